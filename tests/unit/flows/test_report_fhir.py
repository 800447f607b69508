"""A report's FHIR resources: its Provenance cites the versions written with it, first time and on re-writes."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from service.flows import analysis, ingest, queue, report_fhir
from service.flows.runtime import Runtime
from service.results.fhir import provenance_id
from service.schemas import SYSTEM_PRINCIPAL
from service.store import fhir_store, reports, studies
from tests.factories import dx_instance


def _reported_study(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)
    study_uid = generate_uid()
    ingest.store_instance(
        runtime, dx_instance(study_uid=study_uid, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )
    request = analysis.request_analysis(
        runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="request"
    )
    [job] = [j for j in request.jobs if j.model_name == "cxr-fusion"]
    analysis.preprocess_job(runtime, job.id)
    analysis.infer_job(runtime, job.id)
    return study_uid


def _cited(runtime: Runtime, report_id: str, version: int) -> tuple[set[str], dict[str, int]]:
    with runtime.sessions() as session:
        provenance = fhir_store.read(
            session=session, resource_type="Provenance", resource_id=provenance_id(report_id, version)
        ).body
        cited = {t["reference"] for t in provenance["target"]}
        stored = {
            f"{row.resource_type}/{row.resource_id}": row.version
            for row in (
                fhir_store.read(session=session, resource_type=ref.split("/")[0], resource_id=ref.split("/")[1])
                for ref in {c.split("/_history/")[0] for c in cited}
            )
        }
    return cited, stored


def test_provenance_cites_the_versions_stored_with_it(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    study_uid = _reported_study(runtime, monkeypatch)
    with runtime.sessions() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_uid)
        [report] = reports.for_study(session=session, study=study)
        report_id, version = report.id, report.version
    cited, stored = _cited(runtime, report_id, version)
    assert f"DiagnosticReport/{report_id}/_history/1" in cited
    assert cited == {f"{ref}/_history/{v}" for ref, v in stored.items()}
    with runtime.sessions.begin() as session:  # re-written (an order linked later): every resource a new version
        study = studies.get_or_raise(session=session, study_instance_uid=study_uid)
        written = report_fhir.republish_for_study(session, study)
        assert written == 1
    cited, stored = _cited(runtime, report_id, version)
    assert f"DiagnosticReport/{report_id}/_history/2" in cited
    assert cited == {f"{ref}/_history/{v}" for ref, v in stored.items()}
