"""The synthetic cohort as files: reproducible, valid DICOM and FHIR, and read by the service's own ingest."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from service.errors import InvalidInput
from service.inference.manifest import load_manifest
from service.inference.preprocess import clinical_vector, window_image
from service.ingest.dicom import decode_image, parse_instance
from service.ingest.fhir import canonical_ucum_unit, parse_bundle
from service.schemas import ClinicalContext
from service.training.cohort_files import (
    CR_SOP_CLASS_UID,
    DX_SOP_CLASS_UID,
    ISSUER,
    MANUFACTURER,
    OBSERVATION_KINDS,
    CohortSummary,
    PatientCase,
    generate_cohort,
    make_patient_case,
)
from service.training.synthetic import FINDINGS

REPO = Path(__file__).resolve().parents[3]
MANIFEST = load_manifest(REPO / "models" / "cxr-fusion" / "manifest.yaml")
SEED = 7
SMALL = 128  # image size for the many in-memory cases; the written cohort uses 1024
N_CASES = 120
MAX_PIXELS = 10**9
OTHER_UNITS = {"[degF]", "mg/dL", "10*9/L", "ng/L"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortSummary:
    return generate_cohort(tmp_path_factory.mktemp("cohort") / "out", n=3, seed=SEED, size=1024, progress=False)


@pytest.fixture(scope="module")
def cases() -> list[PatientCase]:
    return [make_patient_case(SEED, index=index, size=SMALL) for index in range(N_CASES)]


def _cohort_objects(cohort: CohortSummary) -> list[bytes]:
    return [path.read_bytes() for path in sorted(cohort.dicom_dir.glob("*/*.dcm"))]


def _labels(cohort: CohortSummary) -> list[dict[str, str]]:
    with cohort.labels_csv.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_generate_cohort_writes_dicom_fhir_labels_and_description(cohort: CohortSummary) -> None:
    labels = _labels(cohort)
    assert [row["patient_id"] for row in labels] == ["MRN-000000", "MRN-000001", "MRN-000002"]
    assert list(labels[0]) == ["patient_id", "study_instance_uid", *FINDINGS, "modality", "photometric", "view"]
    for row in labels:
        files = list((cohort.dicom_dir / row["patient_id"]).glob("*.dcm"))
        assert len(files) == 1
        ds = pydicom.dcmread(files[0])
        assert files[0].name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.StudyInstanceUID == row["study_instance_uid"]
        assert (ds.Modality, ds.PhotometricInterpretation, ds.ViewPosition) == (
            row["modality"],
            row["photometric"],
            row["view"],
        )
        assert {row[name] for name in FINDINGS} <= {"0", "1"}
        bundle = json.loads((cohort.fhir_dir / f"{row['patient_id']}.json").read_text(encoding="utf-8"))
        Bundle.model_validate(bundle)
        patient = bundle["entry"][0]["resource"]
        assert patient["identifier"][0]["value"] == row["patient_id"]

    description = json.loads(cohort.cohort_json.read_text(encoding="utf-8"))
    assert {key: description[key] for key in ("seed", "n", "size")} == {"seed": SEED, "n": 3, "size": 1024}
    assert description["generator"].startswith("clinfer-cohort/")
    assert description["counts"] == cohort.counts
    assert cohort.counts["patients"] == 3
    assert cohort.counts["modality_CR"] + cohort.counts["modality_DX"] == 3


def test_same_seed_gives_byte_identical_files(cohort: CohortSummary, tmp_path: Path) -> None:
    # A patient depends on (seed, index) only: a smaller cohort holds the same first patients, byte for byte.
    again = generate_cohort(tmp_path / "again", n=2, seed=SEED, size=1024, progress=False)
    for row in _labels(again):
        patient_id = row["patient_id"]
        for relative in (
            f"fhir/{patient_id}.json",
            *(f"dicom/{patient_id}/{p.name}" for p in (again.dicom_dir / patient_id).iterdir()),
        ):
            assert (again.out_dir / relative).read_bytes() == (cohort.out_dir / relative).read_bytes(), relative
    assert _labels(again) == _labels(cohort)[:2]


def test_same_seed_gives_same_case_and_another_seed_another() -> None:
    first, second = (make_patient_case(SEED, index=4, size=SMALL) for _ in range(2))
    assert first.dicom == second.dicom
    assert first.bundle == second.bundle
    other = make_patient_case(SEED + 1, index=4, size=SMALL)
    assert other.study_instance_uid != first.study_instance_uid
    assert other.sop_instance_uid != first.sop_instance_uid
    assert other.bundle["entry"][0]["resource"]["id"] != first.bundle["entry"][0]["resource"]["id"]
    assert make_patient_case(SEED, index=5, size=SMALL).study_instance_uid != first.study_instance_uid
    # A generator works as well as a seed, and gives the same patient from the same state.
    from_rng = [make_patient_case(np.random.default_rng(3), index=0, size=SMALL) for _ in range(2)]
    assert from_rng[0].dicom == from_rng[1].dicom


def _check_attributes(ds: pydicom.Dataset, case: PatientCase | None) -> None:
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPClassUID == {"CR": CR_SOP_CLASS_UID, "DX": DX_SOP_CLASS_UID}[ds.Modality]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", ds[keyword].value) and len(ds[keyword].value) <= 64
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel) == (
        16,
        12,
        11,
        0,
        1,
    )
    assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
    assert ds.BodyPartExamined == "CHEST"
    assert ds.ViewPosition in ("PA", "AP")
    assert re.fullmatch(r"MRN-[0-9]{6}", ds.PatientID)
    assert ds.IssuerOfPatientID == ISSUER
    assert str(ds.PatientName) == f"Synthetic^Patient{ds.PatientID[4:]}"
    assert ds.PatientSex in ("M", "F")
    assert re.fullmatch(r"[0-9]{8}", ds.PatientBirthDate) and re.fullmatch(r"[0-9]{8}", ds.StudyDate)
    assert re.fullmatch(r"[0-9]{6}", ds.StudyTime)
    assert ds.AccessionNumber and ds.Manufacturer == MANUFACTURER
    assert ds.PresentationLUTShape == ("INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY")
    if ds.Modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", ""]
        assert ds.DetectorType and ds.ImageLaterality and ds.PixelIntensityRelationship
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1.0, 0.0, "US")
        assert "WindowCenter" in ds and "WindowWidth" in ds  # the VOI LUT is required for For Presentation
        view_meaning = ds.ViewCodeSequence[0].CodeMeaning
        assert view_meaning == {"PA": "postero-anterior", "AP": "antero-posterior"}[ds.ViewPosition]
    pixels = ds.pixel_array
    assert pixels.shape == (ds.Rows, ds.Columns)
    assert pixels.dtype == np.uint16 and int(pixels.max()) <= 4095
    if case is not None:
        assert ds.PatientID == case.patient_id and ds.StudyInstanceUID == case.study_instance_uid
        assert ds.PatientBirthDate == case.birth_date.strftime("%Y%m%d")
        assert ds.PatientSex == {"male": "M", "female": "F"}[case.clinical["sex"]]


def test_every_object_reads_back_with_its_attributes_and_decodes(
    cohort: CohortSummary, cases: list[PatientCase]
) -> None:
    for data in _cohort_objects(cohort):
        ds = pydicom.dcmread(io.BytesIO(data))
        _check_attributes(ds, None)
        assert (ds.Rows, ds.Columns) == (1024, 1024)
    for case in cases:
        _check_attributes(pydicom.dcmread(io.BytesIO(case.dicom)), case)


def test_the_cohort_varies_what_real_senders_vary(cases: list[PatientCase]) -> None:
    datasets = [pydicom.dcmread(io.BytesIO(case.dicom), stop_before_pixels=True) for case in cases]
    assert {(ds.Modality, ds.PhotometricInterpretation) for ds in datasets} == {
        ("CR", "MONOCHROME1"),
        ("CR", "MONOCHROME2"),
        ("DX", "MONOCHROME1"),
        ("DX", "MONOCHROME2"),
    }
    assert {ds.ViewPosition for ds in datasets} == {"PA", "AP"}
    cr = [ds for ds in datasets if ds.Modality == "CR"]
    assert {float(ds.RescaleSlope) for ds in cr} >= {1.0, 2.0}
    assert any(float(ds.RescaleIntercept) != 0 for ds in cr)
    assert any("WindowCenter" not in ds for ds in cr) and any("WindowCenter" in ds for ds in cr)
    assert any(ds.get("WindowCenter") is not None and ds["WindowCenter"].VM > 1 for ds in datasets)
    codes = Counter(
        coding["code"]
        for case in cases
        for entry in case.bundle["entry"]
        for coding in entry["resource"].get("code", {}).get("coding", [])
    )
    assert codes["2708-6"] > 0 and codes["59408-5"] > 0  # SpO2 under either code
    assert codes["85354-9"] > 0 and codes["8480-6"] > 0  # systolic pressure alone and inside the panel
    assert sum(len(case.stale) for case in cases) > 0
    assert sum(entry["resource"]["resourceType"] == "Condition" for case in cases for entry in case.bundle["entry"])


def test_service_dicom_ingest_parses_every_object(cohort: CohortSummary, cases: list[PatientCase]) -> None:
    for data in _cohort_objects(cohort):
        meta = parse_instance(data, max_pixels=MAX_PIXELS).meta
        assert meta.rows == 1024 and meta.modality in ("CR", "DX") and meta.body_part_examined == "CHEST"
    for case in cases:
        meta = parse_instance(case.dicom, max_pixels=MAX_PIXELS).meta
        assert (meta.patient_id, meta.issuer_of_patient_id) == (case.patient_id, ISSUER)
        assert meta.patient_birth_date == case.birth_date
        assert meta.study_date == case.study_at.date()
        assert (meta.study_instance_uid, meta.sop_instance_uid) == (case.study_instance_uid, case.sop_instance_uid)
        assert (meta.modality, meta.photometric_interpretation, meta.view_position) == (
            case.modality,
            case.photometric_interpretation,
            case.view_position,
        )


def _windowed(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    windowed = window_image(
        decoded.pixels,
        photometric_interpretation=decoded.photometric_interpretation,
        window=decoded.window,
        spec=MANIFEST.image_input.preprocessing,
    )
    return decoded.pixels, windowed


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_monochrome1_displays_like_monochrome2(modality: str) -> None:
    for index in range(4):
        mono1, mono2 = (
            make_patient_case(SEED, index=index, size=256, modality=modality, photometric_interpretation=photometric)
            for photometric in ("MONOCHROME1", "MONOCHROME2")
        )
        assert mono1.study_instance_uid == mono2.study_instance_uid
        assert mono1.sop_instance_uid != mono2.sop_instance_uid
        pixels1, windowed1 = _windowed(mono1.dicom)
        pixels2, windowed2 = _windowed(mono2.dicom)
        # Stored inverted (modality values mirrored), displayed the same.
        assert np.allclose(pixels1 + pixels2, 4095.0, atol=1.0)
        assert float(np.abs(windowed1 - windowed2).mean()) < 0.005
        assert float(np.abs(windowed1 - (1.0 - windowed2)).mean()) > 0.2


def test_modality_values_do_not_depend_on_the_modality_lut(cases: list[PatientCase]) -> None:
    rescaled = [
        case
        for case in cases
        if case.modality == "CR"
        and (pydicom.dcmread(io.BytesIO(case.dicom), stop_before_pixels=True).RescaleSlope != 1)
    ][:4]
    assert rescaled
    for case in rescaled:
        ds = pydicom.dcmread(io.BytesIO(case.dicom), stop_before_pixels=True)
        identity = make_patient_case(
            SEED,
            index=case.index,
            size=SMALL,
            modality="DX",
            photometric_interpretation=case.photometric_interpretation,
        )
        pixels, windowed = _windowed(case.dicom)
        reference, reference_windowed = _windowed(identity.dicom)
        assert float(np.abs(pixels - reference).max()) <= float(ds.RescaleSlope) / 2 + 1e-3
        if "WindowCenter" in ds:
            assert float(np.abs(windowed - reference_windowed).mean()) < 0.005


def test_a_realistic_share_of_values_arrives_in_other_units(cases: list[PatientCase]) -> None:
    units = []
    for case in cases:
        for entry in case.bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] != "Observation":
                continue
            quantities = [resource.get("valueQuantity")] + [c["valueQuantity"] for c in resource.get("component", [])]
            loinc = resource["code"]["coding"][0]["code"]
            quantity = next(q for q in quantities if q is not None)
            assert quantity["system"] == "http://unitsofmeasure.org"
            units.append((loinc, quantity["code"]))
    other = [(loinc, unit) for loinc, unit in units if loinc != "85354-9" and canonical_ucum_unit(loinc) != unit]
    assert 0.15 <= len(other) / len(units) <= 0.35
    assert {unit for _, unit in other} == OTHER_UNITS
    assert len(other) == sum(
        unit != OBSERVATION_KINDS[key].ucum_unit for case in cases for key, unit in case.ucum_units.items()
    )


def test_parse_bundle_accepts_every_bundle_and_recovers_the_canonical_values(cases: list[PatientCase]) -> None:
    loinc_to_key = {kind.loinc: key for key, kind in OBSERVATION_KINDS.items()} | {"2708-6": "spo2"}
    for case in cases:
        Bundle.model_validate(case.bundle)
        parsed = parse_bundle(json.dumps(case.bundle).encode())
        assert parsed.bundle_type == "transaction" and not parsed.errors
        (patient,) = parsed.patients
        assert [(i.system, i.value) for i in patient.identifiers] == [(ISSUER, case.patient_id)]
        assert (patient.gender, patient.birth_date) == (case.clinical["sex"], case.birth_date)
        sent = {key: value for key, value in case.clinical.items() if key in OBSERVATION_KINDS and value is not None}
        recovered = {loinc_to_key[fact.loinc]: fact for fact in parsed.observations}
        assert len(parsed.observations) == len(sent) and set(recovered) == set(sent)
        for key, value in sent.items():
            fact = recovered[key]
            assert fact.ucum_unit == OBSERVATION_KINDS[key].ucum_unit
            assert math.isclose(fact.value, value, rel_tol=1e-6), (case.index, key, fact.original_unit)
            assert fact.effective_at is not None and fact.effective_at < case.study_at
            assert fact.status == "final"


def test_values_older_than_the_lookback_are_masked_the_rest_used(cases: list[PatientCase]) -> None:
    features = MANIFEST.clinical_input.features if MANIFEST.clinical_input else []
    checked_stale = 0
    for case in cases:
        parsed = parse_bundle(case.bundle)
        context = ClinicalContext(
            gender=parsed.patients[0].gender, birth_date=parsed.patients[0].birth_date, observations=parsed.observations
        )
        _, mask, used = clinical_vector(context, features=features, study_at=case.study_at)
        for value, present in zip(used, mask, strict=True):
            expected = case.clinical.get(value.feature)
            if value.feature not in OBSERVATION_KINDS:
                continue
            if expected is None:
                assert present == 0 and value.reason == "no value"
            elif value.feature in case.stale:
                assert present == 0 and value.reason == "outside lookback window"
                checked_stale += 1
            else:
                assert present == 1 and math.isclose(value.value or 0.0, expected, rel_tol=1e-6)
    assert checked_stale > 0


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="'size'"):
        generate_cohort(tmp_path / "small", n=1, size=512, progress=False)
    with pytest.raises(InvalidInput, match="'n'"):
        generate_cohort(tmp_path / "none", n=0, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="'out_dir'"):
        generate_cohort(tmp_path / "busy", n=1, progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(InvalidInput, match="'modality'"):
        make_patient_case(0, index=0, size=SMALL, modality="MR")
    with pytest.raises(InvalidInput, match="'seed'"):
        make_patient_case(-1, index=0, size=SMALL)
