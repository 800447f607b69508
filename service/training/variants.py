"""The four model variants compared on the model card, and a trained run read back from its work directory.

- ``fusion``: ``FusionNet``, image and clinical data fused in the middle of the network (the shipped model).
- ``image_only``: ``ImageOnlyNet``, the same image encoder and head without clinical input.
- ``clinical_only``: ``ClinicalNet``, an MLP on the clinical values and their missing-mask.
- ``late_fusion``: the mean of the ``image_only`` and ``clinical_only`` logits, nothing trained. For ranking (and
  so for AUROC) this is the sum of the two log-odds, the combination that is exact when image and clinical data
  are independent given the finding; it is the baseline a fused network must beat to show an interaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.errors import InvalidInput, ModelError
from service.training.cohort_arrays import (
    IMAGE_SIZE,
    RENDER_SIZE,
    SPLITS,
    Normalizer,
    Split,
    cache_path,
    load_or_render,
)
from service.training.model import ClinicalNet, FusionNet, ImageOnlyNet
from service.training.synthetic import FINDINGS

MODEL_NAME = "cxr-fusion"
VARIANTS: tuple[str, ...] = ("fusion", "image_only", "clinical_only", "late_fusion")
TRAINED_VARIANTS: tuple[str, ...] = ("fusion", "image_only", "clinical_only")
CONFIG_FILE = "config.json"
EVALUATION_FILE = "evaluation.json"
WEIGHTS_DIR = "weights"
INFERENCE_BATCH = 64


def check_model_name(name: str) -> None:
    """Refuse a model these steps cannot build.

    Raises:
        InvalidInput: ``name`` is not ``cxr-fusion``.
    """
    if name != MODEL_NAME:
        raise InvalidInput(f"unknown trainable model {name!r}; available: {MODEL_NAME}")


def build_model(variant: str, *, n_clinical: int) -> nn.Module:
    """A fresh, untrained network of one trained variant."""
    if variant == "fusion":
        return FusionNet(n_clinical=n_clinical, n_findings=len(FINDINGS))
    if variant == "image_only":
        return ImageOnlyNet(n_findings=len(FINDINGS))
    if variant == "clinical_only":
        return ClinicalNet(n_clinical=n_clinical, n_findings=len(FINDINGS))
    raise ValueError(f"unknown trained variant {variant!r}; expected one of {TRAINED_VARIANTS}")


def weights_path(work_dir: Path, variant: str) -> Path:
    return work_dir / WEIGHTS_DIR / f"{variant}.pt"


@dataclass
class Inputs:
    """A split ready for the networks: cached images normalized batch by batch, clinical values z-scored."""

    split: Split
    normalizer: Normalizer
    clinical: np.ndarray  # float32 [n, features]
    masks: np.ndarray  # float32 [n, features]

    @classmethod
    def of(cls, split: Split, normalizer: Normalizer) -> Inputs:
        return cls(
            split=split,
            normalizer=normalizer,
            clinical=normalizer.clinical(split.raw_values, split.masks),
            masks=split.masks.astype(np.float32),
        )

    def __len__(self) -> int:
        return len(self.split)

    def images(self, rows: np.ndarray | slice) -> torch.Tensor:
        return torch.from_numpy(self.normalizer.images(self.split.images[rows]))

    def without_clinical(self) -> Inputs:
        """The same patients with their clinical data fully missing (values and mask zero)."""
        return Inputs(
            split=self.split,
            normalizer=self.normalizer,
            clinical=np.zeros_like(self.clinical),
            masks=np.zeros_like(self.masks),
        )


def predict_logits(variant: str, models: dict[str, nn.Module], inputs: Inputs) -> np.ndarray:
    """Logits [n, findings] of one variant (``late_fusion`` from the two single-modality models)."""
    if variant == "late_fusion":
        return (predict_logits("image_only", models, inputs) + predict_logits("clinical_only", models, inputs)) / 2.0
    model = models[variant]
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), INFERENCE_BATCH):
            rows = slice(start, start + INFERENCE_BATCH)
            clinical = torch.from_numpy(inputs.clinical[rows])
            masks = torch.from_numpy(inputs.masks[rows])
            if variant == "fusion":
                logits, _ = model(inputs.images(rows), clinical, masks)
            elif variant == "image_only":
                logits, _ = model(inputs.images(rows))
            else:
                logits = model(clinical, masks)
            out.append(logits.numpy())
    return np.concatenate(out).astype(np.float64)


@dataclass
class TrainedRun:
    """What ``train`` left in a work directory, read back."""

    work_dir: Path
    config: dict[str, Any]
    splits: dict[str, Split]
    normalizer: Normalizer
    models: dict[str, nn.Module]

    def inputs(self, split: str) -> Inputs:
        return Inputs.of(self.splits[split], self.normalizer)


def load_run(work_dir: Path, *, progress: bool = False) -> TrainedRun:
    """Read the configuration, the cached cohort and the weights of every trained variant.

    Raises:
        ModelError: ``train`` has not completed in ``work_dir``.
    """
    config_path = work_dir / CONFIG_FILE
    if not config_path.exists():
        raise ModelError(f"no trained run in {work_dir}: {CONFIG_FILE} is missing (run train first)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    cohort = config["cohort"]
    sizes = {name: cohort["sizes"][name] for name in SPLITS}
    image_size, render_size = cohort.get("image_size", IMAGE_SIZE), cohort.get("render_size", RENDER_SIZE)
    expected = cache_path(work_dir, seed=config["seed"], sizes=sizes, image_size=image_size, render_size=render_size)
    if expected.name != cohort["file"]:
        # The generator's code changed since training: its cohort would not be the one the weights were fit on.
        raise ModelError(f"the synthetic cohort generator changed since {work_dir} was trained; run train again")
    splits, _ = load_or_render(
        work_dir,
        seed=config["seed"],
        sizes=sizes,
        image_size=image_size,
        render_size=render_size,
        workers=1,
        progress=progress,
    )
    normalizer = Normalizer(**config["normalization"])
    n_clinical = len(normalizer.feature_means)
    models = {}
    for variant in TRAINED_VARIANTS:
        path = weights_path(work_dir, variant)
        if not path.exists():
            raise ModelError(f"no weights for {variant} in {path.parent} (run train first)")
        model = build_model(variant, n_clinical=n_clinical)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        models[variant] = model
    return TrainedRun(work_dir=work_dir, config=config, splits=splits, normalizer=normalizer, models=models)


def predict_all(models: dict[str, nn.Module], inputs: Inputs) -> dict[str, np.ndarray]:
    """Logits of every variant in ``VARIANTS`` on one split, each network run once."""
    logits = {variant: predict_logits(variant, models, inputs) for variant in TRAINED_VARIANTS}
    logits["late_fusion"] = (logits["image_only"] + logits["clinical_only"]) / 2.0
    return logits
