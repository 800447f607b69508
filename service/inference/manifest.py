"""The model manifest: the only thing the service needs to serve a model.

A model is a folder ``<repository>/<name>/`` with ``manifest.yaml``, ``MODEL_CARD.md`` and one folder per
version holding the exported artifact. ``manifest.yaml`` holds one document per version under ``versions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service import ucum
from service.errors import ModelError


class _Strict(BaseModel):
    """A part of the manifest: a key it does not define is an error, not ignored. A misspelt optional key
    (``normalisation``, ``lookback_hour``) would otherwise leave its default in force without a word."""

    model_config = ConfigDict(extra="forbid")


class RoutingDefaults(_Strict):
    modalities: list[str] = Field(default_factory=list, description="empty: any")
    body_parts: list[str] = Field(default_factory=list, description="BodyPartExamined values; empty: any")
    sop_class_uids: list[str] = Field(default_factory=list, description="empty: any")
    view_positions: list[str] = Field(
        default_factory=list,
        description="ViewPosition values the model reads (e.g. PA, AP); an image without a ViewPosition is taken "
        "(not every modality records it); empty: any",
    )
    min_rows: int = 0
    min_columns: int = 0


class Normalization(_Strict):
    mean: float = 0.0
    std: float = 1.0


class ImagePreprocessing(_Strict):
    window: Literal["dicom", "percentile"] = Field(
        default="dicom", description="dicom: the object's first VOI window, else percentiles; percentile: always"
    )
    percentiles: tuple[float, float] = (0.5, 99.5)
    invert_monochrome1: bool = True
    resize: tuple[int, int] = Field(description="height, width fed to the model")
    normalization: Normalization = Field(default_factory=Normalization)


class ImageInput(_Strict):
    name: str
    shape: list[int] = Field(
        description="without the batch axis: channels (1, or 3 for a model trained on RGB images: the grayscale "
        "image is repeated in each), height, width; height and width are preprocessing.resize"
    )
    dtype: Literal["float32"] = "float32"
    preprocessing: ImagePreprocessing

    @model_validator(mode="after")
    def _fed_as_preprocessed(self) -> ImageInput:
        """The shape must be what preprocessing makes, or every study would fail at inference."""
        if len(self.shape) != 3:
            raise ValueError(f"shape must be [channels, height, width], not {self.shape}")
        if self.shape[0] not in (1, 3):
            raise ValueError(
                f"shape has {self.shape[0]} channels: clinfer feeds 1 (grayscale) or 3 (the grayscale image repeated)"
            )
        if tuple(self.shape[1:]) != tuple(self.preprocessing.resize):
            raise ValueError(
                f"shape {self.shape} does not match preprocessing.resize {list(self.preprocessing.resize)}: images "
                "are resized to that height and width"
            )
        return self


class FeatureSource(_Strict):
    kind: Literal["age_at_study", "patient_gender", "observation"]
    loinc: list[str] = Field(default_factory=list, description="codes accepted, first preferred (observation only)")
    gender_value: str | None = Field(default=None, description="patient_gender: the gender coded as 1.0")

    @model_validator(mode="after")
    def _complete(self) -> FeatureSource:
        """A source without what it reads gives a feature missing (or 0) for every patient."""
        if self.kind == "observation" and not self.loinc:
            raise ValueError("an observation source needs its LOINC codes (loinc)")
        if self.kind == "patient_gender" and not self.gender_value:
            raise ValueError("a patient_gender source needs the gender coded as 1.0 (gender_value, e.g. male)")
        return self


class ClinicalFeature(_Strict):
    name: str
    display: str
    source: FeatureSource
    unit: str | None = Field(description="canonical UCUM unit; None for coded features")
    lookback_hours: float | None = Field(default=None, description="window before the study date; None: any")
    mean: float = 0.0
    std: float = 1.0

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("std must be positive")
        return value

    @field_validator("unit")
    @classmethod
    def _ucum(cls, value: str | None) -> str | None:
        """Values are converted to this unit; one that is not UCUM would leave the feature missing for everyone."""
        if value is not None:
            try:
                ucum.parse(value)
            except ValueError as e:
                raise ValueError(f"unit {value!r} is not a UCUM unit: {e}") from e
        return value


class ClinicalInput(_Strict):
    values_name: str
    mask_name: str
    features: list[ClinicalFeature]


class Calibration(_Strict):
    method: Literal["none", "temperature"] = "none"
    temperature: float = 1.0


class FindingOutput(_Strict):
    code: str
    system: str = "http://snomed.info/sct"
    display: str
    threshold: float = Field(ge=0.0, le=1.0)
    calibration: Calibration = Field(default_factory=Calibration)


class Outputs(_Strict):
    logits: str = Field(description="ONNX output name of the per-finding logits, shape [batch, findings]")
    heatmap: str | None = Field(default=None, description="optional ONNX output [batch, findings, h, w]")
    findings: list[FindingOutput]


class Batching(_Strict):
    preferred_batch_size: int = Field(default=8, ge=1)
    max_batch_size: int = Field(default=32, ge=1, description="1 for a graph whose batch axis is fixed at 1")
    max_delay_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=1000.0,
        description="longest a request waits in the GPU worker's dynamic batcher for others to join its batch",
    )

    @model_validator(mode="after")
    def _preferred_within_max(self) -> Batching:
        """A preferred size over the maximum is the maximum (``max_batch_size: 4`` alone leaves the default 8)."""
        self.preferred_batch_size = min(self.preferred_batch_size, self.max_batch_size)
        return self


class ModelVersion(_Strict):
    version: str
    artifact: str = Field(description="path of the ONNX file relative to the model folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    """One model's manifest: identity, routing defaults, inputs, outputs, batching."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str = ""
    intended_use: str
    versions: list[ModelVersion] = Field(min_length=1)
    routing: RoutingDefaults = Field(default_factory=RoutingDefaults)
    image_input: ImageInput
    clinical_input: ClinicalInput | None = None
    outputs: Outputs
    batching: Batching = Field(default_factory=Batching)

    def latest(self) -> ModelVersion:
        return self.versions[-1]


def load_manifest(path: Path) -> Manifest:
    """Read and validate a ``manifest.yaml``.

    Args:
        path: the manifest file.

    Returns:
        The validated manifest.

    Raises:
        ModelError: the file is missing, not YAML, or does not match the manifest format.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"cannot read manifest {path}: {e}") from e
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ModelError(f"manifest {path} is invalid: {e}") from e


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.yaml (docs/manifest.schema.json is this, written out)."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://clinfer.invalid/schemas/manifest.schema.json"
    return schema
