"""QIDO-RS search and WADO-RS retrieval of what was stored."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.ingest.stow import iter_parts, related_boundary
from tests.conftest import Tokens
from tests.e2e.test_embedded_spine import post_study
from tests.factories import dx_instance, multipart_related


def _value(item: dict, tag: str) -> object:
    return item[tag]["Value"][0]


def test_qido_and_wado(client: TestClient, tokens: Tokens, tmp_path: object) -> None:
    first, second = generate_uid(), generate_uid()
    series = generate_uid()
    assert (
        post_study(
            client,
            tokens,
            [
                dx_instance(
                    study_uid=first, series_uid=series, patient_id="MRN-500", seed=i, size=256, instance_number=i + 1
                )
                for i in range(3)
            ],
        ).status_code
        == 200
    )
    assert (
        post_study(
            client,
            tokens,
            [
                dx_instance(
                    study_uid=second, patient_id="MRN-600", size=256, study_date=dt.date(2025, 1, 2), modality="CR"
                )
            ],
        ).status_code
        == 200
    )
    clinician = tokens.header("clinician")

    by_patient = client.get("/dicomweb/studies", params={"PatientID": "MRN-5*"}, headers=clinician)
    assert by_patient.status_code == 200 and by_patient.headers["content-type"].startswith("application/dicom+json")
    [study] = by_patient.json()
    assert _value(study, "0020000D") == first
    assert _value(study, "00201208") == 3 and study["00080061"]["Value"] == ["DX"]
    by_date = client.get("/dicomweb/studies", params={"StudyDate": "20250101-20250131"}, headers=clinician).json()
    assert [_value(s, "0020000D") for s in by_date] == [second]
    by_modality = client.get("/dicomweb/studies", params={"ModalitiesInStudy": "CR"}, headers=clinician).json()
    assert [_value(s, "0020000D") for s in by_modality] == [second]
    assert client.get("/dicomweb/studies", params={"PatientID": "nobody"}, headers=clinician).status_code == 204
    assert client.get("/dicomweb/studies", params={"StudyDate": "yesterday"}, headers=clinician).status_code == 400

    [series_item] = client.get(f"/dicomweb/studies/{first}/series", headers=clinician).json()
    assert _value(series_item, "0020000E") == series and _value(series_item, "00201209") == 3
    instances = client.get(f"/dicomweb/studies/{first}/series/{series}/instances", headers=clinician).json()
    assert [_value(i, "00200013") for i in instances] == [1, 2, 3]

    retrieved = client.get(f"/dicomweb/studies/{first}", headers=clinician)
    assert retrieved.status_code == 200
    boundary = related_boundary(retrieved.headers["content-type"])
    import tempfile

    with tempfile.TemporaryFile() as body:
        body.write(retrieved.content)
        body.flush()
        parts = list(iter_parts(body, boundary, max_parts=10))
    assert len(parts) == 3 and all(p.body[128:132] == b"DICM" for p in parts)
    assert client.get(f"/dicomweb/studies/{generate_uid()}", headers=clinician).status_code == 404
    assert client.get("/dicomweb/studies", headers=tokens.header("ingest")).status_code == 403


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (None, 200),
        ("*/*", 200),
        ('multipart/related; type="application/dicom"; transfer-syntax=*', 200),
        ("multipart/related", 200),
        ('image/jpeg, multipart/related; type="application/dicom"; q=0.5', 200),
        ("image/jpeg", 406),
        ("application/dicom+json", 406),
        ('multipart/related; type="image/jpeg"', 406),
        ('multipart/related; type="application/dicom"; q=0', 406),
        ("garbage", 406),
    ],
)
def test_wado_answers_what_accept_admits_or_406(
    client: TestClient, tokens: Tokens, accept: str | None, status: int
) -> None:
    """Before, any Accept got multipart DICOM: a client asking for JPEG got bytes it could not read."""
    study_uid = generate_uid()
    body, content_type = multipart_related([dx_instance(study_uid=study_uid, size=64)])
    headers = {"Content-Type": content_type, **tokens.header("ingest")}
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    headers = {**tokens.header("clinician"), **({"Accept": accept} if accept else {})}
    response = client.get(f"/dicomweb/studies/{study_uid}", headers=headers)
    assert response.status_code == status, response.text
    if status == 406:
        assert response.json()["error"]["code"] == "not-acceptable"


def test_qido_names_the_query_keys_it_ignores(client: TestClient, tokens: Tokens) -> None:
    """A key the search does not match on (a tag, a name we do not index) is ignored, as PS3.18 allows, and named
    in a Warning header, as it requires. Before, "00100020=MRN-X" answered every study with no word of it."""
    study_uid = generate_uid()
    body, content_type = multipart_related([dx_instance(study_uid=study_uid, size=64)])
    headers = {"Content-Type": content_type, **tokens.header("ingest")}
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200
    clinician = tokens.header("clinician")
    answered = client.get("/dicomweb/studies", params={"00100020": "MRN-X", "PatientName": "A*"}, headers=clinician)
    assert answered.status_code == 200
    assert (
        answered.headers["warning"] == '299 clinfer "The fields in the query were not supported: 00100020, PatientName"'
    )
    matched = client.get("/dicomweb/studies", params={"StudyInstanceUID": study_uid, "limit": 5}, headers=clinician)
    assert matched.status_code == 200 and "warning" not in matched.headers
    series = client.get(f"/dicomweb/studies/{study_uid}/series", params={"Modality": "DX"}, headers=clinician)
    assert series.status_code == 200 and "Modality" in series.headers["warning"]
