"""`onnxcam export`: the servable graph's heatmap equals Explainer's, and it is plain, checked ONNX."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcam import Explainer, OnnxcamError
from onnxcam.cli import main
from onnxcam.cam.export import export_model, is_optional_target, triton_config, triton_model
from onnx import TensorProto, helper, numpy_helper

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


def _triton_entry(exported: Path) -> Path:
    return exported.parent / "repo" / "explainable" / "1" / "model.onnx"


@pytest.mark.parametrize("form", ["optional", "initializer"])  # `onnxcam export -o`; the Triton entry
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("with_target", [False, True])
def test_heatmap_output_equals_explainer(exported, explainer, form, batch, with_target):
    path = exported if form == "optional" else _triton_entry(exported)
    assert is_optional_target(onnx.load(str(path), load_external_data=False)) == (form == "optional")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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


_LOAD_AND_RUN = """
import sys
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.zeros([2] + [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape[1:]], np.float32)
sess.run(None, {sess.get_inputs()[0].name: x})
sess.run(None, {sess.get_inputs()[0].name: x, "target": np.array([1, 2], np.int64)})
"""


def test_the_export_loads_and_runs_in_onnxruntime_without_a_word(exported):
    # Every load of the initializer form prints "Initializer target appears in graph inputs ..." (issue #18).
    res = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(exported)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout + res.stderr == ""
    # The Triton entry keeps the form Triton's onnxruntime backend takes: a plain tensor with a default.
    entry = onnx.load(str(_triton_entry(exported)), load_external_data=False)
    target = next(i for i in entry.graph.input if i.name == "target")
    assert target.type.HasField("tensor_type") and target.type.tensor_type.elem_type == TensorProto.INT64
    default = next(t for t in entry.graph.initializer if t.name == "target")
    assert numpy_helper.to_array(default).tolist() == [-1]
    onnx.checker.check_model(entry, full_check=True)


def _small_model(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(opset)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["feat"]),
             helper.make_node("GlobalAveragePool", ["feat"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_a_model_below_opset_15_is_upgraded_for_the_optional_target(tmp_path):
    source = _small_model(13)
    m = export_model(source, layer="feat")
    assert is_optional_target(m)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 15
    path = tmp_path / "small.onnx"
    onnx.save(m, str(path))
    res = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stderr
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    ref = Explainer(source, layer="feat")
    for model in (m, triton_model(m)):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(["heatmap"], {"image": x})[0], ref.explain(x).heatmaps, atol=1e-6)
        got = sess.run(["heatmap"], {"image": x, "target": np.array([4, 0, 2], np.int64)})[0]
        np.testing.assert_allclose(got, ref.explain(x, [4, 0, 2]).heatmaps, atol=1e-6)


def _check_against_triton_schema(text: str, model: onnx.ModelProto) -> None:
    """config.pbtxt parsed as Triton's ModelConfig protobuf (unknown fields or enum values fail), then checked
    against the ONNX graph it describes: the checks Triton's onnxruntime backend makes at load time that can be
    made without it (names, data types, dims without the batch dimension, reshape sizes)."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size >= 0
    graph_inputs = {i.name: i for i in model.graph.input}
    initializers = {t.name for t in model.graph.initializer}
    assert {i.name for i in config.input} == {n for n in graph_inputs if n not in initializers or n == "target"}
    assert [o.name for o in config.output] == [o.name for o in model.graph.output]
    for entry in [*config.input, *config.output]:
        vi = graph_inputs.get(entry.name) or next(o for o in model.graph.output if o.name == entry.name)
        t = vi.type.tensor_type
        onnx_type = helper.tensor_dtype_to_np_dtype(t.elem_type)
        assert model_config_pb2.DataType.Name(entry.data_type) == "TYPE_" + {
            "float32": "FP32", "int64": "INT64", "float16": "FP16"}[onnx_type.name]
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if config.max_batch_size > 0:
            assert dims[0] == -1, f"{entry.name}: a batched model needs a dynamic first dimension"
            dims = dims[1:]
        shape = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
        assert shape == dims, (entry.name, shape, dims)
        if entry.HasField("reshape"):
            assert np.prod(entry.dims) == np.prod(entry.reshape.shape)
        assert entry.name in graph_inputs or not getattr(entry, "optional", False)
    assert [i.optional for i in config.input] == [i.name == "target" for i in config.input]
    assert config.HasField("dynamic_batching") == (config.max_batch_size > 0)


def test_triton_config_is_a_valid_model_configuration(exported):
    entry = onnx.load(str(_triton_entry(exported)), load_external_data=False)
    _check_against_triton_schema((exported.parent / "repo" / "explainable" / "config.pbtxt").read_text(), entry)
    _check_against_triton_schema(triton_config(entry, "x", max_batch_size=0), entry)
