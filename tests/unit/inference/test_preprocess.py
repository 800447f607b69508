from __future__ import annotations

import datetime as dt

import numpy as np

from service.inference.manifest import ClinicalFeature, FeatureSource, ImagePreprocessing
from service.inference.preprocess import age_in_years, clinical_vector, prepare_image, resize_bilinear
from service.schemas import ClinicalContext, ObservationFact

STUDY_AT = dt.datetime(2026, 11, 20, 9, 30, tzinfo=dt.UTC)


def _obs(loinc: str, value: float, unit: str, hours_before: float) -> ObservationFact:
    return ObservationFact(
        resource_id=f"{loinc}-{hours_before}",
        patient_ref="Patient/p",
        loinc=loinc,
        value=value,
        ucum_unit=unit,
        original_value=value,
        original_unit=unit,
        effective_at=STUDY_AT - dt.timedelta(hours=hours_before),
        status="final",
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


def test_unconvertible_unit_is_masked_with_its_reason() -> None:
    context = ClinicalContext(observations=[_obs("1988-5", 3.0, "mg/dl", 1)])
    _, mask, used = clinical_vector(context, features=FEATURES[2:3], study_at=STUDY_AT)
    assert mask.tolist() == [0.0] and used[0].reason == "unit not convertible"


def test_age_in_years() -> None:
    # a 29 February birthday falls on 28 February in common years
    assert age_in_years(dt.date(2000, 2, 29), dt.date(2026, 2, 28)) == 26.0
    assert 25.99 < age_in_years(dt.date(2000, 2, 29), dt.date(2026, 2, 27)) < 26
    assert 25.99 < age_in_years(dt.date(2000, 3, 1), dt.date(2026, 2, 28)) < 26


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
