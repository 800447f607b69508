"""ONNX Runtime runner: the only module that imports onnxruntime."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.errors import ModelError

log = logging.getLogger(__name__)


class OnnxRunner:
    """One ONNX model loaded on the best execution provider available, in the configured order."""

    def __init__(self, path: Path, *, providers: list[str]) -> None:
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime raises its own untyped errors for bad graphs
            raise ModelError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.provider: str = self._session.get_providers()[0]
        self._lock = threading.Lock()
        log.info("loaded %s on %s", path.name, self.provider)

    def input_specs(self) -> dict[str, tuple[list[int | str | None], str]]:
        return {i.name: (list(i.shape), i.type) for i in self._session.get_inputs()}

    def output_specs(self) -> dict[str, tuple[list[int | str | None], str]]:
        return {o.name: (list(o.shape), o.type) for o in self._session.get_outputs()}

    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe, but serializing keeps one model's memory bounded per process.
        with self._lock:
            outputs = self._session.run(output_names, feeds)
        return dict(zip(output_names, outputs, strict=True))
