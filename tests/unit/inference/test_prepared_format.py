"""The preprocess -> infer hand-off blob: exact round trip; damaged or foreign bytes, and arrays its model does not
take, refused, never misread."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np
import pytest

from service.errors import ModelError
from service.inference.manifest import Manifest, load_manifest
from service.inference.pipeline import (
    PREPARED_MAGIC,
    PreparedFormatError,
    PreparedInputs,
    decode_prepared,
    encode_prepared,
    pre_process,
)
from service.schemas import ClinicalContext, ClinicalValue
from tests.conftest import REPO


def _prepared(with_clinical: bool) -> PreparedInputs:
    rng = np.random.default_rng(3)
    used = [
        ClinicalValue(
            feature="crp",
            loinc="1988-5",
            value=25.0,
            unit="mg/L",
            effective_at=dt.datetime(2026, 11, 20, 8, 30, tzinfo=dt.UTC),
            missing=False,
            source="Observation/crp-1",
            original_value=2.5,
            original_unit="mg/dL",
        ),
        ClinicalValue(feature="inr", value=None, unit=None, missing=True, reason="no value"),
    ]
    return PreparedInputs(
        image=rng.standard_normal((1, 256, 256)).astype(np.float32),
        clinical=rng.standard_normal(10).astype(np.float32) if with_clinical else None,
        clinical_mask=(rng.random(10) > 0.5).astype(np.float32) if with_clinical else None,
        clinical_used=used if with_clinical else [],
        source_sop_instance_uid="1.2.826.0.1.3680043.10.543.7",
    )


@pytest.mark.parametrize("with_clinical", [True, False])
def test_round_trip_is_exact(with_clinical: bool) -> None:
    prepared = _prepared(with_clinical)
    data = encode_prepared(prepared)
    assert data.startswith(PREPARED_MAGIC)
    back = decode_prepared(data)
    np.testing.assert_array_equal(back.image, prepared.image)
    assert back.image.dtype == np.float32 and back.image.shape == (1, 256, 256)
    if with_clinical:
        assert back.clinical is not None and back.clinical_mask is not None
        np.testing.assert_array_equal(back.clinical, prepared.clinical)  # type: ignore[arg-type]
        np.testing.assert_array_equal(back.clinical_mask, prepared.clinical_mask)  # type: ignore[arg-type]
    else:
        assert back.clinical is None and back.clinical_mask is None
    assert back.clinical_used == prepared.clinical_used
    assert back.source_sop_instance_uid == prepared.source_sop_instance_uid


def test_foreign_or_damaged_bytes_are_refused() -> None:
    data = encode_prepared(_prepared(True))
    with pytest.raises(PreparedFormatError, match="not a clinfer"):
        decode_prepared(b"PK\x03\x04 an npz of an earlier version")
    with pytest.raises(PreparedFormatError, match="damaged"):
        decode_prepared(data[: len(data) // 2])
    with pytest.raises(PreparedFormatError, match="damaged"):
        decode_prepared(PREPARED_MAGIC + (5).to_bytes(4, "little") + b"{oops")


@pytest.fixture(scope="module")
def cxr_fusion() -> Manifest:
    return load_manifest(REPO / "models" / "cxr-fusion" / "manifest.yaml")


def test_inputs_of_the_manifests_shapes_are_accepted(cxr_fusion: Manifest) -> None:
    prepared = _prepared(True)
    assert cxr_fusion.image_input.shape == [1, 256, 256]
    back = decode_prepared(encode_prepared(prepared), manifest=cxr_fusion)
    np.testing.assert_array_equal(back.image, prepared.image)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (
            {"image": np.zeros((1, 128, 128), dtype=np.float32)},
            "image is float32[1, 128, 128], expected float32[1, 256, 256]",
        ),
        (
            {"image": np.zeros((1, 256, 256), dtype=np.float64)},
            "image is float64[1, 256, 256], expected float32[1, 256, 256]",
        ),
        ({"clinical": np.zeros(9, dtype=np.float32)}, "clinical is float32[9], expected float32[10]"),
        ({"clinical": None, "clinical_mask": None}, "no clinical; no clinical_mask"),
    ],
    ids=["image-size", "image-dtype", "clinical-size", "no-clinical"],
)
def test_a_blob_whose_arrays_the_model_does_not_take_is_refused(
    cxr_fusion: Manifest, change: dict[str, Any], complaint: str
) -> None:
    """Before, a well-formed blob of another shape was decoded as it was and joined a batch, whose np.stack then
    failed every study in it, for good. Refused here, the job is pre-processed again instead."""
    data = encode_prepared(dataclasses.replace(_prepared(True), **change))
    decode_prepared(data)  # a well-formed blob: without a manifest there is nothing to hold it against
    with pytest.raises(PreparedFormatError, match="cxr-fusion does not take") as refused:
        decode_prepared(data, manifest=cxr_fusion)
    assert complaint in str(refused.value)


def test_pre_processing_that_does_not_make_the_declared_inputs_fails_the_model_not_the_batch(
    cxr_fusion: Manifest,
) -> None:
    """A manifest whose resize disagrees with its image_input.shape would make, every time, inputs the infer stage
    refuses: the job would go back and forth between the stages. It fails at pre-processing instead."""
    preprocessing = cxr_fusion.image_input.preprocessing.model_copy(update={"resize": (128, 128)})
    image_input = cxr_fusion.image_input.model_copy(update={"preprocessing": preprocessing})
    mismatched = cxr_fusion.model_copy(update={"image_input": image_input})
    arguments: dict[str, Any] = {
        "pixels": np.random.default_rng(1).integers(0, 4096, (300, 300)).astype(np.uint16),
        "photometric_interpretation": "MONOCHROME2",
        "window": None,
        "context": ClinicalContext(),
        "study_at": dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
        "source_sop_instance_uid": "1.2.826.0.1.3680043.10.543.7",
    }
    assert pre_process(cxr_fusion, **arguments).image.shape == (1, 256, 256)
    with pytest.raises(ModelError, match=r"image is float32\[1, 128, 128\], expected float32\[1, 256, 256\]"):
        pre_process(mismatched, **arguments)
