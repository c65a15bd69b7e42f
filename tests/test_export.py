"""`onnxcam export`: the servable graph's heatmap equals Explainer's, and it is plain, checked ONNX."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcam import Explainer, OnnxcamError
from onnxcam.cli import main
from onnxcam.cam.export import export_model, triton_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "explainable.onnx"
    assert main(["export", str(MODEL), "-o", str(path), "--triton", str(path.parent / "repo")]) == 0
    return path


@pytest.fixture(scope="module")
def explainer():
    return Explainer(str(MODEL))


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("with_target", [False, True])
def test_heatmap_output_equals_explainer(exported, explainer, batch, with_target):
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    feeds = {"image": x}
    targets = None
    if with_target:
        targets = (np.arange(batch) * 97 + 3) % 1000
        feeds["target"] = targets.astype(np.int64)
    logits, heat = sess.run(["logits", "heatmap"], feeds)
    ref = explainer.explain(x, targets)
    assert heat.shape == (batch, 224, 224)
    np.testing.assert_allclose(heat, ref.heatmaps, atol=1e-5)
    np.testing.assert_allclose(logits, ref.scores, rtol=1e-5, atol=1e-5)
    if not with_target:  # -1 in the target vector also means the argmax
        minus = sess.run(["heatmap"], {"image": x, "target": np.full(batch, -1, np.int64)})[0]
        np.testing.assert_array_equal(minus, heat)


def test_graph_is_standard_checked_onnx(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    assert {imp.domain for imp in model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert [o.name for o in model.graph.output] == ["logits", "heatmap"]
    assert model.ir_version == onnx.load(str(MODEL)).ir_version
    config = (exported.parent / "repo" / "explainable" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 8" in config
    assert "dynamic_batching" in config and 'name: "target"' in config and "optional: true" in config
    assert "dims: [ 224, 224 ]" in config and "dims: [ 3, 224, 224 ]" in config
    assert (exported.parent / "repo" / "explainable" / "1" / "model.onnx").stat().st_size > 10_000_000


def test_layer_sized_heatmap_and_errors(explainer):
    m = export_model(str(MODEL), heatmap_size="layer")
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    heat = sess.run(["heatmap"], {"image": x})[0]
    maps = explainer.explain(x).maps
    lo = maps.min(axis=(1, 2), keepdims=True)
    ref = (maps - lo) / ((maps - lo).max(axis=(1, 2), keepdims=True) + 1e-7)
    np.testing.assert_allclose(heat, ref, atol=1e-6)
    with pytest.raises(OnnxcamError, match="cannot be exported"):
        export_model(str(MODEL), method="scorecam")
    assert "max_batch_size: 0" in triton_config(m, "x", max_batch_size=0)


def test_export_refuses_to_overwrite_its_input(tmp_path, capsys):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(MODEL.read_bytes())
    assert main(["export", str(copy), "-o", str(copy)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert copy.read_bytes() == MODEL.read_bytes()
