"""Inference as pre_process -> predict -> post_process, on arrays and our own types only."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import numpy as np

from service.errors import ModelError, ServiceError
from service.inference.manifest import Manifest, ModelVersion
from service.inference.preprocess import clinical_vector, prepare_image
from service.inference.runner import Runner
from service.schemas import ClinicalContext, ClinicalValue, FindingResult, Findings, ModelIdentity


@dataclass(frozen=True)
class PreparedInputs:
    """One study's model inputs, without the batch axis, and the clinical values behind them."""

    image: np.ndarray
    clinical: np.ndarray | None
    clinical_mask: np.ndarray | None
    clinical_used: list[ClinicalValue]
    source_sop_instance_uid: str

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by name (``image``, and ``clinical``/``clinical_mask`` for models with clinical data)."""
        named = {"image": self.image, "clinical": self.clinical, "clinical_mask": self.clinical_mask}
        return {name: array for name, array in named.items() if array is not None}


def pre_process(
    manifest: Manifest,
    *,
    pixels: np.ndarray,
    photometric_interpretation: str,
    window: tuple[float, float] | None,
    context: ClinicalContext,
    study_at: dt.datetime,
    source_sop_instance_uid: str,
) -> PreparedInputs:
    """Turn a decoded image and a patient's clinical context into the tensors the manifest describes.

    Raises:
        ModelError: the manifest's preprocessing makes inputs other than its declared ones (``resize`` against
            ``image_input.shape``): pre-processing again would make them again, so the job fails here.
    """
    image = prepare_image(
        pixels,
        photometric_interpretation=photometric_interpretation,
        window=window,
        spec=manifest.image_input.preprocessing,
        channels=manifest.image_input.shape[0],
    )
    if manifest.clinical_input is None:
        prepared = PreparedInputs(image, None, None, [], source_sop_instance_uid)
    else:
        values, mask, used = clinical_vector(context, features=manifest.clinical_input.features, study_at=study_at)
        prepared = PreparedInputs(image, values, mask, used, source_sop_instance_uid)
    problems = input_problems(manifest, prepared)
    if problems is not None:
        raise ModelError(f"pre-processing for {manifest.name} made inputs its manifest does not declare: {problems}")
    return prepared


def input_problems(manifest: Manifest, prepared: PreparedInputs) -> str | None:
    """How one study's arrays differ from the inputs the manifest declares (shape without the batch axis; float32,
    as ``image_input.dtype`` says and ``clinical_vector`` makes), or None when they match. One array of another
    shape fails the ``np.stack`` of every batch it joins.

    Args:
        manifest: the model's manifest.
        prepared: one study's inputs.

    Returns:
        The differences, in one line; None when there are none.
    """
    clinical = manifest.clinical_input
    features = (len(clinical.features),) if clinical is not None else None
    expected = {"image": tuple(manifest.image_input.shape), "clinical": features, "clinical_mask": features}
    arrays = prepared.arrays()
    problems = []
    for name, shape in expected.items():
        array = arrays.get(name)
        if shape is None:
            if array is not None:
                problems.append(f"{name} given, but {manifest.name} takes no clinical input")
        elif array is None:
            problems.append(f"no {name}")
        elif array.shape != shape or array.dtype != np.float32:
            problems.append(f"{name} is {array.dtype}{list(array.shape)}, expected float32{list(shape)}")
    return "; ".join(problems) or None


def predict(manifest: Manifest, runner: Runner, batch: list[PreparedInputs]) -> tuple[np.ndarray, float]:
    """Run a batch through the model.

    Returns:
        (logits [batch, findings], seconds spent in the runtime).
    """
    feeds = {manifest.image_input.name: np.stack([item.image for item in batch]).astype(np.float32)}
    if manifest.clinical_input is not None:
        feeds[manifest.clinical_input.values_name] = np.stack([item.clinical for item in batch]).astype(np.float32)  # type: ignore[misc]
        feeds[manifest.clinical_input.mask_name] = np.stack([item.clinical_mask for item in batch]).astype(np.float32)  # type: ignore[misc]
    started = time.perf_counter()
    outputs = runner.run(feeds, [manifest.outputs.logits])
    return outputs[manifest.outputs.logits], time.perf_counter() - started


def post_process(
    manifest: Manifest,
    version: ModelVersion,
    *,
    provider: str,
    logits: np.ndarray,
    inputs: PreparedInputs,
) -> Findings:
    """Calibrate one study's logits into probabilities and apply each finding's decision threshold."""
    if logits.shape != (len(manifest.outputs.findings),):
        raise ValueError(f"expected {len(manifest.outputs.findings)} logits, got shape {logits.shape}")
    if not np.isfinite(logits).all():  # never a NaN probability in a report
        raise ServiceError(f"the model's outputs are not all finite numbers: {logits.tolist()}", code="inference")
    results = []
    for logit, finding in zip(logits.tolist(), manifest.outputs.findings, strict=True):
        temperature = finding.calibration.temperature if finding.calibration.method == "temperature" else 1.0
        probability = float(1.0 / (1.0 + np.exp(-logit / temperature)))
        results.append(
            FindingResult(
                code=finding.code,
                system=finding.system,
                display=finding.display,
                probability=round(probability, 6),
                threshold=finding.threshold,
                positive=probability >= finding.threshold,
            )
        )
    return Findings(
        model=ModelIdentity(
            name=manifest.name,
            version=version.version,
            sha256=version.sha256,
            execution_provider=provider,
            intended_use=manifest.intended_use,
        ),
        findings=results,
        clinical_inputs=inputs.clinical_used,
        missing_inputs=[value.feature for value in inputs.clinical_used if value.missing],
        source_sop_instance_uid=inputs.source_sop_instance_uid,
    )


def heatmap_finding(findings: Findings) -> int:
    """The finding a heatmap explains: the most probable positive one, else the most probable."""
    scored = [(f.positive, f.probability, -i) for i, f in enumerate(findings.findings)]
    return -max(scored)[2]


def occlusion_heatmap(
    manifest: Manifest,
    runner: Runner,
    inputs: PreparedInputs,
    *,
    finding_index: int,
    grid: int = 8,
    batch_size: int = 32,
) -> np.ndarray:
    """Occlusion sensitivity: how much the finding's probability drops when each cell of a grid x grid
    partition of the image is replaced by the image's mean. Works for any model (no gradients needed).

    Returns:
        float32 [grid, grid] in [0, 1] (1: the cell whose occlusion lowers the probability most); all zeros when
        no occlusion lowers it.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    finding = manifest.outputs.findings[finding_index]
    temperature = finding.calibration.temperature if finding.calibration.method == "temperature" else 1.0
    image = inputs.image
    height, width = image.shape[-2:]
    ys = np.linspace(0, height, grid + 1).astype(int)
    xs = np.linspace(0, width, grid + 1).astype(int)
    fill = image.mean(axis=(-2, -1), keepdims=True)
    variants = [inputs]
    for row in range(grid):
        for column in range(grid):
            occluded = image.copy()
            occluded[..., ys[row] : ys[row + 1], xs[column] : xs[column + 1]] = fill
            variants.append(
                PreparedInputs(
                    occluded,
                    inputs.clinical,
                    inputs.clinical_mask,
                    inputs.clinical_used,
                    inputs.source_sop_instance_uid,
                )
            )
    logits = np.concatenate(
        [predict(manifest, runner, variants[i : i + batch_size])[0] for i in range(0, len(variants), batch_size)]
    )[:, finding_index]
    probabilities = 1.0 / (1.0 + np.exp(-logits / temperature))
    drops = np.clip(probabilities[0] - probabilities[1:], 0.0, None).reshape(grid, grid)
    peak = float(drops.max())
    return (drops / peak if peak > 0 else drops).astype(np.float32)


# --- the hand-off from the preprocess stage to the infer stage (another process, often another machine) ----------

PREPARED_MAGIC = b"CLINFER-PREPARED-1\n"


class PreparedFormatError(ValueError):
    """Bytes that are not ``encode_prepared`` output (another version's format, a truncated blob)."""


def encode_prepared(prepared: PreparedInputs) -> bytes:
    """One study's pre-processed inputs as one blob: a JSON header (the clinical values used, the source image,
    the arrays present), then each array in numpy's ``.npy`` format (dtype and shape kept, no pickle).

    Chosen by measurement (``clinfer bench`` prints it): encode + decode of a 256² study with its clinical values
    took 0.25 ms this way, 0.47 ms as ``.npz`` (zip, arrays only), 46 ms as JSON lists (5× the bytes). Pickle is
    faster still (0.04 ms), but unpickling a blob from shared storage runs whatever it names.
    """
    import io
    import json

    arrays = prepared.arrays()
    header = json.dumps(
        {
            "source": prepared.source_sop_instance_uid,
            "values": [v.model_dump(mode="json") for v in prepared.clinical_used],
            "arrays": list(arrays),
        }
    ).encode()
    out = io.BytesIO()
    out.write(PREPARED_MAGIC)
    out.write(len(header).to_bytes(4, "little"))
    out.write(header)
    for array in arrays.values():
        np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def decode_prepared(data: bytes, *, manifest: Manifest | None = None) -> PreparedInputs:
    """The inverse of ``encode_prepared``.

    Args:
        data: the blob.
        manifest: the model the inputs are for: their shapes and dtypes are checked against it, so that a blob made
            for another shape (a changed manifest, a foreign writer) never reaches a batch, where it would fail
            every study of that batch. None: not checked (benchmarks of the format).

    Raises:
        PreparedFormatError: the bytes are not in this format, or (with ``manifest``) their arrays are not the
            inputs it declares (the caller pre-processes the study again).
    """
    import io
    import json

    if not data.startswith(PREPARED_MAGIC):
        raise PreparedFormatError("not a clinfer prepared-inputs blob (written by another version?)")
    stream = io.BytesIO(data)
    stream.seek(len(PREPARED_MAGIC))
    try:
        size = int.from_bytes(stream.read(4), "little")
        header = json.loads(stream.read(size))
        arrays = {name: np.lib.format.read_array(stream, allow_pickle=False) for name in header["arrays"]}
        clinical_used = [ClinicalValue.model_validate(v) for v in header["values"]]
        source = str(header["source"])
    except (ValueError, KeyError, TypeError, EOFError) as e:
        raise PreparedFormatError(f"damaged prepared-inputs blob: {e}") from e
    if "image" not in arrays:
        raise PreparedFormatError("damaged prepared-inputs blob: no image")
    prepared = PreparedInputs(
        image=arrays["image"],
        clinical=arrays.get("clinical"),
        clinical_mask=arrays.get("clinical_mask"),
        clinical_used=clinical_used,
        source_sop_instance_uid=source,
    )
    if manifest is not None and (problems := input_problems(manifest, prepared)) is not None:
        raise PreparedFormatError(f"prepared inputs that {manifest.name} does not take: {problems}")
    return prepared
