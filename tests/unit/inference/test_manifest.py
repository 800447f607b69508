"""A hand-written manifest is checked where it is written (``clinfer models import``), not on a patient: keys it does
not define, an image shape preprocessing cannot make, units that are not UCUM, sources that read nothing, a graph
that takes one study a call while the manifest batches, and a new version that changes what earlier versions
shared. Found in a review that brought its own models: each of these passed import and validation, then gave wrong
results without a word or failed every study."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper, save

from service.errors import ModelError
from service.inference import pipeline
from service.inference.manifest import Manifest
from service.inference.preprocess import prepare_image
from service.inference.repository import import_model
from service.schemas import ClinicalContext

BASE: dict[str, Any] = {
    "name": "byo-test",
    "intended_use": "Test model; not for clinical use.",
    "versions": [{"version": "1", "artifact": "1/model.onnx", "sha256": "0" * 64}],
    "image_input": {
        "name": "image",
        "shape": [1, 64, 64],
        "preprocessing": {"window": "percentile", "resize": [64, 64], "normalization": {"mean": 0.5, "std": 0.25}},
    },
    "clinical_input": {
        "values_name": "clinical",
        "mask_name": "clinical_mask",
        "features": [
            {
                "name": "crp",
                "display": "C reactive protein",
                "source": {"kind": "observation", "loinc": ["1988-5"]},
                "unit": "mg/L",
                "lookback_hours": 24,
            }
        ],
    },
    "outputs": {"logits": "logits", "findings": [{"code": "233604007", "display": "Pneumonia", "threshold": 0.5}]},
}


def _manifest(**changes: Any) -> dict[str, Any]:
    """BASE with dotted paths set (``image_input.shape``); a value of ``...`` removes the key."""
    manifest = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return manifest


def test_the_base_manifest_is_valid() -> None:
    Manifest.model_validate(BASE)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_input__preprocessing__normalisation": {"mean": 0.5, "std": 0.25}}, "normalisation"),
        ({"clinical_input__features__0__lookback_hour": 24}, "lookback_hour"),
        ({"outputs__findings__0__calibraton": {"method": "temperature"}}, "calibraton"),
        ({"modality": "DX"}, "modality"),
    ],
    ids=["normalisation", "lookback_hour", "calibraton", "top-level"],
)
def test_a_key_the_manifest_does_not_define_is_refused_by_its_name(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"(?s){message}.*Extra inputs are not permitted"):
        Manifest.model_validate(_manifest(**changes))


@pytest.mark.parametrize(
    ("shape", "resize", "message"),
    [
        ([1, 64, 64], [128, 128], "does not match preprocessing.resize"),
        ([2, 64, 64], [64, 64], "clinfer feeds 1 .grayscale. or 3"),
        ([64, 64], [64, 64], "must be \\[channels, height, width\\]"),
    ],
)
def test_an_image_shape_preprocessing_cannot_make_is_refused(shape: list[int], resize: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(_manifest(image_input__shape=shape, image_input__preprocessing__resize=resize))


def test_three_channels_are_accepted() -> None:
    assert Manifest.model_validate(_manifest(image_input__shape=[3, 64, 64])).image_input.shape == [3, 64, 64]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clinical_input__features__0__unit": "bpm"}, "unit 'bpm' is not a UCUM unit"),
        ({"clinical_input__features__0__unit": "°C"}, "is not a UCUM unit"),
        ({"clinical_input__features__0__source": {"kind": "observation"}}, "needs its LOINC codes"),
        ({"clinical_input__features__0__source": {"kind": "patient_gender"}}, "gender_value"),
        ({"batching": {"max_batch_size": 0}}, "greater than or equal to 1"),
    ],
    ids=["bpm", "degree-sign", "no-loinc", "no-gender-value", "batch-0"],
)
def test_a_feature_or_batching_that_cannot_work_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(_manifest(**changes))


def test_a_maximum_batch_below_the_default_preferred_size_is_taken_as_the_preferred_size_too() -> None:
    """Found in review: ``max_batch_size: 4`` alone (the preferred size left at its default 8) was refused after
    loading before, and a model already in the repository then silently stopped being served."""
    for batching, preferred in (({"max_batch_size": 4}, 4), ({"max_batch_size": 1}, 1), ({"max_batch_size": 16}, 8)):
        assert Manifest.model_validate(_manifest(batching=batching)).batching.preferred_batch_size == preferred


def test_ucum_units_with_annotations_and_prefixes_are_accepted() -> None:
    for unit in ("mg/L", "10*3/uL", "/min", "[degF]", "mm[Hg]", "%", "a"):
        Manifest.model_validate(_manifest(clinical_input__features__0__unit=unit))


# --- import ---------------------------------------------------------------------------------------------------


def _onnx(path: Path, *, batch: int | str = "N", bias: float = 0.0, channels: int = 1) -> Path:
    """image [batch,channels,64,64] + clinical [batch,1] + mask -> logits [batch,1]: mean pixel + value + bias."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["pooled", "axis"], ["column"]),
        helper.make_node("Mul", ["clinical", "clinical_mask"], ["kept"]),
        helper.make_node("Add", ["column", "kept"], ["summed"]),
        helper.make_node("Add", ["summed", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "byo",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, channels, 64, 64]),
            helper.make_tensor_value_info("clinical", TensorProto.FLOAT, [batch, 1]),
            helper.make_tensor_value_info("clinical_mask", TensorProto.FLOAT, [batch, 1]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1])],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
            numpy_helper.from_array(np.array([bias], dtype=np.float32), "bias"),
        ],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _manifest_file(tmp_path: Path, file_name: str = "manifest.yaml", **changes: Any) -> Path:
    manifest = _manifest(**changes)
    del manifest["versions"]  # import adds the version
    path = tmp_path / file_name
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_a_graph_whose_batch_axis_is_fixed_at_1_needs_a_manifest_that_does_not_batch(tmp_path: Path) -> None:
    artifact = _onnx(tmp_path / "fixed.onnx", batch=1)
    with pytest.raises(ModelError, match="fixed at 1 but batching.max_batch_size is 32"):
        import_model(tmp_path / "models", artifact=artifact, manifest_file=_manifest_file(tmp_path), providers=[])
    unbatched = _manifest_file(tmp_path, batching={"preferred_batch_size": 1, "max_batch_size": 1})
    imported = import_model(tmp_path / "models", artifact=artifact, manifest_file=unbatched, providers=[])
    assert imported.report.ok and imported.report.smoke_output_shape == (1, 1)


def test_a_new_version_that_changes_what_versions_share_is_refused_naming_what_changed(tmp_path: Path) -> None:
    root = tmp_path / "models"
    import_model(root, artifact=_onnx(tmp_path / "v1.onnx"), manifest_file=_manifest_file(tmp_path), providers=[])
    retuned = _manifest_file(
        tmp_path, "v2.yaml", outputs__findings__0__threshold=0.3, clinical_input__features__0__mean=20.0
    )
    with pytest.raises(ModelError) as refused:
        import_model(root, artifact=_onnx(tmp_path / "v2.onnx", bias=0.5), manifest_file=retuned, providers=[])
    message = refused.value.message
    assert "outputs.findings.0.threshold" in message and "clinical_input.features.0.mean" in message
    assert "under a new name" in message
    same = _manifest_file(tmp_path, "v2-same.yaml")
    second = import_model(root, artifact=_onnx(tmp_path / "v2.onnx", bias=0.5), manifest_file=same, providers=[])
    assert second.version == "2"


def _with_sigmoid(path: Path) -> Path:
    """The test graph with a Sigmoid (behind a Reshape) on its output: probabilities, not logits."""
    _onnx(path)
    import onnx

    model = onnx.load(str(path))
    model.graph.node[-1].output[0] = "raw"
    shape = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape")
    model.graph.initializer.append(shape)
    model.graph.node.extend(
        [
            helper.make_node("Sigmoid", ["raw"], ["probability"], name="head_sigmoid"),
            helper.make_node("Reshape", ["probability", "shape"], ["logits"]),
        ]
    )
    save(model, str(path))
    return path


def test_a_graph_that_outputs_probabilities_is_refused_with_how_to_export_its_logits(tmp_path: Path) -> None:
    """Found in review: a graph ending in a Sigmoid was squashed a second time, every finding positive."""
    artifact = _with_sigmoid(tmp_path / "probabilities.onnx")
    with pytest.raises(ModelError, match="made by a Sigmoid node .head_sigmoid.*extract_model.*'raw'"):
        import_model(tmp_path / "models", artifact=artifact, manifest_file=_manifest_file(tmp_path), providers=[])
    assert not (tmp_path / "models" / "byo-test").exists()


def test_a_three_channel_graph_is_fed_the_grayscale_image_in_each_channel(tmp_path: Path) -> None:
    """Models trained on RGB images take three channels; a one-channel graph declared as three is refused at
    import, not on every study."""
    three = import_model(
        tmp_path / "models",
        artifact=_onnx(tmp_path / "three.onnx", channels=3),
        manifest_file=_manifest_file(tmp_path, image_input__shape=[3, 64, 64]),
        providers=[],
    )
    assert three.report.ok and three.report.smoke_output_shape == (2, 1)
    spec = Manifest.model_validate(_manifest(image_input__shape=[3, 64, 64])).image_input.preprocessing
    image = prepare_image(
        np.arange(100 * 80).reshape(100, 80),
        photometric_interpretation="MONOCHROME2",
        window=None,
        spec=spec,
        channels=3,
    )
    assert image.shape == (3, 64, 64) and image.dtype == np.float32
    assert np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2])
    served = pipeline.pre_process(
        Manifest.model_validate(_manifest(image_input__shape=[3, 64, 64])),
        pixels=np.arange(100 * 80).reshape(100, 80),
        photometric_interpretation="MONOCHROME2",
        window=None,
        context=ClinicalContext(),
        study_at=dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
        source_sop_instance_uid="1.2.3",
    )
    assert served.image.shape == (3, 64, 64)  # as the service feeds it (the pipeline checks it against the shape)
    declared_three = _manifest_file(tmp_path, "three.yaml", name="byo-other", image_input__shape=[3, 64, 64])
    with pytest.raises(ModelError, match="axis 1 is 1 in the graph, 3 in the manifest"):
        import_model(
            tmp_path / "models", artifact=_onnx(tmp_path / "one.onnx"), manifest_file=declared_three, providers=[]
        )
