"""The FHIR resources of a report — DiagnosticReport, result Observations, Provenance, Device — written to the FHIR
store in the transaction that stores (or amends) the report, so FHIR read, search, versions and ETags work on them
as on any resource. Clients cannot write them (origin "result")."""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from service.flows.orders import DICOM_UID_SYSTEM
from service.results import reports as report_results
from service.store import clinical, fhir_store, reports
from service.store.tables import Report, Study

_HISTORY = re.compile(r"^([A-Za-z]+/[A-Za-z0-9\-.]{1,64})/_history/\d+$")


def _imaging_study_id(session: Session, study: Study) -> str | None:
    """The FHIR ImagingStudy of the study: the first match of an identifier search (the search an order link
    runs), asked for directly, with no query string to parse, and for one row."""
    request = fhir_store.SearchRequest(
        "ImagingStudy", [("identifier", f"{DICOM_UID_SYSTEM}|urn:oid:{study.study_instance_uid}")], count=1
    )
    found = fhir_store.matching_ids(session=session, request=request)
    return found[0] if found else None


def publish(session: Session, *, report: Report, study: Study, new_version: bool = False) -> dict[str, int]:
    """Write the report's current version as FHIR resources; returns their store versions by reference.

    Args:
        new_version: The report's current version was made in this transaction (``reports.create_once``). Its
            Provenance is then new, and so is every resource but the Device of a first version (their ids are
            made from the new report's id), so the store does not look for their rows (``PutRequest.new``).
    """
    patient_resource_id = clinical.patient_resource_id(session=session, patient_id=report.patient_id)
    based_on = [f"ServiceRequest/{study.order_resource_id}"] if study.order_resource_id else []
    resources = report_results.report_resources(
        report,
        study=study,
        patient_resource_id=patient_resource_id,
        based_on=based_on,
        imaging_study_id=_imaging_study_id(session, study),
    )
    first_version = new_version and report.version == 1
    requests = [
        fhir_store.PutRequest(
            resource_type=resource["resourceType"],
            resource_id=resource["id"],
            body=resource,
            patient_id=None if resource["resourceType"] == "Device" else report.patient_id,
            origin="result",
            create_only=resource["resourceType"] == "Device",  # one Device per model version, written once
            new=first_version and resource["resourceType"] != "Device",
        )
        for resource in resources
        if resource["resourceType"] != "Provenance"
    ]
    provenance = next((r for r in resources if r["resourceType"] == "Provenance"), None)
    if provenance is not None:
        targets = provenance.get("target", [])

        def cite_stored_versions(versions: dict[str, int]) -> None:
            for target in targets:  # point at the versions this same write stores
                match = _HISTORY.match(target.get("reference", ""))
                if match and match.group(1) in versions:
                    target["reference"] = f"{match.group(1)}/_history/{versions[match.group(1)]}"

        requests.append(  # last: it learns the versions of all the others, and goes in the same statements
            fhir_store.PutRequest(
                resource_type="Provenance",
                resource_id=provenance["id"],
                body=provenance,
                patient_id=report.patient_id,
                origin="result",
                complete=cite_stored_versions,
                new=new_version,  # one per report version
            )
        )
    return {
        f"{row.resource_type}/{row.resource_id}": row.version
        for row, _ in fhir_store.put_many(session=session, requests=requests)
    }


def republish_for_study(session: Session, study: Study) -> int:
    """Re-write the FHIR resources of a study's reports (an order was linked after the report: basedOn)."""
    found = reports.for_study(session=session, study=study)
    for report in found:
        publish(session, report=report, study=study)
    return len(found)
