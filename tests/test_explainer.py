"""The Python API on the bundled demo and on small hand-built graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer, OnnxcamError, UnsupportedOpError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
CAT = ROOT / "models" / "cat.png"
CAT_CUP = ROOT / "models" / "cat_and_cup.png"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = (504, 967, 968)  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def demo():
    return Explainer(str(MODEL))


def test_demo_top1_is_a_cat(demo):
    e = demo.explain_image(CAT)
    assert int(np.argmax(e.scores[0])) in CAT_CLASSES
    assert e.targets[0] == np.argmax(e.scores[0])
    assert e.maps.shape == (1, 7, 7) and e.heatmaps.shape == (1, 224, 224)
    assert e.heatmaps.min() >= 0 and e.heatmaps.max() <= 1 and e.heatmaps.max() > 0.99


def test_demo_maps_are_class_discriminative(demo):
    """Cat on the left half of cat_and_cup.png, cup on the right: each class's peak lands on its object."""
    x = demo.explain_image(CAT_CUP)
    scores = x.scores[0]
    cat = max(CAT_CLASSES, key=lambda c: scores[c])
    cup = max(CUP_CLASSES, key=lambda c: scores[c])
    pp = demo.preprocessing()
    from onnxcam.images.preprocess import load_image, to_tensor

    batch = np.concatenate([to_tensor(load_image(CAT_CUP), pp)] * 2)
    e = demo.explain(batch, [cat, cup])
    w = e.heatmaps.shape[2]
    for heat, side in zip(e.heatmaps, ("left", "right")):
        _, col = np.unravel_index(np.argmax(heat), heat.shape)
        assert (col < w // 2) == (side == "left"), f"peak at column {col} of {w}, expected the {side} half"
        left, right = heat[:, : w // 2].mean(), heat[:, w // 2:].mean()
        assert (left > 1.5 * right) if side == "left" else (right > 1.5 * left)


def test_batch_targets_match_single_runs(demo):
    from onnxcam.images.preprocess import load_image, to_tensor

    pp = demo.preprocessing()
    x = np.concatenate([to_tensor(load_image(p), pp) for p in (CAT, CAT_CUP)])
    both = demo.explain(x, [285, 504])
    for i, t in enumerate((285, 504)):
        one = demo.explain(x[i:i + 1], t)
        np.testing.assert_allclose(both.maps[i], one.maps[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(both.heatmaps[i], one.heatmaps[0], atol=1e-5)
    default = demo.explain(x)
    np.testing.assert_array_equal(default.targets, np.argmax(default.scores, axis=1))


def test_counterfactual_is_grad_cam_of_the_negated_weights(demo):
    """ReLU(sum_k -alpha_k A^k): disjoint support with Grad-CAM, and the two differ only in sign before the ReLU."""
    from onnxcam.images.preprocess import load_image, to_tensor

    x = to_tensor(load_image(CAT_CUP), demo.preprocessing())
    pos = demo.explain(x, 285).maps
    neg = demo.explain(x, 285, counterfactual=True).maps
    assert (pos > 0).any() and (neg > 0).any()
    assert not ((pos > 1e-6) & (neg > 1e-6)).any()


def test_input_errors(demo):
    good = np.zeros((1, 3, 224, 224), np.float32)
    with pytest.raises(OnnxcamError, match="out of range"):
        demo.explain(good, 1000)
    with pytest.raises(OnnxcamError, match="out of range"):
        demo.explain(good, -3)
    with pytest.raises(OnnxcamError, match="targets for a batch"):
        demo.explain(np.zeros((2, 3, 224, 224), np.float32), [1, 2, 3])
    with pytest.raises(OnnxcamError, match="expects"):
        demo.explain(np.zeros((1, 3, 100, 100), np.float32))
    with pytest.raises(OnnxcamError, match="rank"):
        demo.explain(np.zeros((3, 224, 224), np.float32))
    with pytest.raises(OnnxcamError, match="unknown input"):
        demo.explain({"pixels": good})
    with pytest.raises(OnnxcamError, match="unknown layer"):
        Explainer(str(MODEL), layer="not_a_tensor")
    with pytest.raises(OnnxcamError, match="unknown method"):
        Explainer(str(MODEL), method="nope")
    with pytest.raises(OnnxcamError, match="not found"):
        Explainer("/nonexistent/model.onnx")


def test_accepts_bytes_and_modelproto_without_changing_them():
    data = MODEL.read_bytes()
    proto = onnx.load_from_string(data)
    snapshot = proto.SerializeToString()
    a = Explainer(data)
    b = Explainer(proto)
    assert proto.SerializeToString() == snapshot
    assert a.layer == b.layer
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(a.explain(x).maps, b.explain(x).maps, rtol=1e-5, atol=1e-7)


def _tiny_model(extra_op: str | None = None, softmax: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> [extra] -> GlobalAveragePool -> Flatten -> Gemm [-> Softmax]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    feat = "r"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["r"], ["e"], name="mystery", domain="com.example"))
        feat = "e"
    nodes += [helper.make_node("GlobalAveragePool", [feat], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out = "probs"
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.example", 1)] if extra_op else [])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_unsupported_op_names_op_and_node():
    with pytest.raises(UnsupportedOpError, match=r"'Mystery'.*'mystery'"):
        Explainer(_tiny_model("Mystery"), layer="c")
    from onnxcam.autodiff.rules import supported_ops

    assert "Mystery" not in supported_ops() and "Conv" in supported_ops()


def test_global_pool_gradient_is_read_unspread_and_unread_nodes_are_dropped():
    """Behind a global average pool dy/dA is constant over the positions, so Grad-CAM's weights (its spatial
    mean) are the pooled gradient itself: the graph neither spreads it to h x w nor averages it back; nodes no
    output reads (the softmax after the score) are dropped. The maps are numpy's fc[c] / (h w) weighting."""
    import onnxruntime as ort

    model = _tiny_model(softmax=True)
    ex = Explainer(model)
    ops = [n.op_type for n in ex.model.graph.node]
    assert "Expand" not in ops and "Softmax" not in ops and "ReduceMean" not in ops
    assert "Expand" in [n.op_type for n in Explainer(model, method="gradcam++").model.graph.node]  # reads all of G
    x = np.random.default_rng(5).standard_normal((3, 3, 6, 6)).astype(np.float32)
    e = ex.explain(x, [0, 2, 4])
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 6, 6]))
    acts = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r"], {"x": x})[0]
    fc = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc")).astype(np.float64)
    want = np.maximum(np.einsum("nc,nchw->nhw", fc[[0, 2, 4]] / 36.0, acts.astype(np.float64)), 0)
    np.testing.assert_allclose(e.maps, want, rtol=1e-5, atol=1e-6)


def test_score_is_taken_before_softmax_and_matches_finite_differences():
    """alpha_k is d y_c / d(add t to all of channel k): central differences on the head give it exactly."""
    model = _tiny_model(softmax=True)
    ex = Explainer(model)
    assert ex.score == "logits" and ex.layer == "r"
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)
    e = ex.explain(x, [1, 3])
    # Reference in numpy: forward to the layer, then the head with perturbed channels.
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 6, 6]))
    m.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, acts = sess.run(["logits", "r"], {"x": x})
    np.testing.assert_allclose(e.scores, logits, rtol=1e-5, atol=1e-6)
    fc = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc"))

    def head(a):
        return a.mean(axis=(2, 3)) @ fc.T

    eps = 1e-2
    for n, t in enumerate((1, 3)):
        alpha = np.zeros(acts.shape[1])
        for k in range(acts.shape[1]):
            up, down = acts.astype(np.float64).copy(), acts.astype(np.float64).copy()
            up[n, k] += eps
            down[n, k] -= eps
            alpha[k] = (head(up)[n, t] - head(down)[n, t]) / (2 * eps) / (acts.shape[2] * acts.shape[3])
        ref = np.maximum((alpha[:, None, None] * acts[n]).sum(0), 0)
        np.testing.assert_allclose(e.maps[n], ref, rtol=1e-4, atol=1e-5)


def test_one_explainer_shared_by_many_threads(demo):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((1 + i % 3, 3, 224, 224)).astype(np.float32) for i in range(12)]
    targets = [[(7 * i + j) % 1000 for j in range(len(b))] for i, b in enumerate(batches)]
    expected = [demo.explain(b, t).heatmaps for b, t in zip(batches, targets)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda bt: demo.explain(*bt).heatmaps, zip(batches, targets)))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-6)


def test_from_existing_session_reuses_providers_and_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
    ex = Explainer.from_session(sess)
    assert ex.session.get_providers() == sess.get_providers()
    assert ex.session.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(ex.explain(x).scores, sess.run(None, {"image": x})[0], rtol=1e-5, atol=1e-5)


def test_building_the_explain_graph_leaves_its_input_untouched():
    # Explainer keeps the shape-inferred model for the graphs it derives later (Score-CAM, Ablation-CAM, targets).
    from onnxcam.cam import build
    from onnxcam.model import select
    from onnxcam.model.graph import ModelView, infer_shapes, load_model

    model = infer_shapes(load_model(MODEL))
    before = model.SerializeToString()
    view = ModelView(model)
    image, score, layers = select.resolve(view)
    build.build_explain_graph(model, build.Spec(image=image, layers=layers, score=score))
    assert model.SerializeToString() == before


def test_score_skips_softmax_then_identity():
    # paddle2onnx-style tail: Softmax followed by Identity; the score is still the logits.
    model = _tiny_model(softmax=True)
    model.graph.node.append(helper.make_node("Identity", ["probs"], ["out"]))
    model.graph.output[0].name = "out"
    assert Explainer(model).score == "logits"


def test_unsupported_op_is_one_cli_line(tmp_path, capsys):
    from onnxcam.cli import main

    path = tmp_path / "mystery.onnx"
    onnx.save(_tiny_model("Mystery"), str(path))
    np.save(tmp_path / "x.npy", np.zeros((3, 6, 6), np.float32))
    code = main(["explain", str(path), str(tmp_path / "x.npy"), "--layer", "c", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("onnxcam: error:") and "'Mystery'" in err[0] and "'mystery'" in err[0]


def test_shape_inference_without_weights_matches_inference_on_the_whole_model():
    # infer_shapes hides weights from ONNX shape inference (speed); what it infers must not change, including
    # shapes that data propagation takes from short constants (Reshape target, Resize scales, Slice ends).
    from onnx import shape_inference

    from onnxcam.model.graph import infer_shapes, load_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 16, -1], np.int64), "shape"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([5], np.int64), "end"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Slice", ["r", "zero", "end", "axis2"], ["s"]),
             helper.make_node("Shape", ["s"], ["sh"]),
             helper.make_node("Reshape", ["s", "shape"], ["flat"]),
             helper.make_node("ReduceMean", ["flat"], ["y"], axes=[2], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    small = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    small.ir_version = 7
    for model in (small, load_model(MODEL)):
        before = model.SerializeToString()
        ours = infer_shapes(model)
        full = shape_inference.infer_shapes(model, data_prop=True)
        assert model.SerializeToString() == before
        assert {v.name: v for v in ours.graph.value_info} == {v.name: v for v in full.graph.value_info}
        assert list(ours.graph.output) == list(full.graph.output)
        assert list(ours.graph.initializer) == list(model.graph.initializer)
    flat = {v.name: v for v in infer_shapes(small).graph.value_info}["flat"]
    assert [d.dim_value for d in flat.type.tensor_type.shape.dim][1:] == [16, 80]  # 16 x (8->16 sliced to 5) x 16


def test_sessions_get_no_unused_initializers():
    # onnxruntime warns once per unused initializer on stderr; the Resize rule used to leave two behind.
    from onnxcam.run.runtime import _drop_unused_initializers

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["up"], mode="linear"),
             helper.make_node("GlobalAveragePool", ["up"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ex = Explainer(model, layer="r")  # the gradient goes back through the Resize
    used = {i for n in ex.model.graph.node for i in n.input}
    assert [t.name for t in ex.model.graph.initializer if t.name not in used] == []
    # the clean-up keeps what is read only by a subgraph or declared as a graph input
    then = helper.make_graph([helper.make_node("Add", ["x", "outer"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    g2 = helper.make_graph([helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then)], "g2",
                           [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                            helper.make_tensor_value_info("declared", TensorProto.FLOAT, [2])],
                           [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                           [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("outer", "declared", "unused")])
    m2 = helper.make_model(g2)
    _drop_unused_initializers(m2)
    assert [t.name for t in m2.graph.initializer] == ["outer", "declared"]
