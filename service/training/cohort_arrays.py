"""The training cohort of ``cxr-fusion`` as arrays: rendered once, pre-processed as the service would, cached.

Every patient goes through the service's own pre-processing (``prepare_image`` and ``clinical_vector``) so that
the exported model sees at serving time exactly what it saw in training. Three splits, each from its own seed
stream: ``train`` (fitting), ``validation`` (calibration and thresholds) and ``test`` (held-out evaluation
only). The result is cached as one ``.npz`` keyed by seed, sizes and the generator's source, so that ``train``,
``export`` and ``evaluate`` all read the same arrays. (``cohort_files`` writes a cohort as DICOM and FHIR files
instead, for the service's ingest.)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.manifest import ClinicalFeature, FeatureSource, ImagePreprocessing, Normalization
from service.inference.preprocess import clinical_vector, prepare_image
from service.schemas import ClinicalContext, ObservationFact
from service.training import synthetic
from service.training.progress import Progress
from service.training.synthetic import FINDINGS, render_chest_radiograph, sample_clinical, sample_findings

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
IMAGE_SIZE = 256
RENDER_SIZE = 512
# Images are cached as windowed [0, 1] values in 16 bits: a quarter of float32's size, 1.5e-5 resolution.
_QUANTUM = 65535.0

# (name, display, source, canonical UCUM unit, lookback hours), in the model's input order.
CLINICAL_FEATURES: tuple[tuple[str, str, FeatureSource, str | None, float | None], ...] = (
    ("age", "Age at study", FeatureSource(kind="age_at_study"), "a", None),
    ("sex_male", "Sex (male)", FeatureSource(kind="patient_gender", gender_value="male"), None, None),
    ("temperature", "Body temperature", FeatureSource(kind="observation", loinc=["8310-5"]), "Cel", 48),
    ("heart_rate", "Heart rate", FeatureSource(kind="observation", loinc=["8867-4"]), "/min", 48),
    ("respiratory_rate", "Respiratory rate", FeatureSource(kind="observation", loinc=["9279-1"]), "/min", 48),
    (
        "spo2",
        "Oxygen saturation (pulse oximetry)",
        FeatureSource(kind="observation", loinc=["59408-5", "2708-6"]),
        "%",
        48,
    ),
    ("leukocytes", "Leukocytes in blood", FeatureSource(kind="observation", loinc=["6690-2"]), "10*3/uL", 168),
    ("crp", "C reactive protein", FeatureSource(kind="observation", loinc=["1988-5"]), "mg/L", 168),
    ("nt_probnp", "NT-proBNP", FeatureSource(kind="observation", loinc=["33762-6"]), "pg/mL", 720),
    ("systolic_bp", "Systolic blood pressure", FeatureSource(kind="observation", loinc=["8480-6"]), "mm[Hg]", 48),
)

# (synthetic finding name, display, SNOMED CT code), in the model's output order.
FINDING_CODES: tuple[tuple[str, str, str], ...] = (
    ("pneumonia", "Pneumonia", "233604007"),
    ("cardiomegaly", "Cardiomegaly", "8186001"),
    ("pleural_effusion", "Pleural effusion", "60046008"),
    ("pulmonary_edema", "Pulmonary edema", "19242006"),
    ("pneumothorax", "Pneumothorax", "36118008"),
)
assert tuple(name for name, _, _ in FINDING_CODES) == FINDINGS


@dataclass
class Split:
    """One split as arrays. Images are windowed to [0, 1] (not yet normalized), clinical values raw."""

    labels: np.ndarray  # float32 [n, findings], 1 = present
    images: np.ndarray  # uint16 [n, 1, size, size]: windowed value * 65535
    raw_values: np.ndarray  # float64 [n, features] in canonical units, 0 where missing
    masks: np.ndarray  # float32 [n, features], 1 = present
    ages: np.ndarray  # float64 [n], years at the study
    male: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_SPLIT_FIELDS = tuple(field.name for field in fields(Split))


@dataclass
class Normalizer:
    """Training-split statistics, rounded as the manifest writes them, so training and serving agree exactly."""

    image_mean: float
    image_std: float
    feature_means: list[float]
    feature_stds: list[float]

    def images(self, quantized: np.ndarray) -> np.ndarray:
        """uint16 cached images -> float32 model input, with ``prepare_image``'s normalization arithmetic."""
        windowed = quantized.astype(np.float32) / np.float32(_QUANTUM)
        return (windowed - np.float32(self.image_mean)) / np.float32(self.image_std)

    def clinical(self, raw_values: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Raw values -> z-scores as ``clinical_vector`` computes them (float64, then float32), 0 where masked."""
        z = (raw_values - np.asarray(self.feature_means)) / np.asarray(self.feature_stds)
        return np.where(masks > 0, z, 0.0).astype(np.float32)

    def features(self) -> list[ClinicalFeature]:
        return clinical_features(self.feature_means, self.feature_stds)

    def image_spec(self, image_size: int) -> ImagePreprocessing:
        return image_spec(image_size, mean=self.image_mean, std=self.image_std)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "feature_means": self.feature_means,
            "feature_stds": self.feature_stds,
        }


def features_from_table(
    table: tuple[tuple[str, str, FeatureSource, str | None, float | None], ...] | list[Any],
    means: list[float] | None = None,
    stds: list[float] | None = None,
) -> list[ClinicalFeature]:
    """Manifest clinical features from a (name, display, source, unit, lookback) table, with normalization
    statistics (identity when None)."""
    return [
        ClinicalFeature(
            name=name,
            display=display,
            source=source,
            unit=unit,
            lookback_hours=lookback,
            mean=0.0 if means is None else means[i],
            std=1.0 if stds is None else stds[i],
        )
        for i, (name, display, source, unit, lookback) in enumerate(table)
    ]


def clinical_features(means: list[float] | None = None, stds: list[float] | None = None) -> list[ClinicalFeature]:
    """cxr-fusion's clinical features, with normalization statistics (identity when None)."""
    return features_from_table(CLINICAL_FEATURES, means, stds)


def image_spec(image_size: int, *, mean: float = 0.0, std: float = 1.0) -> ImagePreprocessing:
    return ImagePreprocessing(
        window="dicom", resize=(image_size, image_size), normalization=Normalization(mean=mean, std=std)
    )


def _round(value: float) -> float:
    """Statistics as written to the manifest; training uses the rounded values so both agree exactly."""
    return float(f"{value:.6g}")


def fit_normalizer(train: Split, *, chunk: int = 256) -> Normalizer:
    """Image and clinical normalization statistics from the training split only."""
    # Sums in float64 over chunks: exact enough, without a float copy of the whole split in memory.
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(train), chunk):
        block = train.images[start : start + chunk].astype(np.float64) / _QUANTUM
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
        count += block.size
    mean = total / count
    std = max(total_sq / count - mean * mean, 1e-12) ** 0.5
    present = train.masks.astype(bool)
    means, stds = [], []
    for k in range(train.raw_values.shape[1]):
        values = train.raw_values[present[:, k], k]
        means.append(_round(float(values.mean())) if values.size else 0.0)
        stds.append(_round(max(float(values.std()), 1e-3)) if values.size else 1.0)
    return Normalizer(image_mean=_round(mean), image_std=_round(std), feature_means=means, feature_stds=stds)


def _clinical_context(
    rng: np.random.Generator, clinical: dict[str, Any], *, study_at: dt.datetime, case_id: str
) -> ClinicalContext:
    """Turn sampled values into the facts the FHIR ingest would have stored for this patient."""
    birth_date = (study_at - dt.timedelta(days=clinical["age"] * 365.2425)).date()
    observations = []
    for name, _, source, unit, _ in CLINICAL_FEATURES:
        value = clinical.get(name)
        if source.kind != "observation" or value is None or unit is None:
            continue
        # Pulse oximeters report under either code; the service must accept both.
        loinc = source.loinc[0] if len(source.loinc) == 1 or rng.random() < 0.8 else source.loinc[1]
        observations.append(
            ObservationFact(
                resource_id=f"{case_id}-{name}",
                patient_ref="Patient/x",
                loinc=loinc,
                value=value,
                ucum_unit=unit,
                original_value=value,
                original_unit=unit,
                effective_at=study_at - dt.timedelta(hours=float(rng.uniform(0.25, 6.0))),
                status="final",
            )
        )
    return ClinicalContext(gender=clinical["sex"], birth_date=birth_date, observations=observations)


def _window(rng: np.random.Generator, pixels: np.ndarray) -> tuple[float, float] | None:
    """A VOI window as a modality would store it, or None (then the service windows on percentiles)."""
    if rng.random() < 0.3:
        return None
    sample = pixels[::4, ::4]
    low, high = (float(v) for v in np.percentile(sample, (1.0, 99.5)))
    center = (low + high) / 2.0 + rng.uniform(-0.05, 0.05) * (high - low)
    width = (high - low) * rng.uniform(0.9, 1.25)
    return center, width


_Case = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, bool]


def make_case(key: tuple[int, int, int, int, int]) -> _Case:
    """One synthetic patient, from its own seed so that cases can be made in any order, in any process.

    Args:
        key: (seed, split number, index, image size, render size).

    Returns:
        (labels, quantized image [1, size, size], raw clinical values, mask, age, male).
    """
    seed, split, index, image_size, render_size = key
    rng = np.random.default_rng([seed, split, index])
    case = sample_findings(rng)
    stored = render_chest_radiograph(rng, case, size=render_size)
    # A random modality LUT: the service windows after Rescale Slope/Intercept, so training must too.
    slope = float(rng.choice([1.0, 1.0, 0.5, 2.0]))
    intercept = float(rng.choice([0.0, 0.0, -1024.0]))
    pixels = stored.astype(np.float32) * slope + intercept
    # Identity normalization here: the training split's statistics are not known before the split is made.
    windowed = prepare_image(
        pixels,
        photometric_interpretation="MONOCHROME2",
        window=_window(rng, pixels),
        spec=image_spec(image_size),
    )
    study_at = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    clinical = sample_clinical(rng, case)
    context = _clinical_context(rng, clinical, study_at=study_at, case_id=f"{split}-{index}")
    _, mask, used = clinical_vector(context, features=clinical_features(), study_at=study_at)
    raw = np.array([0.0 if value.value is None else value.value for value in used], dtype=np.float64)
    quantized = np.rint(np.clip(windowed, 0.0, 1.0) * _QUANTUM).astype(np.uint16)
    labels = np.array([case[name] for name in FINDINGS], dtype=np.float32)
    return labels, quantized, raw, mask, float(raw[0]), clinical["sex"] == "male"


def _cases(keys: list[tuple[int, int, int, int, int]], workers: int) -> Iterator[_Case]:
    if workers > 1:
        # spawn, not fork: the parent has torch loaded, and forking a process with OpenMP threads can deadlock.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(make_case, keys, chunksize=16)
    else:
        yield from map(make_case, keys)


def _empty_split(n: int, image_size: int) -> Split:
    n_features = len(CLINICAL_FEATURES)
    return Split(
        labels=np.zeros((n, len(FINDINGS)), dtype=np.float32),
        images=np.zeros((n, 1, image_size, image_size), dtype=np.uint16),
        raw_values=np.zeros((n, n_features), dtype=np.float64),
        masks=np.zeros((n, n_features), dtype=np.float32),
        ages=np.zeros(n, dtype=np.float64),
        male=np.zeros(n, dtype=bool),
    )


def render_splits(
    seed: int, sizes: dict[str, int], *, image_size: int, render_size: int, workers: int, progress: Progress | None
) -> dict[str, Split]:
    """Render and pre-process every split (one pool for all); the result does not depend on ``workers``."""
    splits = {name: _empty_split(sizes[name], image_size) for name in SPLITS}
    keys = [
        (seed, number, index, image_size, render_size)
        for number, name in enumerate(SPLITS)
        for index in range(sizes[name])
    ]
    for (_, number, index, _, _), (labels, image, raw, mask, age, male) in zip(
        keys, _cases(keys, workers), strict=True
    ):
        out = splits[SPLITS[number]]
        out.labels[index], out.images[index], out.raw_values[index], out.masks[index] = labels, image, raw, mask
        out.ages[index], out.male[index] = age, male
        if progress is not None:
            progress.update()
    return splits


def generator_fingerprint() -> str:
    """A short digest of the code that makes a cohort: a changed generator must not reuse an old cache."""
    digest = hashlib.sha256(inspect.getsource(synthetic).encode("utf-8"))
    for function in (make_case, _clinical_context, _window):
        digest.update(inspect.getsource(function).encode("utf-8"))
    return digest.hexdigest()[:10]


def cache_path(work_dir: Path, *, seed: int, sizes: dict[str, int], image_size: int, render_size: int) -> Path:
    counts = "-".join(f"{sizes[name]}" for name in SPLITS)
    return work_dir / f"cohort-seed{seed}-n{counts}-img{image_size}-render{render_size}-{GENERATOR_FINGERPRINT}.npz"


def load_or_render(
    work_dir: Path,
    *,
    seed: int,
    sizes: dict[str, int],
    image_size: int = IMAGE_SIZE,
    render_size: int = RENDER_SIZE,
    workers: int = 2,
    progress: bool = True,
) -> tuple[dict[str, Split], Path]:
    """The cohort's three splits, from the cache in ``work_dir`` or rendered and cached there.

    Args:
        work_dir: where the ``.npz`` lives.
        seed: the cohort's seed; each split draws from its own stream of it.
        sizes: patients per split, keyed by the names of ``SPLITS``.
        image_size: side of the model's input.
        render_size: side of the rendered radiograph (pre-processing resizes it to ``image_size``).
        workers: rendering processes; the cohort does not depend on it.
        progress: show a progress bar on stderr while rendering.

    Returns:
        The splits by name, and the cache file.
    """
    path = cache_path(work_dir, seed=seed, sizes=sizes, image_size=image_size, render_size=render_size)
    if path.exists():
        with np.load(path) as data:
            splits = {name: Split(**{field: data[f"{name}_{field}"] for field in _SPLIT_FIELDS}) for name in SPLITS}
        logger.info("cohort read from %s", path)
        return splits, path
    work_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress("render cohort", sum(sizes.values()), enabled=progress)
    splits = render_splits(seed, sizes, image_size=image_size, render_size=render_size, workers=workers, progress=bar)
    bar.close()
    arrays = {f"{name}_{field}": getattr(split, field) for name, split in splits.items() for field in _SPLIT_FIELDS}
    # Written under a temporary name and renamed: an interrupted run must not leave a truncated cache behind.
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    logger.info("cohort cached in %s", path)
    for stale in work_dir.glob("cohort-*.npz"):
        if stale != path and ".partial" not in stale.name:
            # Caches of other sizes or of an older generator: hundreds of MB each, and never read again here.
            logger.info("removing stale cohort cache %s", stale)
            stale.unlink(missing_ok=True)
    return splits, path


# Computed once, at import: a process that edits nothing sees one fingerprint from start to end.
GENERATOR_FINGERPRINT = generator_fingerprint()
