"""Routing: which models read a study, which of its instances each model reads, how urgently, and where results go.

Rules come from a YAML file (``CLINFER_ROUTING_RULES``) or, without one, from each model's manifest routing
defaults. A rule matches DICOM attributes of an instance; for each model the first rule (in file order) with a
matching instance wins. The model's own input requirements (its manifest routing: modality, size, grayscale)
are always checked too, so a rule cannot feed a model an image it was never made for.

Example::

    destinations:
      pacs: {kind: dimse, host: 10.1.2.3, port: 104, ae_title: PACS}
    rules:
      - name: chest-stat
        match:
          Modality: [DX, CR]
          SeriesDescription: {regex: "(?i)chest|thorax"}
          Rows: {min: 1024}
          CallingAETitle: [ER_DX1]
        models: [cxr-fusion]
        priority: stat
        stable_seconds: 10
        series: most_instances
        instance: middle
        destinations: [pacs]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import ConfigurationError
from service.inference.manifest import Manifest


class Priority(StrEnum):
    stat = "stat"
    routine = "routine"


# Celery priority on Redis: lower numbers are consumed first (kombu's Redis transport steps are 0, 3, 6, 9).
QUEUE_PRIORITY = {Priority.stat: 0, Priority.routine: 6}


@dataclass(frozen=True)
class InstanceAttributes:
    """The DICOM attributes routing may look at, for one stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    body_part_examined: str | None
    rows: int | None
    columns: int | None
    photometric_interpretation: str | None
    series_instance_uid: str = ""
    series_description: str | None = None
    view_position: str | None = None
    manufacturer: str | None = None
    calling_ae_title: str | None = None
    instance_number: int | None = None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegexMatch(_Strict):
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"invalid regular expression {value!r}: {e}") from e
        return value


class RangeMatch(_Strict):
    min: int | None = None
    max: int | None = None


TextCondition = list[str] | RegexMatch
# DICOM keyword -> InstanceAttributes field
TEXT_ATTRIBUTES = {
    "Modality": "modality",
    "BodyPartExamined": "body_part_examined",
    "SOPClassUID": "sop_class_uid",
    "SeriesDescription": "series_description",
    "ViewPosition": "view_position",
    "Manufacturer": "manufacturer",
    "CallingAETitle": "calling_ae_title",
}
NUMERIC_ATTRIBUTES = {"Rows": "rows", "Columns": "columns"}


class RuleMatch(_Strict):
    """Conditions on an instance, all of which must hold. Lists match exactly (case-insensitive)."""

    Modality: TextCondition | None = None
    BodyPartExamined: TextCondition | None = None
    SOPClassUID: TextCondition | None = None
    SeriesDescription: TextCondition | None = None
    ViewPosition: TextCondition | None = None
    Manufacturer: TextCondition | None = None
    CallingAETitle: TextCondition | None = None
    Rows: RangeMatch | None = None
    Columns: RangeMatch | None = None


class RuleSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    match: RuleMatch = Field(default_factory=RuleMatch)
    models: list[str] = Field(min_length=1)
    priority: Priority = Priority.routine
    stable_seconds: float | None = Field(default=None, ge=0, description="default: CLINFER_STUDY_STABLE_SECONDS")
    series: Literal["first", "last", "most_instances"] = "first"
    instance: Literal["first", "middle", "last"] = "first"
    destinations: list[str] = Field(default_factory=list)


class DimseDestinationSpec(_Strict):
    kind: Literal["dimse"]
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(min_length=1, max_length=16)
    calling_ae_title: str = Field(default="CLINFER", min_length=1, max_length=16)
    timeout_seconds: float = Field(default=30.0, gt=0)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


class StowDestinationSpec(_Strict):
    kind: Literal["stow"]
    url: str = Field(description="the DICOMweb base URL; objects are POSTed to {url}/studies")
    bearer_token_file: Path | None = Field(default=None, description="a file holding the token (never inline)")
    timeout_seconds: float = Field(default=30.0, gt=0)
    verify_tls: bool = True


DestinationSpec = DimseDestinationSpec | StowDestinationSpec


class RulesFile(_Strict):
    destinations: dict[str, DimseDestinationSpec | StowDestinationSpec] = Field(default_factory=dict)
    rules: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> RulesFile:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in self.destinations]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown destinations: {', '.join(unknown)}")
        return self


@dataclass(frozen=True)
class Condition:
    """One condition's verdict for one instance, worded for a person."""

    attribute: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    sop_instance_uid: str
    conditions: list[Condition]

    @property
    def matched(self) -> bool:
        return all(c.ok for c in self.conditions)


@dataclass(frozen=True)
class Route:
    model_name: str
    model_version: str
    sop_instance_uid: str
    rule: str
    priority: Priority = Priority.routine
    stable_seconds: float | None = None
    destinations: tuple[str, ...] = ()

    @property
    def queue_priority(self) -> int:
        return QUEUE_PRIORITY[self.priority]


@dataclass(frozen=True)
class StudyRouting:
    """The routes of a study and, for each model without one, why."""

    routes: list[Route]
    unrouted: dict[str, str] = field(default_factory=dict)

    def reason(self) -> str | None:
        if self.routes:
            return None
        if not self.unrouted:
            return "no model applies to this study: no routing rule names a served model"
        details = "; ".join(f"{model}: {why}" for model, why in sorted(self.unrouted.items()))
        return f"no model applies to this study: {details}"


def _text_condition(keyword: str, condition: TextCondition, value: str | None) -> Condition:
    shown = "(absent)" if value is None else repr(value)
    if isinstance(condition, RegexMatch):
        ok = value is not None and re.search(condition.regex, value) is not None
        return Condition(keyword, ok, f"{keyword} {shown} {'matches' if ok else 'does not match'} /{condition.regex}/")
    allowed = {v.strip().upper() for v in condition}
    # several values where the standard has one come as DICOM writes them ("CHEST\\THORAX"): any of them may match
    ok = value is not None and any(part.strip().upper() in allowed for part in value.split("\\"))
    return Condition(keyword, ok, f"{keyword} {shown} {'in' if ok else 'not in'} {sorted(allowed)}")


def _range_condition(keyword: str, condition: RangeMatch, value: int | None) -> Condition:
    bounds = []
    if condition.min is not None:
        bounds.append(f">= {condition.min}")
    if condition.max is not None:
        bounds.append(f"<= {condition.max}")
    ok = value is not None
    if value is not None and condition.min is not None:
        ok = ok and value >= condition.min
    if value is not None and condition.max is not None:
        ok = ok and value <= condition.max
    shown = "(absent)" if value is None else str(value)
    return Condition(keyword, ok, f"{keyword} {shown} {'is' if ok else 'is not'} {' and '.join(bounds)}")


def match_conditions(match: RuleMatch, instance: InstanceAttributes) -> list[Condition]:
    conditions = []
    for keyword, attribute in TEXT_ATTRIBUTES.items():
        text_condition = getattr(match, keyword)
        if text_condition is not None:
            conditions.append(_text_condition(keyword, text_condition, getattr(instance, attribute)))
    for keyword, attribute in NUMERIC_ATTRIBUTES.items():
        range_condition = getattr(match, keyword)
        if range_condition is not None:
            conditions.append(_range_condition(keyword, range_condition, getattr(instance, attribute)))
    return conditions


def model_requirements(manifest: Manifest, instance: InstanceAttributes) -> list[Condition]:
    """The model's own input requirements (manifest routing), as conditions."""
    routing = manifest.routing
    name = manifest.name
    conditions = []
    if routing.modalities:
        conditions.append(_text_condition(f"{name} Modality", routing.modalities, instance.modality))
    if routing.body_parts:
        conditions.append(_text_condition(f"{name} BodyPartExamined", routing.body_parts, instance.body_part_examined))
    if routing.sop_class_uids:
        conditions.append(_text_condition(f"{name} SOPClassUID", routing.sop_class_uids, instance.sop_class_uid))
    if routing.view_positions:
        keyword = f"{name} ViewPosition"
        if instance.view_position is None:  # not every modality records it: taken, and said so
            conditions.append(Condition(keyword, True, f"{keyword} (absent): taken, the view cannot be told"))
        else:
            conditions.append(_text_condition(keyword, routing.view_positions, instance.view_position))
    if routing.min_rows:
        conditions.append(_range_condition(f"{name} Rows", RangeMatch(min=routing.min_rows), instance.rows))
    if routing.min_columns:
        conditions.append(_range_condition(f"{name} Columns", RangeMatch(min=routing.min_columns), instance.columns))
    conditions.append(
        _text_condition(
            f"{name} PhotometricInterpretation", ["MONOCHROME1", "MONOCHROME2"], instance.photometric_interpretation
        )
    )
    return conditions


@dataclass(frozen=True)
class RoutingTable:
    """Rules resolved against the served models; built once per process."""

    rules: list[RuleSpec]
    destinations: dict[str, DimseDestinationSpec | StowDestinationSpec]
    source: str

    def verdicts(
        self, manifests: dict[str, Manifest], instance: InstanceAttributes
    ) -> list[tuple[RuleSpec, str, RuleVerdict]]:
        """Every (rule, model) pair's verdict on one instance, in rule order: the explanation of routing."""
        out = []
        for rule in self.rules:
            rule_conditions = match_conditions(rule.match, instance)
            for model_name in rule.models:
                manifest = manifests.get(model_name)
                if manifest is None:
                    missing = Condition("model", False, f"model {model_name} is not served")
                    out.append((rule, model_name, RuleVerdict(rule.name, instance.sop_instance_uid, [missing])))
                    continue
                conditions = rule_conditions + model_requirements(manifest, instance)
                out.append((rule, model_name, RuleVerdict(rule.name, instance.sop_instance_uid, conditions)))
        return out

    def route_study(self, manifests: dict[str, Manifest], instances: Sequence[InstanceAttributes]) -> StudyRouting:
        """For each model, the first rule with matching instances; its series and instance selection pick one."""
        matches: dict[str, tuple[RuleSpec, list[InstanceAttributes]]] = {}
        unrouted: dict[str, str] = {}
        first_failure: dict[str, str] = {}
        for instance in instances:
            for rule, model_name, verdict in self.verdicts(manifests, instance):
                if verdict.matched:
                    chosen = matches.get(model_name)
                    if chosen is None:
                        matches[model_name] = (rule, [instance])
                    elif chosen[0].name == rule.name:
                        chosen[1].append(instance)
                    elif self.rules.index(rule) < self.rules.index(chosen[0]):
                        matches[model_name] = (rule, [instance])  # an earlier rule wins
                else:
                    failed = next(c for c in verdict.conditions if not c.ok)
                    first_failure.setdefault(model_name, f"rule {rule.name}: {failed.detail}")
        routes = []
        for model_name in sorted({m for rule in self.rules for m in rule.models}):
            if model_name in matches:
                rule, candidates = matches[model_name]
                chosen_instance = select_instance(candidates, series=rule.series, instance=rule.instance)
                manifest = manifests[model_name]
                routes.append(
                    Route(
                        model_name=model_name,
                        model_version=manifest.latest().version,
                        sop_instance_uid=chosen_instance.sop_instance_uid,
                        rule=rule.name,
                        priority=rule.priority,
                        stable_seconds=rule.stable_seconds,
                        destinations=tuple(rule.destinations),
                    )
                )
            elif model_name in manifests:
                unrouted[model_name] = first_failure.get(model_name, "the study has no instances")
        return StudyRouting(routes, unrouted)

    def matching_instances(
        self, manifests: dict[str, Manifest], route: Route, instances: Iterable[InstanceAttributes]
    ) -> list[InstanceAttributes]:
        """The instances the route's rule accepts for its model (to tell whether new arrivals concern it)."""
        out = []
        for instance in instances:
            for rule, model_name, verdict in self.verdicts(manifests, instance):
                if rule.name == route.rule and model_name == route.model_name and verdict.matched:
                    out.append(instance)
                    break
        return out

    def min_stable_seconds(self, default: float) -> float:
        values = [default if r.stable_seconds is None else r.stable_seconds for r in self.rules]
        return min(values, default=default)


def select_instance(
    candidates: Sequence[InstanceAttributes],
    *,
    series: Literal["first", "last", "most_instances"],
    instance: Literal["first", "middle", "last"],
) -> InstanceAttributes:
    """Series selection then instance selection (by InstanceNumber) among the matching instances."""
    by_series: dict[str, list[InstanceAttributes]] = {}
    for candidate in candidates:
        by_series.setdefault(candidate.series_instance_uid, []).append(candidate)
    groups = list(by_series.values())  # in arrival (series) order
    if series == "first":
        group = groups[0]
    elif series == "last":
        group = groups[-1]
    else:
        group = max(groups, key=len)  # the first of the largest
    ordered = sorted(group, key=lambda i: (i.instance_number is None, i.instance_number or 0))
    if instance == "first":
        return ordered[0]
    if instance == "last":
        return ordered[-1]
    return ordered[(len(ordered) - 1) // 2]


def default_table(manifests: dict[str, Manifest]) -> RoutingTable:
    """One rule per served model, from its manifest's routing defaults (no file configured)."""
    rules = [RuleSpec(name=f"manifest:{name}", models=[name]) for name in sorted(manifests)]
    return RoutingTable(rules=rules, destinations={}, source="manifest routing defaults")


def load_table(path: Path, manifests: dict[str, Manifest]) -> RoutingTable:
    """Read and check a rules file.

    Raises:
        ConfigurationError: unreadable YAML, unknown keys, bad values, or a rule naming a model that is not served.
    """
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigurationError(f"routing rules {path}: cannot read: {e}") from e
    try:
        parsed = RulesFile.model_validate(raw or {})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigurationError(f"routing rules {path}: {problems}") from e
    for rule in parsed.rules:
        unknown = [m for m in rule.models if m not in manifests]
        if unknown:
            raise ConfigurationError(
                f"routing rules {path}: rule {rule.name!r} names models that are not served: {', '.join(unknown)}"
                f" (served: {', '.join(sorted(manifests)) or 'none'})"
            )
    return RoutingTable(rules=list(parsed.rules), destinations=dict(parsed.destinations), source=str(path))


def build_table(path: Path | None, manifests: dict[str, Manifest]) -> RoutingTable:
    return load_table(path, manifests) if path is not None else default_table(manifests)


def explain(table: RoutingTable, manifests: dict[str, Manifest], instances: Sequence[InstanceAttributes]) -> list[str]:
    """Lines that say, per instance, which rule matched which model and why (or why not); then the study's routes."""
    lines = [f"rules: {table.source}"]
    for instance in instances:
        lines.append(f"instance {instance.sop_instance_uid}")
        for rule, model_name, verdict in table.verdicts(manifests, instance):
            lines.append(f"  rule {rule.name} -> {model_name}: {'MATCH' if verdict.matched else 'no match'}")
            for condition in verdict.conditions:
                lines.append(f"    [{'x' if condition.ok else ' '}] {condition.detail}")
    routing = table.route_study(manifests, instances)
    lines.append("as one study:")
    for route in routing.routes:
        lines.append(
            f"  {route.model_name} {route.model_version} <- rule {route.rule}, priority {route.priority.value},"
            f" reads {route.sop_instance_uid}"
            + (f", results to {', '.join(route.destinations)}" if route.destinations else "")
        )
    if not routing.routes:
        lines.append(f"  no route: {routing.reason()}")
    return lines
