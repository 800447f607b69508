"""Study completeness on the embedded default: a study trickling in is analyzed once, when it has been quiet for
its rule's stable_seconds; an instance arriving after the report amends that report (a new version), never a
second report."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.api.main import create_app
from service.flows.runtime import build_runtime, set_runtime
from tests.conftest import Tokens, make_settings
from tests.e2e.test_dicom_results import wado_instance, wait_for_dicom
from tests.e2e.test_embedded_spine import post_study
from tests.factories import dx_instance, patient_bundle

STABLE_SECONDS = 6.0
RULES = f"""
rules:
  - name: chest
    match: {{Modality: [DX, CR], BodyPartExamined: [CHEST]}}
    models: [cxr-fusion]
    stable_seconds: {STABLE_SECONDS}
    series: last                    # a repeat exposure, in a later series, is the image read
"""


def _jobs(client: TestClient, study_uid: str, headers: dict[str, str]) -> list[dict]:
    response = client.get(f"/v1/studies/{study_uid}", headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["jobs"])


def test_a_trickling_study_is_analyzed_once_when_stable_and_a_late_instance_amends_the_report(tmp_path: Path) -> None:
    rules_file = tmp_path / "routing.yaml"
    rules_file.write_text(RULES)
    # the global default is an hour: only the rule's stable_seconds can make this study due
    settings = make_settings(tmp_path, routing_rules=rules_file, study_stable_seconds=3600)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    tokens = Tokens(settings)
    clinician = tokens.header("clinician")
    study_uid, series_uid = generate_uid(), generate_uid()
    with TestClient(create_app(runtime)) as client:
        assert client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest")).status_code == 200
        started = time.monotonic()
        for number in range(1, 8):  # 7 instances, one every 5 s: 30 s, never quiet for 6 s
            if number > 1:
                time.sleep(5.0)
            part = dx_instance(study_uid=study_uid, series_uid=series_uid, seed=number, instance_number=number)
            assert post_study(client, tokens, [part]).status_code == 200
            assert _jobs(client, study_uid, clinician) == [], f"analyzed before the study was stable ({number})"
        last_instance = time.monotonic()
        assert last_instance - started >= 30.0

        report = wait_for_dicom(client, study_uid, clinician)
        analyzed_after = time.monotonic() - last_instance
        assert analyzed_after >= STABLE_SECONDS - 0.5, analyzed_after
        [job] = _jobs(client, study_uid, clinician)
        assert job["revision"] == 1 and job["rule"] == "chest" and job["state"] == "succeeded"
        assert report["version"] == 1 and report["status"] == "preliminary"
        first_report_id = report["id"]
        analyses = client.get(
            "/v1/audit", params={"event_type": "study.analyze", "limit": 1000}, headers=tokens.header("admin")
        ).json()["events"]
        assert len([e for e in analyses if e["entity"] == f"study:{study_uid}"]) == 1, "analyzed exactly once"

        # a late instance (say a repeat exposure) after the report: the same report, amended
        late_uid = generate_uid()
        late = dx_instance(study_uid=study_uid, series_uid=generate_uid(), sop_uid=late_uid, seed=99, instance_number=1)
        assert post_study(client, tokens, [late]).status_code == 200
        assert client.get(f"/v1/studies/{study_uid}", headers=clinician).json()["status"] == "receiving"
        amended = wait_for_dicom(client, study_uid, clinician, version=2)
        body = client.get(f"/v1/studies/{study_uid}/report", headers=clinician).json()
        assert len(body["reports"]) == 1, "an amended report, never a duplicate"
        assert amended["id"] == first_report_id
        assert amended["status"] == "amended" and amended["version"] == 2
        revisions = sorted(j["revision"] for j in _jobs(client, study_uid, clinician))
        assert revisions == [1, 2]

        fhir = client.get(f"/fhir/DiagnosticReport/{first_report_id}", headers=clinician).json()
        assert fhir["status"] == "amended" and fhir["meta"]["versionId"] == "2"

        # the amended SR names the SR it replaces
        assert amended["dicom"]["state"] == "stored", amended["dicom"]
        assert amended["dicom"]["sr"]["sop_instance_uid"] != report["dicom"]["sr"]["sop_instance_uid"]
        sr = pydicom.dcmread(io.BytesIO(wado_instance(client, amended["dicom"]["sr"]["wado_rs"], clinician)))
        predecessors = [
            item.ReferencedSOPInstanceUID
            for study in sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        ]
        assert predecessors == [report["dicom"]["sr"]["sop_instance_uid"]]

        [revised] = [j for j in _jobs(client, study_uid, clinician) if j["revision"] == 2]
        assert revised["reads"] == late_uid, "the amendment read the late image"

        # nothing new: a second request changes nothing
        again = client.post(f"/v1/studies/{study_uid}/analyze", headers=clinician)
        assert again.status_code == 202 and len(again.json()["jobs"]) == 1
        assert sorted(j["revision"] for j in _jobs(client, study_uid, clinician)) == [1, 2]


def test_a_late_instance_that_the_selection_does_not_read_leaves_the_report_as_it_is(tmp_path: Path) -> None:
    """Found in review: with the default selection (the first series) a late instance in a later series made an
    amendment that read the first image again, the same report marked amended; and a late instance that changed no
    analysis left the study "receiving" for good. Neither amends now, and the study is reported again."""
    rules_file = tmp_path / "routing.yaml"
    rules_file.write_text(
        """
rules:
  - name: chest
    match: {Modality: [DX, CR], BodyPartExamined: [CHEST]}
    models: [cxr-fusion]
    stable_seconds: 1
"""
    )
    settings = make_settings(tmp_path, routing_rules=rules_file, completeness_scan_seconds=0.2)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    tokens = Tokens(settings)
    clinician = tokens.header("clinician")
    study_uid = generate_uid()
    with TestClient(create_app(runtime)) as client:
        assert client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest")).status_code == 200
        first_uid = generate_uid()
        assert (
            post_study(client, tokens, [dx_instance(study_uid=study_uid, sop_uid=first_uid, seed=1)]).status_code == 200
        )
        report = wait_for_dicom(client, study_uid, clinician)
        assert report["version"] == 1
        for late in (
            dx_instance(study_uid=study_uid, series_uid=generate_uid(), seed=2),  # a later series: not read
            dx_instance(study_uid=study_uid, series_uid=generate_uid(), seed=3, body_part="ABDOMEN"),  # not taken
        ):
            assert post_study(client, tokens, [late]).status_code == 200
            assert client.get(f"/v1/studies/{study_uid}", headers=clinician).json()["status"] == "receiving"
            deadline = time.monotonic() + 30
            while client.get(f"/v1/studies/{study_uid}", headers=clinician).json()["status"] != "reported":
                assert time.monotonic() < deadline, "the study stayed receiving"
                time.sleep(0.2)
        jobs = _jobs(client, study_uid, clinician)
        assert [(j["revision"], j["reads"]) for j in jobs] == [(1, first_uid)]
        body = client.get(f"/v1/studies/{study_uid}/report", headers=clinician).json()
        assert [(r["version"], r["status"]) for r in body["reports"]] == [(1, "preliminary")]
