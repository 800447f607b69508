"""Build the demonstration model ``cxr-fusion`` on synthetic data, in three steps sharing one work directory.

1. ``train``: render the cohort once (cached), fit the three networks behind the four variants of
   ``service/training/variants.py`` (the fused network and its baselines), save weights and a ``config.json``.
2. ``evaluate``: score every variant on the held-out test split (``service/training/evaluate.py``).
3. ``export``: calibrate and choose thresholds on validation, export the fused network to ONNX, write the model
   folder with its manifest and model card (``service/training/export.py``).

``build_cxr_fusion`` runs the three in that order. Run it with ``python -m service.training.train --out models``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from service.errors import InvalidInput
from service.inference.registry import sha256_of
from service.training.cohort_arrays import IMAGE_SIZE, RENDER_SIZE, fit_normalizer, load_or_render
from service.training.evaluate import evaluate
from service.training.export import export
from service.training.measures import macro, per_finding_auroc
from service.training.progress import Progress
from service.training.variants import (
    CONFIG_FILE,
    MODEL_NAME,
    TRAINED_VARIANTS,
    VARIANTS,
    WEIGHTS_DIR,
    Inputs,
    build_model,
    check_model_name,
    predict_logits,
    weights_path,
)

logger = logging.getLogger(__name__)

DEFAULT_WORK_ROOT = Path("var/training")
# Share of training samples of the fused network that lose their whole clinical vector and mask, as a patient
# with no FHIR record would: the network must still answer from the image alone.
MODALITY_DROPOUT = 0.3
AUX_LOSS_WEIGHT = 1.0
BATCH_SIZE = 32
IMAGE_LEARNING_RATE = 3e-3
CLINICAL_LEARNING_RATE = 3e-3
CLINICAL_BATCH_SIZE = 64
CLINICAL_EPOCHS = 40
WEIGHT_DECAY = 1e-4


def default_work_dir(name: str) -> Path:
    """Where the steps keep their artifacts unless told otherwise: ``var/training/<name>/``."""
    return DEFAULT_WORK_ROOT / name


def _variant_seed(seed: int, variant: str) -> int:
    # One independent stream per variant: a variant's weights do not depend on which others were trained first.
    return int(np.random.SeedSequence([seed, VARIANTS.index(variant)]).generate_state(1)[0])


@contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the block; the caller's settings restored after."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def _schedule(model: nn.Module, *, learning_rate: float, total_steps: int) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=max(total_steps, 1), pct_start=0.2
    )
    return optimizer, scheduler


def _fit_image_model(
    variant: str,
    model: nn.Module,
    data: Inputs,
    validation: Inputs,
    *,
    epochs: int,
    generator: torch.Generator,
    bar: Progress,
) -> None:
    """Train ``fusion`` or ``image_only``: BCE on the logits plus the auxiliary BCE of the CAM average."""
    n = len(data)
    optimizer, scheduler = _schedule(
        model, learning_rate=IMAGE_LEARNING_RATE, total_steps=epochs * math.ceil(n / BATCH_SIZE)
    )
    model.to(memory_format=torch.channels_last)  # a quarter faster on CPU for these small convolutions
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator).numpy()
        total = 0.0
        for start in range(0, n, BATCH_SIZE):
            rows = order[start : start + BATCH_SIZE]
            images = data.images(rows).contiguous(memory_format=torch.channels_last)
            target = torch.from_numpy(data.split.labels[rows])
            if variant == "fusion":
                # Modality dropout: whole clinical vector and mask gone together.
                keep = (torch.rand(rows.size, 1, generator=generator) >= MODALITY_DROPOUT).float()
                clinical = torch.from_numpy(data.clinical[rows]) * keep
                masks = torch.from_numpy(data.masks[rows]) * keep
                logits, image_logits, _ = model.forward_with_aux(images, clinical, masks)
            else:
                logits, image_logits, _ = model.forward_with_aux(images)
            # The auxiliary image-only loss trains the CAM projection, which the heatmap output shows.
            loss = functional.binary_cross_entropy_with_logits(logits, target)
            loss = loss + AUX_LOSS_WEIGHT * functional.binary_cross_entropy_with_logits(image_logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * rows.size
            bar.update(note=f"epoch {epoch + 1}/{epochs} loss {total / (start + rows.size):.3f}")
        _log_epoch(variant, model, validation, epoch=epoch, epochs=epochs, loss=total / n, started=started)
    model.to(memory_format=torch.contiguous_format)


def _fit_clinical_model(
    model: nn.Module, data: Inputs, validation: Inputs, *, epochs: int, generator: torch.Generator, bar: Progress
) -> None:
    n = len(data)
    optimizer, scheduler = _schedule(
        model, learning_rate=CLINICAL_LEARNING_RATE, total_steps=epochs * math.ceil(n / CLINICAL_BATCH_SIZE)
    )
    clinical, masks = torch.from_numpy(data.clinical), torch.from_numpy(data.masks)
    labels = torch.from_numpy(data.split.labels)
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, CLINICAL_BATCH_SIZE):
            rows = order[start : start + CLINICAL_BATCH_SIZE]
            loss = functional.binary_cross_entropy_with_logits(model(clinical[rows], masks[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * rows.shape[0]
        bar.update(note=f"epoch {epoch + 1}/{epochs} loss {total / n:.3f}")
        if epoch + 1 == epochs:
            _log_epoch("clinical_only", model, validation, epoch=epoch, epochs=epochs, loss=total / n, started=started)


def _log_epoch(
    variant: str, model: nn.Module, validation: Inputs, *, epoch: int, epochs: int, loss: float, started: float
) -> None:
    """Log the epoch's loss, and the validation AUROCs after the last epoch (a pass over validation costs time)."""
    if epoch + 1 < epochs:
        seconds = time.perf_counter() - started
        logger.info("%s epoch %d/%d  loss %.4f  %.0f s", variant, epoch + 1, epochs, loss, seconds)
        return
    aurocs = per_finding_auroc(validation.split.labels, predict_logits(variant, {variant: model}, validation))
    logger.info(
        "%s epoch %d/%d  loss %.4f  validation macro AUROC %.3f  (%s)  %.0f s",
        variant,
        epoch + 1,
        epochs,
        loss,
        float(macro(aurocs)),
        " ".join(f"{a:.3f}" for a in aurocs),
        time.perf_counter() - started,
    )


def train(
    name: str,
    *,
    work_dir: Path,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 600,
    n_test: int = 1000,
    epochs: int = 10,
    image_size: int = IMAGE_SIZE,
    render_size: int = RENDER_SIZE,
    workers: int = 2,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Render (or reuse) the cohort and train every variant; weights and ``config.json`` go to ``work_dir``.

    Deterministic: the same arguments on the same machine give bit-identical weights (cohort cases each have their
    own seed, each variant its own torch stream, and kernels run deterministically on ``threads`` threads).

    Args:
        name: the model to build; only ``cxr-fusion``.
        work_dir: the run's directory (``default_work_dir(name)`` by convention); created if needed.
        seed: seeds the cohort and the networks.
        n_train: training patients.
        n_val: validation patients (early insight, calibration and thresholds in ``export``/``evaluate``).
        n_test: held-out test patients (``evaluate`` only).
        epochs: epochs of the two image networks (the clinical MLP has its own fixed schedule).
        image_size: side of the model's input image (256 for the shipped model; smaller for quick tests).
        render_size: side at which radiographs are rendered before pre-processing resizes them.
        workers: processes rendering the cohort; the cohort does not depend on it.
        threads: torch threads, recorded with the run (bit-identical weights need the same count). One by default:
            on two cores a second thread saves a third of the time when the machine is idle, and costs several
            times that when another process holds a core (its threads wait for each other at every layer).
        progress: progress bars on stderr.

    Returns:
        The configuration written to ``config.json``, with the wall time of each part.

    Raises:
        InvalidInput: unknown ``name`` or a size out of range.
    """
    check_model_name(name)
    for argument, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("epochs", epochs)):
        if value < 1:
            raise InvalidInput(f"'{argument}' must be at least 1, got {value}")
    if image_size % 16 or image_size < 32:
        raise InvalidInput(f"'image_size' must be a multiple of 16 and at least 32, got {image_size}")
    started = time.perf_counter()
    # A run that stops half-way must not leave an old config describing new weights.
    (work_dir / CONFIG_FILE).unlink(missing_ok=True)
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    splits, cohort_path = load_or_render(
        work_dir,
        seed=seed,
        sizes=sizes,
        image_size=image_size,
        render_size=render_size,
        workers=workers,
        progress=progress,
    )
    seconds: dict[str, float] = {"cohort": time.perf_counter() - started}
    normalizer = fit_normalizer(splits["train"])
    data, validation = Inputs.of(splits["train"], normalizer), Inputs.of(splits["validation"], normalizer)

    (work_dir / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    variants: dict[str, Any] = {}
    with _deterministic_torch(threads):
        for variant in TRAINED_VARIANTS:
            variant_started = time.perf_counter()
            variant_seed = _variant_seed(seed, variant)
            torch.manual_seed(variant_seed)  # initial weights and the head's dropout
            generator = torch.Generator().manual_seed(variant_seed)  # batch order and modality dropout
            model = build_model(variant, n_clinical=len(normalizer.feature_means))
            if variant == "clinical_only":
                bar = Progress(f"train {variant}", CLINICAL_EPOCHS, enabled=progress)
                _fit_clinical_model(model, data, validation, epochs=CLINICAL_EPOCHS, generator=generator, bar=bar)
            else:
                bar = Progress(f"train {variant}", epochs * math.ceil(n_train / BATCH_SIZE), enabled=progress)
                _fit_image_model(variant, model, data, validation, epochs=epochs, generator=generator, bar=bar)
            bar.close()
            path = weights_path(work_dir, variant)
            torch.save(model.state_dict(), path)
            validation_aurocs = per_finding_auroc(
                validation.split.labels, predict_logits(variant, {variant: model}, validation)
            )
            seconds[variant] = time.perf_counter() - variant_started
            variants[variant] = {
                "weights": str(path.relative_to(work_dir)),
                "sha256": sha256_of(path),
                "seed": variant_seed,
                "parameters": sum(p.numel() for p in model.parameters()),
                "validation_macro_auroc": float(macro(validation_aurocs)),
            }
    variants["late_fusion"] = {"combination": "mean of the image_only and clinical_only logits; nothing trained"}
    run_id = hashlib.sha256("".join(variants[v]["sha256"] for v in TRAINED_VARIANTS).encode("ascii")).hexdigest()[:16]
    seconds["total"] = time.perf_counter() - started
    config: dict[str, Any] = {
        "name": name,
        "run_id": run_id,
        "seed": seed,
        "cohort": {
            "file": cohort_path.name,
            "sizes": sizes,
            "image_size": image_size,
            "render_size": render_size,
            "prevalence": {
                split: [float(p) for p in splits[split].labels.mean(axis=0)]
                for split in ("train", "validation", "test")
            },
        },
        "normalization": normalizer.as_dict(),
        "training": {
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "learning_rate": IMAGE_LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY,
            "modality_dropout": MODALITY_DROPOUT,
            "aux_loss_weight": AUX_LOSS_WEIGHT,
            "clinical_epochs": CLINICAL_EPOCHS,
            "clinical_batch_size": CLINICAL_BATCH_SIZE,
            "clinical_learning_rate": CLINICAL_LEARNING_RATE,
            "threads": threads,
            "torch": torch.__version__,
        },
        "variants": variants,
        "seconds": seconds,
    }
    (work_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("trained %s in %.0f s (run %s)", ", ".join(TRAINED_VARIANTS), seconds["total"], run_id)
    return config


def build_cxr_fusion(
    out_dir: Path,
    *,
    work_dir: Path | None = None,
    n_train: int = 3000,
    n_val: int = 600,
    n_test: int = 1000,
    epochs: int = 10,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """``train``, ``evaluate`` and ``export`` in a row: the model folder ``out_dir/cxr-fusion/`` from nothing.

    Evaluation runs before export so that the model card carries the held-out test figures.

    Args:
        out_dir: the model repository.
        work_dir: the run's directory; ``var/training/cxr-fusion`` when None.
        n_train: training patients.
        n_val: validation patients.
        n_test: held-out test patients.
        epochs: epochs of the image networks.
        seed: seeds everything; the same seed gives the same model.
        workers: processes rendering the cohort.
        progress: progress bars on stderr.

    Returns:
        ``{"train": ..., "evaluation": ..., "export": ...}``, each step's own summary.
    """
    work_dir = default_work_dir(MODEL_NAME) if work_dir is None else work_dir
    trained = train(
        MODEL_NAME,
        work_dir=work_dir,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        epochs=epochs,
        workers=workers,
        progress=progress,
    )
    evaluation = evaluate(MODEL_NAME, work_dir=work_dir)
    exported = export(MODEL_NAME, work_dir=work_dir, out_dir=out_dir)
    return {"train": trained, "evaluation": evaluation, "export": exported}


def _headline(evaluation: dict[str, Any]) -> str:
    lines = []
    for variant, figures in evaluation["variants"].items():
        low, high = figures["macro_auroc_ci"]
        lines.append(f"{variant:14s} macro AUROC {figures['macro_auroc']:.3f} ({low:.3f}-{high:.3f})")
    delta = evaluation["delta_vs_best_unimodal"]
    lines.append(f"fusion - best single modality {delta['value']:+.3f} ({delta['ci'][0]:+.3f}-{delta['ci'][1]:+.3f})")
    missing = evaluation["missing_clinical_macro_auroc_ci"]
    lines.append(
        f"fusion, clinical missing {evaluation['missing_clinical_macro_auroc']:.3f} ({missing[0]:.3f}-{missing[1]:.3f})"
    )
    lines.append(f"ECE {evaluation['ece_before']:.3f} before, {evaluation['ece_after']:.3f} after calibration")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Build the demonstration model {MODEL_NAME} on synthetic data.")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--work-dir", type=Path, default=None, help=f"default: {default_work_dir(MODEL_NAME)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--step", choices=("all", "train", "evaluate", "export"), default="all", help="one step, or all three"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work_dir = args.work_dir or default_work_dir(MODEL_NAME)
    if args.step == "all":
        summary = build_cxr_fusion(args.out, work_dir=work_dir, seed=args.seed)
        print(_headline(summary["evaluation"]))
        print(f"wrote {summary['export']['model']} ({summary['export']['model_bytes'] / 1e6:.2f} MB)")
    elif args.step == "train":
        config = train(MODEL_NAME, work_dir=work_dir, seed=args.seed)
        print(f"trained run {config['run_id']} in {config['seconds']['total']:.0f} s")
    elif args.step == "evaluate":
        print(_headline(evaluate(MODEL_NAME, work_dir=work_dir)))
    else:
        exported = export(MODEL_NAME, work_dir=work_dir, out_dir=args.out)
        print(f"wrote {exported['model']} ({exported['model_bytes'] / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
