from __future__ import annotations

import json

import yaml

from service.inference.manifest import Manifest, manifest_json_schema
from tests.conftest import REPO


def test_published_schema_is_the_manifest_model() -> None:
    published = json.loads((REPO / "docs" / "manifest.schema.json").read_text())
    assert published == manifest_json_schema(), "run `clinfer models schema > docs/manifest.schema.json`"


def test_documented_example_manifest_validates() -> None:
    text = (REPO / "docs" / "models.md").read_text()
    example = text.split("## The manifest", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    raw = yaml.safe_load(example)
    raw["versions"] = [{"version": "1", "artifact": "1/model.onnx", "sha256": "0" * 64}]
    manifest = Manifest.model_validate(raw)
    assert manifest.clinical_input is not None and len(manifest.clinical_input.features) == 3
