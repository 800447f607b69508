"""A model made outside the project, with a manifest written by hand from docs/models.md, imported and served."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from pydicom.uid import generate_uid

from service.api.main import create_app
from service.cli import main as clinfer
from service.config import get_settings
from service.flows.runtime import build_runtime, set_runtime
from service.inference.registry import sha256_of
from tests.conftest import REPO, Tokens, make_settings
from tests.factories import dx_instance, multipart_related

MANIFEST = """
name: dx-effusion-demo
description: Mean density of a downsampled chest image -> two scores. A test of the import path only.
intended_use: Test model — not for clinical use.
routing:
  modalities: [DX]
  body_parts: [CHEST]
image_input:
  name: pixels
  shape: [1, 64, 64]
  preprocessing:
    window: percentile
    resize: [64, 64]
outputs:
  logits: scores
  findings:
    - {code: "60046008", display: Pleural effusion, threshold: 0.5}
    - {code: "36118008", display: Pneumothorax, threshold: 0.5}
"""


def _external_onnx(path: Path, *, input_name: str = "pixels") -> None:
    """A graph built with onnx.helper, not with the project's training code: mean pixel -> two logits."""
    weights = numpy_helper.from_array(np.array([[2.0, -1.5]], dtype=np.float32), "w")
    bias = numpy_helper.from_array(np.array([-1.0, 0.5], dtype=np.float32), "b")
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["pooled"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["pooled", "axis"], ["column"]),
        helper.make_node("MatMul", ["column", "w"], ["product"]),
        helper.make_node("Add", ["product", "b"], ["scores"]),
    ]
    axis = numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")
    graph = helper.make_graph(
        nodes,
        "external",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])],
        initializer=[weights, bias, axis],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="elsewhere")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_imported_model_is_validated_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(REPO / "models", repository)
    monkeypatch.setenv("CLINFER_MODEL_REPOSITORY", str(repository))
    get_settings.cache_clear()
    manifest_file = tmp_path / "manifest.yaml"
    manifest_file.write_text(MANIFEST)

    wrong = tmp_path / "wrong.onnx"
    _external_onnx(wrong, input_name="image")
    assert clinfer(["models", "import", str(wrong), "--manifest", str(manifest_file)]) == 1
    assert "input 'pixels' named in the manifest is not in the graph" in capsys.readouterr().err
    assert not (repository / "dx-effusion-demo").exists(), "a refused import writes nothing"

    artifact = tmp_path / "exported.onnx"
    _external_onnx(artifact)
    assert clinfer(["models", "import", str(artifact), "--manifest", str(manifest_file)]) == 0
    assert clinfer(["models", "validate", "dx-effusion-demo"]) == 0
    assert clinfer(["models", "import", str(artifact), "--manifest", str(manifest_file), "--version", "1"]) == 1
    capsys.readouterr()
    assert clinfer(["models", "list"]) == 0
    assert "dx-effusion-demo" in capsys.readouterr().out

    settings = make_settings(tmp_path, model_repository=repository)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    tokens = Tokens(settings)
    with TestClient(create_app(runtime)) as client:
        models = client.get("/v1/models", headers=tokens.header("admin")).json()
        assert [m["name"] for m in models["models"]] == ["ct-head-ich", "cxr-fusion", "dx-effusion-demo"]
        study_uid = generate_uid()
        body, content_type = multipart_related([dx_instance(study_uid=study_uid, size=256)])
        assert (
            client.post(
                "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
            ).status_code
            == 200
        )
        analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician")).json()
        assert sorted(j["model"] for j in analyze["jobs"]) == ["cxr-fusion", "dx-effusion-demo"]
        report: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = client.get(f"/v1/studies/{study_uid}/report", headers=tokens.header("clinician"))
            if response.status_code == 200 and len(response.json()["reports"]) == 2:
                report = response.json()
                break
            time.sleep(0.2)
        assert report, "both models reported"
        [byo] = [r for r in report["reports"] if r["model"]["name"] == "dx-effusion-demo"]
        assert byo["model"]["sha256"] == sha256_of(repository / "dx-effusion-demo" / "1" / "model.onnx")
        assert [f["display"] for f in byo["findings"]] == ["Pleural effusion", "Pneumothorax"]
        assert byo["clinical_inputs"] == [] and byo["missing_inputs"] == []
        fhir = client.get(f"/fhir/DiagnosticReport/{byo['id']}", headers=tokens.header("clinician"))
        assert fhir.status_code == 200 and len(fhir.json()["result"]) == 2
