"""Export a trained ``cxr-fusion`` run as a model folder the service can serve.

Calibration (one temperature per finding) and thresholds (Youden's J) are fit on the validation split; the fused
network goes to ONNX and must agree with PyTorch on held-out test cases; the manifest and the model card are
written next to it. The card carries the held-out test evaluation when ``evaluate`` has run on the same weights,
else the validation figures, and says which.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from service.errors import ModelError
from service.inference.manifest import ClinicalFeature, ImagePreprocessing, Manifest, load_manifest
from service.inference.registry import sha256_of
from service.training.cohort_arrays import CLINICAL_FEATURES, FINDING_CODES
from service.training.measures import fit_calibration, macro, per_finding_auroc, sigmoid
from service.training.synthetic import FINDINGS
from service.training.variants import (
    EVALUATION_FILE,
    MODEL_NAME,
    VARIANTS,
    TrainedRun,
    check_model_name,
    load_run,
    predict_all,
)

logger = logging.getLogger(__name__)

MODEL_VERSION = "1"
INTENDED_USE = "Demonstration on synthetic data — not for clinical use."
SNOMED = "http://snomed.info/sct"
OPSET = 17
PARITY_CASES = 100
PARITY_TOLERANCE = 1e-4
INPUT_NAMES = ("image", "clinical", "clinical_mask")
OUTPUT_NAMES = ("logits", "heatmap")

VARIANT_LABELS = {
    "fusion": "fusion (shipped)",
    "image_only": "image only",
    "clinical_only": "clinical only",
    "late_fusion": "late fusion",
}


def export_onnx(
    model: nn.Module,
    path: Path,
    example: tuple[torch.Tensor, ...],
    *,
    input_names: tuple[str, ...] = INPUT_NAMES,
    output_names: tuple[str, ...] = OUTPUT_NAMES,
) -> None:
    """Export with a dynamic batch axis on every input and output (opset ``OPSET``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript; the graph
        # graphs here are plain convolutions, reductions and linear layers, well within what it handles.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
            do_constant_folding=True,
        )


def check_parity(
    model: nn.Module,
    path: Path,
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    temperatures: list[float],
) -> dict[str, float]:
    """Largest differences between PyTorch and ONNX Runtime on the same cases.

    Args:
        model: the network that was exported.
        path: the ONNX file.
        inputs: image, clinical values and mask of the cases, as the service would feed them.
        temperatures: per-finding temperatures; probabilities are compared as the service computes them.

    Returns:
        ``probability``, ``logit`` and ``heatmap``: max |difference| of each over all cases.

    Raises:
        ModelError: a probability or heatmap value differs by more than ``PARITY_TOLERANCE``.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_heatmap = session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, inputs, strict=True)))
    model.eval()
    with torch.no_grad():
        torch_logits, torch_heatmap = (t.numpy() for t in model(*(torch.from_numpy(a) for a in inputs)))
    scale = np.asarray(temperatures)
    differences = {
        "probability": float(np.max(np.abs(sigmoid(onnx_logits / scale) - sigmoid(torch_logits / scale)))),
        "logit": float(np.max(np.abs(onnx_logits - torch_logits))),
        "heatmap": float(np.max(np.abs(onnx_heatmap - torch_heatmap))),
    }
    if not (differences["probability"] <= PARITY_TOLERANCE and differences["heatmap"] <= PARITY_TOLERANCE):
        raise ModelError(
            f"ONNX Runtime differs from PyTorch on {inputs[0].shape[0]} cases: max |Δ probability| "
            f"{differences['probability']:.3g}, max |Δ heatmap| {differences['heatmap']:.3g} "
            f"(limit {PARITY_TOLERANCE})"
        )
    return differences


def _manifest(
    *,
    sha256: str,
    image_size: int,
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
            "routing": {
                "modalities": ["CR", "DX"],
                "body_parts": ["CHEST"],
                "view_positions": ["PA", "AP"],  # a frontal view: the model card lists a lateral as a failure
                "min_rows": 256,
                "min_columns": 256,
            },
            "image_input": {
                "name": "image",
                "shape": [1, image_size, image_size],
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


def _current_evaluation(run: TrainedRun) -> dict[str, Any] | None:
    """The run's ``evaluation.json``, if it was made from these very weights."""
    path = run.work_dir / EVALUATION_FILE
    if not path.exists():
        return None
    evaluation = json.loads(path.read_text(encoding="utf-8"))
    if evaluation.get("run_id") != run.config["run_id"]:
        logger.warning("%s is from another training run; the model card shows validation figures", path)
        return None
    return evaluation


def export(name: str, *, work_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Calibrate on validation, export the fused network to ONNX, write manifest and model card.

    Writes ``out_dir/<name>/<version>/model.onnx``, ``out_dir/<name>/manifest.yaml`` (with the ONNX file's
    sha256) and ``out_dir/<name>/MODEL_CARD.md``.

    Args:
        name: the model; only ``cxr-fusion``.
        work_dir: the run's directory, as ``train`` (and, for the card's test figures, ``evaluate``) left it.
        out_dir: the model repository.

    Returns:
        Paths, sha256, size, temperatures, thresholds and the parity differences.

    Raises:
        InvalidInput: unknown ``name``.
        ModelError: no complete run in ``work_dir``; ONNX Runtime disagrees with PyTorch by more than 1e-4 in
            probability on the parity cases; the written manifest does not read back as written.
    """
    check_model_name(name)
    run = load_run(work_dir)
    validation, test = run.inputs("validation"), run.inputs("test")
    validation_logits = predict_all(run.models, validation)
    temperatures, thresholds = fit_calibration(validation.split.labels, validation_logits["fusion"])

    model = run.models["fusion"]
    model_dir = out_dir / name
    onnx_path = model_dir / MODEL_VERSION / "model.onnx"
    rows = slice(0, min(PARITY_CASES, len(test)))
    parity_inputs = (test.images(rows).numpy(), test.clinical[rows], test.masks[rows])
    example = tuple(torch.from_numpy(array[:2]) for array in parity_inputs)
    export_onnx(model, onnx_path, example)  # type: ignore[arg-type]
    parity = check_parity(model, onnx_path, parity_inputs, temperatures)
    sha256 = sha256_of(onnx_path)
    model_bytes = onnx_path.stat().st_size

    image_size = int(run.config["cohort"]["image_size"])
    manifest = _manifest(
        sha256=sha256,
        image_size=image_size,
        image_spec=run.normalizer.image_spec(image_size),
        features=run.normalizer.features(),
        temperatures=temperatures,
        thresholds=thresholds,
    )
    manifest_path = model_dir / "manifest.yaml"
    manifest_path.write_text(
        yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120),
        encoding="utf-8",
    )
    if load_manifest(manifest_path) != manifest:
        raise ModelError(f"manifest {manifest_path} does not read back as written")

    evaluation = _current_evaluation(run)
    validation_aurocs = {
        variant: per_finding_auroc(validation.split.labels, validation_logits[variant]) for variant in VARIANTS
    }
    card_path = model_dir / "MODEL_CARD.md"
    card_path.write_text(
        model_card(
            config=run.config,
            evaluation=evaluation,
            validation_aurocs=validation_aurocs,
            temperatures=temperatures,
            thresholds=thresholds,
            parity=parity,
            parity_cases=parity_inputs[0].shape[0],
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
        "temperatures": dict(zip(FINDINGS, temperatures, strict=True)),
        "thresholds": dict(zip(FINDINGS, thresholds, strict=True)),
        "parity": parity,
        "parity_cases": parity_inputs[0].shape[0],
        "card_figures": "test" if evaluation is not None else "validation",
    }


def _ci(figure: float | None, interval: list[float | None]) -> str:
    if figure is None:
        return "—"
    if interval[0] is None or interval[1] is None:
        return f"{figure:.3f}"
    return f"{figure:.3f} ({interval[0]:.3f}–{interval[1]:.3f})"


def _signed_ci(figure: float | None, interval: list[float | None]) -> str:
    if figure is None or interval[0] is None or interval[1] is None:
        return "—"
    return f"{figure:+.3f} ({interval[0]:+.3f} to {interval[1]:+.3f})"


def _compare(delta: dict[str, Any], *, better: str, worse: str, unclear: str) -> str:
    low, high = delta["ci"]
    if low is None or high is None:
        return unclear
    if low > 0:
        return better
    if high < 0:
        return worse
    return unclear


def _verdict(evaluation: dict[str, Any]) -> str:
    """One paragraph saying what the intervals support, so that a reader need not work it out from the tables."""
    best = VARIANT_LABELS[evaluation["delta_vs_best_unimodal"]["best_unimodal"]]
    unimodal = _compare(
        evaluation["delta_vs_best_unimodal"],
        better=f"discriminates better than the better single modality ({best})",
        worse=f"discriminates worse than the better single modality ({best})",
        unclear=f"is not shown to differ from the better single modality ({best})",
    )
    late = _compare(
        evaluation["delta_vs_late_fusion"],
        better="better than late fusion",
        worse="slightly but measurably worse than late fusion, the untrained average of the two single-modality models",
        unclear="not shown to differ from late fusion, the untrained average of the two single-modality models",
    )
    missing = evaluation["missing_clinical"]["delta_vs_image_only"]
    return (
        f"**Reading.** On these synthetic patients the fused model {unimodal}, and is {late} (paired 95% intervals "
        f"below). With no clinical data at all, its macro AUROC differs from the image-only model's by "
        f"{_signed_ci(missing['value'], missing['ci'])}."
    )


def _evaluation_section(evaluation: dict[str, Any], config: dict[str, Any]) -> str:
    displays = {finding: display for finding, display, _ in FINDING_CODES}
    header = "| finding | prevalence | " + " | ".join(VARIANT_LABELS[v] for v in VARIANTS) + " |"
    rule = "|---|---|" + "---|" * len(VARIANTS)
    rows = []
    for finding in FINDINGS:
        cells = [
            _ci(
                evaluation["variants"][v]["per_finding"][finding]["auroc"],
                evaluation["variants"][v]["per_finding"][finding]["ci"],
            )
            for v in VARIANTS
        ]
        rows.append(f"| {displays[finding]} | {evaluation['prevalence'][finding]:.1%} | " + " | ".join(cells) + " |")
    macro_cells = [
        "**" + _ci(evaluation["variants"][v]["macro_auroc"], evaluation["variants"][v]["macro_auroc_ci"]) + "**"
        for v in VARIANTS
    ]
    rows.append("| **macro** | | " + " | ".join(macro_cells) + " |")
    delta = evaluation["delta_vs_best_unimodal"]
    late = evaluation["delta_vs_late_fusion"]
    missing = evaluation["missing_clinical"]
    calibration_lines = []
    for finding in FINDINGS:
        ece, point = evaluation["ece_per_finding"][finding], evaluation["operating_points"][finding]
        calibration_lines.append(
            f"| {displays[finding]} | {ece['temperature']:.2f} | {ece['before']:.3f} | {ece['after']:.3f} | "
            f"{point['threshold']:.3f} | {_ci(point['sensitivity'], [None, None])} | "
            f"{_ci(point['specificity'], [None, None])} |"
        )
    calibration_rows = "\n".join(calibration_lines)
    subgroup_rows = []
    for axis, label in (("sex", "sex"), ("age_band", "age")):
        for group, figures in evaluation["subgroups"][axis].items():
            subgroup_rows.append(
                f"| {label} {group} | {figures['n']} | {_ci(figures['macro_auroc'], figures['macro_auroc_ci'])} |"
            )
    n_test = evaluation["n_test"]
    verdict = _verdict(evaluation)
    return f"""## Evaluation (held-out synthetic test split, {n_test} patients)
Seed {evaluation["seed"]}. The test patients were used for nothing but these figures: the networks were fit on the
training split, temperatures and thresholds on the validation split. Intervals are 95% percentile bootstrap
intervals over test patients ({evaluation["resamples"]} resamples); every variant is scored on the same resamples,
so differences between variants have paired intervals.

{verdict}

### Discrimination: AUROC (95% CI)
{header}
{rule}
{chr(10).join(rows)}

- **Fusion − best single modality ({VARIANT_LABELS[delta["best_unimodal"]]})**, macro AUROC:
  {_signed_ci(delta["value"], delta["ci"])}. On each resample the better of image only and clinical only on that
  resample is subtracted.
- **Fusion − late fusion**, macro AUROC: {_signed_ci(late["value"], late["ci"])}. Whether fusing inside the
  network adds anything over averaging the two single-modality models' logits.
- **Clinical data fully missing** (fusion with the clinical vector and mask all zero): macro AUROC
  {_ci(missing["macro_auroc"], missing["macro_auroc_ci"])}; difference to image only
  {_signed_ci(missing["delta_vs_image_only"]["value"], missing["delta_vs_image_only"]["ci"])}.

### Calibration and operating points (fusion)
ECE ({evaluation["ece_bins"]} equal-width bins, averaged over findings): **{evaluation["ece_before"]:.3f}** before
calibration, **{evaluation["ece_after"]:.3f}** after the per-finding temperatures fit on validation. Thresholds
maximize Youden's J on validation; sensitivity and specificity are measured on test.

| finding | T | ECE before | ECE after | threshold | sensitivity | specificity |
|---|---|---|---|---|---|---|
{calibration_rows}

### Subgroups (fusion, macro AUROC, 95% CI)
| subgroup | n | macro AUROC |
|---|---|---|
{chr(10).join(subgroup_rows)}
"""


def _validation_section(
    config: dict[str, Any], validation_aurocs: dict[str, np.ndarray], temperatures: list[float], thresholds: list[float]
) -> str:
    displays = {finding: display for finding, display, _ in FINDING_CODES}
    n_val = config["cohort"]["sizes"]["validation"]
    rows = "\n".join(
        f"| {displays[finding]} | "
        + " | ".join(f"{validation_aurocs[v][k]:.3f}" for v in VARIANTS)
        + f" | {thresholds[k]:.3f} | {temperatures[k]:.2f} |"
        for k, finding in enumerate(FINDINGS)
    )
    macros = " | ".join(f"**{float(macro(validation_aurocs[v])):.3f}**" for v in VARIANTS)
    return f"""## Validation figures only (synthetic validation split, {n_val} patients)
`evaluate` has not been run on these weights, so there are no held-out test figures. Temperatures and thresholds
were fit on this same split: these AUROCs are optimistic and carry no confidence intervals.

| finding | {" | ".join(VARIANT_LABELS[v] for v in VARIANTS)} | threshold | T |
|---|{"---|" * len(VARIANTS)}---|---|
{rows}
| **macro** | {macros} | | |
"""


def model_card(
    *,
    config: dict[str, Any],
    evaluation: dict[str, Any] | None,
    validation_aurocs: dict[str, np.ndarray],
    temperatures: list[float],
    thresholds: list[float],
    parity: dict[str, float],
    parity_cases: int,
    model_bytes: int,
    sha256: str,
) -> str:
    """The model card (Markdown) of an exported run."""
    cohort, training = config["cohort"], config["training"]
    image_size, render_size = cohort["image_size"], cohort["render_size"]
    sizes = cohort["sizes"]
    heat = image_size // 16
    features = "\n".join(
        f"| {name} | {display} | {unit or '—'} | {'any' if lookback is None else f'{lookback:g} h'} |"
        for name, display, _, unit, lookback in CLINICAL_FEATURES
    )
    if evaluation is not None:
        figures = _evaluation_section(evaluation, config)
        figures_note = (
            "- The figures above are on held-out synthetic test patients; temperatures and thresholds were chosen on "
            "the validation split, never on test."
        )
    else:
        figures = _validation_section(config, validation_aurocs, temperatures, thresholds)
        figures_note = "- No held-out test figures: run `evaluate` and export again to get them."
    return f"""# Model card: {MODEL_NAME} version {MODEL_VERSION}

**{INTENDED_USE}** This model is a demonstration of the clinfer service's multimodal pipeline. It is not a
medical device, has never seen a real radiograph or a real patient record, and must not inform any clinical
decision.

## Intended use
{INTENDED_USE} Exercise the service end to end (DICOM + FHIR in, structured findings out) with a model whose
inputs and outputs have the shape of a real chest radiograph triage model, and show how a fusion model is
judged against its single-modality baselines. Out of scope: any use on real patients, any performance claim.

## Model
Intermediate fusion network (`service/training/model.py`, `FusionNet`): a small CNN encodes the radiograph
(1×{image_size}×{image_size}, last feature map {heat}×{heat}), an MLP encodes the clinical values concatenated with
their missing-mask, and a gate computed from both embeddings mixes them per feature. A per-finding 1×1 projection
of the image feature map, averaged over locations, is an image-only classifier (trained with an auxiliary loss); its
map is the class-activation heatmap. The multi-label head adds to those image logits a correction computed from
the fused vector, so the image evidence always reaches the output and the clinical data adjusts it. Trained with
modality dropout ({training["modality_dropout"]:.0%} of training samples lose their whole clinical vector and mask)
so that it answers from the image alone when no clinical data is available.

Three baselines, on the same patients (the two networks with the same training recipe), are reported below:
- **image only** (`ImageOnlyNet`): the same image encoder, CAM projection and residual head, no clinical input;
- **clinical only** (`ClinicalNet`): an MLP on the clinical values and their mask;
- **late fusion**: the mean of the image-only and clinical-only logits, nothing trained (for ranking, the sum of
  the two log-odds: the right combination if image and clinical data were independent given the finding).

- Artifact: `{MODEL_VERSION}/model.onnx`, ONNX opset {OPSET}, {model_bytes / 1e6:.2f} MB, sha256 `{sha256}`.
- PyTorch ↔ ONNX Runtime parity on {parity_cases} test cases: max |Δ probability| = {parity["probability"]:.1e},
  max |Δ logit| = {parity["logit"]:.1e}, max |Δ heatmap| = {parity["heatmap"]:.1e} (limit {PARITY_TOLERANCE:g}).

## Inputs
- `image` float32 [batch, 1, {image_size}, {image_size}]: a PA chest radiograph (CR/DX, BodyPartExamined CHEST,
  at least 256×256), windowed with the object's first VOI window (else the 0.5–99.5 percentiles), MONOCHROME1
  inverted, resized, normalized with the training images' mean and standard deviation (see `manifest.yaml`).
- `clinical` float32 [batch, {len(CLINICAL_FEATURES)}] z-scored with the training statistics, and `clinical_mask`
  float32 [batch, {len(CLINICAL_FEATURES)}] with 1 = present. A missing value is 0 with mask 0.

| feature | display | canonical unit | lookback |
|---|---|---|---|
{features}

## Outputs
- `logits` float32 [batch, 5]; probability = sigmoid(logit / T) with the per-finding temperature T (in
  `manifest.yaml`); a finding is positive when its probability reaches the threshold.
- `heatmap` float32 [batch, 5, {heat}, {heat}] in [0, 1]: sigmoid of the per-location image-only logits (class
  activation map). It shows where the image branch saw evidence; it does not include the clinical contribution.

## Data
Entirely synthetic (`service/training/synthetic.py`), seed {config["seed"]}: {sizes["train"]} training,
{sizes["validation"]} validation and {sizes["test"]} test patients, each split from its own random stream.
Procedural radiographs ({render_size}×{render_size}, 12-bit, random exposure, positioning, noise and Rescale/VOI
attributes) go through the service's own pre-processing. Each finding has a random conspicuity, from obvious to
nearly invisible, and some signs are shared on purpose: a patchy opacity may be pneumonia or atelectasis/scarring
(15% of patients), a borderline heart may or may not be enlarged. Clinical values depend on the findings (fever,
leukocytosis and CRP with pneumonia; NT-proBNP with cardiomegaly and edema; hypoxaemia and tachypnoea with
pneumothorax and edema) and on conditions the film does not show (an infection elsewhere, chronic lung disease,
kidney disease); each vital sign or lab is missing independently (10–50%). So pneumonia and edema are often
ambiguous on the image and settled by the clinical data, while pneumothorax and effusion are image findings that
the clinical data only hints at (effusion mostly through the findings it comes with). Findings co-occur (edema
with cardiomegaly; effusion with edema, cardiomegaly or pneumonia).

Training: image networks {training["epochs"]} epochs, batch {training["batch_size"]}, AdamW with a one-cycle
learning rate (peak {training["learning_rate"]:g}), binary cross-entropy plus {training["aux_loss_weight"]:g} × the
auxiliary image-only loss; clinical MLP {training["clinical_epochs"]} epochs. Run
`{config["run_id"]}`, deterministic for its seed with {training["threads"]} torch thread(s) (torch {training["torch"]}).

{figures}
## Limitations
- Synthetic data only: the figures above say the pipeline works and the fusion is judged fairly, nothing about
  performance on real radiographs, where this model would fail. Real anatomy, devices, projections (AP, lateral),
  paediatric patients and other findings are absent.
- The synthetic clinical distributions are invented and simplified; how much the model relies on them, and the
  gain of fusion over each single modality, reflect choices made in the generator, not real clinical associations.
- Temperatures and thresholds were chosen on the validation split ({sizes["validation"]} patients); the test
  patients come from the same generator, so there is no external or shifted test set.
{figures_note}
- Subgroups (sex, age band) are small and, in this generator, differ mainly in prevalence; wide intervals there
  are expected and say nothing about fairness on real patients.
- The heatmap is a coarse ({heat}×{heat}) class-activation map of the image branch, not a segmentation.
"""
