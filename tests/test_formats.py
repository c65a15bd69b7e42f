"""Model formats: float16 models, opsets 11 to the newest onnxruntime loads, IR versions 6 up, external data.

One network throughout: torchvision ResNet-18 (random weights, BatchNorm calibrated, tests/torch_export.py) at
64x64, exported by the TorchScript exporter at several opsets and by the dynamo exporter, and the opset-17 file
converted to float16 and saved with external data. Reference: the maps of the opset-17 float32 export (the same
file test_parity.py checks against Captum).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper, version_converter

import onnxcam
from onnxcam.cam.export import export_model
from tests import torch_export

SIZE = 64
TARGETS = [3, 7]
# Same graph, same float32 arithmetic up to op rewrites and kernel choices between opsets.
OPSET_RTOL = 1e-5


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The whole graph in float16: initializers, Constant tensors, Cast targets, inputs and outputs (what a
    'full fp16' conversion without kept float32 I/O produces)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
    for vi in [*g.input, *g.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    return m


@pytest.fixture(scope="module")
def net():
    model = torch_export.build("resnet18")
    x = torch_export.random_input("resnet18", size=SIZE)
    return model, x


@pytest.fixture(scope="module")
def exports(net, tmp_path_factory):
    """label -> path: TorchScript opsets 11 (IR 6), 13 (IR 7), 17 (IR 8); dynamo; the opset-17 file converted
    up to the newest opset onnx knows that onnxruntime still loads."""
    model, x = net
    root = tmp_path_factory.mktemp("formats")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opset in (11, 13, 17):
            path = root / f"op{opset}.onnx"
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
            paths[f"torchscript-opset{opset}"] = str(path)
        paths["dynamo"] = torch_export.export(model, x, root / "dynamo.onnx", "dynamo")
    base = onnx.load(paths["torchscript-opset17"])
    for opset in range(onnx.defs.onnx_opset_version(), 17, -1):
        try:
            newest = version_converter.convert_version(base, opset)
            newest.ir_version = 10
            ort.InferenceSession(newest.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            continue
        path = root / f"op{opset}.onnx"
        onnx.save(newest, str(path))
        paths["converted-newest"] = str(path)
        break
    return paths


@pytest.fixture(scope="module")
def reference(exports, net):
    return {m: onnxcam.Explainer(exports["torchscript-opset17"], method=m).explain(net[1].numpy(), TARGETS)
            for m in ("gradcam", "guided-backprop")}


@pytest.mark.parametrize("label", ["torchscript-opset11", "torchscript-opset13", "dynamo", "converted-newest"])
def test_opsets_and_ir_versions_give_the_same_maps(exports, net, reference, label):
    path = exports[label]
    source = onnx.load(path, load_external_data=False)
    opset = next(o.version for o in source.opset_import if o.domain in ("", "ai.onnx"))
    print(f"FORMATS {label}: opset {opset}, IR {source.ir_version}")
    ex = onnxcam.Explainer(path)
    r = ex.explain(net[1].numpy(), TARGETS)
    assert _rel(r.maps, reference["gradcam"].maps) < OPSET_RTOL
    # Nothing on the path to layer4 needs a newer opset: the model keeps its own opset and IR version.
    assert ex.model.ir_version == source.ir_version
    # Guided Backprop differentiates the stem's MaxPool too, whose rule needs ScatterElements(reduction='add'):
    # older models are upgraded to opset 16, with the IR version that opset requires (8).
    gb = onnxcam.Explainer(path, method="guided-backprop")
    g = gb.explain(net[1].numpy(), TARGETS)
    assert _rel(g.guided, reference["guided-backprop"].guided) < OPSET_RTOL
    gb_opset = next(o.version for o in gb.model.opset_import if o.domain in ("", "ai.onnx"))
    assert gb_opset == max(opset, 16)
    assert gb.model.ir_version == (max(source.ir_version, 8) if opset < 16 else source.ir_version)


# fp16 stores ~3 significant digits (unit roundoff 4.9e-4); through ResNet-18's 18 layers the logits move by ~2e-3
# (of ~1.3) and the layer4 gradients by ~0.5% -- measured: Grad-CAM maps 3.9e-3 relative L2, heatmaps 4.8e-3 max
# abs; Ablation-CAM (score differences of ablated channels, a cancellation) 1.6e-2; Guided Backprop 1.6e-2; Score-CAM
# 1.9e-4. The bounds are ~3x the measurements; a wrong dtype or layer is O(1).
FP16 = {"gradcam": (1e-2, 2e-2), "gradcam++": (1e-2, 3e-2), "scorecam": (1e-2, 1e-2), "ablationcam": (5e-2, 3e-2)}
FP16_GUIDED_RTOL = 5e-2


@pytest.fixture(scope="module")
def fp16_path(exports, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "resnet18_fp16.onnx"
    onnx.save(to_float16(onnx.load(exports["torchscript-opset17"])), str(path))
    return str(path)


@pytest.mark.parametrize("method", sorted(FP16))
def test_float16_model_maps_close_to_float32(exports, fp16_path, net, method):
    x = net[1].numpy()
    ex16 = onnxcam.Explainer(fp16_path, method=method)
    assert ex16.input_dtypes[ex16.image_input] == np.float16
    r16 = ex16.explain(x, TARGETS)  # float32 input is converted to the model's float16
    r32 = onnxcam.Explainer(exports["torchscript-opset17"], method=method).explain(x, TARGETS)
    maps_tol, heat_tol = FP16[method]
    rel, heat = _rel(r16.maps, r32.maps), float(np.abs(r16.heatmaps - r32.heatmaps).max())
    print(f"FORMATS fp16 {method}: maps rel L2 {rel:.1e}, heatmaps max abs {heat:.1e}")
    assert r16.maps.dtype == np.float32 and r16.scores.dtype == np.float32
    assert rel < maps_tol and heat < heat_tol
    assert np.abs(r16.scores - r32.scores).max() < 1e-2 * np.abs(r32.scores).max()


def test_float16_guided_backprop_through_maxpool(exports, fp16_path, net):
    # The MaxPool gradient scatters with reduction='add', which onnxruntime's CPU kernel refuses for float16: the
    # rule sums in float32 and casts back.
    x = net[1].numpy()
    g16 = onnxcam.Explainer(fp16_path, method="guided-backprop").explain(x, TARGETS).guided
    g32 = onnxcam.Explainer(exports["torchscript-opset17"], method="guided-backprop").explain(x, TARGETS).guided
    rel = _rel(g16, g32)
    print(f"FORMATS fp16 guided-backprop: rel L2 {rel:.1e}")
    assert rel < FP16_GUIDED_RTOL


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_external_data_model(exports, net, reference, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx.load(exports["torchscript-opset17"])
    onnx.save(model, str(folder / "resnet18.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="resnet18.weights", size_threshold=0)
    assert (folder / "resnet18.weights").stat().st_size > (folder / "resnet18.onnx").stat().st_size
    before = _digests(folder)
    path = str(folder / "resnet18.onnx")
    r = onnxcam.Explainer(path).explain(net[1].numpy(), TARGETS)
    assert _rel(r.maps, reference["gradcam"].maps) < OPSET_RTOL
    out = tmp_path / "exported.onnx"
    onnx.save(export_model(path), str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    heat = sess.run(["heatmap"], {"input": net[1].numpy(), "target": np.array(TARGETS, np.int64)})[0]
    assert np.abs(heat - r.heatmaps).max() < 1e-5
    assert _digests(folder) == before  # the model and its weights file are untouched, nothing added next to them
