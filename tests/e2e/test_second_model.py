"""Two models served side by side: a head CT goes to ct-head-ich only, a chest radiograph to cxr-fusion only."""

from __future__ import annotations

import datetime as dt
import io
import time
import uuid
from typing import Any

import numpy as np
import onnxruntime
from fastapi.testclient import TestClient
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.flows.runtime import Runtime
from service.inference.manifest import load_manifest
from service.inference.preprocess import age_in_years, prepare_image
from service.training.ct_synthetic import render_head_ct_slice
from tests.conftest import REPO, Tokens
from tests.factories import dx_instance, multipart_related

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ICH_CODE = "1386000"
ISSUER = "urn:oid:1.2.3.4.5"
CT_PATIENT, DX_PATIENT = "MRN-CT-501", "MRN-DX-502"
BIRTH_DATE = dt.date(1950, 1, 1)
STUDY_DATE, STUDY_TIME = dt.date(2026, 11, 20), "101500"
SYSTOLIC_BP, GCS = 176.0, 11.0


def ct_instance(hu: np.ndarray, *, study_uid: str) -> bytes:
    """A Part 10 CT Image Storage object as a scanner writes a head CT slice: 12 bits stored, intercept -1024."""
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = CT_PATIENT
    ds.IssuerOfPatientID = ISSUER
    ds.PatientName = "Synthetic^Head"
    ds.PatientBirthDate = BIRTH_DATE.strftime("%Y%m%d")
    ds.PatientSex = "F"
    ds.StudyDate = STUDY_DATE.strftime("%Y%m%d")
    ds.StudyTime = STUDY_TIME
    ds.AccessionNumber = "ACC" + uuid.uuid4().hex[:8]
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [0.45, 0.45]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _observation(patient_url: str, loinc: str, display: str, value: float, unit: str, at: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": display}]},
            "subject": {"reference": patient_url},
            "effectiveDateTime": at,
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        },
        "request": {"method": "POST", "url": "Observation"},
    }


def ct_patient_bundle() -> dict[str, Any]:
    """The head CT patient: systolic pressure and GCS from the emergency department, no INR."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": ISSUER, "value": CT_PATIENT}],
                    "gender": "female",
                    "birthDate": BIRTH_DATE.isoformat(),
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            _observation(
                patient_url, "8480-6", "Systolic blood pressure", SYSTOLIC_BP, "mm[Hg]", "2026-11-20T09:30:00Z"
            ),
            # GCS in {score}: an annotation, dimensionless in UCUM, the same unit as the manifest's.
            _observation(
                patient_url, "9269-2", "Glasgow coma score total", GCS, "{score}", "2026-11-20T09:40:00+00:00"
            ),
        ],
    }


def _reports(client: TestClient, study_uid: str, headers: dict[str, str], timeout: float = 60) -> list[dict[str, Any]]:
    """The study's reports once every one of its jobs has succeeded or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = client.get(f"/v1/studies/{study_uid}", headers=headers).json()
        if study["jobs"] and all(j["state"] in ("succeeded", "failed") for j in study["jobs"]):
            response = client.get(f"/v1/studies/{study_uid}/report", headers=headers)
            assert response.status_code == 200, f"{response.text}; jobs {study['jobs']}"
            return response.json()["reports"]
        time.sleep(0.2)
    raise AssertionError(f"jobs still pending after {timeout}s: {study['jobs']}")


def _expected_probability(hu: np.ndarray) -> float:
    """What the model should say, computed here from the HU array and the manifest, not through the service."""
    manifest = load_manifest(REPO / "models" / "ct-head-ich" / "manifest.yaml")
    assert manifest.clinical_input is not None
    image = prepare_image(
        hu.astype(np.float32),
        photometric_interpretation="MONOCHROME2",
        window=(40.0, 80.0),
        spec=manifest.image_input.preprocessing,
    )
    raw = {"age": age_in_years(BIRTH_DATE, STUDY_DATE), "systolic_bp": SYSTOLIC_BP, "gcs": GCS}
    features = manifest.clinical_input.features
    values = np.array([[(raw[f.name] - f.mean) / f.std if f.name in raw else 0.0 for f in features]], np.float32)
    mask = np.array([[1.0 if f.name in raw else 0.0 for f in features]], np.float32)
    session = onnxruntime.InferenceSession(
        str(REPO / "models" / "ct-head-ich" / manifest.latest().artifact), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(
        [manifest.outputs.logits],
        {manifest.image_input.name: image[None], "clinical": values, "clinical_mask": mask},
    )
    temperature = manifest.outputs.findings[0].calibration.temperature
    return float(1.0 / (1.0 + np.exp(-logits[0, 0] / temperature)))


def test_head_ct_and_chest_radiograph_each_go_to_their_own_model(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    assert {"ct-head-ich", "cxr-fusion"} <= set(runtime.registry.models)
    ct_study, dx_study = generate_uid(), generate_uid()
    hu = render_head_ct_slice(np.random.default_rng(11), hemorrhage=True)
    ct_bytes = ct_instance(hu, study_uid=ct_study)
    dx_bytes = dx_instance(patient_id=DX_PATIENT, issuer=ISSUER, study_uid=dx_study, seed=3)

    # One STOW-RS request carrying both studies, as a PACS forwarding its queue does.
    body, content_type = multipart_related([ct_bytes, dx_bytes])
    stored = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
    )
    assert stored.status_code == 200, stored.text
    assert len(stored.json()["00081199"]["Value"]) == 2
    bundle = client.post("/fhir", json=ct_patient_bundle(), headers=tokens.header("ingest"))
    assert bundle.status_code == 200, bundle.text
    assert all(e["response"]["status"] == "201 Created" for e in bundle.json()["entry"])

    clinician = tokens.header("clinician")
    analyzed = {
        uid: client.post(f"/v1/studies/{uid}/analyze", headers=clinician).json() for uid in (ct_study, dx_study)
    }
    assert [j["model"] for j in analyzed[ct_study]["jobs"]] == ["ct-head-ich"]
    assert [j["model"] for j in analyzed[dx_study]["jobs"]] == ["cxr-fusion"]

    [ct_report] = _reports(client, ct_study, clinician)
    assert ct_report["model"]["name"] == "ct-head-ich"
    assert "not for clinical use" in ct_report["model"]["intended_use"]
    assert ct_report["patient"] is not None, "joined with the Bundle's patient by PatientID + issuer"
    [finding] = ct_report["findings"]
    assert finding["code"] == ICH_CODE and finding["system"] == "http://snomed.info/sct"
    assert finding["display"] == "Intracranial hemorrhage"
    assert finding["positive"] == (finding["probability"] >= finding["threshold"])
    # Decoding the object (stored values, Rescale Intercept, the object's own brain window) and the clinical
    # vector through FHIR give the model the same inputs as preparing the HU array directly.
    assert abs(finding["probability"] - _expected_probability(hu)) < 1e-4

    used = {value["feature"]: value for value in ct_report["clinical_inputs"]}
    assert list(used) == ["age", "systolic_bp", "inr", "gcs"]
    assert not used["age"]["missing"] and abs(used["age"]["value"] - age_in_years(BIRTH_DATE, STUDY_DATE)) < 1e-6
    assert used["systolic_bp"]["source"].startswith("Observation/"), "the report names the Observation used"
    assert used["systolic_bp"] | {"effective_at": None, "source": None} == {
        "feature": "systolic_bp",
        "loinc": "8480-6",
        "value": SYSTOLIC_BP,
        "unit": "mm[Hg]",
        "effective_at": None,
        "missing": False,
        "reason": None,
        "source": None,
        "original_value": SYSTOLIC_BP,
        "original_unit": "mm[Hg]",
    }
    assert used["gcs"]["loinc"] == "9269-2" and used["gcs"]["value"] == GCS and used["gcs"]["unit"] == "{score}"
    assert not used["gcs"]["missing"]
    assert used["inr"]["missing"] and used["inr"]["value"] is None and used["inr"]["reason"] == "no value"
    assert ct_report["missing_inputs"] == ["inr"]

    [dx_report] = _reports(client, dx_study, clinician)
    assert dx_report["model"]["name"] == "cxr-fusion"
    assert ICH_CODE not in {f["code"] for f in dx_report["findings"]}
    assert dx_report["patient"] is None, "no Bundle was sent for the chest patient"

    # Each study has exactly the one job of its own model.
    for uid, model in ((ct_study, "ct-head-ich"), (dx_study, "cxr-fusion")):
        jobs = client.get(f"/v1/studies/{uid}", headers=clinician).json()["jobs"]
        assert [(j["model"], j["state"]) for j in jobs] == [(model, "succeeded")]
