"""AI-read orders: a FHIR ServiceRequest linked to its study by accession number, or through an ImagingStudy
(identified by its Study Instance UID) that is basedOn the ServiceRequest — in whichever order they arrive, by the same
rules: only an order in force (``studies.ORDER_STATUSES_IN_FORCE``) links; by accession number, only an identifier of
type v2-0203 ACSN, and only a study of the order's own patient. An order withdrawn (another status, or deleted)
unlinks the studies it ordered that were not analyzed yet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy.orm import Session

from service.store import fhir_store, studies
from service.store.tables import Study

ACCESSION_TYPE = ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")
DICOM_UID_SYSTEM = "urn:dicom:uid"


def resolver(session: Session) -> Callable[[str, str], list[str]]:
    """A function (resource type, FHIR search query) -> ids of the current matches, within ``session``."""

    def resolve(resource_type: str, query: str) -> list[str]:
        request = fhir_store.parse_search(resource_type, parse_qsl(query, keep_blank_values=True))
        return fhir_store.matching_ids(session=session, request=request)

    return resolve


def accession_numbers(resource: dict[str, Any]) -> set[str]:
    """The accession numbers of an order: the values of its identifiers of type v2-0203 ACSN (a placer or filler
    number, or an untyped identifier, may equal another study's accession number and is not one)."""
    numbers = set()
    for identifier in resource.get("identifier") or []:
        codings = ((identifier.get("type") or {}).get("coding")) or []
        if any((c.get("system"), c.get("code")) == ACCESSION_TYPE for c in codings) and identifier.get("value"):
            numbers.add(str(identifier["value"]))
    return numbers


def in_force(order: dict[str, Any]) -> bool:
    """Whether a ServiceRequest has its study analyzed (its status is one of ``studies.ORDER_STATUSES_IN_FORCE``)."""
    return order.get("status") in studies.ORDER_STATUSES_IN_FORCE


def _order_in_force(session: Session, resource_id: str) -> bool:
    """Whether the ServiceRequest is stored, not deleted, and in force now."""
    row = fhir_store.current(session=session, resource_type="ServiceRequest", resource_id=resource_id)
    return row is not None and not row.deleted and in_force(row.body)


def study_uids(resource: dict[str, Any]) -> set[str]:
    return {
        str(i["value"]).removeprefix("urn:oid:")
        for i in resource.get("identifier") or []
        if i.get("system") == DICOM_UID_SYSTEM and i.get("value")
    }


def link_orders(session: Session, resource: dict[str, Any], *, patient_id: int | None) -> list[Study]:
    """Link AI-read orders to studies after a FHIR write: a ServiceRequest in force by accession number (studies of
    its patient, ``patient_id``) and through the ImagingStudies basedOn it; an ImagingStudy (by its Study Instance
    UID) to the first order in force it is basedOn. A ServiceRequest written with another status is withdrawn: the
    studies it ordered that were not analyzed yet are unlinked (``studies.unlink_order``).

    Returns:
        The studies newly linked.
    """
    linked: list[Study] = []
    if resource.get("resourceType") == "ServiceRequest":
        if not in_force(resource):
            studies.unlink_order(session=session, order_resource_id=resource["id"])
            return linked
        for accession in accession_numbers(resource):
            for study in studies.by_accession(session=session, accession_number=accession, patient_id=patient_id):
                if study.order_resource_id != resource["id"]:
                    study.order_resource_id = resource["id"]
                    linked.append(study)
        # an ImagingStudy stored earlier may name this order (by Study Instance UID: no accession number to mistake)
        for row_id in resolver(session)("ImagingStudy", f"basedon=ServiceRequest/{resource['id']}"):
            imaging = fhir_store.read(session=session, resource_type="ImagingStudy", resource_id=row_id).body
            for uid in study_uids(imaging):
                named = studies.get(session=session, study_instance_uid=uid)
                if named is not None and named.order_resource_id != resource["id"]:
                    named.order_resource_id = resource["id"]
                    linked.append(named)
    elif resource.get("resourceType") == "ImagingStudy":
        order = next((o for o in _based_on_orders(resource) if _order_in_force(session, o)), None)
        for uid in study_uids(resource) if order is not None else ():
            found = studies.get(session=session, study_instance_uid=uid)
            if found is not None and found.order_resource_id != order:
                found.order_resource_id = order
                linked.append(found)
    return linked


def _based_on_orders(imaging: dict[str, Any]) -> list[str]:
    """The ids of the ServiceRequests an ImagingStudy is basedOn, in its order."""
    return [
        ref.removeprefix("ServiceRequest/")
        for ref in (fhir_store.normalize_reference(b.get("reference", "")) for b in imaging.get("basedOn") or [])
        if ref and ref.startswith("ServiceRequest/")
    ]


def order_for_new_study(session: Session, study: Study) -> None:
    """A study that arrives after its order: find an order in force by accession number (an ACSN identifier, and the
    study's own patient: the rules of ``link_orders``) or by an ImagingStudy basedOn it (both searches in one
    SELECT). Call it after the study has been joined to its patient."""
    if study.order_resource_id is not None:
        return
    identifier = f"{DICOM_UID_SYSTEM}|urn:oid:{study.study_instance_uid}"
    searches = [fhir_store.SearchRequest("ImagingStudy", [("identifier", identifier)])]
    if study.accession_number:
        accession = fhir_store.escape(study.accession_number)  # "A,B" is one accession number, not two
        statuses = ",".join(studies.ORDER_STATUSES_IN_FORCE)
        searches.append(fhir_store.SearchRequest("ServiceRequest", [("identifier", accession), ("status", statuses)]))
    imaging_ids, *order_ids = fhir_store.matching_ids_of_each(session=session, requests=searches)
    for order_id in order_ids[0] if order_ids else []:
        # the search matched the value in any identifier: a placer number equal to the accession number too
        row = fhir_store.read(session=session, resource_type="ServiceRequest", resource_id=order_id)
        if row.patient_id == study.patient_id and study.accession_number in accession_numbers(row.body):
            study.order_resource_id = order_id
            return
    for imaging_id in imaging_ids:
        imaging = fhir_store.read(session=session, resource_type="ImagingStudy", resource_id=imaging_id).body
        for order_id in _based_on_orders(imaging):
            if _order_in_force(session, order_id):
                study.order_resource_id = order_id
                return
