"""An infer worker loads and warms up every model before its first task."""

from __future__ import annotations

from pathlib import Path

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


def test_nothing_is_warmed_with_batching_off(tmp_path: Path) -> None:
    runtime = build_runtime(make_settings(tmp_path, batching=False))
    analysis.warm_models(runtime)
    assert runtime.batchers.loaded() == []
