"""A FHIR client library (fhirclient, SMART on FHIR's Python client) against clinfer on PostgreSQL: it searches a
patient's DiagnosticReports, pages through more than 50 of them by the server's next links, and reads each."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fhirclient.models.diagnosticreport import DiagnosticReport
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRServer
from pydicom.uid import generate_uid

from service.api import auth
from service.flows.runtime import build_runtime, set_runtime
from tests.conftest import make_settings, serve_over_http
from tests.factories import dx_instance, multipart_related, patient_bundle

pytestmark = pytest.mark.postgres

STUDIES = 55


def test_fhirclient_pages_through_a_patients_diagnostic_reports(tmp_path: Path, postgres_url: str) -> None:
    settings = make_settings(tmp_path, database_url=postgres_url, dicom_results=False)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    ingest = {"Authorization": f"Bearer {auth.mint_token(settings, role='ingest')}"}
    clinician_token = auth.mint_token(settings, role="clinician")
    with serve_over_http(runtime) as base, httpx.Client(base_url=base, timeout=60) as http:
        assert http.post("/fhir", json=patient_bundle(), headers=ingest).status_code == 200
        study_uids = [generate_uid() for _ in range(STUDIES)]
        for number, study_uid in enumerate(study_uids):
            body, content_type = multipart_related([dx_instance(study_uid=study_uid, size=256, seed=number)])
            stored = http.post("/dicomweb/studies", content=body, headers={**ingest, "Content-Type": content_type})
            assert stored.status_code == 200, stored.text
        clinician = {"Authorization": f"Bearer {clinician_token}"}
        for study_uid in study_uids:
            assert http.post(f"/v1/studies/{study_uid}/analyze", headers=clinician).status_code == 202
        deadline = time.monotonic() + 180
        while True:
            reports = http.get("/fhir/DiagnosticReport", params={"_summary": "count"}, headers=clinician).json()
            if reports["total"] == STUDIES or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert reports["total"] == STUDIES, reports

        server = FHIRServer(None, base_uri=f"{base}/fhir/")
        server.session.headers["Authorization"] = f"Bearer {clinician_token}"
        patients = Patient.where(struct={"identifier": "MRN-1001"}).perform_resources(server)
        assert len(patients) == 1
        search = DiagnosticReport.where(struct={"subject": f"Patient/{patients[0].id}", "_count": "20"})
        first_page = search.perform(server)
        assert first_page.total == STUDIES and len(first_page.entry) == 20
        assert any(link.relation == "next" for link in first_page.link)
        found = list(search.perform_resources_iter(server))
        assert len(found) == STUDIES and len({r.id for r in found}) == STUDIES, "every report once, across 3 pages"
        for report in found[:3] + found[-3:]:
            read = DiagnosticReport.read(report.id, server)
            assert read.status == "preliminary" and read.subject.reference == f"Patient/{patients[0].id}"
            assert read.meta.versionId == "1"
            assert any(coding.code == "18748-4" for coding in read.code.coding)
            assert read.presentedForm[0].contentType == "text/html"
