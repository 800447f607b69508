"""FHIR R4 Bundle ingest: validate a transaction or batch Bundle and reduce it to our facts.

Only Patient, Observation and Condition are accepted. Each resource is validated with the fhir.resources
R4B models (wire-compatible with R4 for these three), then reduced to :class:`PatientFacts`,
:class:`ObservationFact` and :class:`ConditionFact`. References to ``urn:uuid:`` fullUrls inside the Bundle are
rewritten to ``Patient/<id>`` style, as a FHIR server does when it processes a transaction.

A transaction is all-or-nothing: the first bad entry raises :class:`InvalidInput`. A batch may be parsed with
``collect_errors=True``: bad entries are then skipped and reported per entry index.

Units: a valueQuantity's UCUM code (system http://unitsofmeasure.org) must be valid UCUM, or the entry is refused.
A quantity with only a display ``unit`` keeps it as sent; when that is not UCUM, no model ever uses the value
(pre-processing cannot convert it, and says so in the report). Each fact keeps the value and unit as sent
(``original_value``, ``original_unit``), which pre-processing converts to each model's unit; ``value`` and
``ucum_unit`` hold the value in the canonical UCUM unit of its LOINC code (:data:`CANONICAL_UCUM_UNITS`) where it
converts, for search and comparison across senders.

This module is the only place in ingest that imports fhir.resources.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from service import ucum
from service.errors import InvalidInput, PreconditionFailed, ServiceError
from service.schemas import ConditionFact, ObservationFact, PatientFacts, PatientIdentifier
from service.ucum import UcumError

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
BLOOD_PRESSURE_PANEL_LOINC = "85354-9"
SYSTOLIC_BLOOD_PRESSURE_LOINC = "8480-6"
DIASTOLIC_BLOOD_PRESSURE_LOINC = "8462-4"
# What the store keeps of a unit (observations.ucum_unit and original_unit).
MAX_UNIT_LENGTH = 32

ACCEPTED_BUNDLE_TYPES = ("transaction", "batch")
ACCEPTED_RESOURCE_TYPES = (
    "Patient",
    "Observation",
    "Condition",
    "MedicationStatement",
    "ImagingStudy",
    "ServiceRequest",
)
# create (POST, conditional with ifNoneExist), update (PUT Type/id with ifMatch, or conditional PUT Type?query), delete
ACCEPTED_METHODS = ("POST", "PUT", "DELETE")
FHIR_R4 = "FHIR R4 (4.0.1)"
# JSON levels a body may nest: a transaction Bundle of R4 resources needs a dozen or two; fhir.resources validates
# elements recursively (5 frames a level), so a few hundred levels exhaust Python's recursion limit
MAX_JSON_DEPTH = 100

# Required bindings that fhir.resources does not enforce.
_OBSERVATION_STATUSES = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
_ADMINISTRATIVE_GENDERS = frozenset({"male", "female", "other", "unknown"})

_MODELS: dict[str, Any] = {
    "Patient": Patient,
    "Observation": Observation,
    "Condition": Condition,
    "MedicationStatement": MedicationStatement,
    "ImagingStudy": ImagingStudy,
    "ServiceRequest": ServiceRequest,
}
# Required bindings of the other types that fhir.resources does not enforce.
_STATUSES = {
    "MedicationStatement": frozenset(
        {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"}
    ),
    "ImagingStudy": frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"}),
    "ServiceRequest": frozenset({"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}),
}

_FHIR_ID = r"[A-Za-z0-9\-.]{1,64}"
_PATIENT_REFERENCE = re.compile(rf"Patient/({_FHIR_ID})(?:/_history/{_FHIR_ID})?")
_RESOURCE_URL = re.compile(rf"([A-Za-z]+)/({_FHIR_ID})")
_CONDITIONAL_URL = re.compile(r"([A-Za-z]+)\?(.+)")
_ETAG = re.compile(r'^(?:W/)?"?([0-9]{1,30})"?$')  # ASCII digits, few enough for int()


# The canonical UCUM unit of each LOINC code we know, for ObservationFact.value/ucum_unit (search, comparison).
# Only target units: the conversion is service.ucum's. A model's own unit comes from its manifest.
CANONICAL_UCUM_UNITS: dict[str, str] = {
    "8310-5": "Cel",  # body temperature
    "8867-4": "/min",  # heart rate
    "9279-1": "/min",  # respiratory rate
    "59408-5": "%",  # oxygen saturation by pulse oximetry
    "2708-6": "%",  # oxygen saturation in arterial blood
    "6690-2": "10*3/uL",  # leukocytes
    "1988-5": "mg/L",  # C reactive protein
    "33762-6": "pg/mL",  # NT-proBNP
    SYSTOLIC_BLOOD_PRESSURE_LOINC: "mm[Hg]",
    DIASTOLIC_BLOOD_PRESSURE_LOINC: "mm[Hg]",
    "6301-6": "{INR}",  # INR in platelet poor plasma
    "9269-2": "{score}",  # Glasgow coma score total
}

# Panels whose values are components: (the component a panel must carry, whose fact keeps the Observation's id;
# the components also taken when they have a value, each a fact "<id>#<LOINC>").
PANEL_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    BLOOD_PRESSURE_PANEL_LOINC: (SYSTOLIC_BLOOD_PRESSURE_LOINC, (DIASTOLIC_BLOOD_PRESSURE_LOINC,)),
}


@dataclass
class ParsedResource:
    """One accepted entry, ready to store.

    Attributes:
        resource_type: "Patient", "Observation" or "Condition".
        resource_id: The resource's id, or a new uuid4 hex when it had none (create semantics).
        full_url: The entry's fullUrl, if any.
        method: The entry's request.method ("POST" or "PUT").
        json: The resource as sent, with ``id`` set and references to fullUrls of this Bundle rewritten to
            ``<Type>/<id>``.
        entry_index: Position of the entry in ``Bundle.entry``.
    """

    resource_type: str
    resource_id: str
    full_url: str | None
    method: str
    json: dict[str, Any] | None
    entry_index: int
    if_match: int | None = None
    existing: bool = False


@dataclass(frozen=True)
class SubjectFact:
    """A resource kept as sent (MedicationStatement, ImagingStudy, ServiceRequest), with its Patient."""

    resource_type: str
    resource_id: str
    patient_ref: str


@dataclass
class ParsedBundle:
    """A parsed transaction or batch Bundle.

    Attributes:
        bundle_type: "transaction" or "batch".
        patients: One per accepted Patient entry.
        observations: One per accepted Observation, with the Observation's id (for a blood-pressure panel: its
            systolic component).
        components: The further component values of panels, by the Observation's id (for a blood-pressure panel:
            its diastolic component), each with the id ``<id>#<LOINC>`` ("#" never occurs in a FHIR id).
        conditions: One per accepted Condition.
        others: One per accepted MedicationStatement, ImagingStudy or ServiceRequest.
        resources: Every accepted entry, in Bundle order (a DELETE has no json; a conditional create that
            matched an existing resource is ``existing``, with that resource's id).
        errors: ``(entry_index, error)`` for each entry skipped; only filled with ``collect_errors=True``
            on a batch.
    """

    bundle_type: str
    patients: list[PatientFacts] = field(default_factory=list)
    observations: list[ObservationFact] = field(default_factory=list)
    components: dict[str, list[ObservationFact]] = field(default_factory=dict)
    conditions: list[ConditionFact] = field(default_factory=list)
    others: list[SubjectFact] = field(default_factory=list)
    resources: list[ParsedResource] = field(default_factory=list)
    errors: list[tuple[int, ServiceError]] = field(default_factory=list)


@dataclass
class _CheckedEntry:
    index: int
    resource_type: str
    resource_id: str
    full_url: str | None
    method: str
    raw: dict[str, Any] | None
    model: Any
    if_match: int | None = None
    if_none_exist: str | None = None
    conditional_query: str | None = None
    existing: bool = False


def canonical_ucum_unit(loinc: str) -> str | None:
    """The canonical UCUM unit a LOINC code's ``ObservationFact.value`` is kept in.

    Args:
        loinc: LOINC code, e.g. "8310-5".

    Returns:
        The unit (e.g. "Cel"), or None for a LOINC code without one (its value is kept as sent).
    """
    return CANONICAL_UCUM_UNITS.get(loinc)


def describe_validation_error(error: ValidationError, *, limit: int = 3) -> str:
    """Render a pydantic error as ``field.path[0].name: message`` items, without echoing input values.

    Args:
        error: The error raised by a fhir.resources ``model_validate``.
        limit: How many of its errors to name; the rest are counted.

    Returns:
        One line, e.g. ``"valueQuantity.value: Value error, Decimal value string does not match spec regex."``.
    """
    items = error.errors()
    parts = []
    for item in items[:limit]:
        parts.append(f"{_location(item['loc'])}: {' '.join(str(item['msg']).split())}")
    if len(items) > limit:
        parts.append(f"and {len(items) - limit} more")
    return "; ".join(parts)


Resolve = Callable[[str, str], list[str]]


def parse_bundle(
    raw: bytes | dict[str, Any], *, collect_errors: bool = False, resolve: Resolve | None = None
) -> ParsedBundle:
    """Validate a FHIR transaction or batch Bundle and reduce its entries to facts.

    Args:
        raw: The request body (JSON bytes) or the already decoded JSON object.
        collect_errors: Skip bad entries and report them in ``ParsedBundle.errors`` instead of raising (for a
            transaction, the caller then refuses the whole Bundle).
        resolve: ``(resource type, search query) -> ids of current matches``, for conditional creates
            (``ifNoneExist``) and conditional updates (``PUT Type?query``); without it they are refused.

    Returns:
        The accepted entries as facts and as resources to store.

    Raises:
        InvalidInput: The body is not JSON, not a Bundle, not a transaction or batch, or an entry is invalid
            (unless collected). Entry messages start with ``entry[<index>] (<resourceType>): <field>:`` and
            carry the expression ``Bundle.entry[<index>]``.
        PreconditionFailed: a conditional create or update matches more than one resource (unless collected).
    """
    document = _load_json(raw)
    bundle_type = _check_envelope(document)
    parsed = ParsedBundle(bundle_type=bundle_type)

    def reject(index: int, error: ServiceError) -> None:
        if error.expression is None:
            error.expression = [f"Bundle.entry[{index}]"]
        if not collect_errors:
            raise error
        parsed.errors.append((index, error))

    checked: list[_CheckedEntry] = []
    for index, entry in enumerate(document.get("entry") or []):
        try:
            item = _check_entry(index, entry)
            _resolve_conditional(item, resolve)
        except ServiceError as error:
            reject(index, error)
            continue
        checked.append(item)

    seen_ids: set[tuple[str, str]] = set()
    url_map: dict[str, str] = {}
    unique: list[_CheckedEntry] = []
    for item in checked:
        try:
            _check_unique(item, seen_ids, url_map)
        except InvalidInput as error:
            reject(item.index, error)
            continue
        seen_ids.add((item.resource_type, item.resource_id))
        if item.full_url is not None:
            url_map[item.full_url] = f"{item.resource_type}/{item.resource_id}"
        unique.append(item)

    for item in unique:
        resource_json = None
        if item.raw is not None and not item.existing:
            try:
                _reduce(item, url_map, parsed)
            except InvalidInput as error:
                reject(item.index, error)
                continue
            resource_json = _rewritten(item.raw, url_map)
            resource_json["id"] = item.resource_id
        parsed.resources.append(
            ParsedResource(
                resource_type=item.resource_type,
                resource_id=item.resource_id,
                full_url=item.full_url,
                method=item.method,
                json=resource_json,
                entry_index=item.index,
                if_match=item.if_match,
                existing=item.existing,
            )
        )
    parsed.errors.sort(key=lambda pair: pair[0])
    return parsed


def _resolve_conditional(item: _CheckedEntry, resolve: Resolve | None) -> None:
    query = item.if_none_exist or item.conditional_query
    if query is None:
        return
    where = f"entry[{item.index}] ({item.resource_type})"
    if resolve is None:
        raise InvalidInput(f"{where}: conditional requests are not supported here")
    found = resolve(item.resource_type, query)
    if len(found) > 1:
        raise PreconditionFailed(
            f"{where}: the condition {query!r} matches {len(found)} {item.resource_type} resources; it must match"
            " at most one"
        )
    if not found:
        return
    if item.if_none_exist is not None:
        item.resource_id, item.existing = found[0], True
        return
    declared = (item.raw or {}).get("id")
    if declared is not None and declared != found[0]:
        raise InvalidInput(f"{where}: resource.id {declared} differs from the resource the condition matches")
    item.resource_id = found[0]


def _load_json(raw: bytes | dict[str, Any]) -> dict[str, Any]:
    return raw if isinstance(raw, dict) else load_json(raw)


def load_json(raw: bytes) -> dict[str, Any]:
    """A FHIR JSON body decoded: one object, nested at most ``MAX_JSON_DEPTH`` levels.

    Raises:
        InvalidInput: not JSON (NaN and Infinity included), a number beyond int()'s 4300 digits, not an object, or
            nested too deeply for the validation of its elements (which recurses, one element level at a time).
    """
    try:
        document = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        reason = str(e).partition(";")[0]  # int()'s own message goes on to advise sys.set_int_max_str_digits()
        raise InvalidInput(f"body is not valid JSON: {reason}") from e
    except RecursionError as e:
        raise InvalidInput(f"body is JSON nested deeper than {MAX_JSON_DEPTH} levels") from e
    if not isinstance(document, dict):
        raise InvalidInput("body is not a JSON object")
    if _nested_deeper_than(document, MAX_JSON_DEPTH):
        raise InvalidInput(f"body is JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return document


def _nested_deeper_than(document: dict[str, Any], limit: int) -> bool:
    # a stack, not recursion: the point is to refuse what recursion cannot take (2 MB: 23 ms, 40% of json.loads)
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity, which are not JSON and not FHIR decimals.
    raise ValueError(f"{name} is not a JSON number")


def _check_envelope(document: dict[str, Any]) -> str:
    resource_type = document.get("resourceType")
    if resource_type != "Bundle":
        raise InvalidInput(f"resourceType: expected Bundle, got {resource_type!r}")
    bundle_type = document.get("type")
    if bundle_type not in ACCEPTED_BUNDLE_TYPES:
        raise InvalidInput(f"Bundle.type: expected transaction or batch, got {bundle_type!r}")
    entries = document.get("entry")
    if entries is not None and not isinstance(entries, list):
        raise InvalidInput("Bundle.entry: must be an array")
    try:
        # Entries are validated one by one so that a batch can report them separately.
        Bundle.model_validate({key: value for key, value in document.items() if key != "entry"})
    except ValidationError as e:
        raise InvalidInput(f"Bundle: {describe_validation_error(e)}") from e
    return str(bundle_type)


def _r5_hint(resource_type: str, error: ValidationError) -> str:
    unknown = sorted({_location(e["loc"]) for e in error.errors() if e["type"] == "extra_forbidden"})
    if not unknown:
        return ""
    return (
        f" (unknown element{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])}: not {FHIR_R4}; content of"
        f" FHIR R5 or later, such as R5's {resource_type}, is not accepted — send {FHIR_R4})"
    )


def _check_entry(index: int, entry: Any) -> _CheckedEntry:
    where = f"entry[{index}]"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: must be a JSON object")
    try:
        shell = BundleEntry.model_validate({key: value for key, value in entry.items() if key != "resource"})
    except ValidationError as e:
        raise InvalidInput(f"{where}: {describe_validation_error(e)}") from e
    if shell.request is None:
        raise InvalidInput(f"{where}: request: required in a transaction or batch Bundle")
    method = str(shell.request.method).upper()
    url = str(shell.request.url)
    if method not in ACCEPTED_METHODS:
        raise InvalidInput(f"{where}: request.method: {method} is not accepted (accepted: POST, PUT, DELETE)")
    if method == "DELETE":
        target = _RESOURCE_URL.fullmatch(url)
        if target is None or target.group(1) not in ACCEPTED_RESOURCE_TYPES:
            raise InvalidInput(
                f"{where}: request.url: a DELETE must name <Type>/<id> of {', '.join(ACCEPTED_RESOURCE_TYPES)}"
            )
        return _CheckedEntry(index, target.group(1), target.group(2), None, method, None, None)

    resource = entry.get("resource")
    if not isinstance(resource, dict):
        raise InvalidInput(f"{where}: resource: required for a {method}")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidInput(f"{where}: resource.resourceType: required")
    where = f"{where} ({resource_type})"
    if resource_type not in ACCEPTED_RESOURCE_TYPES:
        raise InvalidInput(
            f"{where}: resourceType: {resource_type} is not accepted (accepted: {', '.join(ACCEPTED_RESOURCE_TYPES)})"
        )
    try:
        model = _MODELS[resource_type].model_validate(resource)
    except ValidationError as e:
        raise InvalidInput(f"{where}: {describe_validation_error(e)}{_r5_hint(resource_type, e)}") from e
    if isinstance(model, Observation) and model.status not in _OBSERVATION_STATUSES:
        raise InvalidInput(f"{where}: status: {model.status!r} is not an ObservationStatus code")
    if isinstance(model, Patient) and model.gender is not None and model.gender not in _ADMINISTRATIVE_GENDERS:
        raise InvalidInput(f"{where}: gender: {model.gender!r} is not an AdministrativeGender code")
    statuses = _STATUSES.get(resource_type)
    if statuses is not None and getattr(model, "status", None) not in statuses:
        hint = " (R5 codes such as 'recorded' are not R4)" if resource_type == "MedicationStatement" else ""
        raise InvalidInput(f"{where}: status: {getattr(model, 'status', None)!r} is not an R4 status code{hint}")

    resource_id = model.id
    if_match = None
    conditional_query = None
    if method == "PUT":
        target = _RESOURCE_URL.fullmatch(url)
        conditional = _CONDITIONAL_URL.fullmatch(url)
        if target is not None and target.group(1) == resource_type:
            if resource_id is None:
                resource_id = target.group(2)
            elif resource_id != target.group(2):
                raise InvalidInput(f"{where}: request.url: the id in the URL differs from resource.id")
        elif conditional is not None and conditional.group(1) == resource_type:
            conditional_query = conditional.group(2)
        else:
            raise InvalidInput(f"{where}: request.url: a PUT must name {resource_type}/<id> or {resource_type}?<query>")
        if shell.request.ifMatch:
            etag = _ETAG.match(str(shell.request.ifMatch).strip())
            if etag is None:
                raise InvalidInput(f'{where}: request.ifMatch: expected a version ETag such as W/"3"')
            if_match = int(etag.group(1))
    elif url.split("?")[0] != resource_type:
        raise InvalidInput(f"{where}: request.url: a POST must name {resource_type}")
    full_url = str(shell.fullUrl) if shell.fullUrl is not None else None
    return _CheckedEntry(
        index=index,
        resource_type=resource_type,
        resource_id=resource_id or uuid.uuid4().hex,
        full_url=full_url,
        method=method,
        raw=resource,
        model=model,
        if_match=if_match,
        if_none_exist=str(shell.request.ifNoneExist) if method == "POST" and shell.request.ifNoneExist else None,
        conditional_query=conditional_query,
    )


def _check_unique(item: _CheckedEntry, seen_ids: set[tuple[str, str]], url_map: dict[str, str]) -> None:
    where = f"entry[{item.index}] ({item.resource_type})"
    if item.full_url is not None and item.full_url in url_map:
        raise InvalidInput(f"{where}: fullUrl: {item.full_url} appears twice in the Bundle")
    if (item.resource_type, item.resource_id) in seen_ids:
        raise InvalidInput(f"{where}: id: {item.resource_type}/{item.resource_id} appears twice in the Bundle")


def _reduce(item: _CheckedEntry, url_map: dict[str, str], parsed: ParsedBundle) -> None:
    where = f"entry[{item.index}] ({item.resource_type})"
    assert item.raw is not None
    if isinstance(item.model, Patient):
        parsed.patients.append(_patient_facts(item.model, item.resource_id))
    elif isinstance(item.model, Observation):
        fact, *components = _observation_facts(item.model, item.raw, item.resource_id, url_map, where)
        parsed.observations.append(fact)
        if components:
            parsed.components[item.resource_id] = components
    elif isinstance(item.model, Condition):
        parsed.conditions.append(_condition_fact(item.model, item.resource_id, url_map, where))
    else:
        patient_ref = _patient_reference(item.model.subject, url_map, where)
        parsed.others.append(SubjectFact(item.resource_type, item.resource_id, patient_ref))


def _patient_facts(patient: Patient, resource_id: str) -> PatientFacts:
    identifiers = [
        # An identifier without a value cannot be matched on; it stays in the stored resource only.
        PatientIdentifier(system=str(identifier.system or ""), value=str(identifier.value))
        for identifier in patient.identifier or []
        if identifier.value
    ]
    return PatientFacts(
        resource_id=resource_id,
        identifiers=identifiers,
        gender=patient.gender,
        birth_date=_to_date(patient.birthDate),
    )


def _observation_facts(
    observation: Observation, raw: dict[str, Any], resource_id: str, url_map: dict[str, str], where: str
) -> list[ObservationFact]:
    """The facts of one Observation: its valueQuantity, or for a panel its components (the required one first)."""
    loinc = _loinc_code(observation.code)
    if loinc is None:
        raise InvalidInput(f"{where}: code.coding: no LOINC coding (system {LOINC_SYSTEM})")
    patient_ref = _patient_reference(observation.subject, url_map, where)
    effective = _to_utc(
        observation.effectiveDateTime
        or (observation.effectivePeriod.start if observation.effectivePeriod is not None else None)
        or observation.effectiveInstant
        or observation.issued
    )

    def fact(fact_id: str, code: str, quantity: Quantity | None, raw_quantity: Any, path: str) -> ObservationFact:
        value, unit = _quantity(quantity, raw_quantity, f"{where}: {path}")
        canonical_value, ucum_unit = _canonical(code, value, unit)
        return ObservationFact(
            resource_id=fact_id,
            patient_ref=patient_ref,
            loinc=code,
            value=canonical_value,
            ucum_unit=ucum_unit,
            original_value=value,
            original_unit=unit,
            effective_at=effective,
            status=str(observation.status),
        )

    panel = PANEL_COMPONENTS.get(loinc)
    if panel is None:
        return [fact(resource_id, loinc, observation.valueQuantity, raw.get("valueQuantity"), "valueQuantity")]
    required, optional = panel
    components = observation.component or []
    positions: dict[str, int] = {}
    for position, component in enumerate(components):
        code = _loinc_code(component.code)
        if code is not None and code not in positions:
            positions[code] = position
    if required not in positions:
        raise InvalidInput(f"{where}: component: no component with LOINC {required} in panel {loinc}")
    facts = []
    for code in (required, *optional):
        position = positions.get(code, -1)
        if position < 0 or (code != required and components[position].valueQuantity is None):
            continue  # absent, or sent without a value (dataAbsentReason): nothing to take
        facts.append(
            fact(
                resource_id if code == required else f"{resource_id}#{code}",
                code,
                components[position].valueQuantity,
                raw["component"][position].get("valueQuantity"),
                f"component[{position}].valueQuantity",
            )
        )
    return facts


def _canonical(loinc: str, value: float, unit: str) -> tuple[float, str]:
    """The value in the canonical UCUM unit of its LOINC code, or as sent when there is none or it does not convert."""
    canonical_unit = CANONICAL_UCUM_UNITS.get(loinc)
    if canonical_unit is None or canonical_unit == unit:
        return value, unit
    try:
        return ucum.convert(value, unit, canonical_unit), canonical_unit
    except UcumError:
        return value, unit


def _condition_fact(condition: Condition, resource_id: str, url_map: dict[str, str], where: str) -> ConditionFact:
    coding = condition.code.coding[0] if condition.code is not None and condition.code.coding else None
    clinical_status = (
        condition.clinicalStatus.coding[0].code
        if condition.clinicalStatus is not None and condition.clinicalStatus.coding
        else None
    )
    return ConditionFact(
        resource_id=resource_id,
        patient_ref=_patient_reference(condition.subject, url_map, where),
        system=_optional_str(coding.system) if coding is not None else None,
        code=_optional_str(coding.code) if coding is not None else None,
        display=_optional_str(coding.display) if coding is not None else None,
        clinical_status=_optional_str(clinical_status),
        onset_at=_to_utc(condition.onsetDateTime),
    )


def _loinc_code(concept: Any) -> str | None:
    for coding in getattr(concept, "coding", None) or []:
        if coding.system == LOINC_SYSTEM and coding.code:
            return str(coding.code)
    return None


def _patient_reference(subject: Reference | None, url_map: dict[str, str], where: str) -> str:
    """Normalise a subject to "Patient/<id>" or "identifier:<system>|<value>"."""
    if subject is None:
        raise InvalidInput(f"{where}: subject: required (a Patient)")
    if subject.reference:
        reference = str(subject.reference)
        target = url_map.get(reference)
        if target is not None:
            if not target.startswith("Patient/"):
                raise InvalidInput(
                    f"{where}: subject.reference: {reference} is a {target.split('/')[0]}, not a Patient"
                )
            return target
        if reference.startswith("urn:"):
            raise InvalidInput(f"{where}: subject.reference: {reference} matches no fullUrl in this Bundle")
        match = _PATIENT_REFERENCE.fullmatch(reference)
        if match is None:
            raise InvalidInput(
                f"{where}: subject.reference: must be Patient/<id> or the fullUrl of a Patient in this Bundle"
            )
        return f"Patient/{match.group(1)}"
    if subject.identifier is not None and subject.identifier.value:
        if subject.type is not None and subject.type != "Patient":
            raise InvalidInput(f"{where}: subject.type: {subject.type} is not Patient")
        return f"identifier:{subject.identifier.system or ''}|{subject.identifier.value}"
    raise InvalidInput(f"{where}: subject: needs a reference or an identifier with a value")


def _quantity(quantity: Quantity | None, raw_quantity: Any, where: str) -> tuple[float, str]:
    if quantity is None or not isinstance(raw_quantity, dict):
        raise InvalidInput(f"{where}: required (a value with a UCUM unit)")
    raw_value = raw_quantity.get("value")
    # fhir.resources accepts decimal strings ("12.5"); FHIR JSON requires a number.
    if isinstance(raw_value, bool) or not isinstance(raw_value, int | float):
        raise InvalidInput(f"{where}.value: must be a JSON number")
    if quantity.value is None or not math.isfinite(float(quantity.value)):
        raise InvalidInput(f"{where}.value: must be a finite number")
    if quantity.comparator is not None:
        raise InvalidInput(f"{where}.comparator: censored values ({quantity.comparator}) are not accepted")
    if quantity.system == UCUM_SYSTEM and quantity.code:
        unit, field_name = str(quantity.code), "code"
    elif quantity.unit:
        # A display unit only: kept as sent. A model uses the value only if it parses as UCUM and converts.
        unit, field_name = str(quantity.unit), "unit"
    else:
        raise InvalidInput(f"{where}: a unit is required (code with system {UCUM_SYSTEM}, or unit)")
    if len(unit) > MAX_UNIT_LENGTH:
        raise InvalidInput(f"{where}.{field_name}: longer than {MAX_UNIT_LENGTH} characters")
    if field_name == "code":
        try:
            ucum.parse(unit)
        except UcumError as e:
            raise InvalidInput(f"{where}.code: {e}") from e
    return float(quantity.value), unit


def _rewritten(node: Any, url_map: dict[str, str]) -> Any:
    """A copy of a JSON value (the entry's own is left as received) with each reference to one of the Bundle's
    fullUrls made Type/id; one pass, cheaper than a deep copy followed by a rewrite."""
    if isinstance(node, dict):
        return {
            key: url_map.get(value, value)
            if key == "reference" and isinstance(value, str)
            else _rewritten(value, url_map)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewritten(value, url_map) for value in node]
    return node


def _to_utc(value: dt.datetime | dt.date | str | None) -> dt.datetime | None:
    """A FHIR dateTime as an aware UTC datetime; a date (or a partial date) means its first midnight UTC."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            # valid FHIR whose UTC lies beyond the calendar (9999-12-31T23:59:59-14:00 is in year 10000): the
            # calendar's edge stands for it, as in the search index (store/fhir_store.date_range)
            later = (value.utcoffset() or dt.timedelta(0)) < dt.timedelta(0)
            return (dt.datetime.max if later else dt.datetime.min).replace(tzinfo=dt.UTC)
    day = _to_date(value)
    return dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC) if day is not None else None


def _to_date(value: dt.date | str | None) -> dt.date | None:
    """A FHIR date; a partial date ("1970", "1970-06") becomes the first day of its period."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    parts = [int(part) for part in str(value).split("-")]
    return dt.date(parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else 1)


def _optional_str(value: Any) -> str | None:
    return str(value) if value is not None else None


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "resource"
