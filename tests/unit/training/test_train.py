"""The three build steps on a tiny cohort: deterministic training, ONNX export with parity, evaluation files.

Tiny on purpose (32 training patients at 64x64, one epoch): these tests check the machinery, not the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

from service.errors import InvalidInput, ModelError  # noqa: E402
from service.inference.manifest import load_manifest  # noqa: E402
from service.training.evaluate import evaluate  # noqa: E402
from service.training.export import check_parity, export  # noqa: E402
from service.training.train import train  # noqa: E402
from service.training.variants import TRAINED_VARIANTS, VARIANTS, load_run  # noqa: E402

TINY: dict[str, Any] = {
    "n_train": 32,
    "n_val": 24,
    "n_test": 24,
    "epochs": 1,
    "image_size": 64,
    "render_size": 64,
    "workers": 1,
    "progress": False,
}


def _weights(work_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        variant: torch.load(work_dir / "weights" / f"{variant}.pt", weights_only=True) for variant in TRAINED_VARIANTS
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work_dir = tmp_path_factory.mktemp("run")
    train("cxr-fusion", work_dir=work_dir, seed=0, **TINY)
    return work_dir


def test_same_seed_gives_identical_weights(tiny_run: Path, tmp_path: Path) -> None:
    config = train("cxr-fusion", work_dir=tmp_path, seed=0, **TINY)
    first, second = _weights(tiny_run), _weights(tmp_path)

    for variant in TRAINED_VARIANTS:
        assert first[variant].keys() == second[variant].keys()
        for key in first[variant]:
            assert torch.equal(first[variant][key], second[variant][key]), (variant, key)
    assert config["run_id"] == json.loads((tiny_run / "config.json").read_text())["run_id"]


def test_another_seed_gives_other_weights(tiny_run: Path, tmp_path: Path) -> None:
    train("cxr-fusion", work_dir=tmp_path, seed=1, **TINY)
    first, other = _weights(tiny_run), _weights(tmp_path)

    assert not torch.equal(first["fusion"]["head.3.weight"], other["fusion"]["head.3.weight"])


def test_the_cohort_is_rendered_once_and_reused(tiny_run: Path) -> None:
    caches = list(tiny_run.glob("cohort-*.npz"))
    run = load_run(tiny_run)

    assert len(caches) == 1
    assert {name: len(split) for name, split in run.splits.items()} == {"train": 32, "validation": 24, "test": 24}
    assert run.splits["train"].images.shape == (32, 1, 64, 64)


@pytest.fixture(scope="module")
def built(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Evaluate, then export (so that the card carries the test figures): (evaluation, export summary, models)."""
    out_dir = tmp_path_factory.mktemp("models")
    evaluation = evaluate("cxr-fusion", work_dir=tiny_run, resamples=200, progress=False)
    return evaluation, export("cxr-fusion", work_dir=tiny_run, out_dir=out_dir), out_dir


def test_export_writes_a_model_folder_that_matches_pytorch(built: tuple[dict[str, Any], dict[str, Any], Path]) -> None:
    _, summary, out_dir = built

    model_dir = out_dir / "cxr-fusion"
    manifest = load_manifest(model_dir / "manifest.yaml")
    onnx_path = model_dir / manifest.latest().artifact
    assert manifest.latest().sha256 == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert manifest.image_input.shape == [1, 64, 64]
    assert summary["parity"]["probability"] <= 1e-4
    assert summary["parity_cases"] == 24

    # Dynamic batch axis: any batch size runs, with the named inputs and outputs.
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {
        "image": np.zeros((3, 1, 64, 64), dtype=np.float32),
        "clinical": np.zeros((3, 10), dtype=np.float32),
        "clinical_mask": np.zeros((3, 10), dtype=np.float32),
    }
    logits, heatmap = session.run(["logits", "heatmap"], feed)
    assert logits.shape == (3, 5)
    assert heatmap.shape == (3, 5, 4, 4)


def test_parity_check_refuses_a_model_that_differs(
    tiny_run: Path, built: tuple[dict[str, Any], dict[str, Any], Path]
) -> None:
    run = load_run(tiny_run)
    test = run.inputs("test")
    inputs = (test.images(slice(0, 8)).numpy(), test.clinical[:8], test.masks[:8])
    model = run.models["fusion"]
    with torch.no_grad():
        model.head[3].bias += 0.5  # what a stale or wrongly exported file would look like

    with pytest.raises(ModelError, match="differs from PyTorch"):
        check_parity(model, built[2] / "cxr-fusion" / "1" / "model.onnx", inputs, [1.0] * 5)


def test_evaluation_has_every_figure_and_the_card_shows_them(
    tiny_run: Path, built: tuple[dict[str, Any], dict[str, Any], Path]
) -> None:
    evaluation, _, out_dir = built

    assert json.loads((tiny_run / "evaluation.json").read_text()) == evaluation
    assert set(evaluation["variants"]) == set(VARIANTS)
    for figures in evaluation["variants"].values():
        assert {"macro_auroc", "macro_auroc_ci", "per_finding"} <= set(figures)
    expected = {"delta_vs_best_unimodal", "delta_vs_late_fusion", "missing_clinical_macro_auroc", "ece_before"}
    assert expected | {"ece_after", "subgroups"} <= set(evaluation)
    assert evaluation["n_test"] == 24 and evaluation["seed"] == 0
    assert set(evaluation["subgroups"]["age_band"]) == {"<50", "50-69", ">=70"}
    assert 0.0 <= evaluation["ece_after"] <= 1.0

    card = (out_dir / "cxr-fusion" / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card
    assert "held-out synthetic test split, 24 patients" in card
    assert "late fusion" in card


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        train("chest-ct", work_dir=tmp_path, **TINY)


def test_export_without_a_trained_run_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="run train first"):
        export("cxr-fusion", work_dir=tmp_path, out_dir=tmp_path / "models")
