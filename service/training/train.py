"""Train the demonstration model ``cxr-fusion`` on synthetic data and write it into a model repository.

The cohort goes through the service's own pre-processing (``prepare_image`` and ``clinical_vector``) so that the
exported model sees at serving time exactly what it saw here. The result is a model folder the service can load:
``<out>/cxr-fusion/manifest.yaml``, ``MODEL_CARD.md`` and ``1/model.onnx``.

Run it with ``python -m service.training.train --out models``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import math
import multiprocessing
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn import functional

from service.errors import ModelError
from service.inference.manifest import (
    ClinicalFeature,
    FeatureSource,
    ImagePreprocessing,
    Manifest,
    Normalization,
    load_manifest,
)
from service.inference.preprocess import clinical_vector, prepare_image
from service.schemas import ClinicalContext, ObservationFact
from service.training.model import FusionNet
from service.training.synthetic import FINDINGS, render_chest_radiograph, sample_clinical, sample_findings

logger = logging.getLogger(__name__)

MODEL_NAME = "cxr-fusion"
MODEL_VERSION = "1"
INTENDED_USE = "Demonstration on synthetic data — not for clinical use."
SNOMED = "http://snomed.info/sct"
IMAGE_SIZE = 256
RENDER_SIZE = 512
OPSET = 17
PARITY_TOLERANCE = 1e-4

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

MODALITY_DROPOUT = 0.3
AUX_LOSS_WEIGHT = 0.5
BATCH_SIZE = 32


@dataclass
class Cohort:
    """One split of synthetic patients, as the service would see them."""

    findings: np.ndarray  # float32 [n, findings], 1 = present
    images: np.ndarray  # float32 [n, 1, 256, 256], prepared with unit normalization
    contexts: list[ClinicalContext]
    study_times: list[dt.datetime]


def _features(means: list[float] | None = None, stds: list[float] | None = None) -> list[ClinicalFeature]:
    features = []
    for i, (name, display, source, unit, lookback) in enumerate(CLINICAL_FEATURES):
        features.append(
            ClinicalFeature(
                name=name,
                display=display,
                source=source,
                unit=unit,
                lookback_hours=lookback,
                mean=0.0 if means is None else means[i],
                std=1.0 if stds is None else stds[i],
            )
        )
    return features


def _image_spec(mean: float = 0.0, std: float = 1.0) -> ImagePreprocessing:
    return ImagePreprocessing(
        window="dicom", resize=(IMAGE_SIZE, IMAGE_SIZE), normalization=Normalization(mean=mean, std=std)
    )


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


def _make_case(
    key: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, ClinicalContext, dt.datetime]:
    """One synthetic patient, from its own seed so that cases can be made in any order, in any process."""
    seed, split, index = key
    rng = np.random.default_rng([seed, split, index])
    case = sample_findings(rng)
    stored = render_chest_radiograph(rng, case, size=RENDER_SIZE)
    # A random modality LUT: the service windows after Rescale Slope/Intercept, so training must too.
    slope = float(rng.choice([1.0, 1.0, 0.5, 2.0]))
    intercept = float(rng.choice([0.0, 0.0, -1024.0]))
    pixels = stored.astype(np.float32) * slope + intercept
    image = prepare_image(
        pixels, photometric_interpretation="MONOCHROME2", window=_window(rng, pixels), spec=_image_spec()
    )
    study_at = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    context = _clinical_context(rng, sample_clinical(rng, case), study_at=study_at, case_id=f"{split}-{index}")
    return np.array([case[name] for name in FINDINGS], dtype=np.float32), image, context, study_at


def _make_cohort(seed: int, n: int, *, split: int, workers: int) -> Cohort:
    """Render and pre-process ``n`` patients (images with unit normalization), in ``workers`` processes."""
    findings = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    images = np.zeros((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    contexts: list[ClinicalContext] = []
    study_times: list[dt.datetime] = []
    keys = [(seed, split, i) for i in range(n)]
    if workers > 1:
        # spawn, not fork: the parent has torch loaded, and forking a process with OpenMP threads can deadlock.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            cases = pool.imap(_make_case, keys, chunksize=32)
            for i, (case_findings, image, context, study_at) in enumerate(cases):
                findings[i], images[i] = case_findings, image
                contexts.append(context)
                study_times.append(study_at)
    else:
        for i, key in enumerate(keys):
            findings[i], images[i], context, study_at = _make_case(key)
            contexts.append(context)
            study_times.append(study_at)
    return Cohort(findings=findings, images=images, contexts=contexts, study_times=study_times)


def _clinical_arrays(cohort: Cohort, features: list[ClinicalFeature]) -> tuple[np.ndarray, np.ndarray]:
    values = np.zeros((len(cohort.contexts), len(features)), dtype=np.float32)
    masks = np.zeros_like(values)
    for i, (context, study_at) in enumerate(zip(cohort.contexts, cohort.study_times, strict=True)):
        values[i], masks[i], _ = clinical_vector(context, features=features, study_at=study_at)
    return values, masks


def _round(value: float) -> float:
    """Statistics as written to the manifest; training uses the rounded values so both agree exactly."""
    return float(f"{value:.6g}")


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic, ties counted half.

    Args:
        labels: 0/1 array.
        scores: array of the same length; higher means more likely positive.

    Returns:
        The AUROC, or NaN when one class is absent.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over ties: each run of equal scores gets the mean of its 1-based positions.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    run_ranks = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_ranks, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _bce(logits: np.ndarray, labels: np.ndarray) -> float:
    # log(1 + exp(-|z|)) form: stable for large logits.
    return float(np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimizing the negative log-likelihood of sigmoid(logit / T).

    Golden-section search on log T in [1/8, 8]; NLL is unimodal in T for a fixed ranking.
    """
    low, high = math.log(0.125), math.log(8.0)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a = high - ratio * (high - low)
    b = low + ratio * (high - low)
    fa, fb = _bce(logits / math.exp(a), labels), _bce(logits / math.exp(b), labels)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _bce(logits / math.exp(a), labels)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _bce(logits / math.exp(b), labels)
    return math.exp((low + high) / 2.0)


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability threshold maximizing sensitivity + specificity - 1 (Youden's J)."""
    labels = labels.astype(bool)
    candidates = np.unique(probabilities)
    best, best_j = 0.5, -1.0
    n_pos, n_neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    for threshold in candidates:
        predicted = probabilities >= threshold
        j = (predicted & labels).sum() / n_pos - (predicted & ~labels).sum() / n_neg
        if j > best_j:
            best, best_j = float(threshold), float(j)
    return best


def _predict(
    model: FusionNet, images: torch.Tensor, values: torch.Tensor, masks: torch.Tensor, *, batch_size: int = 64
) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            stop = start + batch_size
            logits, _ = model(images[start:stop], values[start:stop], masks[start:stop])
            out.append(logits.numpy())
    return np.concatenate(out)


def _train(
    model: FusionNet,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray],
    *,
    epochs: int,
    generator: torch.Generator,
) -> None:
    images, values, masks, labels = data
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            batch_values, batch_masks = values[index], masks[index]
            # Modality dropout: whole clinical vector and mask gone, as for a patient with no FHIR record,
            # so the model still answers from the image alone.
            keep = (torch.rand(index.shape[0], 1, generator=generator) >= MODALITY_DROPOUT).float()
            logits, image_logits, _ = model.forward_with_aux(images[index], batch_values * keep, batch_masks * keep)
            target = labels[index]
            # The auxiliary image-only loss trains the CAM projection, which the heatmap output shows.
            loss = functional.binary_cross_entropy_with_logits(logits, target)
            loss = loss + AUX_LOSS_WEIGHT * functional.binary_cross_entropy_with_logits(image_logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * index.shape[0]
        val_logits = _predict(model, *validation[:3])
        val_aurocs = [auroc(validation[3][:, k], val_logits[:, k]) for k in range(len(FINDINGS))]
        logger.info(
            "epoch %d/%d  loss %.4f  val macro AUROC %.3f  (%s)  %.0f s",
            epoch + 1,
            epochs,
            total / n,
            float(np.nanmean(val_aurocs)),
            " ".join(f"{a:.3f}" for a in val_aurocs),
            time.perf_counter() - started,
        )


def _export_onnx(model: FusionNet, path: Path, example: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript; the graph
        # here is plain convolutions and linear layers, well within what the TorchScript exporter handles.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image", "clinical", "clinical_mask"],
            output_names=["logits", "heatmap"],
            dynamic_axes={name: {0: "batch"} for name in ("image", "clinical", "clinical_mask", "logits", "heatmap")},
            do_constant_folding=True,
        )


def _check_parity(
    model: FusionNet, path: Path, example: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """Max abs difference of logits and heatmap between PyTorch and ONNX Runtime on one batch.

    Raises:
        ModelError: the logits differ by ``PARITY_TOLERANCE`` or more.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_heatmap = session.run(
        ["logits", "heatmap"],
        {"image": example[0].numpy(), "clinical": example[1].numpy(), "clinical_mask": example[2].numpy()},
    )
    model.eval()
    with torch.no_grad():
        torch_logits, torch_heatmap = model(*example)
    logits_diff = float(np.max(np.abs(onnx_logits - torch_logits.numpy())))
    heatmap_diff = float(np.max(np.abs(onnx_heatmap - torch_heatmap.numpy())))
    if not logits_diff < PARITY_TOLERANCE:
        raise ModelError(f"ONNX Runtime logits differ from PyTorch by {logits_diff:.3g} (limit {PARITY_TOLERANCE})")
    return logits_diff, heatmap_diff


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(
    *,
    sha256: str,
    image_spec: ImagePreprocessing,
    features: list[ClinicalFeature],
    temperatures: list[float],
    thresholds: list[float],
) -> Manifest:
    return Manifest.model_validate(
        {
            "name": MODEL_NAME,
            "description": "Chest radiograph (PA) + clinical context -> five findings; gated intermediate-fusion CNN.",
            "intended_use": INTENDED_USE,
            "versions": [{"version": MODEL_VERSION, "artifact": f"{MODEL_VERSION}/model.onnx", "sha256": sha256}],
            "routing": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "min_rows": 256, "min_columns": 256},
            "image_input": {
                "name": "image",
                "shape": [1, IMAGE_SIZE, IMAGE_SIZE],
                "preprocessing": image_spec.model_dump(),
            },
            "clinical_input": {
                "values_name": "clinical",
                "mask_name": "clinical_mask",
                "features": [feature.model_dump() for feature in features],
            },
            "outputs": {
                "logits": "logits",
                "heatmap": "heatmap",
                "findings": [
                    {
                        "code": code,
                        "system": SNOMED,
                        "display": display,
                        "threshold": round(threshold, 4),
                        "calibration": {"method": "temperature", "temperature": round(temperature, 4)},
                    }
                    for (_, display, code), threshold, temperature in zip(
                        FINDING_CODES, thresholds, temperatures, strict=True
                    )
                ],
            },
            "batching": {"preferred_batch_size": 8, "max_batch_size": 32},
        }
    )


def _model_card(
    *,
    n_train: int,
    n_val: int,
    epochs: int,
    seed: int,
    aurocs: list[float],
    image_only_aurocs: list[float],
    prevalences: list[float],
    thresholds: list[float],
    temperatures: list[float],
    parity: float,
    model_bytes: int,
    sha256: str,
) -> str:
    rows = "\n".join(
        f"| {display} | {code} | {prevalence:.1%} | {a:.3f} | {b:.3f} | {threshold:.3f} | {temperature:.2f} |"
        for (_, display, code), prevalence, a, b, threshold, temperature in zip(
            FINDING_CODES, prevalences, aurocs, image_only_aurocs, thresholds, temperatures, strict=True
        )
    )
    features = "\n".join(
        f"| {name} | {display} | {unit or '—'} | {'any' if lookback is None else f'{lookback:g} h'} |"
        for name, display, _, unit, lookback in CLINICAL_FEATURES
    )
    return f"""# Model card: {MODEL_NAME} version {MODEL_VERSION}

**{INTENDED_USE}** This model is a demonstration of the clinfer service's multimodal pipeline. It is not a
medical device, has never seen a real radiograph or a real patient record, and must not inform any clinical
decision.

## Intended use
Exercise the service end to end (DICOM + FHIR in, structured findings out) with a model whose inputs and outputs
have the shape of a real chest radiograph triage model. Out of scope: any use on real patients, any performance
claim.

## Model
Intermediate fusion network (`service/training/model.py`, `FusionNet`): a small CNN encodes the radiograph
(1×{IMAGE_SIZE}×{IMAGE_SIZE}, last feature map 16×16), an MLP encodes the clinical values concatenated with their
missing-mask, a gate computed from both embeddings mixes them per feature, and a multi-label head gives one logit
per finding. A per-finding 1×1 projection of the image feature map (trained as an auxiliary image-only classifier)
gives the class-activation heatmap. Trained with modality dropout ({MODALITY_DROPOUT:.0%} of samples lose their
whole clinical vector) so that it answers from the image alone when no clinical data is available.

- Artifact: `{MODEL_VERSION}/model.onnx`, ONNX opset {OPSET}, {model_bytes / 1e6:.2f} MB, sha256 `{sha256}`.
- PyTorch ↔ ONNX Runtime parity on a validation batch: max |Δ logit| = {parity:.2e}.

## Inputs
- `image` float32 [batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]: a PA chest radiograph (CR/DX, BodyPartExamined CHEST,
  at least 256×256), windowed with the object's first VOI window (else the 0.5–99.5 percentiles), MONOCHROME1
  inverted, resized, normalized with the training images' mean and standard deviation (see `manifest.yaml`).
- `clinical` float32 [batch, {len(CLINICAL_FEATURES)}] z-scored with the training statistics, and `clinical_mask`
  float32 [batch, {len(CLINICAL_FEATURES)}] with 1 = present. A missing value is 0 with mask 0.

| feature | display | canonical unit | lookback |
|---|---|---|---|
{features}

## Outputs
- `logits` float32 [batch, 5]; probability = sigmoid(logit / T) with the per-finding temperature T below; a
  finding is positive when its probability reaches the threshold.
- `heatmap` float32 [batch, 5, 16, 16] in [0, 1]: sigmoid of the per-location image-only logits (class activation
  map). It shows where the image branch saw evidence; it does not include the clinical contribution.

## Data
Entirely synthetic (`service/training/synthetic.py`), seed {seed}: {n_train} training and {n_val} validation
patients. Procedural radiographs (512×512, 12-bit, random exposure, positioning, noise and Rescale/VOI attributes)
show each finding with a random conspicuity, from obvious to nearly invisible; clinical values are drawn from
distributions that depend on the findings (fever, leukocytosis and CRP with pneumonia; NT-proBNP with edema and
cardiomegaly; hypoxaemia and tachypnoea with pneumothorax), each vital sign or lab missing independently (10–50%).
Findings co-occur (edema with cardiomegaly; effusion with edema, cardiomegaly or pneumonia). Training: {epochs}
epochs.

## Validation (synthetic validation split, {n_val} patients)
Temperatures were fit and thresholds chosen (Youden's J) on this same split, so the thresholds are optimistic.

| finding | SNOMED CT | prevalence | AUROC (fusion) | AUROC (image only, clinical withheld) | threshold | T |
|---|---|---|---|---|---|---|
{rows}

Macro AUROC: fusion **{float(np.mean(aurocs)):.3f}**, image only {float(np.mean(image_only_aurocs)):.3f}.

## Limitations
- Synthetic data only: the figures above say the pipeline works, nothing about performance on real radiographs,
  where this model would fail. Real anatomy, devices, projections (AP, lateral), paediatric patients and other
  findings are absent.
- The synthetic clinical distributions are invented and simplified; the model's reliance on them does not reflect
  real clinical associations.
- Thresholds and temperatures were tuned on the validation split that also gives the AUROCs; there is no external
  test set.
- The heatmap is a coarse (16×16) class-activation map of the image branch, not a segmentation.
"""


def build_cxr_fusion(
    out_dir: Path, *, n_train: int = 3000, n_val: int = 600, epochs: int = 8, seed: int = 0, workers: int = 2
) -> dict:
    """Generate the synthetic cohort, train, calibrate, export and write the model folder.

    Args:
        out_dir: the model repository; the model goes to ``out_dir/cxr-fusion/``.
        n_train: training patients.
        n_val: validation patients (calibration, thresholds and reported AUROCs).
        epochs: training epochs.
        seed: seeds the cohort and the network; the same seed gives the same model.
        workers: processes rendering the cohort; the cohort does not depend on it.

    Returns:
        A summary: paths, per-finding and macro AUROC, parity difference, model size, wall time.

    Raises:
        ModelError: the exported ONNX model does not match PyTorch, or the written manifest does not validate.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)

    logger.info("rendering %d training and %d validation patients in %d processes", n_train, n_val, workers)
    train = _make_cohort(seed, n_train, split=0, workers=workers)
    val = _make_cohort(seed, n_val, split=1, workers=workers)
    logger.info("cohort ready in %.0f s", time.perf_counter() - started)

    # Normalization statistics from the training split only, rounded as the manifest writes them.
    image_spec = _image_spec(mean=_round(float(train.images.mean())), std=_round(float(train.images.std())))
    for cohort in (train, val):
        # Same arithmetic as prepare_image's normalization step, applied in place to save a second pass.
        cohort.images -= np.float32(image_spec.normalization.mean)
        cohort.images /= np.float32(image_spec.normalization.std)
    raw_values, raw_masks = _clinical_arrays(train, _features())
    present = raw_masks.astype(bool)
    means = [_round(float(raw_values[present[:, k], k].mean())) for k in range(raw_values.shape[1])]
    stds = [_round(max(float(raw_values[present[:, k], k].std()), 1e-3)) for k in range(raw_values.shape[1])]
    features = _features(means, stds)
    train_values, train_masks = _clinical_arrays(train, features)
    val_values, val_masks = _clinical_arrays(val, features)

    train_tensors = (
        torch.from_numpy(train.images),
        torch.from_numpy(train_values),
        torch.from_numpy(train_masks),
        torch.from_numpy(train.findings),
    )
    val_tensors = (torch.from_numpy(val.images), torch.from_numpy(val_values), torch.from_numpy(val_masks))
    model = FusionNet(n_clinical=len(features), n_findings=len(FINDINGS))
    generator = torch.Generator().manual_seed(seed)
    _train(model, train_tensors, (*val_tensors, val.findings), epochs=epochs, generator=generator)

    val_logits = _predict(model, *val_tensors)
    image_only_logits = _predict(
        model, val_tensors[0], torch.zeros_like(val_tensors[1]), torch.zeros_like(val_tensors[2])
    )
    aurocs = [auroc(val.findings[:, k], val_logits[:, k]) for k in range(len(FINDINGS))]
    image_only_aurocs = [auroc(val.findings[:, k], image_only_logits[:, k]) for k in range(len(FINDINGS))]
    temperatures = [fit_temperature(val_logits[:, k], val.findings[:, k]) for k in range(len(FINDINGS))]
    thresholds = [
        youden_threshold(val.findings[:, k], 1.0 / (1.0 + np.exp(-val_logits[:, k] / temperatures[k])))
        for k in range(len(FINDINGS))
    ]

    model_dir = out_dir / MODEL_NAME
    onnx_path = model_dir / MODEL_VERSION / "model.onnx"
    example = tuple(t[:16] for t in val_tensors)
    _export_onnx(model, onnx_path, example)  # type: ignore[arg-type]
    parity, heatmap_parity = _check_parity(model, onnx_path, example)  # type: ignore[arg-type]
    sha256 = _sha256(onnx_path)
    model_bytes = onnx_path.stat().st_size

    manifest = _manifest(
        sha256=sha256, image_spec=image_spec, features=features, temperatures=temperatures, thresholds=thresholds
    )
    manifest_path = model_dir / "manifest.yaml"
    manifest_path.write_text(
        yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120),
        encoding="utf-8",
    )
    if load_manifest(manifest_path) != manifest:
        raise ModelError(f"manifest {manifest_path} does not read back as written")
    card_path = model_dir / "MODEL_CARD.md"
    card_path.write_text(
        _model_card(
            n_train=n_train,
            n_val=n_val,
            epochs=epochs,
            seed=seed,
            aurocs=aurocs,
            image_only_aurocs=image_only_aurocs,
            prevalences=[float(p) for p in val.findings.mean(axis=0)],
            thresholds=thresholds,
            temperatures=temperatures,
            parity=parity,
            model_bytes=model_bytes,
            sha256=sha256,
        ),
        encoding="utf-8",
    )
    return {
        "manifest": str(manifest_path),
        "model": str(onnx_path),
        "model_card": str(card_path),
        "sha256": sha256,
        "model_bytes": model_bytes,
        "auroc": dict(zip(FINDINGS, aurocs, strict=True)),
        "macro_auroc": float(np.mean(aurocs)),
        "image_only_auroc": dict(zip(FINDINGS, image_only_aurocs, strict=True)),
        "image_only_macro_auroc": float(np.mean(image_only_aurocs)),
        "temperatures": dict(zip(FINDINGS, temperatures, strict=True)),
        "thresholds": dict(zip(FINDINGS, thresholds, strict=True)),
        "parity_max_abs_diff_logits": parity,
        "parity_max_abs_diff_heatmap": heatmap_parity,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Train the demonstration model {MODEL_NAME} on synthetic data.")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = build_cxr_fusion(args.out, seed=args.seed)
    print(f"wrote {summary['manifest']} and {summary['model']} ({summary['model_bytes'] / 1e6:.2f} MB)")
    print("validation AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["auroc"].items()))
    print(f"macro AUROC {summary['macro_auroc']:.3f} (image only {summary['image_only_macro_auroc']:.3f})")
    print(f"parity max |Δ logit| {summary['parity_max_abs_diff_logits']:.2e}; total {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
