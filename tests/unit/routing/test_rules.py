"""Routing rules: YAML checked with clear errors, conditions explained, first matching rule per model, priority,
per-rule stable seconds, series and instance selection, and `clinfer rules test`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.cli import main
from service.errors import ConfigurationError
from service.inference.manifest import Manifest, load_manifest
from service.routing.rules import InstanceAttributes, Priority, build_table, explain, load_table
from tests.conftest import REPO
from tests.factories import dx_instance

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture(scope="module")
def manifests() -> dict[str, Manifest]:
    return {name: load_manifest(REPO / "models" / name / "manifest.yaml") for name in ("cxr-fusion", "ct-head-ich")}


def dx(
    uid: str,
    *,
    series: str = "s1",
    number: int | None = 1,
    ae: str | None = None,
    description: str | None = "CHEST PA",
    rows: int = 2048,
    modality: str = "DX",
    body_part: str | None = "CHEST",
) -> InstanceAttributes:
    return InstanceAttributes(
        sop_instance_uid=uid,
        sop_class_uid=DX_IMAGE if modality != "CT" else CT_IMAGE,
        modality=modality,
        body_part_examined=body_part,
        rows=rows,
        columns=rows,
        photometric_interpretation="MONOCHROME2",
        series_instance_uid=series,
        series_description=description,
        view_position="PA",
        manufacturer="ACME",
        calling_ae_title=ae,
        instance_number=number,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    return path


RULES = """
destinations:
  pacs: {kind: dimse, host: 10.0.0.5, port: 104, ae_title: PACS}
  web: {kind: stow, url: "https://pacs.example/dicomweb"}
rules:
  - name: er-stat
    match:
      Modality: [DX, CR]
      CallingAETitle: [ER_DX1]
    models: [cxr-fusion]
    priority: stat
    stable_seconds: 5
    destinations: [pacs, web]
  - name: chest
    match:
      Modality: [dx, cr]
      SeriesDescription: {regex: "(?i)chest|thorax"}
      Rows: {min: 1024, max: 4096}
    models: [cxr-fusion]
    series: most_instances
    instance: middle
  - name: head-ct
    match: {Modality: [CT]}
    models: [ct-head-ich]
"""


def test_the_first_matching_rule_wins_and_carries_priority_stability_and_destinations(
    tmp_path: Path, manifests: dict[str, Manifest]
) -> None:
    table = load_table(write(tmp_path, RULES), manifests)
    stat = table.route_study(manifests, [dx("a", ae="ER_DX1")])
    [route] = stat.routes
    assert (route.rule, route.priority, route.stable_seconds) == ("er-stat", Priority.stat, 5)
    assert route.destinations == ("pacs", "web") and route.queue_priority < 5
    routine = table.route_study(manifests, [dx("a", ae="WARD_DX")])
    [route] = routine.routes
    assert (route.rule, route.priority, route.queue_priority) == ("chest", Priority.routine, 6)
    assert table.min_stable_seconds(30.0) == 5


def test_series_and_instance_selection(tmp_path: Path, manifests: dict[str, Manifest]) -> None:
    table = load_table(write(tmp_path, RULES), manifests)
    instances = [
        dx("lone", series="s1", number=1),
        dx("third", series="s2", number=3),
        dx("first", series="s2", number=1),
        dx("second", series="s2", number=2),
    ]
    [route] = table.route_study(manifests, instances).routes
    assert route.sop_instance_uid == "second", "the middle instance of the series with the most instances"


def test_no_route_says_why_per_model(tmp_path: Path, manifests: dict[str, Manifest]) -> None:
    table = load_table(write(tmp_path, RULES), manifests)
    routing = table.route_study(manifests, [dx("a", description="KNEE", rows=512)])
    assert routing.routes == []
    reason = routing.reason()
    assert reason is not None and reason.startswith("no model applies to this study")
    assert "cxr-fusion" in reason and "CallingAETitle" in reason


def test_the_models_own_requirements_always_hold(tmp_path: Path, manifests: dict[str, Manifest]) -> None:
    rules = write(tmp_path, "rules:\n  - {name: anything, models: [cxr-fusion]}\n")
    table = load_table(rules, manifests)
    routing = table.route_study(manifests, [dx("ct", modality="CT", body_part="HEAD")])
    assert routing.routes == [] and "Modality 'CT' not in" in (routing.reason() or "")


def test_without_a_file_each_manifest_routes_its_own_images(manifests: dict[str, Manifest]) -> None:
    table = build_table(None, manifests)
    [route] = table.route_study(manifests, [dx("a")]).routes
    assert route.model_name == "cxr-fusion" and route.rule == "manifest:cxr-fusion"
    assert route.priority == Priority.routine and route.stable_seconds is None


def test_the_chest_model_reads_a_frontal_view_not_a_lateral(manifests: dict[str, Manifest]) -> None:
    """Found in review: a study whose lateral view arrived first had the lateral read by a model trained on frontal
    views (its model card lists a lateral as a failure). The manifest's routing now names the views it reads; an
    image without a ViewPosition is taken, since not every modality records one."""
    table = build_table(None, manifests)
    lateral = dataclasses.replace(dx("lateral", series="s1"), view_position="LL")
    frontal = dataclasses.replace(dx("frontal", series="s2"), view_position="PA")
    [route] = table.route_study(manifests, [lateral, frontal]).routes
    assert route.sop_instance_uid == "frontal"
    alone = table.route_study(manifests, [lateral])
    assert alone.routes == [] and "cxr-fusion ViewPosition 'LL' not in ['AP', 'PA']" in alone.reason()
    unknown = dataclasses.replace(dx("unknown"), view_position=None)
    assert [r.sop_instance_uid for r in table.route_study(manifests, [unknown]).routes] == ["unknown"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [{name: x, models: [nope]}]", "names models that are not served: nope"),
        ("rules: [{name: x, models: [cxr-fusion], destinations: [pacs]}]", "unknown destinations: pacs"),
        ("rules: [{name: x, models: [cxr-fusion], match: {Modalty: [DX]}}]", "Modalty"),
        ("rules: [{name: x, models: [cxr-fusion], match: {SeriesDescription: {regex: '('}}}]", "regular expression"),
        ("rules: [{name: x, models: [cxr-fusion], priority: urgent}]", "priority"),
        ("rules: [{name: x, models: [cxr-fusion]}, {name: x, models: [cxr-fusion]}]", "unique: x"),
        ("destinations: {p: {kind: dimse, host: h, port: 0, ae_title: A}}", "port"),
        ("rules: [", "cannot read"),
    ],
)
def test_bad_rules_files_are_refused_with_a_message_naming_the_problem(
    tmp_path: Path, manifests: dict[str, Manifest], text: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_table(write(tmp_path, text), manifests)
    assert message in raised.value.message and "routing.yaml" in raised.value.message


def test_explain_shows_every_condition(tmp_path: Path, manifests: dict[str, Manifest]) -> None:
    table = load_table(write(tmp_path, RULES), manifests)
    lines = explain(table, manifests, [dx("a", ae="ER_DX1")])
    assert "  rule er-stat -> cxr-fusion: MATCH" in lines
    assert "    [x] CallingAETitle 'ER_DX1' in ['ER_DX1']" in lines
    assert any(line.startswith("  cxr-fusion ") and "rule er-stat, priority stat" in line for line in lines)


def test_clinfer_rules_test_explains_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINFER_STATE_DIR", str(tmp_path / "var"))
    chest, knee = tmp_path / "chest.dcm", tmp_path / "knee.dcm"
    chest.write_bytes(dx_instance(size=1024))
    knee.write_bytes(dx_instance(body_part="KNEE", size=1024))
    rules = write(tmp_path, RULES)
    assert main(["rules", "test", str(chest), "--rules", str(rules), "--calling-ae-title", "ER_DX1"]) == 0
    out = capsys.readouterr().out
    assert "rule er-stat -> cxr-fusion: MATCH" in out and "results to pacs, web" in out
    assert main(["rules", "test", str(knee), "--rules", str(rules)]) == 1
    assert "no route: no model applies" in capsys.readouterr().out
    assert main(["rules", "test", str(tmp_path / "missing.dcm"), "--rules", str(rules)]) == 2
