from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from service.inference.manifest import ClinicalFeature, FeatureSource, ImagePreprocessing
from service.inference.preprocess import (
    age_in_years,
    clinical_vector,
    percentiles,
    prepare_image,
    resize_bilinear,
)
from service.schemas import ClinicalContext, ClinicalValue, ObservationFact

STUDY_AT = dt.datetime(2026, 11, 20, 9, 30, tzinfo=dt.UTC)


def _obs(
    loinc: str,
    value: float,
    unit: str,
    hours_before: float | None,
    *,
    status: str = "final",
    resource_id: str | None = None,
) -> ObservationFact:
    return ObservationFact(
        resource_id=resource_id or f"{loinc}-{hours_before}-{status}",
        patient_ref="Patient/p",
        loinc=loinc,
        # The canonical fields are not what pre-processing reads: it converts the original value and unit.
        value=-1.0,
        ucum_unit="1",
        original_value=value,
        original_unit=unit,
        effective_at=STUDY_AT - dt.timedelta(hours=hours_before) if hours_before is not None else None,
        status=status,
    )


FEATURES = [
    ClinicalFeature(name="age", display="Age", source=FeatureSource(kind="age_at_study"), unit="a", mean=60, std=15),
    ClinicalFeature(
        name="sex_male", display="Sex", source=FeatureSource(kind="patient_gender", gender_value="male"), unit=None
    ),
    ClinicalFeature(
        name="crp",
        display="CRP",
        source=FeatureSource(kind="observation", loinc=["1988-5"]),
        unit="mg/L",
        lookback_hours=72,
        mean=20,
        std=10,
    ),
    ClinicalFeature(
        name="spo2",
        display="SpO2",
        source=FeatureSource(kind="observation", loinc=["59408-5", "2708-6"]),
        unit="%",
        lookback_hours=24,
        mean=95,
        std=3,
    ),
]
CRP = FEATURES[2]


def _feature(name: str, loinc: str, unit: str, lookback_hours: float | None = 48) -> ClinicalFeature:
    source = FeatureSource(kind="observation", loinc=[loinc])
    return ClinicalFeature(name=name, display=name, source=source, unit=unit, lookback_hours=lookback_hours)


def _used(observations: list[ObservationFact], feature: ClinicalFeature = CRP) -> ClinicalValue:
    _, mask, (used,) = clinical_vector(
        ClinicalContext(observations=observations), features=[feature], study_at=STUDY_AT
    )
    assert mask.tolist() == [0.0 if used.missing else 1.0]
    return used


def test_missing_and_out_of_window_values_are_masked_not_zero_filled() -> None:
    context = ClinicalContext(
        gender="female",
        birth_date=dt.date(1956, 11, 20),
        observations=[
            _obs("1988-5", 40.0, "mg/L", 100),
            _obs("1988-5", 30.0, "mg/L", 10),
            _obs("2708-6", 88.0, "%", 30),
        ],
    )
    values, mask, used = clinical_vector(context, features=FEATURES, study_at=STUDY_AT)
    assert mask.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert values[0] == np.float32((70.0 - 60) / 15)
    assert values[1] == 0.0 and mask[1] == 1.0  # female: a present zero, not a missing one
    assert used[2].value == 30.0, "the latest value inside the lookback window"
    assert used[3].missing and used[3].reason == "outside lookback window"


def test_values_are_converted_from_the_unit_they_were_sent_in_to_the_manifest_unit() -> None:
    features = [
        CRP,
        _feature("temperature", "8310-5", "Cel"),
        _feature("leukocytes", "6690-2", "10*3/uL"),
        _feature("heart_rate", "8867-4", "/min"),
        _feature("systolic_bp", "8480-6", "mm[Hg]"),
        _feature("diastolic_bp", "8462-4", "mm[Hg]"),
    ]
    context = ClinicalContext(
        observations=[
            _obs("1988-5", 4.8, "mg/dL", 2, resource_id="crp-1"),
            _obs("8310-5", 101.3, "[degF]", 1, resource_id="temp-1"),
            _obs("6690-2", 14.2, "10*9/L", 3, resource_id="wbc-1"),
            _obs("8867-4", 96, "{beats}/min", 1, resource_id="hr-1"),
            _obs("8480-6", 16.0, "kPa", 1, resource_id="bp-1"),
            _obs("8462-4", 10.0, "kPa", 1, resource_id="bp-1#8462-4"),
        ]
    )

    values, mask, used = clinical_vector(context, features=features, study_at=STUDY_AT)

    assert mask.tolist() == [1.0] * 6
    by_name = {value.feature: value for value in used}
    assert by_name["crp"].value == 48.0 and by_name["crp"].unit == "mg/L"
    assert values[0] == np.float32((48.0 - 20) / 10)
    assert by_name["temperature"].value == pytest.approx(38.5, rel=1e-12)
    assert by_name["leukocytes"].value == 14.2 and by_name["heart_rate"].value == 96.0
    assert by_name["systolic_bp"].value == pytest.approx(16_000 / 133.322, rel=1e-12)
    assert (by_name["crp"].source, by_name["crp"].original_value, by_name["crp"].original_unit) == (
        "Observation/crp-1",
        4.8,
        "mg/dL",
    )
    assert by_name["temperature"].loinc == "8310-5"
    assert by_name["temperature"].effective_at == STUDY_AT - dt.timedelta(hours=1)
    # a panel's component values name the panel Observation
    assert by_name["systolic_bp"].source == by_name["diastolic_bp"].source == "Observation/bp-1"
    assert by_name["diastolic_bp"].loinc == "8462-4"


@pytest.mark.parametrize(
    ("unit", "reason"),
    [
        ("mmol/L", 'unit "mmol/L" cannot be converted to "mg/L" (number/volume vs mass/volume)'),
        ("mg/dX", 'unit "mg/dX" cannot be converted to "mg/L" (not valid UCUM: "dX" at position 3 is not a UCUM unit)'),
    ],
)
def test_a_unit_that_does_not_convert_is_masked_with_its_reason(unit: str, reason: str) -> None:
    used = _used([_obs("1988-5", 3.0, unit, 1)])
    assert used.missing and used.value is None and used.reason == reason and used.source is None


def test_a_later_value_in_a_unit_that_does_not_convert_leaves_the_earlier_one() -> None:
    used = _used([_obs("1988-5", 2.0, "mg/dL", 5, resource_id="good"), _obs("1988-5", 9.0, "mmol/L", 1)])
    assert (used.value, used.source) == (20.0, "Observation/good")


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "registered", "unknown"])
def test_observations_whose_status_is_not_a_result_are_never_used(status: str) -> None:
    latest = _obs("1988-5", 999.0, "mg/L", 1, status=status, resource_id="wrong")
    used = _used([_obs("1988-5", 12.0, "mg/L", 6, resource_id="right"), latest])
    assert (used.value, used.source) == (12.0, "Observation/right")
    alone = _used([latest])
    assert alone.missing and alone.reason == f"no observation with a usable status (status {status})"


@pytest.mark.parametrize("status", ["preliminary", "final", "amended", "corrected"])
def test_result_statuses_are_used(status: str) -> None:
    assert _used([_obs("1988-5", 12.0, "mg/L", 1, status=status)]).value == 12.0


def test_at_the_same_time_amended_supersedes_final_which_supersedes_preliminary() -> None:
    preliminary = _obs("1988-5", 10.0, "mg/L", 2, status="preliminary")
    final = _obs("1988-5", 11.0, "mg/L", 2, status="final")
    amended = _obs("1988-5", 12.0, "mg/L", 2, status="amended")
    corrected = _obs("1988-5", 13.0, "mg/L", 2, status="corrected")
    assert _used([final, preliminary]).value == 11.0
    assert _used([amended, final, preliminary]).value == 12.0
    assert _used([corrected, final]).value == 13.0
    # a later time still wins over an amendment of an earlier value
    assert _used([amended, _obs("1988-5", 14.0, "mg/L", 1, status="preliminary")]).value == 14.0


def test_values_after_the_study_are_never_used() -> None:
    after = _obs("1988-5", 99.0, "mg/L", -0.25)
    assert _used([_obs("1988-5", 12.0, "mg/L", 4), after]).value == 12.0
    alone = _used([after])
    assert alone.missing and alone.reason == "effective after the study"


def test_undated_values_are_used_only_without_a_lookback_window() -> None:
    undated = _obs("8310-5", 37.2, "Cel", None)
    assert _used([undated], _feature("temperature", "8310-5", "Cel", lookback_hours=None)).value == 37.2
    within = _used([undated], _feature("temperature", "8310-5", "Cel", lookback_hours=48))
    assert within.missing and within.reason == "no effective time"


def test_at_the_same_time_the_code_listed_first_wins() -> None:
    pulse_oximetry = _obs("59408-5", 91.0, "%", 3)
    arterial = _obs("2708-6", 0.93, "1", 3)
    assert _used([arterial, pulse_oximetry], FEATURES[3]).value == 91.0
    assert _used([pulse_oximetry, _obs("2708-6", 0.93, "1", 2)], FEATURES[3]).value == 93.0


def test_age_in_years() -> None:
    # a 29 February birthday falls on 28 February in common years
    assert age_in_years(dt.date(2000, 2, 29), dt.date(2026, 2, 28)) == 26.0
    assert 25.99 < age_in_years(dt.date(2000, 2, 29), dt.date(2026, 2, 27)) < 26
    assert 25.99 < age_in_years(dt.date(2000, 3, 1), dt.date(2026, 2, 28)) < 26
    # a study dated in the calendar's last year (a wrong StudyDate): an age, not a crash of the job
    assert 8041.8 < age_in_years(dt.date(1958, 3, 1), dt.date(9999, 12, 31)) <= 8042


def test_monochrome1_is_inverted_and_window_applied() -> None:
    spec = ImagePreprocessing(resize=(4, 4))
    ramp = np.tile(np.arange(8, dtype=np.float32) * 100, (8, 1))
    mono2 = prepare_image(ramp, photometric_interpretation="MONOCHROME2", window=(350, 700), spec=spec)
    mono1 = prepare_image(ramp, photometric_interpretation="MONOCHROME1", window=(350, 700), spec=spec)
    assert mono2.shape == (1, 4, 4)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2[0, 0, 0] < mono2[0, 0, -1]


def test_resize_matches_area_mean_and_bilinear_shapes() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(resize_bilinear(image, 2, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert resize_bilinear(image, 3, 5).shape == (3, 5)


@pytest.mark.parametrize(("shape", "size"), [((1024, 1024), (256, 256)), ((512, 768), (128, 256)), ((6, 9), (2, 3))])
def test_area_average_is_the_mean_of_each_block(shape: tuple[int, int], size: tuple[int, int]) -> None:
    image = np.random.default_rng(3).random(shape, dtype=np.float32) * 4095
    before = image.copy()
    expected = image.reshape(size[0], shape[0] // size[0], size[1], shape[1] // size[1]).mean(axis=(1, 3))
    resized = resize_bilinear(image, *size)
    assert resized.dtype == np.float32 and resized.shape == size
    np.testing.assert_allclose(resized, expected, rtol=1e-6)
    assert np.array_equal(image, before)  # the caller's image is left as it was


def test_windowing_leaves_the_decoded_pixels_as_they_were() -> None:
    pixels = np.linspace(-100, 5000, 64, dtype=np.float32).reshape(8, 8)
    before = pixels.copy()
    spec = ImagePreprocessing(resize=(4, 4))
    windowed = prepare_image(pixels, photometric_interpretation="MONOCHROME1", window=(2000, 3000), spec=spec)
    assert np.array_equal(pixels, before)
    assert windowed.dtype == np.float32


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "ct-like, negative intercept": rng.integers(0, 4096, (512, 512)).astype(np.float32) - 1024,
        "8-bit": rng.integers(0, 256, (300, 200)).astype(np.float32),
        "uniform": np.full((64, 64), 7.0, np.float32),
        "a few pixels": rng.integers(0, 4096, (5, 3)).astype(np.float32),
        "fractional slope": (rng.integers(0, 4096, (256, 256)) * 0.37).astype(np.float32),
        "continuous": rng.normal(0, 1000, (128, 128)).astype(np.float32),
        "integers over a wide span": np.concatenate([np.zeros(1000), [3e6]]).astype(np.float32).reshape(7, 143),
        "with a NaN": np.array([[1.0, np.nan], [3.0, 4.0]], np.float32),
    }


@pytest.mark.parametrize("name", list(_images()))
@pytest.mark.parametrize("qs", [(0.5, 99.5), (0.0, 100.0), (1.0, 99.0), (33.3, 66.7)])
def test_percentiles_are_numpy_s_whichever_way_they_are_found(name: str, qs: tuple[float, float]) -> None:
    image = _images()[name]
    before = image.copy()
    found = percentiles(image, qs)
    np.testing.assert_allclose(found, np.percentile(image, qs), rtol=1e-12, atol=1e-9, equal_nan=True)
    assert np.array_equal(image, before, equal_nan=True)  # the caller's image is left as it was


def test_an_image_without_a_window_is_windowed_on_its_percentiles() -> None:
    image = np.random.default_rng(6).integers(0, 4096, (64, 64)).astype(np.float32)
    spec = ImagePreprocessing(resize=(64, 64), percentiles=(1.0, 99.0))
    low, high = np.percentile(image, (1.0, 99.0))
    windowed = prepare_image(image, photometric_interpretation="MONOCHROME2", window=None, spec=spec)
    np.testing.assert_allclose(windowed[0], np.clip((image - low) / (high - low), 0, 1), atol=1e-6)


def test_outputs_that_are_not_finite_numbers_fail_the_study_not_the_report() -> None:
    """A NaN logit made a NaN probability, which the database refused (SQLite) or kept (PostgreSQL) in a report."""
    from service.errors import ServiceError
    from service.inference import pipeline
    from service.inference.manifest import load_manifest
    from tests.conftest import REPO

    manifest = load_manifest(REPO / "models" / "cxr-fusion" / "manifest.yaml")
    logits = np.zeros(len(manifest.outputs.findings), dtype=np.float32)
    logits[1] = np.nan
    with pytest.raises(ServiceError, match="not all finite"):
        pipeline.post_process(manifest, manifest.latest(), provider="cpu", logits=logits, inputs=None)  # type: ignore[arg-type]
