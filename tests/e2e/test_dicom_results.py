"""Results as DICOM on the embedded default: the SR and heatmap of each report version, stored in the study,
retrievable by WADO-RS, valid by dciodvfy, pushed by C-STORE to a real dcmtk storescp with bounded retries."""

from __future__ import annotations

import email
import email.policy
import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.api.main import create_app
from service.flows.runtime import Runtime, build_runtime, set_runtime
from tests.conftest import Tokens, dcmtk_tool, free_port, make_settings
from tests.e2e.test_embedded_spine import post_study, wait_for_report
from tests.factories import dx_instance, patient_bundle

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}


def wait_for_dicom(client: TestClient, study_uid: str, headers: dict[str, str], *, version: int = 1) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = client.get(f"/v1/studies/{study_uid}/report", headers=headers).json()
        report = body.get("reports", [{}])[0]
        if report.get("version") == version and report["dicom"]["state"] in ("stored", "failed"):
            return report
        time.sleep(0.2)
    raise AssertionError(f"no DICOM results for version {version} within 60 s: {body}")


def wado_instance(client: TestClient, path: str, headers: dict[str, str]) -> bytes:
    response = client.get(path, headers=headers)
    assert response.status_code == 200, response.text
    message = email.message_from_bytes(
        b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content,
        policy=email.policy.HTTP,
    )
    [part] = [p for p in message.iter_parts()]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def dciodvfy_errors(path: Path) -> list[str]:
    tool = Path(sys.executable).parent / "dciodvfy"
    run = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _analyzed_study(client: TestClient, tokens: Tokens) -> tuple[str, dict[str, Any]]:
    study_uid = generate_uid()
    assert client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest")).status_code == 200
    assert post_study(client, tokens, [dx_instance(study_uid=study_uid)]).status_code == 200
    assert client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician")).status_code == 202
    wait_for_report(client, study_uid, tokens.header("clinician"))
    return study_uid, wait_for_dicom(client, study_uid, tokens.header("clinician"))


def test_each_report_has_a_valid_sr_and_heatmap_retrievable_by_wado(
    client: TestClient, tokens: Tokens, tmp_path: Path
) -> None:
    study_uid, report = _analyzed_study(client, tokens)
    dicom = report["dicom"]
    assert dicom["state"] == "stored", dicom
    assert dicom["error"] is None
    clinician = tokens.header("clinician")

    sr_bytes = wado_instance(client, dicom["sr"]["wado_rs"], clinician)
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert sr.SOPClassUID in SR_CLASSES and sr.StudyInstanceUID == study_uid
    assert sr.PatientID == "MRN-1001"
    text = str(sr)
    for finding in report["findings"]:
        assert finding["code"] in text
    assert "cxr-fusion" in text and "AI" in text

    heatmap_bytes = wado_instance(client, dicom["heatmap"]["wado_rs"], clinician)
    (tmp_path / "sc.dcm").write_bytes(heatmap_bytes)
    assert dciodvfy_errors(tmp_path / "sc.dcm") == []
    heatmap = pydicom.dcmread(io.BytesIO(heatmap_bytes))
    assert heatmap.StudyInstanceUID == study_uid
    assert heatmap.pixel_array.ndim == 3 and heatmap.SamplesPerPixel == 3
    referenced = {item.ReferencedSOPInstanceUID for item in heatmap.get("SourceImageSequence", [])} | {
        item.ReferencedSOPInstanceUID for item in heatmap.get("ReferencedImageSequence", [])
    }
    assert report["source_sop_instance_uid"] in referenced

    # our results are part of the study for QIDO-RS, but they never start an analysis of their own
    series = client.get(f"/dicomweb/studies/{study_uid}/series", headers=clinician).json()
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["DX", "OT", "SR"] or modalities == ["DX", "SC", "SR"], modalities
    study = client.get(f"/v1/studies/{study_uid}", headers=clinician).json()
    assert study["status"] == "reported" and len(study["jobs"]) == 1


def _start_storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    """dcmtk's storescp as the PACS "PACS" on ``port``, storing into ``out``, once it accepts connections."""
    out.mkdir(exist_ok=True)
    process = subprocess.Popen([dcmtk_tool("storescp"), "-aet", "PACS", "-od", str(out), str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return process


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "received"
    process = _start_storescp(port, out)
    yield port, out
    process.terminate()
    process.wait(timeout=10)


def _client_with_rules(tmp_path: Path, rules: str, **overrides: Any) -> tuple[TestClient, Tokens, Runtime]:
    rules_file = tmp_path / "routing.yaml"
    rules_file.write_text(rules)
    settings = make_settings(tmp_path, routing_rules=rules_file, **overrides)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    return TestClient(create_app(runtime)), Tokens(settings), runtime


def test_results_are_pushed_to_a_pacs_by_c_store_intact(tmp_path: Path, storescp: tuple[int, Path]) -> None:
    port, received = storescp
    rules = f"""
destinations:
  pacs: {{kind: dimse, host: 127.0.0.1, port: {port}, ae_title: PACS}}
rules:
  - name: chest
    match: {{Modality: [DX, CR]}}
    models: [cxr-fusion]
    destinations: [pacs]
"""
    client, tokens, _ = _client_with_rules(tmp_path, rules)
    with client:
        study_uid, report = _analyzed_study(client, tokens)
        clinician = tokens.header("clinician")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = client.get(f"/v1/studies/{study_uid}/report", headers=clinician).json()["reports"][0]
            if report["dicom"]["deliveries"] and report["dicom"]["deliveries"][0]["state"] != "pending":
                break
            time.sleep(0.2)
        [delivery] = report["dicom"]["deliveries"]
        assert delivery["state"] == "delivered", delivery
        assert delivery["attempts"] == 1 and delivery["destination"] == "pacs"
        ours = {
            kind: pydicom.dcmread(io.BytesIO(wado_instance(client, report["dicom"][kind]["wado_rs"], clinician)))
            for kind in ("sr", "heatmap")
        }
    files = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in received.iterdir()}
    for dataset in ours.values():
        theirs = files[dataset.SOPInstanceUID]
        assert theirs == dataset, "the PACS holds exactly what we stored"
        if "PixelData" in dataset:
            assert theirs.PixelData == dataset.PixelData


def test_a_push_that_keeps_failing_ends_failed_after_the_bounded_tries(tmp_path: Path) -> None:
    closed = free_port()
    rules = f"""
destinations:
  pacs: {{kind: dimse, host: 127.0.0.1, port: {closed}, ae_title: PACS, timeout_seconds: 2}}
rules:
  - {{name: chest, match: {{Modality: [DX]}}, models: [cxr-fusion], destinations: [pacs]}}
"""
    client, tokens, _ = _client_with_rules(tmp_path, rules, delivery_max_attempts=3, delivery_retry_seconds=0.2)
    with client:
        study_uid, _ = _analyzed_study(client, tokens)
        clinician = tokens.header("clinician")
        deadline = time.monotonic() + 60
        delivery: dict[str, Any] = {}
        while time.monotonic() < deadline:
            report = client.get(f"/v1/studies/{study_uid}/report", headers=clinician).json()["reports"][0]
            delivery = report["dicom"]["deliveries"][0] if report["dicom"]["deliveries"] else {}
            if delivery.get("state") == "failed":
                break
            time.sleep(0.2)
        assert delivery["state"] == "failed", delivery
        assert delivery["attempts"] == 3
        assert "pacs" in delivery["last_error"] and delivery["next_attempt_at"] is None
        metrics = client.get("/metrics", headers=tokens.header("admin")).text
        assert 'clinfer_deliveries_total{destination="pacs",outcome="failed"} 1.0' in metrics
        assert 'clinfer_deliveries_total{destination="pacs",outcome="retry"} 2.0' in metrics
        events = client.get("/v1/audit", params={"event_type": "report.push"}, headers=tokens.header("admin"))
        assert events.status_code == 200, events.text
        assert any(e["outcome"] != "0" for e in events.json()["events"]), events.json()


def _deliveries(client: TestClient, admin: dict[str, str], state: str, seconds: float = 60) -> list[dict[str, Any]]:
    """The deliveries in ``state``, once there is one."""
    deadline = time.monotonic() + seconds
    while True:
        response = client.get("/v1/deliveries", params={"state": state}, headers=admin)
        assert response.status_code == 200, response.text
        if response.json()["deliveries"] or time.monotonic() > deadline:
            return list(response.json()["deliveries"])
        time.sleep(0.2)


def test_failed_pushes_are_listed_and_sent_again_once_the_pacs_is_back(tmp_path: Path) -> None:
    """Found in review: a push that used up its tries while the PACS was down stayed failed, with no way to send
    it again once the PACS was back; the results made during an outage never reached it."""
    port = free_port()  # nothing listens there yet: the PACS is down
    rules = f"""
destinations:
  pacs: {{kind: dimse, host: 127.0.0.1, port: {port}, ae_title: PACS, timeout_seconds: 2}}
rules:
  - {{name: chest, match: {{Modality: [DX]}}, models: [cxr-fusion], destinations: [pacs]}}
"""
    client, tokens, _ = _client_with_rules(tmp_path, rules, delivery_max_attempts=2, delivery_retry_seconds=0.2)
    admin = tokens.header("admin")
    with client:
        study_uid, _ = _analyzed_study(client, tokens)
        [failed] = _deliveries(client, admin, "failed")
        assert failed["study_instance_uid"] == study_uid and failed["destination"] == "pacs"
        assert failed["attempts"] == 2 and failed["current"] is True and "could not be reached" in failed["last_error"]
        assert client.get("/v1/deliveries", params={"state": "lost"}, headers=admin).status_code == 400

        refused = client.post("/v1/deliveries/retry", headers=tokens.header("clinician"))
        assert refused.status_code == 403, refused.text  # re-sending is an operator's action (Task.u)
        unknown = client.post("/v1/deliveries/retry", params={"destination": "elsewhere"}, headers=admin)
        assert unknown.status_code == 400 and "pacs" in unknown.json()["error"]["message"]

        received = tmp_path / "received"
        pacs = _start_storescp(port, received)
        try:
            retried = client.post("/v1/deliveries/retry", params={"destination": "pacs"}, headers=admin)
            assert retried.status_code == 202, retried.text
            assert retried.json() == {"retried": 1, "deliveries": [failed["id"]]}
            [delivered] = _deliveries(client, admin, "delivered")
            assert delivered["id"] == failed["id"] and delivered["attempts"] == 1
            assert len(list(received.iterdir())) == 2  # the SR and the heatmap
        finally:
            pacs.terminate()
            pacs.wait(timeout=10)
        again = client.post("/v1/deliveries/retry", headers=admin)
        assert again.json()["retried"] == 0  # nothing failed is left
        events = client.get("/v1/audit", params={"event_type": "report.push-retry"}, headers=admin).json()["events"]
        assert [(e["actor"], e["detail"]["destination"]) for e in events] == [("admin-dev", "pacs")]
