"""Crafted minimal models for the ways real deployed models made onnxcam silently wrong (issue #12):
graphs that hard-code a batch of 1 (Score-CAM / Ablation-CAM batches), outputs whose batch axis is not
axis 0 (CTC (T, N, K)), multi-branch detection heads (YOLOv8: box and class fields of several strides),
empty maps nobody explained, single-channel sigmoid segmentation, and opset < 10 models.

Every reference is independent of onnxcam's graph rewriting: numpy definitions of the methods run on the
model itself through plain onnxruntime sessions, or central finite differences of the score.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.errors import OnnxcamError
from onnxcam.cam.targets import DetectionTarget, IndexTarget, RegionTarget

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m


def _run(model: onnx.ModelProto, feeds: dict, outputs=None) -> list:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(outputs, feeds)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, F, None))
    return m


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-12))


# -- 1. a graph that hard-codes a batch of 1 -------------------------------------------------------------
def batch_one_model() -> onnx.ModelProto:
    """conv -> relu (the layer) -> Reshape to [1, 4, -1] -> mean over positions -> MatMul: right for one
    sample; a batch of B is folded into the positions and every row gets the same, mixed, score."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "shape": np.array([1, 4, -1], np.int64), "axes": np.array([2], np.int64),
             "w2": rng.normal(size=(4, 5)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["layer"]),
             helper.make_node("Reshape", ["layer", "shape"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2], keepdims=0),
             helper.make_node("MatMul", ["m", "w2"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("logits", F, [1, 5])],
                  {k: v for k, v in inits.items() if k != "axes"})


def _scorecam_reference(model, x, layer, target):
    """Score-CAM by its definition, one masked image per onnxruntime run of the plain model."""
    (acts,) = _run(_with_output(model, layer), {"x": x}, [layer])
    acts = acts[0]
    scores = []
    for a in acts:  # the layer is 8x8 like the input: the upsampling is the identity
        mask = (a - a.min()) / (a.max() - a.min() + 1e-8)
        scores.append(_run(model, {"x": (x * mask).astype(np.float32)})[0].reshape(-1)[target])
    w = np.exp(np.float64(scores) - max(scores))
    w /= w.sum()
    return np.maximum((w[:, None, None] * acts).sum(0), 0)


def _ablation_reference(model, x, layer, target, head):
    (acts, logits) = _run(_with_output(model, layer), {"x": x}, [layer, "logits"])
    acts = acts[0].astype(np.float64)
    orig = float(logits.reshape(-1)[target])
    value = 0.0 if acts.min() == 0 else acts.min() - 1e7
    w = []
    for k in range(acts.shape[0]):
        a = acts.copy()
        a[k] = value
        w.append((orig - head(a)[target]) / orig)
    return np.maximum((np.float64(w)[:, None, None] * acts).sum(0), 0)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_methods_on_a_batch_one_graph(method):
    model = batch_one_model()
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2")).astype(np.float64)
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ex = onnxcam.Explainer(model, layer="layer", method=method)
    assert ex.batching.fixed
    maps = {bs: onnxcam.Explainer(model, layer="layer", method=method, batch_size=bs).explain(x, 2).maps[0]
            for bs in (1, 32)}
    if method == "scorecam":
        ref = _scorecam_reference(model, x, "layer", 2)
    else:
        ref = _ablation_reference(model, x, "layer", 2, lambda a: a.reshape(4, -1).mean(1) @ w2)
    assert _rel(maps[1], ref) < 1e-4
    assert _rel(maps[32], ref) < 1e-4


def test_batch_one_graph_explains_a_batch_sample_by_sample():
    model = batch_one_model()
    x = np.random.default_rng(2).normal(size=(3, 3, 8, 8)).astype(np.float32)
    ex = onnxcam.Explainer(model, layer="layer")
    r = ex.explain(x, [0, 4, 1])
    for s in range(3):
        one = ex.explain(x[s:s + 1], [0, 4, 1][s])
        np.testing.assert_array_equal(r.maps[s], one.maps[0])
        np.testing.assert_array_equal(r.scores[s], one.scores[0])


# -- 2. the batch axis of a (T, N, K) output ---------------------------------------------------------------
def ctc_model() -> onnx.ModelProto:
    """1x1 conv -> relu (the layer, (N, 4, 1, T)) -> squeeze -> transpose to (T, N, 4) -> MatMul: (T, N, K)
    logits as a CTC recogniser emits them."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "ax": np.array([2], np.int64),
             "w2": rng.normal(size=(4, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]),
             helper.make_node("Relu", ["c"], ["layer"]),
             helper.make_node("Squeeze", ["layer", "ax"], ["s"]),
             helper.make_node("Transpose", ["s"], ["t"], perm=[2, 0, 1]),
             helper.make_node("MatMul", ["t", "w2"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 2, 1, "T"])],
                  [helper.make_tensor_value_info("logits", F, ["T", "N", 3])], inits)


def _ctc_reference(model, x, t, c):
    """Grad-CAM of y = logits[t, n, c]: dy/dlayer is w2[:, c] at position t (the layer is after the ReLU), so
    the channel weights are w2[:, c] / T."""
    (layer,) = _run(_with_output(model, "layer"), {"x": x}, ["layer"])
    w2 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w2")).astype(np.float64)
    alpha = w2[:, c] / x.shape[-1]
    return np.maximum(np.einsum("k,nkhw->nhw", alpha, layer), 0)


def test_ctc_output_batch_axis_is_found_and_targets_reach_every_time_step():
    model = ctc_model()
    x = np.random.default_rng(4).normal(size=(2, 2, 1, 7)).astype(np.float32)
    ex = onnxcam.Explainer(model)
    assert ex.batching.axis == 1
    assert ex.layer == "layer"
    (logits,) = _run(model, {"x": x})
    r = ex.explain(x, [IndexTarget((5, 2)), IndexTarget((0, 1))])
    assert r.scores.shape == (2, 7, 3)
    np.testing.assert_allclose(r.scores, logits.transpose(1, 0, 2), rtol=1e-6)
    np.testing.assert_allclose(r.target_scores, [logits[5, 0, 2], logits[0, 1, 1]], rtol=1e-6)
    ref = np.stack([_ctc_reference(model, x, 5, 2)[0], _ctc_reference(model, x, 0, 1)[1]])
    assert _rel(r.maps, ref) < 1e-5
    # The default target is the most confident (time step, class) of each sample.
    d = ex.explain(x)
    flat = logits.transpose(1, 0, 2).reshape(2, -1).argmax(1)
    np.testing.assert_array_equal(d.targets, flat)
    ref = np.stack([_ctc_reference(model, x, f // 3, f % 3)[s] for s, f in enumerate(flat)])
    assert _rel(d.maps, ref) < 1e-5


def test_a_wrong_batch_axis_is_refused_not_explained():
    model = ctc_model()
    x = np.random.default_rng(5).normal(size=(2, 2, 1, 7)).astype(np.float32)
    with pytest.raises(OnnxcamError, match="rows for 2 sample"):
        onnxcam.Explainer(model, batch_axis=0).explain(x)


# -- 3. a YOLOv8-style detection head -----------------------------------------------------------------------
C = 3  # classes


def detector_model() -> onnx.ModelProto:
    """Two strides. Stride 1's map f1 feeds its box conv, its class conv and the downsampling conv to f2;
    per stride Concat(box 4, classes C) -> (N, 4+C, h*w); strides concatenated along anchors; then Split,
    the boxes scaled, the classes through Sigmoid, Concat: (N, 4+C, anchors), ultralytics' layout."""
    rng = np.random.default_rng(6)
    inits = {"w0": rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.5,
             "wd": rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.3,
             "b1": rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
             "c1": rng.normal(size=(C, 8, 1, 1)).astype(np.float32) * 0.2,  # class logits within +-3: no saturation
             "b2": rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
             "c2": rng.normal(size=(C, 8, 1, 1)).astype(np.float32) * 0.2,
             "s1": np.array([0, 4 + C, -1], np.int64), "split": np.array([4, C], np.int64),
             "scale": np.array(2.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c0"], ["f1"]),
             helper.make_node("Conv", ["f1", "wd"], ["cd"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["cd"], ["f2"])]
    for i in (1, 2):
        nodes += [helper.make_node("Conv", [f"f{i}", f"b{i}"], [f"box{i}"]),
                  helper.make_node("Conv", [f"f{i}", f"c{i}"], [f"cls{i}"]),
                  helper.make_node("Concat", [f"box{i}", f"cls{i}"], [f"bc{i}"], axis=1),
                  helper.make_node("Reshape", [f"bc{i}", "s1"], [f"r{i}"])]
    nodes += [helper.make_node("Concat", ["r1", "r2"], ["xcat"], axis=2),
              helper.make_node("Split", ["xcat", "split"], ["boxes", "classes"], axis=1),
              helper.make_node("Mul", ["boxes", "scale"], ["dbox"]),
              helper.make_node("Sigmoid", ["classes"], ["probs"]),
              helper.make_node("Concat", ["dbox", "probs"], ["output0"], axis=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("output0", F, ["N", 4 + C, 80])], inits)


def _fd_channel_gradients(model, x, layer, y, eps=1e-2):
    """mean_ij dy/dA for each channel of `layer`, by central differences: the layer's output gets a constant
    added on one channel (a graph edit on a copy), and y(outputs) is the explained scalar."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        for k, name in enumerate(node.input):
            if name == layer:
                node.input[k] = layer + "_shifted"
    m.graph.node.append(helper.make_node("Add", [layer, "delta"], [layer + "_shifted"]))
    m.graph.input.append(helper.make_tensor_value_info("delta", F, [1, None, 1, 1]))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (acts,) = _run(_with_output(model, layer), {"x": x}, [layer])
    channels, area = acts.shape[1], acts.shape[2] * acts.shape[3]
    g = np.zeros(channels)
    for k in range(channels):
        d = np.zeros((1, channels, 1, 1), np.float32)
        d[0, k] = eps
        plus = y(s.run(None, {"x": x, "delta": d})[0].astype(np.float64))
        minus = y(s.run(None, {"x": x, "delta": -d})[0].astype(np.float64))
        g[k] = (plus - minus) / (2 * eps) / area
    return g, acts[0].astype(np.float64)


def test_detector_default_layers_are_the_maps_every_branch_forks_from():
    ex = onnxcam.Explainer(detector_model())
    assert ex.layers == ("f1", "f2")


@pytest.mark.parametrize("box", [5, 70])  # an anchor of stride 1 (64 anchors) and one of stride 2
def test_detector_class_target_maps_equal_finite_differences(box):
    model = detector_model()
    x = np.random.default_rng(7).normal(size=(1, 3, 16, 16)).astype(np.float32)
    ex = onnxcam.Explainer(model)
    r = ex.explain(x, DetectionTarget(box, "class", 1))
    (out,) = _run(model, {"x": x})
    assert r.target_scores[0] == pytest.approx(out[0, 4 + 1, box], rel=1e-6)
    assert not r.zero_gradient[0] and not r.empty[0]
    for i, layer in enumerate(("f1", "f2")):
        g, acts = _fd_channel_gradients(model, x, layer, lambda o: o[0, 4 + 1, box])
        ref = np.maximum(np.einsum("k,khw->hw", g, acts), 0)
        if box >= 64 and layer == "f1":  # stride 2's anchors read f1 through f2: f1 gets a gradient too
            assert np.abs(g).max() > 0
        assert _rel(r.maps_per_layer[i][0], ref) < 2e-3, layer  # float32 differences: noise floor ~1e-4


def test_detection_target_reads_ultralytics_and_yolov5_layouts():
    model = detector_model()
    x = np.random.default_rng(8).normal(size=(2, 3, 16, 16)).astype(np.float32)
    ex = onnxcam.Explainer(model)
    (out,) = _run(model, {"x": x})
    r = ex.explain(x, DetectionTarget(9, "class", 2))
    np.testing.assert_allclose(r.target_scores, out[:, 4 + 2, 9], rtol=1e-6)
    top = ex.explain(x, DetectionTarget(9, "class"))  # the box's best class
    np.testing.assert_allclose(top.target_scores, out[:, 4:, 9].max(1), rtol=1e-6)
    default = ex.explain(x, DetectionTarget(9))  # no objectness in this layout: the class score
    np.testing.assert_allclose(default.target_scores, out[:, 4:, 9].max(1), rtol=1e-6)
    with pytest.raises(OnnxcamError, match="objectness"):
        ex.explain(x, DetectionTarget(9, "objectness"))
    best = ex.explain(x, DetectionTarget(None, "class"))  # the top detection
    np.testing.assert_allclose(best.target_scores, out[:, 4:, :].reshape(2, -1).max(1), rtol=1e-6)


# -- 4. empty maps are reported ------------------------------------------------------------------------------
def two_branch_model() -> onnx.ModelProto:
    """Two conv branches, each pooled into its own two logits; the score is their concatenation, so class 2
    and 3 do not depend on branch a at all. Positive head weights: gradients into a are >= 0."""
    rng = np.random.default_rng(9)
    inits = {"wa": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "wb": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "ha": np.abs(rng.normal(size=(4, 2))).astype(np.float32), "hb": rng.normal(size=(4, 2)).astype(np.float32)}
    nodes = []
    for br in "ab":
        nodes += [helper.make_node("Conv", ["x", f"w{br}"], [f"c{br}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{br}"], [br]),
                  helper.make_node("GlobalAveragePool", [br], [f"p{br}"]),
                  helper.make_node("Flatten", [f"p{br}"], [f"f{br}"]),
                  helper.make_node("MatMul", [f"f{br}", f"h{br}"], [f"l{br}"])]
    nodes.append(helper.make_node("Concat", ["la", "lb"], ["logits"], axis=1))
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("logits", F, ["N", 4])], inits)


def test_a_score_that_does_not_depend_on_the_layer_is_flagged():
    ex = onnxcam.Explainer(two_branch_model(), layer="a")
    x = np.random.default_rng(10).normal(size=(2, 3, 8, 8)).astype(np.float32)
    r = ex.explain(x, [3, 0])
    assert list(r.zero_gradient) == [True, False]
    assert r.empty[0] and not r.empty[1]
    assert len(r.warnings) == 1 and "does not depend on layer" in r.warnings[0]
    cf = ex.explain(x, 0, counterfactual=True)  # every gradient into a is >= 0: nothing argues against class 0
    assert cf.empty.all() and not cf.zero_gradient.any()
    assert all("counterfactual map is empty" in w for w in cf.warnings)


def test_cli_prints_the_empty_map_warning(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from onnxcam.cli import cli

    path = tmp_path / "m.onnx"
    onnx.save(two_branch_model(), str(path))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    res = CliRunner().invoke(cli, ["explain", str(path), str(tmp_path / "i.png"), "--layer", "a", "--target", "3",
                                   "--preset", "unit", "-o", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    assert "onnxcam: warning:" in res.output and "does not depend on layer" in res.output


# -- 5. single-channel sigmoid segmentation ------------------------------------------------------------------
def binary_segmentation_model() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    inits = {"w1": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w2": rng.normal(size=(1, 4, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["f"]),
             helper.make_node("Conv", ["f", "w2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["prob"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("prob", F, ["N", 1, 8, 8])], inits)


def test_predicted_mask_of_a_single_channel_sigmoid_output_is_the_foreground():
    model = binary_segmentation_model()
    x = np.random.default_rng(12).normal(size=(1, 3, 8, 8)).astype(np.float32)
    (prob,) = _run(model, {"x": x})
    fg = prob[0, 0] > 0.5
    assert 0 < fg.sum() < fg.size
    r = onnxcam.Explainer(model).explain(x, RegionTarget(0))
    assert r.target_scores[0] == pytest.approx(float(prob[0, 0][fg].sum()), rel=1e-5)


# -- 6. opset < 10 ----------------------------------------------------------------------------------------------
def test_scorecam_on_an_opset_9_model():
    rng = np.random.default_rng(13)
    inits = {"w1": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w2": rng.normal(size=(5, 4)).astype(np.float32),
             "b2": np.zeros(5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["layer"]),
             helper.make_node("GlobalAveragePool", ["layer"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                   [helper.make_tensor_value_info("logits", F, ["N", 5])], inits, opset=9)
    model.ir_version = 4
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    r = onnxcam.Explainer(model, method="scorecam").explain(x, 3)
    assert _rel(r.maps[0], _scorecam_reference(model, x, "layer", 3)) < 1e-4


def test_cli_explains_a_detectors_top_detection_and_draws_its_box(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from onnxcam.cli import cli

    model = detector_model()
    path = tmp_path / "det.onnx"
    onnx.save(model, str(path))
    pixels = np.random.default_rng(14).integers(0, 255, (32, 32, 3), np.uint8)  # twice the input size
    Image.fromarray(pixels).save(tmp_path / "p.png")
    out = tmp_path / "o.png"
    res = CliRunner().invoke(cli, ["explain", str(path), str(tmp_path / "p.png"), "--preset", "unit", "-o", str(out),
                                   "--json"])
    assert res.exit_code == 0, res.output
    import json

    rec = json.loads(res.output[res.output.index("{"):])
    x = (np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR), np.float32) / 255).transpose(2, 0, 1)
    (scores,) = _run(model, {"x": x[None]})
    box = int(scores[0, 4:].max(0).argmax())
    cls = int(scores[0, 4:, box].argmax())
    assert rec["target"] == f"box {box} class {cls}"
    assert rec["target_score"] == pytest.approx(float(scores[0, 4 + cls, box]), rel=1e-5)
    cx, cy, w, h = scores[0, :4, box] * 2  # input pixels -> the 32x32 photo
    w, h = abs(w), abs(h)
    drawn = np.asarray(Image.open(out))[..., :3]
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    if 0 <= x0 < 32 and 0 <= y0 < 32:
        assert tuple(drawn[y0, x0]) == (0, 255, 0)


def test_scorecam_scores_perturbed_inputs_with_the_targets_weights():
    """Every target is a weighting W of the score: Score-CAM scores each masked image by <W, score>, here the
    sum of a given region of a segmentation output (a target the class-index path could not express)."""
    model = binary_segmentation_model()
    x = np.random.default_rng(15).normal(size=(1, 3, 8, 8)).astype(np.float32)
    region = np.zeros((8, 8), bool)
    region[2:6, 1:5] = True
    r = onnxcam.Explainer(model, layer="f", method="scorecam").explain(x, RegionTarget(0, region))
    (acts,) = _run(_with_output(model, "f"), {"x": x}, ["f"])
    acts = acts[0].astype(np.float64)
    ys = []
    for a in acts:  # the layer is 8x8 like the input: the upsampling is the identity
        mask = (a - a.min()) / (a.max() - a.min() + 1e-8)
        (prob,) = _run(model, {"x": (x * mask).astype(np.float32)})
        ys.append(float(prob[0, 0][region].sum()))
    w = np.exp(np.float64(ys) - max(ys))
    w /= w.sum()
    ref = np.maximum((w[:, None, None] * acts).sum(0), 0)
    assert _rel(r.maps[0], ref) < 1e-4
