"""The preprocess -> infer hand-off blob: exact round trip, and damaged or foreign bytes refused, never misread."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from service.inference.pipeline import (
    PREPARED_MAGIC,
    PreparedFormatError,
    PreparedInputs,
    decode_prepared,
    encode_prepared,
)
from service.schemas import ClinicalValue


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
