"""FHIR R4 Bundle ingest: validate a transaction or batch Bundle and reduce it to our facts.

Only Patient, Observation and Condition are accepted. Each resource is validated with the fhir.resources
R4B models (wire-compatible with R4 for these three), then reduced to :class:`PatientFacts`,
:class:`ObservationFact` (value normalised to the canonical UCUM unit of its LOINC code) and
:class:`ConditionFact`. References to ``urn:uuid:`` fullUrls inside the Bundle are rewritten to
``Patient/<id>`` style, as a FHIR server does when it processes a transaction.

A transaction is all-or-nothing: the first bad entry raises :class:`InvalidInput`. A batch may be parsed with
``collect_errors=True``: bad entries are then skipped and reported per entry index.

This module is the only place in ingest that imports fhir.resources.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from pydantic import ValidationError

from service.errors import InvalidInput
from service.schemas import ConditionFact, ObservationFact, PatientFacts, PatientIdentifier

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
BLOOD_PRESSURE_PANEL_LOINC = "85354-9"
SYSTOLIC_BLOOD_PRESSURE_LOINC = "8480-6"

ACCEPTED_BUNDLE_TYPES = ("transaction", "batch")
ACCEPTED_RESOURCE_TYPES = ("Patient", "Observation", "Condition")
# Only entries that carry a resource to store: create (POST) and update (PUT).
ACCEPTED_METHODS = ("POST", "PUT")

# Required bindings that fhir.resources does not enforce.
_OBSERVATION_STATUSES = frozenset(
    {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
)
_ADMINISTRATIVE_GENDERS = frozenset({"male", "female", "other", "unknown"})

_MODELS: dict[str, type[Patient] | type[Observation] | type[Condition]] = {
    "Patient": Patient,
    "Observation": Observation,
    "Condition": Condition,
}

_FHIR_ID = r"[A-Za-z0-9\-.]{1,64}"
_PATIENT_REFERENCE = re.compile(rf"Patient/({_FHIR_ID})(?:/_history/{_FHIR_ID})?")
_RESOURCE_URL = re.compile(rf"([A-Za-z]+)/({_FHIR_ID})")


@dataclass(frozen=True)
class _UnitConversion:
    """``canonical = (value + offset) * scale``; the offset is applied first so that °F reads naturally."""

    scale: float
    offset: float = 0.0


_IDENTITY = _UnitConversion(1.0)

# Canonical UCUM unit per LOINC code, and the units we convert from. Units are matched exactly: UCUM is
# case-sensitive ("mg/dl" is not "mg/dL"), and a unit we do not list is kept as given and masked downstream.
_UCUM_TABLE: dict[str, tuple[str, dict[str, _UnitConversion]]] = {
    # Body temperature
    "8310-5": (
        "Cel",
        {"Cel": _IDENTITY, "[degF]": _UnitConversion(5.0 / 9.0, -32.0), "K": _UnitConversion(1.0, -273.15)},
    ),
    # Heart rate
    "8867-4": ("/min", {"/min": _IDENTITY, "{beats}/min": _IDENTITY, "beats/min": _IDENTITY}),
    # Respiratory rate
    "9279-1": ("/min", {"/min": _IDENTITY, "{breaths}/min": _IDENTITY, "breaths/min": _IDENTITY}),
    # Oxygen saturation (pulse oximetry; arterial blood)
    "59408-5": ("%", {"%": _IDENTITY}),
    "2708-6": ("%", {"%": _IDENTITY}),
    # Leukocytes
    "6690-2": (
        "10*3/uL",
        {
            "10*3/uL": _IDENTITY,
            "10*9/L": _IDENTITY,
            "10*3/mm3": _IDENTITY,
            "/nL": _IDENTITY,
            "/uL": _UnitConversion(1.0 / 1000.0),
        },
    ),
    # C-reactive protein
    "1988-5": ("mg/L", {"mg/L": _IDENTITY, "mg/dL": _UnitConversion(10.0)}),
    # NT-proBNP
    "33762-6": ("pg/mL", {"pg/mL": _IDENTITY, "ng/L": _IDENTITY, "ng/mL": _UnitConversion(1000.0)}),
    # Systolic blood pressure
    "8480-6": ("mm[Hg]", {"mm[Hg]": _IDENTITY, "kPa": _UnitConversion(7.50062)}),
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
    json: dict[str, Any]
    entry_index: int


@dataclass
class ParsedBundle:
    """A parsed transaction or batch Bundle.

    Attributes:
        bundle_type: "transaction" or "batch".
        patients: One per accepted Patient entry.
        observations: One per accepted Observation (for a blood-pressure panel: its systolic component).
        conditions: One per accepted Condition.
        resources: Every accepted entry, in Bundle order.
        errors: ``(entry_index, message)`` for each entry skipped; only filled with ``collect_errors=True``
            on a batch.
    """

    bundle_type: str
    patients: list[PatientFacts] = field(default_factory=list)
    observations: list[ObservationFact] = field(default_factory=list)
    conditions: list[ConditionFact] = field(default_factory=list)
    resources: list[ParsedResource] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _CheckedEntry:
    index: int
    resource_type: str
    resource_id: str
    full_url: str | None
    method: str
    raw: dict[str, Any]
    model: Patient | Observation | Condition


def ucum_convert(loinc: str, value: float, unit: str) -> tuple[float, str] | None:
    """Convert a value to the canonical UCUM unit of its LOINC code.

    Args:
        loinc: LOINC code of the observation, e.g. "1988-5".
        value: The value as measured.
        unit: Its UCUM unit, e.g. "mg/dL" (matched exactly; UCUM is case-sensitive).

    Returns:
        ``(value, canonical_unit)``. For a LOINC code we have no table for, the value and unit as given.
        None when the code is known but the unit cannot be converted to its canonical unit.
    """
    known = _UCUM_TABLE.get(loinc)
    if known is None:
        return value, unit
    canonical_unit, conversions = known
    conversion = conversions.get(unit)
    if conversion is None:
        return None
    return (value + conversion.offset) * conversion.scale, canonical_unit


def canonical_ucum_unit(loinc: str) -> str | None:
    """The canonical UCUM unit we normalise a LOINC code to.

    Args:
        loinc: LOINC code, e.g. "8310-5".

    Returns:
        The unit (e.g. "Cel"), or None for a LOINC code that has no conversion table here.
    """
    known = _UCUM_TABLE.get(loinc)
    return known[0] if known is not None else None


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


def parse_bundle(raw: bytes | dict[str, Any], *, collect_errors: bool = False) -> ParsedBundle:
    """Validate a FHIR transaction or batch Bundle and reduce its entries to facts.

    Args:
        raw: The request body (JSON bytes) or the already decoded JSON object.
        collect_errors: For a batch, skip bad entries and report them in ``ParsedBundle.errors`` instead of
            raising. Ignored for a transaction, which is all-or-nothing.

    Returns:
        The accepted entries as facts and as resources to store.

    Raises:
        InvalidInput: The body is not JSON, not a Bundle, not a transaction or batch, or an entry is invalid
            (unless collected). Entry messages start with ``entry[<index>] (<resourceType>): <field>:``.
    """
    document = _load_json(raw)
    bundle_type = _check_envelope(document)
    collect = collect_errors and bundle_type == "batch"
    parsed = ParsedBundle(bundle_type=bundle_type)

    def reject(index: int, error: InvalidInput) -> None:
        if not collect:
            raise error
        parsed.errors.append((index, error.message))

    checked: list[_CheckedEntry] = []
    seen_ids: set[tuple[str, str]] = set()
    url_map: dict[str, str] = {}
    for index, entry in enumerate(document.get("entry") or []):
        try:
            item = _check_entry(index, entry)
            _check_unique(item, seen_ids, url_map)
        except InvalidInput as error:
            reject(index, error)
            continue
        seen_ids.add((item.resource_type, item.resource_id))
        if item.full_url is not None:
            url_map[item.full_url] = f"{item.resource_type}/{item.resource_id}"
        checked.append(item)

    for item in checked:
        try:
            _reduce(item, url_map, parsed)
        except InvalidInput as error:
            reject(item.index, error)
            continue
        resource_json = _rewrite_references(copy.deepcopy(item.raw), url_map)
        resource_json["id"] = item.resource_id
        parsed.resources.append(
            ParsedResource(
                resource_type=item.resource_type,
                resource_id=item.resource_id,
                full_url=item.full_url,
                method=item.method,
                json=resource_json,
                entry_index=item.index,
            )
        )
    return parsed


def _load_json(raw: bytes | dict[str, Any]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        document = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"body is not valid JSON: {e}") from e
    if not isinstance(document, dict):
        raise InvalidInput("body is not a JSON object")
    return document


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


def _check_entry(index: int, entry: Any) -> _CheckedEntry:
    where = f"entry[{index}]"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: must be a JSON object")
    resource = entry.get("resource")
    if not isinstance(resource, dict):
        raise InvalidInput(f"{where}: resource: required (only POST and PUT entries with a resource are accepted)")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidInput(f"{where}: resource.resourceType: required")
    where = f"{where} ({resource_type})"
    if resource_type not in ACCEPTED_RESOURCE_TYPES:
        raise InvalidInput(
            f"{where}: resourceType: {resource_type} is not accepted (accepted: {', '.join(ACCEPTED_RESOURCE_TYPES)})"
        )

    try:
        shell = BundleEntry.model_validate({key: value for key, value in entry.items() if key != "resource"})
    except ValidationError as e:
        raise InvalidInput(f"{where}: {describe_validation_error(e)}") from e
    if shell.request is None:
        raise InvalidInput(f"{where}: request: required in a transaction or batch Bundle")
    method = str(shell.request.method).upper()
    if method not in ACCEPTED_METHODS:
        raise InvalidInput(f"{where}: request.method: {method} is not accepted (accepted: POST, PUT)")

    try:
        model = _MODELS[resource_type].model_validate(resource)
    except ValidationError as e:
        raise InvalidInput(f"{where}: {describe_validation_error(e)}") from e
    if isinstance(model, Observation) and model.status not in _OBSERVATION_STATUSES:
        raise InvalidInput(f"{where}: status: {model.status!r} is not an ObservationStatus code")
    if isinstance(model, Patient) and model.gender is not None and model.gender not in _ADMINISTRATIVE_GENDERS:
        raise InvalidInput(f"{where}: gender: {model.gender!r} is not an AdministrativeGender code")

    resource_id = model.id
    if method == "PUT":
        target = _RESOURCE_URL.fullmatch(str(shell.request.url))
        if target is None or target.group(1) != resource_type:
            raise InvalidInput(f"{where}: request.url: a PUT must name {resource_type}/<id>")
        if resource_id is None:
            resource_id = target.group(2)
        elif resource_id != target.group(2):
            raise InvalidInput(f"{where}: request.url: the id in the URL differs from resource.id")
    full_url = str(shell.fullUrl) if shell.fullUrl is not None else None
    return _CheckedEntry(
        index=index,
        resource_type=resource_type,
        resource_id=resource_id or uuid.uuid4().hex,
        full_url=full_url,
        method=method,
        raw=resource,
        model=model,
    )


def _check_unique(item: _CheckedEntry, seen_ids: set[tuple[str, str]], url_map: dict[str, str]) -> None:
    where = f"entry[{item.index}] ({item.resource_type})"
    if item.full_url is not None and item.full_url in url_map:
        raise InvalidInput(f"{where}: fullUrl: {item.full_url} appears twice in the Bundle")
    if (item.resource_type, item.resource_id) in seen_ids:
        raise InvalidInput(f"{where}: id: {item.resource_type}/{item.resource_id} appears twice in the Bundle")


def _reduce(item: _CheckedEntry, url_map: dict[str, str], parsed: ParsedBundle) -> None:
    where = f"entry[{item.index}] ({item.resource_type})"
    if isinstance(item.model, Patient):
        parsed.patients.append(_patient_facts(item.model, item.resource_id))
    elif isinstance(item.model, Observation):
        parsed.observations.append(_observation_fact(item.model, item.raw, item.resource_id, url_map, where))
    else:
        parsed.conditions.append(_condition_fact(item.model, item.resource_id, url_map, where))


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


def _observation_fact(
    observation: Observation, raw: dict[str, Any], resource_id: str, url_map: dict[str, str], where: str
) -> ObservationFact:
    loinc = _loinc_code(observation.code)
    if loinc is None:
        raise InvalidInput(f"{where}: code.coding: no LOINC coding (system {LOINC_SYSTEM})")
    patient_ref = _patient_reference(observation.subject, url_map, where)

    if loinc == BLOOD_PRESSURE_PANEL_LOINC:
        for position, component in enumerate(observation.component or []):
            if _loinc_code(component.code) == SYSTOLIC_BLOOD_PRESSURE_LOINC:
                path = f"component[{position}].valueQuantity"
                quantity = component.valueQuantity
                raw_quantity = raw["component"][position].get("valueQuantity")
                break
        else:
            raise InvalidInput(
                f"{where}: component: no systolic blood pressure component (LOINC {SYSTOLIC_BLOOD_PRESSURE_LOINC})"
            )
        loinc = SYSTOLIC_BLOOD_PRESSURE_LOINC
    else:
        path, quantity, raw_quantity = "valueQuantity", observation.valueQuantity, raw.get("valueQuantity")

    value, unit = _quantity(quantity, raw_quantity, f"{where}: {path}")
    converted = ucum_convert(loinc, value, unit)
    # A known code in a unit we cannot convert keeps its unit; the model layer masks it as unconvertible.
    canonical_value, ucum_unit = converted if converted is not None else (value, unit)
    effective = (
        observation.effectiveDateTime
        or (observation.effectivePeriod.start if observation.effectivePeriod is not None else None)
        or observation.effectiveInstant
        or observation.issued
    )
    return ObservationFact(
        resource_id=resource_id,
        patient_ref=patient_ref,
        loinc=loinc,
        value=canonical_value,
        ucum_unit=ucum_unit,
        original_value=value,
        original_unit=unit,
        effective_at=_to_utc(effective),
        status=str(observation.status),
    )


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
        unit = str(quantity.code)
    elif quantity.unit:
        unit = str(quantity.unit)
    else:
        raise InvalidInput(f"{where}: a unit is required (code with system {UCUM_SYSTEM}, or unit)")
    return float(quantity.value), unit


def _rewrite_references(node: Any, url_map: dict[str, str]) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in url_map:
                node[key] = url_map[value]
            else:
                _rewrite_references(value, url_map)
    elif isinstance(node, list):
        for value in node:
            _rewrite_references(value, url_map)
    return node


def _to_utc(value: dt.datetime | dt.date | str | None) -> dt.datetime | None:
    """A FHIR dateTime as an aware UTC datetime; a date (or a partial date) means its first midnight UTC."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)
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
