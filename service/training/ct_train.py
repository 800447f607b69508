"""Train the demonstration model ``ct-head-ich`` on synthetic head CT and write it into a model repository.

A single axial non-contrast head CT slice and four clinical values (age, systolic blood pressure, INR, Glasgow
coma score) -> one logit for intracranial hemorrhage. The second demonstration model has another modality,
another body part, another image size and another clinical vector than ``cxr-fusion``, so that routing and
serving several models are exercised for real.

Each slice goes the way a CT object does: Hounsfield units stored as 12-bit values with RescaleIntercept -1024,
read back through the modality LUT, then the service's own ``prepare_image`` with the brain window (center 40,
width 80) that head CTs carry in WindowCenter/WindowWidth; the clinical vector comes from ``clinical_vector``
on the facts the FHIR ingest would have stored. The exported model therefore sees at serving time exactly what
it saw here. The result is ``<out>/ct-head-ich/manifest.yaml``, ``MODEL_CARD.md`` and ``1/model.onnx``.

Run it with ``python -m service.training.ct_train --out models``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
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
from service.inference.registry import sha256_of
from service.schemas import ClinicalContext, ObservationFact
from service.training.cohort_arrays import features_from_table
from service.training.ct_synthetic import render_head_ct_slice, sample_case
from service.training.export import OPSET, export_onnx
from service.training.measures import auroc, fit_temperature, youden_threshold

logger = logging.getLogger(__name__)

MODEL_NAME = "ct-head-ich"
MODEL_VERSION = "1"
INTENDED_USE = "Demonstration on synthetic data — not for clinical use."
SNOMED = "http://snomed.info/sct"
FINDING_CODE, FINDING_DISPLAY = "1386000", "Intracranial hemorrhage"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RENDER_SIZE = 512
IMAGE_SIZE = 128
# The stored values of a CT object: 12 bits, RescaleSlope 1, RescaleIntercept -1024.
RESCALE_SLOPE, RESCALE_INTERCEPT, MAX_STORED = 1.0, -1024.0, 4095
BRAIN_WINDOW = (40.0, 80.0)  # WindowCenter, WindowWidth
PARITY_TOLERANCE = 1e-4
MODALITY_DROPOUT = 0.3
BATCH_SIZE = 32
LEARNING_RATE = 3e-3

# (name, display, source, canonical UCUM unit, lookback hours), in the model's input order.
CLINICAL_FEATURES: tuple[tuple[str, str, FeatureSource, str, float | None], ...] = (
    ("age", "Age at study", FeatureSource(kind="age_at_study"), "a", None),
    ("systolic_bp", "Systolic blood pressure", FeatureSource(kind="observation", loinc=["8480-6"]), "mm[Hg]", 24),
    ("inr", "INR in platelet poor plasma", FeatureSource(kind="observation", loinc=["6301-6"]), "{INR}", 72),
    ("gcs", "Glasgow coma score total", FeatureSource(kind="observation", loinc=["9269-2"]), "{score}", 24),
)


@dataclass
class Cohort:
    """One split of synthetic patients, as the service would see them."""

    labels: np.ndarray  # float32 [n], 1 = hemorrhage
    images: np.ndarray  # float32 [n, 1, 128, 128], prepared with unit normalization until normalized in place
    contexts: list[ClinicalContext]
    study_times: list[dt.datetime]


class CtHeadNet(nn.Module):
    """A small CNN for the slice and an MLP for the clinical values and their mask, fused by concatenation.

    The image features are pooled both by average and by maximum: a small bleed covers a few dozen of the
    16,384 input pixels, and an average alone would dilute it.
    """

    def __init__(self, n_clinical: int = len(CLINICAL_FEATURES), channels: tuple[int, ...] = (8, 16, 32, 48)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for i, out_channels in enumerate(channels):
            # Halve the resolution, then (past the stem) refine at the new one: 128 -> 64 -> 32 -> 16 -> 8.
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            if 0 < i < len(channels) - 1:
                layers += [
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
            in_channels = out_channels
        self.image_encoder = nn.Sequential(*layers)
        self.image_embedding = nn.Sequential(nn.Linear(2 * in_channels, 32), nn.ReLU(inplace=True))
        # Values and mask together: the network can tell "average" (value 0 after z-scoring) from "missing".
        self.clinical_encoder = nn.Sequential(
            nn.Linear(2 * n_clinical, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True)
        )
        self.head = nn.Sequential(nn.Linear(32 + 16, 32), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, image: torch.Tensor, clinical: torch.Tensor, clinical_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1]."""
        features = self.image_encoder(image)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        image_embedding = self.image_embedding(pooled)
        clinical_embedding = self.clinical_encoder(torch.cat([clinical, clinical_mask], dim=1))
        return self.head(torch.cat([image_embedding, clinical_embedding], dim=1))


def _features(means: list[float] | None = None, stds: list[float] | None = None) -> list[ClinicalFeature]:
    return features_from_table(CLINICAL_FEATURES, means, stds)


def _image_spec(mean: float = 0.0, std: float = 1.0) -> ImagePreprocessing:
    return ImagePreprocessing(
        window="dicom", resize=(IMAGE_SIZE, IMAGE_SIZE), normalization=Normalization(mean=mean, std=std)
    )


def stored_and_back(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units -> 12-bit stored values (as written to PixelData) -> the modality LUT's output.

    Args:
        hu: the rendered slice in HU.

    Returns:
        float32 HU as the service's DICOM decoder returns them: clipped to what 12 stored bits can hold.
    """
    stored = np.clip(np.rint((hu.astype(np.float32) - RESCALE_INTERCEPT) / RESCALE_SLOPE), 0, MAX_STORED)
    return stored.astype(np.uint16).astype(np.float32) * np.float32(RESCALE_SLOPE) + np.float32(RESCALE_INTERCEPT)


def _clinical_context(
    rng: np.random.Generator, case: dict[str, Any], *, study_at: dt.datetime, case_id: str
) -> ClinicalContext:
    """Turn sampled values into the facts the FHIR ingest would have stored for this patient."""
    birth_date = (study_at - dt.timedelta(days=case["age"] * 365.2425)).date()
    observations = []
    for name, _, source, unit, _ in CLINICAL_FEATURES:
        value = case.get(name)
        if source.kind != "observation" or value is None:
            continue
        # Most values were taken in the emergency department; a few the day before, which the lookback
        # window may leave out (masked, as the service would).
        hours_before = rng.uniform(0.25, 6.0) if rng.random() < 0.95 else rng.uniform(26.0, 60.0)
        observations.append(
            ObservationFact(
                resource_id=f"{case_id}-{name}",
                patient_ref="Patient/x",
                loinc=source.loinc[0],
                value=value,
                ucum_unit=unit,
                original_value=value,
                original_unit=unit,
                effective_at=study_at - dt.timedelta(hours=float(hours_before)),
                status="final",
            )
        )
    return ClinicalContext(gender=None, birth_date=birth_date, observations=observations)


def _make_case(
    seed: int, split: int, index: int, *, spec: ImagePreprocessing
) -> tuple[float, np.ndarray, ClinicalContext, dt.datetime]:
    """One synthetic patient, from its own seed so that any case can be made again on its own."""
    rng = np.random.default_rng([seed, split, index])
    case = sample_case(rng)
    hu = render_head_ct_slice(rng, hemorrhage=case["hemorrhage"], size=RENDER_SIZE)
    image = prepare_image(stored_and_back(hu), photometric_interpretation="MONOCHROME2", window=BRAIN_WINDOW, spec=spec)
    study_at = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    context = _clinical_context(rng, case, study_at=study_at, case_id=f"{split}-{index}")
    return float(case["hemorrhage"]), image, context, study_at


def _make_cohort(seed: int, n: int, *, split: int) -> Cohort:
    """Render and pre-process ``n`` patients with unit image normalization, in this process."""
    labels = np.zeros(n, dtype=np.float32)
    images = np.zeros((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    contexts: list[ClinicalContext] = []
    study_times: list[dt.datetime] = []
    spec = _image_spec()
    for i in range(n):
        labels[i], images[i], context, study_at = _make_case(seed, split, i, spec=spec)
        contexts.append(context)
        study_times.append(study_at)
    return Cohort(labels=labels, images=images, contexts=contexts, study_times=study_times)


def _clinical_arrays(cohort: Cohort, features: list[ClinicalFeature]) -> tuple[np.ndarray, np.ndarray]:
    values = np.zeros((len(cohort.contexts), len(features)), dtype=np.float32)
    masks = np.zeros_like(values)
    for i, (context, study_at) in enumerate(zip(cohort.contexts, cohort.study_times, strict=True)):
        values[i], masks[i], _ = clinical_vector(context, features=features, study_at=study_at)
    return values, masks


def _round(value: float) -> float:
    """Statistics as written to the manifest; training uses the rounded values so both agree exactly."""
    return float(f"{value:.6g}")


def _predict(
    model: CtHeadNet, images: torch.Tensor, values: torch.Tensor, masks: torch.Tensor, *, batch_size: int = 128
) -> np.ndarray:
    """Logits [n] in evaluation mode."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            stop = start + batch_size
            out.append(model(images[start:stop], values[start:stop], masks[start:stop])[:, 0].numpy())
    return np.concatenate(out)


def _train(
    model: CtHeadNet,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray],
    *,
    epochs: int,
    generator: torch.Generator,
) -> None:
    images, values, masks, labels = data
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            batch_images = images[index]
            # Left-right mirror images are as plausible as the originals: a free augmentation.
            flip = torch.rand(index.shape[0], generator=generator) < 0.5
            batch_images = torch.where(flip[:, None, None, None], batch_images.flip(-1), batch_images)
            # Modality dropout: the whole clinical vector and its mask gone, as for a patient with no FHIR
            # record, so that the model still answers from the image alone.
            keep = (torch.rand(index.shape[0], 1, generator=generator) >= MODALITY_DROPOUT).float()
            logits = model(batch_images, values[index] * keep, masks[index] * keep)
            loss = functional.binary_cross_entropy_with_logits(logits[:, 0], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * index.shape[0]
        val_logits = _predict(model, *validation[:3])
        logger.info(
            "epoch %d/%d  loss %.4f  val AUROC %.3f  %.0f s",
            epoch + 1,
            epochs,
            total / n,
            auroc(validation[3], val_logits),
            time.perf_counter() - started,
        )


def _check_parity(model: CtHeadNet, path: Path, example: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """Max |Δ logit| between PyTorch and ONNX Runtime, with the clinical data given and withheld.

    Raises:
        ModelError: the logits differ by ``PARITY_TOLERANCE`` or more.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model.eval()
    worst = 0.0
    image, values, masks = example
    for clinical, mask in ((values, masks), (torch.zeros_like(values), torch.zeros_like(masks))):
        (onnx_logits,) = session.run(
            ["logits"], {"image": image.numpy(), "clinical": clinical.numpy(), "clinical_mask": mask.numpy()}
        )
        with torch.no_grad():
            torch_logits = model(image, clinical, mask).numpy()
        if onnx_logits.shape != torch_logits.shape:
            raise ModelError(f"ONNX Runtime logits have shape {onnx_logits.shape}, PyTorch {torch_logits.shape}")
        worst = max(worst, float(np.max(np.abs(onnx_logits - torch_logits))))
    if not worst < PARITY_TOLERANCE:
        raise ModelError(f"ONNX Runtime logits differ from PyTorch by {worst:.3g} (limit {PARITY_TOLERANCE})")
    return worst


def _check_serving_preprocessing(seed: int, cohort: Cohort, spec: ImagePreprocessing, *, cases: int = 4) -> None:
    """The normalized training images must equal what ``prepare_image`` gives with the manifest's own spec.

    Raises:
        ModelError: they differ, so the service would feed the model something it was not trained on.
    """
    for index in range(min(cases, len(cohort.contexts))):
        _, served, _, _ = _make_case(seed, 1, index, spec=spec)
        if not np.allclose(served, cohort.images[index], rtol=0.0, atol=1e-5):
            difference = float(np.max(np.abs(served - cohort.images[index])))
            raise ModelError(f"training images differ from the service's pre-processing by {difference:.3g}")


def _manifest(
    *,
    sha256: str,
    image_spec: ImagePreprocessing,
    features: list[ClinicalFeature],
    temperature: float,
    threshold: float,
) -> Manifest:
    return Manifest.model_validate(
        {
            "name": MODEL_NAME,
            "description": "Axial non-contrast head CT slice + clinical context -> intracranial hemorrhage; "
            "CNN and clinical MLP fused by concatenation.",
            "intended_use": INTENDED_USE,
            "versions": [{"version": MODEL_VERSION, "artifact": f"{MODEL_VERSION}/model.onnx", "sha256": sha256}],
            "routing": {
                "modalities": ["CT"],
                "body_parts": ["HEAD"],
                "sop_class_uids": [CT_IMAGE_STORAGE],
                "min_rows": 256,
                "min_columns": 256,
            },
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
                "heatmap": None,
                "findings": [
                    {
                        "code": FINDING_CODE,
                        "system": SNOMED,
                        "display": FINDING_DISPLAY,
                        "threshold": round(threshold, 4),
                        "calibration": {"method": "temperature", "temperature": round(temperature, 4)},
                    }
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
    fusion_auroc: float,
    image_only_auroc: float,
    prevalence: float,
    threshold: float,
    temperature: float,
    parity: float,
    model_bytes: int,
    sha256: str,
) -> str:
    def source_text(source: FeatureSource) -> str:
        return "age at the study date" if source.kind == "age_at_study" else "LOINC " + ", ".join(source.loinc)

    features = "\n".join(
        f"| {name} | {display} | {source_text(source)} | {unit} | {'any' if lookback is None else f'{lookback:g} h'} |"
        for name, display, source, unit, lookback in CLINICAL_FEATURES
    )
    center, width = BRAIN_WINDOW
    return f"""# Model card: {MODEL_NAME} version {MODEL_VERSION}

**{INTENDED_USE}** This model is a demonstration of the clinfer service's multimodal pipeline. It is not a
medical device, has never seen a real CT scan or a real patient record, and must not inform any clinical decision.

## Intended use
Exercise routing and multi-model serving with a second model whose inputs differ from `cxr-fusion` in every way:
another modality (CT), body part (HEAD), SOP class (CT Image Storage), image size and clinical vector. Out of
scope: any use on real patients, any performance claim.

## Model
A small CNN (`service/training/ct_train.py`, `CtHeadNet`: four stride-2 stages, 128 → 8, average and max pooled)
encodes the slice; an MLP encodes the clinical values concatenated with their missing-mask; the two embeddings
are concatenated and a small head gives one logit. Trained with modality dropout ({MODALITY_DROPOUT:.0%} of
samples lose their whole clinical vector) so that it answers from the image alone when no clinical data is
available, and with left-right mirroring.

- Artifact: `{MODEL_VERSION}/model.onnx`, ONNX opset {OPSET}, {model_bytes / 1e6:.2f} MB, sha256 `{sha256}`.
- PyTorch ↔ ONNX Runtime parity on a validation batch, with and without clinical data: max |Δ logit| =
  {parity:.2e}.

## Routing
Modality CT, BodyPartExamined HEAD, SOP Class CT Image Storage (`{CT_IMAGE_STORAGE}`), at least 256×256,
grayscale. The service reads the first matching instance of a study: one slice, not the volume.

## Inputs
- `image` float32 [batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]: the slice after the modality LUT (Rescale Slope and
  Intercept, so in HU), windowed with the object's first VOI window — trained with the brain window, center
  {center:g} / width {width:g} — resized by 4×4 area averaging from 512×512, normalized with the training images'
  mean and standard deviation (see `manifest.yaml`).
- `clinical` float32 [batch, {len(CLINICAL_FEATURES)}] z-scored with the training statistics, and `clinical_mask`
  float32 [batch, {len(CLINICAL_FEATURES)}] with 1 = present. A missing value (none recorded, outside its lookback
  window, or in another unit) is 0 with mask 0.

| feature | display | source | unit (UCUM) | lookback |
|---|---|---|---|---|
{features}

The FHIR ingest has no conversion table for INR and GCS: an Observation must carry the unit code `{{INR}}` or
`{{score}}` (system `http://unitsofmeasure.org`); any other unit is masked as "unit not convertible".

## Output
- `logits` float32 [batch, 1]: intracranial hemorrhage (SNOMED CT {FINDING_CODE}, "{FINDING_DISPLAY}");
  probability = sigmoid(logit / T) with T = {temperature:.3f}; positive when the probability reaches
  {threshold:.3f}. No heatmap.

## Data
Entirely synthetic (`service/training/ct_synthetic.py`), seed {seed}: {n_train} training and {n_val} validation
patients. Procedural 512×512 axial slices in HU (air, scalp, skull with tables and diploe, grey and white matter,
sulci, ventricles, falx; random head size, position, rotation, atrophy and noise σ 4–8 HU), stored as 12-bit
values with RescaleIntercept −1024 and read back. Hemorrhage (prevalence ~35%) is intraparenchymal (a
hyperdense 55–85 HU hematoma with a hypodense rim of edema), subdural (a crescent along the inner table) or
epidural (a lens), from about a millimetre thick or a few pixels across to large with midline shift. Clinical
values depend on the label: older patients, higher systolic pressure, more often anticoagulated (raised INR) and
a lower GCS with hemorrhage; none is decisive. INR is missing in about 40% of patients, GCS in 20%, systolic
pressure in 5%; 5% of values were taken 26–60 h before the study and fall outside the 24 h windows. Training:
{epochs} epochs.

## Validation (synthetic validation split, {n_val} patients, prevalence {prevalence:.1%})
| | AUROC |
|---|---|
| fusion (image + clinical) | **{fusion_auroc:.3f}** |
| image only (clinical values and mask withheld) | {image_only_auroc:.3f} |

The temperature was fit and the threshold chosen (Youden's J) on this same split, so the threshold is optimistic.

## Limitations
- Synthetic data only: the figures above say the pipeline works, nothing about performance on real head CT,
  where this model would fail. Real anatomy, skull base and posterior fossa slices, artefacts (beam hardening,
  motion, metal), calcifications, subarachnoid and intraventricular blood, chronic (hypodense) collections and
  contrast-enhanced scans are absent.
- One slice: the service reads the first matching instance of the study, not the volume; a bleed outside that
  slice is invisible to the model.
- Trained only with the brain window: an object whose first VOI window is another one (bone, subdural), or that
  has none (then the service windows on percentiles), gives the model an image unlike any it was trained on.
- The synthetic clinical distributions are invented; the model's reliance on them does not reflect real
  clinical associations.
- Not a clinical device. The threshold and temperature were tuned on the validation split that also gives the
  AUROCs; there is no external test set.
"""


def build_ct_head_ich(
    out_dir: Path, *, n_train: int = 1500, n_val: int = 400, epochs: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Generate the synthetic cohort, train, calibrate, export and write the model folder.

    Uses one thread (torch and ONNX Runtime) and one process.

    Args:
        out_dir: the model repository; the model goes to ``out_dir/ct-head-ich/``.
        n_train: training patients.
        n_val: validation patients (calibration, threshold and reported AUROCs).
        epochs: training epochs.
        seed: seeds the cohort and the network; the same seed gives the same model.

    Returns:
        A summary: paths, AUROC with and without clinical data, calibration, parity difference, model size,
        wall time.

    Raises:
        ModelError: the exported ONNX model does not match PyTorch, the training images differ from the
            service's pre-processing, or the written manifest does not validate.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)

    logger.info("rendering %d training and %d validation patients", n_train, n_val)
    train = _make_cohort(seed, n_train, split=0)
    val = _make_cohort(seed, n_val, split=1)
    logger.info("cohort ready in %.0f s", time.perf_counter() - started)

    # Normalization statistics from the training split only, rounded as the manifest writes them.
    image_spec = _image_spec(mean=_round(float(train.images.mean())), std=_round(float(train.images.std())))
    for cohort in (train, val):
        # Same float32 arithmetic as prepare_image's normalization step, in place to save a second pass.
        cohort.images -= np.float32(image_spec.normalization.mean)
        cohort.images /= np.float32(image_spec.normalization.std)
    _check_serving_preprocessing(seed, val, image_spec)
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
        torch.from_numpy(train.labels),
    )
    val_tensors = (torch.from_numpy(val.images), torch.from_numpy(val_values), torch.from_numpy(val_masks))
    model = CtHeadNet()
    generator = torch.Generator().manual_seed(seed)
    _train(model, train_tensors, (*val_tensors, val.labels), epochs=epochs, generator=generator)

    val_logits = _predict(model, *val_tensors)
    image_only_logits = _predict(
        model, val_tensors[0], torch.zeros_like(val_tensors[1]), torch.zeros_like(val_tensors[2])
    )
    fusion_auroc = auroc(val.labels, val_logits)
    image_only_auroc = auroc(val.labels, image_only_logits)
    temperature = fit_temperature(val_logits, val.labels)
    threshold = youden_threshold(val.labels, 1.0 / (1.0 + np.exp(-val_logits / temperature)))

    model_dir = out_dir / MODEL_NAME
    onnx_path = model_dir / MODEL_VERSION / "model.onnx"
    example = (val_tensors[0][:16], val_tensors[1][:16], val_tensors[2][:16])
    export_onnx(model, onnx_path, example, output_names=("logits",))
    parity = _check_parity(model, onnx_path, example)
    sha256 = sha256_of(onnx_path)
    model_bytes = onnx_path.stat().st_size

    manifest = _manifest(
        sha256=sha256, image_spec=image_spec, features=features, temperature=temperature, threshold=threshold
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
            fusion_auroc=fusion_auroc,
            image_only_auroc=image_only_auroc,
            prevalence=float(val.labels.mean()),
            threshold=threshold,
            temperature=temperature,
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
        "auroc": fusion_auroc,
        "image_only_auroc": image_only_auroc,
        "temperature": temperature,
        "threshold": threshold,
        "parity_max_abs_diff_logits": parity,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Train the demonstration model {MODEL_NAME} on synthetic data.")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = build_ct_head_ich(args.out, seed=args.seed)
    print(f"wrote {summary['manifest']} and {summary['model']} ({summary['model_bytes'] / 1e6:.2f} MB)")
    print(f"validation AUROC {summary['auroc']:.3f} (image only {summary['image_only_auroc']:.3f})")
    print(f"parity max |Δ logit| {summary['parity_max_abs_diff_logits']:.2e}; total {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
