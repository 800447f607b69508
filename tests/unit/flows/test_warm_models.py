"""An infer worker loads and warms up every model before its first task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.flows import analysis
from service.flows.runtime import build_runtime
from tests.conftest import make_settings


def test_every_model_is_loaded_and_warmed_up(tmp_path: Path) -> None:
    runtime = build_runtime(make_settings(tmp_path))
    try:
        assert runtime.batchers.loaded() == []
        analysis.warm_models(runtime)
        assert runtime.batchers.loaded() == [("ct-head-ich", "1"), ("cxr-fusion", "1")]
    finally:
        runtime.batchers.close_all()


def test_with_batching_off_the_runners_are_loaded_and_run_once(tmp_path: Path, monkeypatch: Any) -> None:
    runtime = build_runtime(make_settings(tmp_path, batching=False))
    warmed: list[tuple[str, int]] = []
    real = analysis.warm_up_runner

    def spy(manifest: Any, runner: Any, *, version: str, max_batch: int) -> float:
        warmed.append((manifest.name, max_batch))
        return real(manifest, runner, version=version, max_batch=max_batch)

    monkeypatch.setattr(analysis, "warm_up_runner", spy)
    analysis.warm_models(runtime)
    assert runtime.batchers.loaded() == []  # no batcher: every study is a batch of 1
    assert warmed == [("ct-head-ich", 1), ("cxr-fusion", 1)]  # but no study pays the model's loading
