"""The synthetic head CT cohort: reproducible, in Hounsfield units, and showing the bleeds the model must learn."""

from __future__ import annotations

import numpy as np

from service.training.ct_synthetic import render_head_ct_slice, sample_case

SIZE = 256  # the geometry scales with the image; half size keeps the test fast


def _slice(seed: int, *, hemorrhage: bool, size: int = SIZE) -> np.ndarray:
    return render_head_ct_slice(np.random.default_rng(seed), hemorrhage=hemorrhage, size=size)


def _intracranial(hu: np.ndarray, *, margin: int = 0) -> np.ndarray:
    """Pixels enclosed by the skull ring (bone > 300 HU) along both their row and their column.

    Bone is excluded, and ``margin`` more pixels next to it (the partial-volume edge of the inner table).
    """
    bone = hu > 300
    n = hu.shape[0]
    index = np.arange(n)

    def between(mask: np.ndarray) -> np.ndarray:
        # For each row of ``mask``: pixels after its first and before its last True.
        any_bone = mask.any(axis=1)
        first = np.where(any_bone, mask.argmax(axis=1), n)
        last = np.where(any_bone, n - 1 - mask[:, ::-1].argmax(axis=1), -1)
        return (index[None, :] > first[:, None]) & (index[None, :] < last[:, None])

    enclosed = between(bone) & between(bone.T).T & ~bone
    near_bone = bone.copy()
    for _ in range(margin):
        near_bone[1:] |= near_bone[:-1].copy()
        near_bone[:-1] |= near_bone[1:].copy()
        near_bone[:, 1:] |= near_bone[:, :-1].copy()
        near_bone[:, :-1] |= near_bone[:, 1:].copy()
    return enclosed & ~near_bone


def test_same_seed_gives_same_case_and_slice() -> None:
    assert sample_case(np.random.default_rng(3)) == sample_case(np.random.default_rng(3))
    for hemorrhage in (False, True):
        assert np.array_equal(_slice(3, hemorrhage=hemorrhage), _slice(3, hemorrhage=hemorrhage))
    assert not np.array_equal(_slice(3, hemorrhage=False), _slice(4, hemorrhage=False))


def test_slice_is_int16_hounsfield_units_that_a_12_bit_ct_object_can_store() -> None:
    for size in (512, 256):
        hu = _slice(1, hemorrhage=True, size=size)
        assert hu.dtype == np.int16 and hu.shape == (size, size)
        assert -1024 <= int(hu.min()) and int(hu.max()) <= 3071


def test_air_skull_and_brain_have_their_densities() -> None:
    for seed in range(4):
        hu = _slice(seed, hemorrhage=False).astype(np.float64)
        corners = np.concatenate([hu[:12, :12].ravel(), hu[:12, -12:].ravel(), hu[-12:, :12].ravel()])
        assert -1024 <= corners.min() and corners.max() <= -950, "air outside the head"
        assert abs(np.median(corners) + 1000) < 5
        bone = hu[hu > 300]
        assert bone.size > 0.02 * hu.size, "a skull ring"
        assert 650 <= np.median(bone) <= 1500 and bone.max() <= 1600
        # The partial-volume edge of the skull is neither bone nor brain: leave two pixels out.
        brain = hu[_intracranial(hu.astype(np.int16), margin=2)]
        assert brain.size > 0.2 * hu.size
        assert 25 <= np.median(brain) <= 45, "parenchyma"
        assert np.mean((brain >= 15) & (brain <= 55)) > 0.8, "mostly parenchyma, the rest CSF"
        assert np.mean(brain < 15) > 0.02, "ventricles and sulci hold CSF"
        assert brain.max() < 100, "no bone or blood-bright structure inside the skull without a bleed"


def test_hemorrhage_adds_blood_density_inside_the_skull() -> None:
    gains = []
    for seed in range(12):
        # The same generator state gives the same head and noise; only the bleed (and its mass effect) differs.
        # Full size: the thinnest subdural collections are about a pixel and a half thick at 512.
        without, with_bleed = _slice(seed, hemorrhage=False, size=512), _slice(seed, hemorrhage=True, size=512)
        counts = []
        for hu in (without, with_bleed):
            inside = hu[_intracranial(hu)]
            counts.append(int(((inside >= 55) & (inside <= 90)).sum()))
        assert counts[1] > counts[0], f"seed {seed}: {counts}"
        gains.append(counts[1] - counts[0])
    assert np.median(gains) > 20


def test_cases_have_the_intended_prevalence_associations_and_missingness() -> None:
    rng = np.random.default_rng(0)
    cases = [sample_case(rng) for _ in range(4000)]
    label = np.array([c["hemorrhage"] for c in cases])
    assert 0.31 < label.mean() < 0.39
    assert set(cases[0]) == {"hemorrhage", "age", "systolic_bp", "inr", "gcs"}

    def missing(key: str) -> float:
        return float(np.mean([c[key] is None for c in cases]))

    assert 0.35 < missing("inr") < 0.45 and 0.16 < missing("gcs") < 0.24
    assert missing("age") == 0.0 and missing("systolic_bp") < 0.1

    def mean_of(key: str, positive: bool) -> float:
        return float(
            np.mean([c[key] for c, y in zip(cases, label, strict=True) if y == positive and c[key] is not None])
        )

    assert mean_of("systolic_bp", True) > mean_of("systolic_bp", False) + 8
    assert mean_of("gcs", True) < mean_of("gcs", False) - 1
    assert mean_of("inr", True) > mean_of("inr", False)
    gcs = [c["gcs"] for c in cases if c["gcs"] is not None]
    assert min(gcs) >= 3 and max(gcs) == 15 and all(float(g).is_integer() for g in gcs)
