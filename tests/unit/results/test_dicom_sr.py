"""DICOM results: the findings SR and the heatmap Secondary Capture, checked with dciodvfy and read back."""

from __future__ import annotations

import copy
import datetime as dt
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from service.errors import InvalidInput
from service.results.dicom_sr import (
    AI_STATEMENT_PREFIX,
    MAX_SC_SIDE,
    build_findings_sr,
    build_heatmap_sc,
    device_observer_uid,
    to_part10,
)
from service.schemas import ClinicalValue, FindingResult, Findings, ModelIdentity
from service.training.cohort_files import make_patient_case
from tests.factories import dx_instance

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
NOW = dt.datetime(2026, 11, 20, 10, 30, 15, tzinfo=dt.UTC)
MODEL = ModelIdentity(
    name="cxr-fusion",
    version="1.4.0",
    sha256="3f" * 32,
    execution_provider="CPUExecutionProvider",
    intended_use="Demonstration only; not for clinical use",
)
FINDINGS = [  # code, display, probability, threshold
    ("233604007", "Pneumonia", 0.8731234567, 0.5),
    ("8186001", "Cardiomegaly", 0.1234567891, 0.45),
    ("60046008", "Pleural effusion", 0.61, 0.6),
    ("19242006", "Pulmonary edema", 0.05, 0.5),
    ("36118008", "Pneumothorax", 0.4999999, 0.5),
]


# --- data ---------------------------------------------------------------------------------------------------


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _dx(**kwargs: Any) -> Dataset:
    """A DX For Presentation image as the cohort generator writes it (12 bits stored, windows, full IOD)."""
    options: dict[str, Any] = {"size": 512, "modality": "DX", "photometric_interpretation": "MONOCHROME2"}
    options.update(kwargs)
    return _read(make_patient_case(11, index=3, **options).dicom)


def _ct() -> Dataset:
    """A single CT slice: signed pixels, Hounsfield rescale, a head window and patient orientation cosines."""
    rng = np.random.default_rng(5)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID = "MRN-CT-1"
    ds.PatientName = "Synthetic^Head"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = "20261119", "221500"
    ds.AccessionNumber = "ACC-CT-1"
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-128, -128, 40]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.PixelData = rng.integers(0, 2000, size=(256, 256)).astype("<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _findings(source: Dataset, **overrides: Any) -> Findings:
    values: dict[str, Any] = {
        "model": MODEL,
        "findings": [
            FindingResult(code=code, display=display, probability=p, threshold=t, positive=p >= t)
            for code, display, p, t in FINDINGS
        ],
        "clinical_inputs": [
            ClinicalValue(feature="age", value=67.4, unit="a", missing=False),
            ClinicalValue(
                feature="crp",
                loinc="1988-5",
                value=48.0,
                unit="mg/L",
                effective_at=dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC),
                missing=False,
            ),
            ClinicalValue(feature="nt_probnp", value=None, unit="pg/mL", missing=True, reason="outside lookback"),
        ],
        "missing_inputs": ["nt_probnp"],
        "source_sop_instance_uid": source.SOPInstanceUID,
    }
    values.update(overrides)
    return Findings(**values)


def _sr(source: Dataset, **overrides: Any) -> Dataset:
    arguments: dict[str, Any] = {
        "series_instance_uid": "1.2.826.0.1.3680043.8.498.901",
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.901.1",
        "instance_number": 1,
        "content_datetime": NOW,
    }
    findings = overrides.pop("findings", None) or _findings(source)
    arguments.update(overrides)
    return build_findings_sr(source, findings, **arguments)


def _heat(rows: int = 8, columns: int = 8) -> np.ndarray:
    return np.random.default_rng(3).random((rows, columns)).astype(np.float32)


def _sc(source: Dataset, heatmap: np.ndarray | None = None, **overrides: Any) -> Dataset:
    arguments: dict[str, Any] = {
        "finding_display": "Pneumonia",
        "model": MODEL,
        "series_instance_uid": "1.2.826.0.1.3680043.8.498.902",
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.902.1",
        "instance_number": 1,
        "content_datetime": NOW,
    }
    arguments.update(overrides)
    return build_heatmap_sc(source, _heat() if heatmap is None else heatmap, **arguments)


def _dciodvfy(data: bytes, tmp_path: Path, name: str) -> list[str]:
    """Run dciodvfy on a Part 10 file; fail on any Error line and return (and print) the warnings."""
    if not DCIODVFY.exists():
        pytest.skip(f"dciodvfy is not installed at {DCIODVFY} (install the dev extra: dicom3tools)")
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    print(f"dciodvfy {name}: {len(warnings)} warning(s)", *warnings, sep="\n  ")
    assert not errors, f"dciodvfy found errors in the {name}:\n" + "\n".join(lines)
    return warnings


def _items(content: Any, name: Any) -> list[Any]:
    return hd.sr.utils.find_content_items(content[0], name=name, recursive=True)


# --- SR -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amended", [False, True], ids=["first", "amended"])
def test_sr_passes_dciodvfy(tmp_path: Path, amended: bool) -> None:
    source = _dx()
    predecessor = (
        (source.StudyInstanceUID, "1.2.826.0.1.3680043.8.498.901", ComprehensiveSRStorage, "1.2.3.4")
        if amended
        else None
    )
    sr = _sr(source, predecessor=predecessor, sop_instance_uid="1.2.826.0.1.3680043.8.498.901.2")

    _dciodvfy(to_part10(sr), tmp_path, "amended SR" if amended else "SR")


def test_sr_carries_findings_model_statement_and_source(tmp_path: Path) -> None:
    source = _dx()
    read = _read(to_part10(_sr(source)))
    sr = hd.sr.ComprehensiveSR.from_dataset(read)
    report = sr.content

    assert read.SOPClassUID == ComprehensiveSRStorage
    assert (read.CompletionFlag, read.VerificationFlag, read.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
        assert read[keyword].value == source[keyword].value, keyword
    assert read.SeriesInstanceUID != source.SeriesInstanceUID
    assert (read.Manufacturer, read.ManufacturerModelName, read.SoftwareVersions) == (
        "clinfer",
        MODEL.name,
        MODEL.version,
    )
    assert (read.ContentDate, read.ContentTime) == ("20261120", "103015")

    # The observer is the model, as a device.
    [observer] = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert (attributes.name, attributes.model_name) == (MODEL.name, MODEL.name)
    assert attributes.uid == device_observer_uid(MODEL)

    # One group per finding, in order: code, probability, threshold, Present/Absent, algorithm, source image.
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(FINDINGS)
    for group, (code, display, probability, threshold) in zip(groups, FINDINGS, strict=True):
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (code, "SCT")
        assert group.finding_type.meaning == display
        [measured] = group.get_measurements(name=codes.DCM.Probability)
        assert measured.value == pytest.approx(probability, abs=1e-6)
        assert measured.unit.value == "1"
        [cutoff] = group.get_measurements(name=codes.DCM.ThresholdValue)
        assert cutoff.value == pytest.approx(threshold, abs=1e-6)
        [evaluation] = group.get_qualitative_evaluations(name=group.finding_type)
        assert evaluation.value == (codes.SCT.Present if probability >= threshold else codes.SCT.Absent)
        assert [item.value for item in _items([group[0]], codes.DCM.AlgorithmName)] == [MODEL.name]
        assert [item.value for item in _items([group[0]], codes.DCM.AlgorithmVersion)] == [MODEL.version]
        assert [item.value for item in _items([group[0]], codes.DCM.AlgorithmFamily)] == [
            codes.DCM.ArtificialIntelligence
        ]
        [image] = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID

    # Labelled as AI-generated, with the model's hash and intended use.
    [statement] = [item.value for item in _items(report, codes.DCM.Comment)]
    assert statement.startswith(AI_STATEMENT_PREFIX)
    assert MODEL.sha256 in statement
    assert MODEL.intended_use in statement

    # The clinical inputs, missing ones included.
    inputs = [item.value for item in _items(report, codes.LN.ClinicalInformation)]
    assert inputs == [
        "age = 67.4 a",
        "crp [LOINC 1988-5] = 48 mg/L, effective 2026-11-20T08:00:00Z",
        "nt_probnp: missing (outside lookback); masked, not used by the model",
    ]

    # The source is evidence of the current procedure and in the image library.
    assert (
        source.StudyInstanceUID,
        source.SeriesInstanceUID,
        source.SOPInstanceUID,
        source.SOPClassUID,
    ) in sr.get_evidence()
    library = _items(report, codes.DCM.ImageLibrary)
    assert len(library) == 1
    assert "PredecessorDocumentsSequence" not in read


def test_amended_sr_names_its_predecessor() -> None:
    source = _dx()
    predecessor = (
        source.StudyInstanceUID,
        "1.2.826.0.1.3680043.8.498.901",
        ComprehensiveSRStorage,
        "1.2.826.0.1.3680043.8.498.901.1",
    )

    read = _read(to_part10(_sr(source, predecessor=predecessor, sop_instance_uid="1.2.826.0.1.3680043.8.498.901.2")))

    [study] = read.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert (
        study.StudyInstanceUID,
        series.SeriesInstanceUID,
        instance.ReferencedSOPClassUID,
        instance.ReferencedSOPInstanceUID,
    ) == predecessor


def test_sr_from_a_sparse_source_and_a_ct_source(tmp_path: Path) -> None:
    # The service's own test factory leaves out Study ID and Referring Physician's Name (Type 2).
    sparse = _read(dx_instance(size=128))
    sparse_sr = _sr(sparse)
    _dciodvfy(to_part10(sparse_sr), tmp_path, "SR of a sparse DX")
    assert "StudyID" in sparse_sr and not sparse_sr.StudyID
    # Without Patient Orientation and Imager Pixel Spacing there is no Image Library; the groups name the source.
    sparse_report = hd.sr.ComprehensiveSR.from_dataset(sparse_sr).content
    assert _items(sparse_report, codes.DCM.ImageLibrary) == []
    for group in sparse_report.get_image_measurement_groups():
        assert [image.referenced_sop_instance_uid for image in group.source_images] == [sparse.SOPInstanceUID]

    ct = _ct()
    ct_sr = _sr(ct, findings=_findings(ct))
    _dciodvfy(to_part10(ct_sr), tmp_path, "SR of a CT")
    [procedure] = _items(hd.sr.ComprehensiveSR.from_dataset(ct_sr).content, codes.DCM.ProcedureReported)
    assert procedure.value == codes.LN.CTUnspecifiedBodyRegion


def test_sr_and_sc_of_a_source_with_an_unknown_sex_code_leave_the_source_alone(tmp_path: Path) -> None:
    source = _dx()
    source.PatientSex = "U"  # outside the enumeration, common in the wild
    before = copy.deepcopy(source)

    sr = _sr(source)
    sc = _sc(source)

    _dciodvfy(to_part10(sr), tmp_path, "SR of a source with PatientSex U")
    _dciodvfy(to_part10(sc), tmp_path, "SC of a source with PatientSex U")
    assert not sr.PatientSex and not sc.PatientSex
    sr.PatientID = sc.PatientID = "changed afterwards"
    assert source == before


@pytest.mark.parametrize(
    ("character_set", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # PS3.5 H.3.1, as Japanese sites send it
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # PS3.5 I.2, Korean
    ],
    ids=["japanese", "korean"],
)
def test_sr_and_sc_of_a_source_in_an_iso_2022_character_set(
    tmp_path: Path, character_set: list[str], name: str
) -> None:
    """Found in review: the source's Specific Character Set was carried into the evidence as it came, and highdicom
    refuses its empty first value (the default repertoire), so no SR and no heatmap were made for such studies."""
    written = _dx()
    written.SpecificCharacterSet = character_set
    written.PatientName = name
    buffer = io.BytesIO()
    written.save_as(buffer, enforce_file_format=True)
    source = _read(buffer.getvalue())  # as received: the names encoded with escape sequences
    assert source.SpecificCharacterSet == character_set and str(source.PatientName) == name

    for what, built in (("SR", _sr(source)), ("SC", _sc(source))):
        data = to_part10(built)
        _dciodvfy(data, tmp_path, f"{what} of a {character_set[1]} source")
        back = _read(data)
        assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == name, what


def test_sc_carries_the_patient_and_study_attributes_the_sr_carries() -> None:
    """Found in review: the heatmap image lost the issuer of the patient ID (and the other patient and study
    attributes highdicom's Secondary Capture does not copy) that the SR of the same study carries, so a PACS that
    files by PatientID and issuer could file the two under different patients."""
    source = _dx()
    source.IssuerOfPatientID = "urn:oid:1.2.3.4.5"
    qualifier = Dataset()
    qualifier.UniversalEntityID = "1.2.3.4.5"
    qualifier.UniversalEntityIDType = "ISO"
    source.IssuerOfPatientIDQualifiersSequence = [qualifier]
    other = Dataset()
    other.PatientID = "MRN-0042"
    other.IssuerOfPatientID = "OTHER-SITE"
    other.TypeOfPatientID = "TEXT"
    source.OtherPatientIDsSequence = [other]
    source.StudyDescription = "Chest PA"
    source.PatientAge = "063Y"
    source.PatientWeight = "71.5"

    sr, sc = _sr(source), _sc(source)

    for keyword in (
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "OtherPatientIDsSequence",
        "StudyDescription",
        "PatientAge",
        "PatientWeight",
    ):
        assert sr[keyword].value == source[keyword].value, f"SR {keyword}"
        assert sc[keyword].value == source[keyword].value, f"SC {keyword}"
    assert (sc.PatientID, sc.StudyInstanceUID, sc.AccessionNumber) == (
        source.PatientID,
        source.StudyInstanceUID,
        source.AccessionNumber,
    )


def test_what_highdicom_refuses_is_invalid_input() -> None:
    source = _dx()
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        source.StudyDate = "20261340"  # month 13, as some archives hold

    with pytest.raises(InvalidInput, match="cannot build the SR from this source and these arguments: month"):
        _sr(source)
    with pytest.raises(InvalidInput, match="cannot build the Secondary Capture from this source and these arguments"):
        _sc(source)


def test_sr_and_sc_are_reproducible() -> None:
    source = _dx()

    assert to_part10(_sr(source)) == to_part10(_sr(source))
    assert to_part10(_sc(source)) == to_part10(_sc(source))


def test_sr_keeps_the_source_timezone() -> None:
    source = _dx()
    source.TimezoneOffsetFromUTC = "+0100"

    read = _read(to_part10(_sr(source)))

    assert (read.TimezoneOffsetFromUTC, read.ContentDate, read.ContentTime) == ("+0100", "20261120", "113015")


# --- SC -----------------------------------------------------------------------------------------------------


def test_sc_passes_dciodvfy_and_references_the_source(tmp_path: Path) -> None:
    source = _dx()
    data = to_part10(_sc(source, _heat(256, 256)))

    _dciodvfy(data, tmp_path, "SC")
    sc = _read(data)

    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert [item.ReferencedSOPInstanceUID for item in sc.SourceImageSequence] == [source.SOPInstanceUID]
    assert [item.ReferencedSOPInstanceUID for item in sc.ReferencedImageSequence] == [source.SOPInstanceUID]
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SeriesDescription == f"AI heatmap: Pneumonia ({MODEL.name} {MODEL.version})"
    assert sc.ImageComments.startswith(AI_STATEMENT_PREFIX)
    assert "AI-generated" in sc.DerivationDescription
    assert sc.BurnedInAnnotation == "NO"
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.pixel_array.shape == (512, 512, 3)


def test_sc_blends_colour_only_where_the_heatmap_is_hot() -> None:
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[:4, :4] = 1.0  # the top-left quadrant

    pixels = _sc(_dx(), heatmap).pixel_array.astype(int)

    cold = pixels[300:, 300:]
    assert (cold[..., 0] == cold[..., 1]).all() and (cold[..., 1] == cold[..., 2]).all()
    hot = pixels[:200, :200]
    assert (hot[..., 0] - hot[..., 2]).mean() > 60  # red over the gray image


def test_sc_of_a_large_monochrome1_image_is_shrunk_and_displays_like_monochrome2(tmp_path: Path) -> None:
    blank = np.zeros((4, 4), dtype=np.float32)
    inverted = _dx(size=1100, photometric_interpretation="MONOCHROME1")
    plain = _dx(size=1100, photometric_interpretation="MONOCHROME2")

    inverted_sc = _sc(inverted, blank)
    plain_sc = _sc(plain, blank)

    _dciodvfy(to_part10(inverted_sc), tmp_path, "SC of a MONOCHROME1 DX")
    assert max(inverted_sc.Rows, inverted_sc.Columns) <= MAX_SC_SIDE
    assert inverted_sc.pixel_array.shape == (550, 550, 3)
    difference = np.abs(inverted_sc.pixel_array.astype(int) - plain_sc.pixel_array.astype(int))
    assert difference.max() <= 2
    assert plain_sc.pixel_array.std() > 20  # an image, not a flat field


def test_sc_of_a_ct_slice(tmp_path: Path) -> None:
    ct = _ct()

    sc = _sc(ct)

    _dciodvfy(to_part10(sc), tmp_path, "SC of a CT")
    assert list(sc.PatientOrientation) == ["L", "P"]
    assert sc.BodyPartExamined == "HEAD"


# --- Part 10 ------------------------------------------------------------------------------------------------


def test_to_part10_writes_explicit_little_endian_with_file_meta() -> None:
    source = _dx()
    sr = _sr(source)

    data = to_part10(sr)

    assert data[128:132] == b"DICM"
    read = _read(data)
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert read.file_meta.MediaStorageSOPClassUID == sr.SOPClassUID


def test_to_part10_refuses_encapsulated_pixel_data() -> None:
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless

    with pytest.raises(InvalidInput, match="encapsulated"):
        to_part10(ds)


# --- argument errors ----------------------------------------------------------------------------------------


def _finding(**changes: Any) -> FindingResult:
    values: dict[str, Any] = {
        "code": "233604007",
        "display": "Pneumonia",
        "probability": 0.7,
        "threshold": 0.5,
        "positive": True,
    }
    values.update(changes)
    return FindingResult(**values)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"content_datetime": dt.datetime(2026, 11, 20, 10, 30)}, "'content_datetime' must be timezone-aware"),
        ({"series_instance_uid": "not-a-uid"}, "'series_instance_uid' must be a valid DICOM UID"),
        ({"sop_instance_uid": ""}, "'sop_instance_uid' must be a valid DICOM UID"),
        ({"instance_number": 0}, "'instance_number' must be an int of at least 1"),
        ({"series_number": -1}, "'series_number' must be an int of at least 1"),
        ({"predecessor": ("1.2.3", "1.2.4")}, "'predecessor' must be a tuple"),
        ({"predecessor": ("1.2.3", "1.2.4", "x", "1.2.5")}, "'predecessor sop_class_uid' must be a valid DICOM UID"),
        (
            {"predecessor": ("1.2.3", "1.2.4", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.826.0.1.3680043.8.498.901.1")},
            "'predecessor' names the SR being built",
        ),
        ({"institutional_department_name": "Radiology"}, "'institutional_department_name' needs 'institution_name'"),
        ({"institution_name": "x" * 65}, "'institution_name' must be 1 to 64 characters"),
    ],
)
def test_sr_argument_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _sr(_dx(), **overrides)


def test_sr_refuses_the_source_series_and_findings_of_another_image() -> None:
    source = _dx()

    with pytest.raises(InvalidInput, match="'series_instance_uid' is the source's series"):
        _sr(source, series_instance_uid=source.SeriesInstanceUID)
    with pytest.raises(InvalidInput, match="'findings' were made on 1.2.3.4, not on the source"):
        _sr(source, findings=_findings(source, source_sop_instance_uid="1.2.3.4"))


@pytest.mark.parametrize(
    ("findings", "message"),
    [
        ([], "'findings' has no findings"),
        ([_finding(probability=1.5)], r"'findings.findings\[0\]' probability must be in \[0, 1\]"),
        ([_finding(), _finding(threshold=float("nan"))], r"'findings.findings\[1\]' repeats code"),
        ([_finding(threshold=float("nan"))], r"'findings.findings\[0\]' threshold must be in \[0, 1\]"),
        ([_finding(system="http://example.org/codes")], "has no DICOM coding scheme designator"),
        ([_finding(display=" ")], r"'findings.findings\[0\]' needs a code and a display"),
    ],
)
def test_sr_finding_errors(findings: list[FindingResult], message: str) -> None:
    source = _dx()

    with pytest.raises(InvalidInput, match=message):
        _sr(source, findings=_findings(source, findings=findings))


def test_sr_refuses_what_is_not_an_image() -> None:
    source = _dx()
    del source.Rows

    with pytest.raises(InvalidInput, match="'source' is not an image"):
        _sr(source)
    with pytest.raises(InvalidInput, match="'source' must be a pydicom Dataset"):
        build_findings_sr(
            b"DICM",
            _findings(_dx()),
            series_instance_uid="1.2",
            sop_instance_uid="1.3",
            instance_number=1,
            content_datetime=NOW,
        )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("heatmap", "message"),
    [
        (np.zeros((2, 8, 8), dtype=np.float32), "'heatmap' must be a non-empty 2-D array"),
        (np.zeros((0, 8), dtype=np.float32), "'heatmap' must be a non-empty 2-D array"),
        (np.zeros((8, 8), dtype=np.uint8), "'heatmap' must be a float array"),
        (np.full((8, 8), np.nan, dtype=np.float32), "'heatmap' has NaN or infinite values"),
        (np.full((8, 8), 1.5, dtype=np.float32), r"'heatmap' values must be in \[0, 1\]"),
        ([[0.5]], "'heatmap' must be a numpy array"),
    ],
)
def test_sc_heatmap_errors(heatmap: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _sc(_dx(), heatmap)


def test_sc_argument_errors() -> None:
    source = _dx()

    with pytest.raises(InvalidInput, match="'finding_display' must be a non-empty string"):
        _sc(source, finding_display="")
    with pytest.raises(InvalidInput, match="'model.name' must be 1 to 64 characters"):
        _sc(source, model=MODEL.model_copy(update={"name": "x" * 65}))
    with pytest.raises(InvalidInput, match="'sop_instance_uid' is the source's SOP Instance UID"):
        _sc(source, sop_instance_uid=source.SOPInstanceUID)
    with pytest.raises(InvalidInput, match="'content_datetime' must be a datetime"):
        _sc(source, content_datetime="2026-11-20")
    rgb = _dx()
    rgb.PhotometricInterpretation = "RGB"
    with pytest.raises(InvalidInput, match="PhotometricInterpretation RGB; grayscale images only"):
        _sc(rgb)
    del source.PixelData
    with pytest.raises(InvalidInput, match="'source' has no PixelData"):
        _sc(source)
