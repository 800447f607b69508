"""Check an ONNX graph against its manifest, then run a smoke inference.

The manifest is a contract: input and output names, shapes, dtypes and the number of findings must agree with the
graph before a model is served, so that a mistake in a hand-written manifest is found at import, not on a patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from service.errors import ModelError
from service.inference.manifest import Manifest
from service.inference.onnx_runner import OnnxRunner
from service.inference.preprocess import prepare_image

_FLOAT = "tensor(float)"
# Nodes that pass a tensor on unchanged in value, looked through to find what made the logits output.
_PASS_THROUGH = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
_PROBABILITIES = {"Sigmoid", "Softmax", "LogSoftmax"}


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    smoke_output_shape: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_dims(
    where: str, graph_dims: list[int | str | None], expected: list[int], problems: list[str], *, max_batch: int
) -> None:
    """Graph dims are [batch, *expected]; symbolic or unknown dims in the graph accept any size. A batch axis fixed
    at 1 takes one study a call, which the manifest must say (``batching.max_batch_size: 1``)."""
    if len(graph_dims) != len(expected) + 1:
        problems.append(
            f"{where}: the graph has rank {len(graph_dims)}, the manifest implies {len(expected) + 1} "
            f"(batch + {expected})"
        )
        return
    if isinstance(graph_dims[0], int) and graph_dims[0] != 1:
        problems.append(f"{where}: the batch axis is fixed at {graph_dims[0]}; export it as dynamic")
    elif graph_dims[0] == 1 and max_batch > 1:
        problems.append(
            f"{where}: the batch axis is fixed at 1 but batching.max_batch_size is {max_batch}; export the batch "
            "axis as dynamic, or set batching.max_batch_size: 1 (no batching)"
        )
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
        _check_dims(f"input {name!r}", dims, shape, problems, max_batch=manifest.batching.max_batch_size)
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
        _check_dims(
            f"output {manifest.outputs.logits!r}",
            dims,
            [n_findings],
            problems,
            max_batch=manifest.batching.max_batch_size,
        )
    if manifest.outputs.heatmap is not None and manifest.outputs.heatmap not in outputs:
        problems.append(f"heatmap output {manifest.outputs.heatmap!r} is not in the graph")
    return problems


def check_activation(manifest: Manifest, path: Path) -> list[str]:
    """The logits output must be logits: clinfer calibrates them and applies the sigmoid itself, so a graph that ends
    in a Sigmoid (or Softmax) would be squashed twice, every probability in [0.5, 0.73] and every finding with a
    threshold up to 0.5 positive, whatever the image."""
    graph = onnx.load(str(path), load_external_data=False).graph
    made_by = {output: node for node in graph.node for output in node.output}
    node = made_by.get(manifest.outputs.logits)
    while node is not None and node.op_type in _PASS_THROUGH and node.input:
        node = made_by.get(node.input[0])
    if node is None or node.op_type not in _PROBABILITIES:
        return []
    return [
        f"output {manifest.outputs.logits!r} is made by a {node.op_type} node ({node.name or 'unnamed'}): clinfer "
        "expects logits and applies the sigmoid itself, after calibration. Export the graph without its final "
        f"{node.op_type}, e.g. onnx.utils.extract_model(model, output_path, input_names, [{node.input[0]!r}]) and "
        "name that output in outputs.logits"
    ]


def _synthetic_image(seed: int) -> np.ndarray:
    """A 12-bit radiograph-like ramp with noise: something for the manifest's preprocessing to window and resize."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(200, 3800, 512, dtype=np.float32)[None, :] * np.ones((512, 1), dtype=np.float32)
    return (ramp + rng.normal(0, 150, (512, 512))).clip(0, 4095).astype(np.uint16)


def smoke_test(manifest: Manifest, runner: OnnxRunner, *, batch: int = 2) -> tuple[int, ...]:
    """Run a batch of synthetic images through the manifest's own preprocessing, as the service will feed them
    (clinical values at their training means, one row with every value missing); the logits must have shape
    [batch, findings] and be finite.

    Raises:
        ModelError: preprocessing or the runtime fails, or the output has the wrong shape or non-finite values.
    """
    spec, channels = manifest.image_input.preprocessing, manifest.image_input.shape[0]
    try:
        images = [
            prepare_image(
                _synthetic_image(seed),
                photometric_interpretation="MONOCHROME2",
                window=None,
                spec=spec,
                channels=channels,
            )
            for seed in range(batch)
        ]
    except (ArithmeticError, ValueError) as e:
        raise ModelError(f"the manifest's preprocessing fails on a synthetic image: {e}") from e
    feeds = {manifest.image_input.name: np.stack(images).astype(np.float32)}
    if manifest.clinical_input is not None:
        n = len(manifest.clinical_input.features)
        mask = np.ones((batch, n), dtype=np.float32)
        mask[0] = 0.0
        feeds[manifest.clinical_input.values_name] = np.zeros((batch, n), dtype=np.float32)
        feeds[manifest.clinical_input.mask_name] = mask
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
    """The graph checks, then (only if they passed) the smoke inference."""
    report = ValidationReport(problems=check_graph(manifest, runner) + check_activation(manifest, runner.path))
    if report.ok:
        try:
            report.smoke_output_shape = smoke_test(manifest, runner, batch=min(2, manifest.batching.max_batch_size))
        except ModelError as e:
            report.problems.append(e.message)
    return report
