"""AI-read orders: a FHIR ServiceRequest linked to its study by accession number, or through an ImagingStudy
(identified by its Study Instance UID) that is basedOn the ServiceRequest — in whichever order they arrive."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy.orm import Session

from service.store import fhir_store, studies
from service.store.tables import Study

ACCESSION_TYPE = ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")
DICOM_UID_SYSTEM = "urn:dicom:uid"
ACTIVE_ORDER_STATUSES = ("active", "completed")


def resolver(session: Session) -> Callable[[str, str], list[str]]:
    """A function (resource type, FHIR search query) -> ids of the current matches, within ``session``."""

    def resolve(resource_type: str, query: str) -> list[str]:
        request = fhir_store.parse_search(resource_type, parse_qsl(query, keep_blank_values=True))
        return fhir_store.matching_ids(session=session, request=request)

    return resolve


def accession_numbers(resource: dict[str, Any]) -> set[str]:
    numbers = set()
    for identifier in resource.get("identifier") or []:
        codings = ((identifier.get("type") or {}).get("coding")) or []
        if any((c.get("system"), c.get("code")) == ACCESSION_TYPE for c in codings) and identifier.get("value"):
            numbers.add(str(identifier["value"]))
    return numbers


def study_uids(resource: dict[str, Any]) -> set[str]:
    return {
        str(i["value"]).removeprefix("urn:oid:")
        for i in resource.get("identifier") or []
        if i.get("system") == DICOM_UID_SYSTEM and i.get("value")
    }


def link_orders(session: Session, resource: dict[str, Any]) -> list[Study]:
    """Link AI-read orders to studies: a ServiceRequest by accession number, or an ImagingStudy (by its Study
    Instance UID) that is basedOn a ServiceRequest. Returns the studies newly linked."""
    linked: list[Study] = []
    if resource.get("resourceType") == "ServiceRequest":
        if resource.get("status") not in ACTIVE_ORDER_STATUSES:
            return linked
        for accession in accession_numbers(resource):
            for study in studies.by_accession(session=session, accession_number=accession):
                if study.order_resource_id != resource["id"]:
                    study.order_resource_id = resource["id"]
                    linked.append(study)
        # an ImagingStudy stored earlier may name this order
        for row_id in resolver(session)("ImagingStudy", f"basedon=ServiceRequest/{resource['id']}"):
            imaging = fhir_store.read(session=session, resource_type="ImagingStudy", resource_id=row_id).body
            for uid in study_uids(imaging):
                named = studies.get(session=session, study_instance_uid=uid)
                if named is not None and named.order_resource_id != resource["id"]:
                    named.order_resource_id = resource["id"]
                    linked.append(named)
    elif resource.get("resourceType") == "ImagingStudy":
        orders = [
            ref.removeprefix("ServiceRequest/")
            for ref in (fhir_store.normalize_reference(b.get("reference", "")) for b in resource.get("basedOn") or [])
            if ref and ref.startswith("ServiceRequest/")
        ]
        for uid in study_uids(resource):
            found = studies.get(session=session, study_instance_uid=uid)
            if found is not None and orders and found.order_resource_id != orders[0]:
                found.order_resource_id = orders[0]
                linked.append(found)
    return linked


def order_for_new_study(session: Session, study: Study) -> None:
    """A study that arrives after its order: find the order by accession number or by an ImagingStudy (both
    searches in one SELECT)."""
    if study.order_resource_id is not None:
        return
    identifier = f"{DICOM_UID_SYSTEM}|urn:oid:{study.study_instance_uid}"
    searches = [fhir_store.SearchRequest("ImagingStudy", [("identifier", identifier)])]
    if study.accession_number:
        accession = fhir_store.escape(study.accession_number)  # "A,B" is one accession number, not two
        searches.append(fhir_store.SearchRequest("ServiceRequest", [("identifier", accession)]))
    imaging_ids, *order_ids = fhir_store.matching_ids_of_each(session=session, requests=searches)
    active = [
        rid
        for rid in (order_ids[0] if order_ids else [])
        if fhir_store.read(session=session, resource_type="ServiceRequest", resource_id=rid).body.get("status")
        in ACTIVE_ORDER_STATUSES
    ]
    if active:
        study.order_resource_id = active[0]
        return
    for imaging_id in imaging_ids:
        imaging = fhir_store.read(session=session, resource_type="ImagingStudy", resource_id=imaging_id).body
        for based_on in imaging.get("basedOn") or []:
            ref = fhir_store.normalize_reference(based_on.get("reference", ""))
            if ref and ref.startswith("ServiceRequest/"):
                study.order_resource_id = ref.removeprefix("ServiceRequest/")
                return
