"""Check an ONNX graph against its manifest, then run a smoke inference.

The manifest is a contract: input and output names, shapes, dtypes and the number of findings must agree with the
graph before a model is served, so that a mistake in a hand-written manifest is found at import, not on a patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.errors import ModelError
from service.inference.manifest import Manifest
from service.inference.onnx_runner import OnnxRunner

_FLOAT = "tensor(float)"


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    smoke_output_shape: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_dims(where: str, graph_dims: list[int | str | None], expected: list[int], problems: list[str]) -> None:
    """Graph dims are [batch, *expected]; symbolic or unknown dims in the graph accept any size."""
    if len(graph_dims) != len(expected) + 1:
        problems.append(
            f"{where}: the graph has rank {len(graph_dims)}, the manifest implies {len(expected) + 1} "
            f"(batch + {expected})"
        )
        return
    if isinstance(graph_dims[0], int) and graph_dims[0] != 1:
        problems.append(f"{where}: the batch axis is fixed at {graph_dims[0]}; export it as dynamic")
    for axis, (actual, wanted) in enumerate(zip(graph_dims[1:], expected, strict=True), start=1):
        if isinstance(actual, int) and actual != wanted:
            problems.append(f"{where}: axis {axis} is {actual} in the graph, {wanted} in the manifest")


def check_graph(manifest: Manifest, runner: OnnxRunner) -> list[str]:
    """Compare the graph's inputs and outputs with the manifest; return every disagreement found."""
    problems: list[str] = []
    inputs, outputs = runner.input_specs(), runner.output_specs()
    expected_inputs = {manifest.image_input.name: manifest.image_input.shape}
    if manifest.clinical_input is not None:
        n_features = len(manifest.clinical_input.features)
        expected_inputs[manifest.clinical_input.values_name] = [n_features]
        expected_inputs[manifest.clinical_input.mask_name] = [n_features]
    for name, shape in expected_inputs.items():
        if name not in inputs:
            problems.append(
                f"input {name!r} named in the manifest is not in the graph (graph inputs: {', '.join(sorted(inputs))})"
            )
            continue
        dims, dtype = inputs[name]
        if dtype != _FLOAT:
            problems.append(f"input {name!r} is {dtype} in the graph; the service feeds float32")
        _check_dims(f"input {name!r}", dims, shape, problems)
    for name in sorted(set(inputs) - set(expected_inputs)):
        problems.append(f"graph input {name!r} is not described in the manifest; the service could not feed it")
    n_findings = len(manifest.outputs.findings)
    if manifest.outputs.logits not in outputs:
        problems.append(
            f"output {manifest.outputs.logits!r} is not in the graph (graph outputs: {', '.join(sorted(outputs))})"
        )
    else:
        dims, dtype = outputs[manifest.outputs.logits]
        if dtype != _FLOAT:
            problems.append(f"output {manifest.outputs.logits!r} is {dtype}; float32 logits are expected")
        _check_dims(f"output {manifest.outputs.logits!r}", dims, [n_findings], problems)
    if manifest.outputs.heatmap is not None and manifest.outputs.heatmap not in outputs:
        problems.append(f"heatmap output {manifest.outputs.heatmap!r} is not in the graph")
    return problems


def smoke_test(manifest: Manifest, runner: OnnxRunner, *, batch: int = 2) -> tuple[int, ...]:
    """Run a batch of neutral inputs; the logits must have shape [batch, findings] and be finite.

    Raises:
        ModelError: the runtime fails, or the output has the wrong shape or non-finite values.
    """
    feeds = {manifest.image_input.name: np.zeros((batch, *manifest.image_input.shape), dtype=np.float32)}
    if manifest.clinical_input is not None:
        n = len(manifest.clinical_input.features)
        feeds[manifest.clinical_input.values_name] = np.zeros((batch, n), dtype=np.float32)
        feeds[manifest.clinical_input.mask_name] = np.zeros((batch, n), dtype=np.float32)
    try:
        logits = runner.run(feeds, [manifest.outputs.logits])[manifest.outputs.logits]
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelError(f"smoke inference failed: {e}") from e
    expected = (batch, len(manifest.outputs.findings))
    if tuple(logits.shape) != expected:
        raise ModelError(f"smoke inference returned logits of shape {tuple(logits.shape)}, expected {expected}")
    if not np.all(np.isfinite(logits)):
        raise ModelError("smoke inference returned non-finite logits")
    return tuple(logits.shape)


def validate(manifest: Manifest, runner: OnnxRunner) -> ValidationReport:
    """The graph check, then (only if it passed) the smoke inference."""
    report = ValidationReport(problems=check_graph(manifest, runner))
    if report.ok:
        try:
            report.smoke_output_shape = smoke_test(manifest, runner)
        except ModelError as e:
            report.problems.append(e.message)
    return report
