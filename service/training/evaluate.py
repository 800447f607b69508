"""Score a trained ``cxr-fusion`` run on its held-out test split: the figures the model card reports.

Nothing here is fit on the test split. Temperatures and thresholds come from the validation split, exactly as
``export`` computes them, so the calibration and threshold figures are what the shipped model does on unseen
patients. Every interval is a percentile bootstrap over test patients; all variants are scored on the same
resamples, so a difference between two of them gets a paired interval.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.training.measures import (
    ECE_BINS,
    bootstrap_indices,
    bootstrap_per_finding_auroc,
    expected_calibration_error,
    fit_calibration,
    macro,
    mean_expected_calibration_error,
    per_finding_auroc,
    percentile_interval,
    sigmoid,
)
from service.training.progress import Progress
from service.training.synthetic import FINDINGS
from service.training.variants import (
    EVALUATION_FILE,
    VARIANTS,
    check_model_name,
    load_run,
    predict_all,
    predict_logits,
)

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
AGE_BANDS: tuple[tuple[str, float, float], ...] = (("<50", 0.0, 50.0), ("50-69", 50.0, 70.0), (">=70", 70.0, math.inf))


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined figure (a class absent from a subgroup) is written as null."""
    return None if not math.isfinite(value) else float(value)


def _interval(samples: np.ndarray) -> list[float | None]:
    try:
        low, high = percentile_interval(samples)
    except ValueError:
        return [None, None]
    return [low, high]


def _discrimination(labels: np.ndarray, logits: np.ndarray, resampled: np.ndarray) -> dict[str, Any]:
    """Macro and per-finding AUROC with 95% intervals, from the full set and its bootstrap resamples."""
    point = per_finding_auroc(labels, logits)
    return {
        "macro_auroc": _number(float(macro(point))),
        "macro_auroc_ci": _interval(macro(resampled)),
        "per_finding": {
            finding: {"auroc": _number(float(point[k])), "ci": _interval(resampled[:, k])}
            for k, finding in enumerate(FINDINGS)
        },
    }


def _subgroup(labels: np.ndarray, logits: np.ndarray, rows: np.ndarray, *, resamples: int, seed: int) -> dict[str, Any]:
    count = int(rows.sum())
    if count == 0:
        return {"n": 0, "macro_auroc": None, "macro_auroc_ci": [None, None]}
    group_labels, group_logits = labels[rows], logits[rows]
    indices = bootstrap_indices(count, resamples=resamples, seed=seed)
    resampled = bootstrap_per_finding_auroc(group_labels, group_logits, indices)
    return {
        "n": count,
        "prevalence": {finding: float(group_labels[:, k].mean()) for k, finding in enumerate(FINDINGS)},
        "macro_auroc": _number(float(macro(per_finding_auroc(group_labels, group_logits)))),
        "macro_auroc_ci": _interval(macro(resampled)),
    }


def _operating_points(labels: np.ndarray, probabilities: np.ndarray, thresholds: list[float]) -> dict[str, Any]:
    """Sensitivity and specificity on the test split at the thresholds chosen on validation."""
    out = {}
    for k, finding in enumerate(FINDINGS):
        positive = labels[:, k] > 0.5
        predicted = probabilities[:, k] >= thresholds[k]
        out[finding] = {
            "threshold": thresholds[k],
            "sensitivity": _number(float(predicted[positive].mean()) if positive.any() else math.nan),
            "specificity": _number(float((~predicted[~positive]).mean()) if (~positive).any() else math.nan),
        }
    return out


def evaluate(
    name: str, *, work_dir: Path, resamples: int = BOOTSTRAP_RESAMPLES, progress: bool = True
) -> dict[str, Any]:
    """Evaluate every variant of a trained run on its held-out test split; write ``evaluation.json``.

    Args:
        name: the model; only ``cxr-fusion``.
        work_dir: the run's directory, as ``train`` left it.
        resamples: bootstrap resamples for every interval (at least 1000 for the reported figures).
        progress: a progress bar on stderr.

    Returns:
        The evaluation, as written to ``work_dir/evaluation.json``: ``variants`` (macro and per-finding AUROC with
        95% intervals for each of ``VARIANTS``), ``delta_vs_best_unimodal`` (fusion macro AUROC minus the better
        single-modality baseline's, with a paired interval), ``delta_vs_late_fusion`` (likewise against the
        untrained combination of the two), ``missing_clinical_macro_auroc`` (fusion with the
        clinical vector and mask all zero) and its interval, ``ece_before``/``ece_after`` (15-bin ECE averaged over
        findings, before and after the validation-fitted temperatures), ``subgroups`` (fusion macro AUROC by sex
        and age band), ``operating_points``, ``n_test``, ``seed``.

    Raises:
        InvalidInput: unknown ``name``.
        ModelError: no complete trained run in ``work_dir``.
    """
    check_model_name(name)
    started = time.perf_counter()
    run = load_run(work_dir, progress=progress)
    seed = int(run.config["seed"])
    validation, test = run.inputs("validation"), run.inputs("test")
    labels = test.split.labels
    n_test = len(test)

    logits = predict_all(run.models, test)
    missing_logits = predict_logits("fusion", run.models, test.without_clinical())
    temperatures, thresholds = fit_calibration(
        validation.split.labels, predict_logits("fusion", run.models, validation)
    )

    bar = Progress("bootstrap", len(VARIANTS) + 1, enabled=progress)
    indices = bootstrap_indices(n_test, resamples=resamples, seed=seed)
    resampled: dict[str, np.ndarray] = {}
    for variant in VARIANTS:
        resampled[variant] = bootstrap_per_finding_auroc(labels, logits[variant], indices)
        bar.update(note=variant)
    resampled_missing = bootstrap_per_finding_auroc(labels, missing_logits, indices)
    bar.update(note="clinical missing")
    bar.close()

    macro_point = {variant: float(macro(per_finding_auroc(labels, logits[variant]))) for variant in VARIANTS}
    macro_resampled = {variant: macro(resampled[variant]) for variant in VARIANTS}
    best_unimodal = max(("image_only", "clinical_only"), key=lambda variant: macro_point[variant])
    # The statistic's own definition on every resample: fusion minus whichever single modality is better there.
    delta_resampled = macro_resampled["fusion"] - np.maximum(
        macro_resampled["image_only"], macro_resampled["clinical_only"]
    )
    missing = _discrimination(labels, missing_logits, resampled_missing)
    missing_vs_image = macro(resampled_missing) - macro_resampled["image_only"]

    raw_probabilities = sigmoid(logits["fusion"])
    calibrated = sigmoid(logits["fusion"] / np.asarray(temperatures))
    males, ages = test.split.male.astype(bool), test.split.ages
    fusion_logits = logits["fusion"]
    subgroups = {
        "variant": "fusion",
        "sex": {
            sex: _subgroup(labels, fusion_logits, rows, resamples=resamples, seed=seed)
            for sex, rows in (("female", ~males), ("male", males))
        },
        "age_band": {
            band: _subgroup(labels, fusion_logits, (ages >= low) & (ages < high), resamples=resamples, seed=seed)
            for band, low, high in AGE_BANDS
        },
    }

    evaluation: dict[str, Any] = {
        "name": name,
        "run_id": run.config["run_id"],
        "seed": seed,
        "n_test": n_test,
        "resamples": resamples,
        "interval": "95% percentile bootstrap over test patients, the same resamples for every variant",
        "prevalence": {finding: float(labels[:, k].mean()) for k, finding in enumerate(FINDINGS)},
        "variants": {variant: _discrimination(labels, logits[variant], resampled[variant]) for variant in VARIANTS},
        "delta_vs_best_unimodal": {
            "value": _number(macro_point["fusion"] - max(macro_point["image_only"], macro_point["clinical_only"])),
            "ci": _interval(delta_resampled),
            "best_unimodal": best_unimodal,
        },
        "delta_vs_late_fusion": {
            "value": _number(macro_point["fusion"] - macro_point["late_fusion"]),
            "ci": _interval(macro_resampled["fusion"] - macro_resampled["late_fusion"]),
        },
        "missing_clinical_macro_auroc": missing["macro_auroc"],
        "missing_clinical_macro_auroc_ci": missing["macro_auroc_ci"],
        "missing_clinical": {
            **missing,
            "delta_vs_image_only": {
                "value": _number(float(macro(per_finding_auroc(labels, missing_logits))) - macro_point["image_only"]),
                "ci": _interval(missing_vs_image),
            },
        },
        "ece_bins": ECE_BINS,
        "ece_before": mean_expected_calibration_error(labels, raw_probabilities),
        "ece_after": mean_expected_calibration_error(labels, calibrated),
        "ece_per_finding": {
            finding: {
                "before": expected_calibration_error(labels[:, k], raw_probabilities[:, k]),
                "after": expected_calibration_error(labels[:, k], calibrated[:, k]),
                "temperature": temperatures[k],
            }
            for k, finding in enumerate(FINDINGS)
        },
        "operating_points": _operating_points(labels, calibrated, thresholds),
        "subgroups": subgroups,
        "seconds": time.perf_counter() - started,
    }
    (work_dir / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "fusion macro AUROC %.3f, best single modality (%s) %.3f, clinical missing %.3f",
        macro_point["fusion"],
        best_unimodal,
        macro_point[best_unimodal],
        missing["macro_auroc"] or math.nan,
    )
    return evaluation
