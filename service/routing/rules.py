"""Routing: which models apply to a study, and which of its instances each model reads.

This first form uses each manifest's routing defaults; declarative rule files refine it later.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.inference.manifest import Manifest


@dataclass(frozen=True)
class InstanceAttributes:
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    body_part_examined: str | None
    rows: int | None
    columns: int | None
    photometric_interpretation: str | None


@dataclass(frozen=True)
class Route:
    model_name: str
    model_version: str
    sop_instance_uid: str


def instance_matches(manifest: Manifest, instance: InstanceAttributes) -> bool:
    routing = manifest.routing
    if routing.modalities and (instance.modality or "").upper() not in {m.upper() for m in routing.modalities}:
        return False
    if routing.body_parts and (instance.body_part_examined or "").upper() not in {
        b.upper() for b in routing.body_parts
    }:
        return False
    if routing.sop_class_uids and instance.sop_class_uid not in routing.sop_class_uids:
        return False
    if (instance.rows or 0) < routing.min_rows or (instance.columns or 0) < routing.min_columns:
        return False
    return (instance.photometric_interpretation or "").upper() in ("MONOCHROME1", "MONOCHROME2")


def routes_for_study(manifests: list[Manifest], instances: list[InstanceAttributes]) -> list[Route]:
    """One route per model (its latest version) that has a matching instance; the first such instance is read."""
    routes = []
    for manifest in manifests:
        for instance in instances:
            if instance_matches(manifest, instance):
                routes.append(Route(manifest.name, manifest.latest().version, instance.sop_instance_uid))
                break
    return routes
