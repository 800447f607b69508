"""The synthetic cohort: reproducible, 12-bit MONOCHROME2, and carrying the signs the model is meant to learn."""

from __future__ import annotations

import numpy as np

from service.training.synthetic import (
    FINDINGS,
    render_chest_radiograph,
    sample_clinical,
    sample_findings,
)

CLINICAL_KEYS = {
    "age",
    "sex",
    "temperature",
    "heart_rate",
    "respiratory_rate",
    "spo2",
    "leukocytes",
    "crp",
    "nt_probnp",
    "systolic_bp",
}


def _patient(seed: int) -> tuple[dict[str, bool], np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    findings = sample_findings(rng)
    return findings, render_chest_radiograph(rng, findings), sample_clinical(rng, findings)


def _central_bright_width(image: np.ndarray) -> float:
    """Mean number of bright pixels per row across the thorax at heart level (the silhouette's width)."""
    n = image.shape[0]
    rows = image[int(n * 0.6) : int(n * 0.72), int(n * 0.12) : int(n * 0.88)].astype(np.float64)
    lung, dense = np.percentile(rows, [10, 95])
    return float((rows > (lung + dense) / 2).sum(axis=1).mean())


def test_same_seed_gives_same_patient() -> None:
    findings_a, image_a, clinical_a = _patient(7)
    findings_b, image_b, clinical_b = _patient(7)

    assert findings_a == findings_b
    assert np.array_equal(image_a, image_b)
    assert clinical_a == clinical_b


def test_different_seeds_give_different_images() -> None:
    assert not np.array_equal(_patient(1)[1], _patient(2)[1])


def test_image_is_12_bit_uint16_of_the_requested_size() -> None:
    rng = np.random.default_rng(0)
    for size in (512, 256):
        for _ in range(5):
            image = render_chest_radiograph(rng, {name: True for name in FINDINGS}, size=size)
            assert image.dtype == np.uint16
            assert image.shape == (size, size)
            assert int(image.max()) <= 4095
            assert int(image.max()) > int(image.min())


def test_lungs_are_darker_than_the_mediastinum() -> None:
    # MONOCHROME2: dense is bright, so the midline (spine, heart) must outshine the lung fields.
    image = render_chest_radiograph(np.random.default_rng(0), {}).astype(np.float64)
    n = image.shape[0]
    rows = slice(int(n * 0.35), int(n * 0.45))
    lung = image[rows, int(n * 0.25) : int(n * 0.32)].mean()
    midline = image[rows, int(n * 0.48) : int(n * 0.52)].mean()
    assert midline > lung * 1.3


def test_cardiomegaly_widens_the_central_silhouette() -> None:
    rng = np.random.default_rng(3)
    normal = [_central_bright_width(render_chest_radiograph(rng, {"cardiomegaly": False})) for _ in range(15)]
    enlarged = [_central_bright_width(render_chest_radiograph(rng, {"cardiomegaly": True})) for _ in range(15)]

    assert np.mean(enlarged) > 1.15 * np.mean(normal)


def test_pneumonia_raises_mean_crp() -> None:
    rng = np.random.default_rng(5)

    def mean_crp(pneumonia: bool) -> float:
        values = [sample_clinical(rng, {"pneumonia": pneumonia})["crp"] for _ in range(400)]
        present = [v for v in values if v is not None]
        return float(np.mean(present))

    assert mean_crp(True) > 4 * mean_crp(False)


def test_nt_probnp_is_raised_with_edema() -> None:
    rng = np.random.default_rng(6)

    def median_probnp(edema: bool) -> float:
        values = [sample_clinical(rng, {"pulmonary_edema": edema}, age_years=70.0)["nt_probnp"] for _ in range(300)]
        return float(np.median([v for v in values if v is not None]))

    assert median_probnp(True) > 3 * median_probnp(False)


def test_clinical_has_every_key_and_labs_go_missing() -> None:
    rng = np.random.default_rng(8)
    samples = [sample_clinical(rng, sample_findings(rng)) for _ in range(600)]

    assert all(set(sample) == CLINICAL_KEYS for sample in samples)
    assert all(sample["sex"] in ("male", "female") and sample["age"] is not None for sample in samples)
    missing_probnp = np.mean([sample["nt_probnp"] is None for sample in samples])
    missing_heart_rate = np.mean([sample["heart_rate"] is None for sample in samples])
    assert 0.4 < missing_probnp < 0.6
    assert 0.03 < missing_heart_rate < 0.2


def test_age_is_taken_when_given() -> None:
    assert sample_clinical(np.random.default_rng(0), {}, age_years=42.5)["age"] == 42.5


def test_findings_have_plausible_prevalence() -> None:
    rng = np.random.default_rng(9)
    draws = [sample_findings(rng) for _ in range(3000)]

    for name in FINDINGS:
        prevalence = np.mean([draw[name] for draw in draws])
        assert 0.05 < prevalence < 0.35, name
    edema_with = np.mean([d["pulmonary_edema"] for d in draws if d["cardiomegaly"]])
    edema_without = np.mean([d["pulmonary_edema"] for d in draws if not d["cardiomegaly"]])
    assert edema_with > 2 * edema_without


def test_one_patient_looks_alike_at_every_render_size() -> None:
    # A DICOM cohort may render at 1024 or more; the model sees 256. Both must show the same patient, and the
    # generator must be left in the same state so that the clinical values drawn next are the same too.
    findings = {name: True for name in FINDINGS}
    resized = []
    next_draws = []
    for size in (512, 1024):
        rng = np.random.default_rng(11)
        image = render_chest_radiograph(rng, findings, size=size).astype(np.float64)
        factor = size // 256
        resized.append(image.reshape(256, factor, 256, factor).mean(axis=(1, 3)))
        next_draws.append(sample_clinical(rng, findings))

    assert np.corrcoef(resized[0].ravel(), resized[1].ravel())[0, 1] > 0.995
    assert np.abs(resized[0] - resized[1]).mean() < 0.05 * resized[0].std()
    assert next_draws[0] == next_draws[1]
