"""Quirks of real exported ONNX files (issue #12), each reduced to a crafted minimal model.

  negative dims   older paddle2onnx writes `dim_value: -1` for a dynamic dim (rapidocr's
                  ch_ppocr_mobile_v2.0_cls_infer.onnx: input (-1, 3, ?, ?)); read as a fixed size -1 it refused
                  every input.
  opset 11/12     Paddle's opset-11/12 exports with dynamic H, W: un-broadcasting an Add gradient needed
                  ReduceSum with axes as an input (opset 13); and shape inference gives up after a computed
                  Reshape, leaving later tensors without a rank, which the layer choice and the rules need
                  (rapidocr's ch_PP-OCRv4_rec_infer.onnx / ch_PP-OCRv4_det_infer.onnx).
  control flow    If / Loop bodies that read a differentiated tensor from the outer scope: that gradient path
                  was dropped without a word (a wrong map); now refused with one line naming the node.

Maps are checked against Grad-CAM computed here in float64 numpy from the weights (the heads are GAP + a
linear layer, so alpha_k = W[c, k] / (h w) exactly), never against onnxcam itself.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from onnxcam import Explainer
from onnxcam.errors import OnnxcamError
from onnxcam.model.graph import ModelView, dims_of, infer_shapes
from tests.adjoint import check_vjp

F32 = TensorProto.FLOAT
# onnxcam runs float32; against the float64 reference the maps of these O(1) models differ by ~1e-7 relative
# (rounding). A dropped or wrong gradient path, a wrong layer or a wrong alpha is O(0.1 .. 1).
MAPS_RTOL = 1e-5


def _rng(seed=0):
    return np.random.default_rng(seed)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _conv_np(x, w, b):
    """Stride-1 'same' conv (odd kernel) in float64."""
    k = w.shape[2]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    h, wd = x.shape[2:]
    out = np.zeros((x.shape[0], w.shape[0], h, wd)) + b.reshape(1, -1, 1, 1)
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out


def _gradcam_gap_linear(feat, w_head, targets):
    """Grad-CAM of score_c = sum_k w_head[c, k] mean_ij feat[k, i, j] (+ bias): alpha_k = w_head[c, k] / (h w)."""
    hw = feat.shape[2] * feat.shape[3]
    alpha = w_head[targets] / hw  # (N, C)
    return np.maximum(np.einsum("nc,nchw->nhw", alpha, feat), 0.0)


def _rel_l2(a, ref):
    return float(np.linalg.norm((np.asarray(a, np.float64) - ref).ravel()) / np.linalg.norm(ref.ravel()))


def _model(nodes, inputs, outputs, inits, opset, ir=7):
    g = helper.make_graph(nodes, "quirk", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


class Weights:
    def __init__(self, seed=0, c_in=3, c1=4, c2=6, k=5):
        r = _rng(seed)
        self.w1 = r.standard_normal((c1, c_in, 3, 3)).astype(np.float32) * 0.5
        self.b1 = r.standard_normal(c1).astype(np.float32) * 0.1
        self.w2 = r.standard_normal((c2, c1, 3, 3)).astype(np.float32) * 0.5
        self.b2 = r.standard_normal(c2).astype(np.float32) * 0.1
        self.fc = r.standard_normal((k, c2)).astype(np.float32)  # (classes, channels)
        self.fb = r.standard_normal(k).astype(np.float32) * 0.1

    def feat(self, x):
        x = x.astype(np.float64)
        a = np.maximum(_conv_np(x, self.w1.astype(np.float64), self.b1.astype(np.float64)), 0)
        return np.maximum(_conv_np(a, self.w2.astype(np.float64), self.b2.astype(np.float64)), 0)

    def logits(self, x):
        return self.feat(x).mean(axis=(2, 3)) @ self.fc.T.astype(np.float64) + self.fb

    def inits(self):
        return [_init("w1", self.w1), _init("b1", self.b1), _init("w2", self.w2), _init("b2", self.b2),
                _init("fc", self.fc), _init("fcT", self.fc.T), _init("fb", self.fb)]


def _backbone(reshape_between=False):
    """x -> conv1 -> relu 'a1' [-> Reshape to its own shape, computed through a float Cast: ONNX shape
    inference loses the rank there] -> conv2 -> relu 'feat'."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"])]
    src = "a1"
    if reshape_between:
        nodes += [helper.make_node("Shape", ["a1"], ["s"]),
                  helper.make_node("Cast", ["s"], ["sf"], to=F32),
                  helper.make_node("Cast", ["sf"], ["si"], to=TensorProto.INT64),
                  helper.make_node("Reshape", ["a1", "si"], ["a1r"])]
        src = "a1r"
    nodes += [helper.make_node("Conv", [src, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c2"], ["feat"])]
    return nodes


def _gap_head(src="feat", out="pooled"):
    return [helper.make_node("GlobalAveragePool", [src], ["gap"]),
            helper.make_node("Flatten", ["gap"], [out])]


# --------------------------------------------------------------------------- (a) dim_value -1


def _neg_dim_model(dims):
    w = Weights(1)
    nodes = _backbone() + _gap_head() + [helper.make_node("Gemm", ["pooled", "fc", "fb"], ["logits"], transB=1)]
    x = helper.make_tensor_value_info("x", F32, dims)
    return _model(nodes, [x], [helper.make_tensor_value_info("logits", F32, [dims[0], 5])], w.inits(), 11), w


@pytest.mark.parametrize("batch", [-1, 0])
def test_dims_of_reads_nonpositive_input_dims_as_dynamic(batch):
    m, _ = _neg_dim_model([batch, 3, 8, 8])  # the output is declared (batch, 5) too
    if batch < 0:
        assert dims_of(m.graph.input[0].type) == [None, 3, 8, 8]
    view = ModelView(infer_shapes(m))
    assert view.shape("x") == [None, 3, 8, 8]
    # Inference saw a dynamic batch, not -1 / 0 (which it used to copy into every tensor's shape).
    for name, rest in (("feat", [6, 8, 8]), ("logits", [5])):
        assert not isinstance(view.shape(name)[0], int), (name, view.shape(name))
        assert view.shape(name)[1:] == rest


@pytest.mark.parametrize("dims", [[-1, 3, 8, 8], [-1, 3, -1, -1], [0, 3, 8, 8]],
                         ids=["batch-1", "all-1", "batch0"])
def test_negative_dim_value_inputs_are_dynamic(dims):
    m, w = _neg_dim_model(dims)
    ex = Explainer(m)
    assert ex.layer == "feat"
    x = _rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    r = ex.explain(x, targets=[1, 3])
    np.testing.assert_allclose(r.scores, w.logits(x), rtol=0, atol=1e-5)
    ref = _gradcam_gap_linear(w.feat(x), w.fc.astype(np.float64), np.array([1, 3]))
    assert _rel_l2(r.maps, ref) < MAPS_RTOL
    # The preprocessing reads the static H, W and no fixed batch size.
    if dims[2] == 8:
        assert tuple(ex.preprocessing().size) == (8, 8)


# --------------------------------------------------------------------------- (b) opset 11/12, dynamic shapes

# (shape a, dynamic dims of a, shape b, dynamic dims of b): each needs the run-time un-broadcast.
DYNAMIC_CASES = [
    ((2, 3, 4, 5), {0: "N", 2: "H"}, (3, 1, 1), {1: "one"}),
    ((2, 3, 4, 5), {0: "N", 2: "H", 3: "W"}, (2, 3, 4, 5), {0: "M", 2: "P", 3: "Q"}),  # det's FPN Add
    ((3, 1), {0: "C"}, (2, 3, 4), {0: "N", 2: "W"}),
    ((2, 1, 4), {0: "N", 1: "one", 2: "W"}, (2, 3, 1), {0: "N", 2: "one"}),
]


@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize("op", ["Add", "Mul", "Div"])
def test_broadcast_gradient_with_dynamic_shapes_before_opset13(op, opset):
    r = _rng(7)
    for i, (sa, da, sb, db) in enumerate(DYNAMIC_CASES):
        a = r.uniform(0.5, 2.0, sa)
        b = r.uniform(0.5, 2.0, sb)
        check_vjp(op, {"a": a, "b": b}, opset=opset, dynamic={"a": da, "b": db}, seed=i)


def test_broadcast_gradient_max_matmul_prelu_before_opset13():
    r = _rng(8)
    a = r.uniform(-2, 2, (2, 3, 4))
    b = r.uniform(-2, 2, (3, 1)) + 0.05  # no ties with a
    check_vjp("Max", {"a": a, "b": b}, opset=11, dynamic={"a": {0: "N", 2: "W"}, "b": {0: "C", 1: "one"}})
    # MatMul's batch broadcast: the 'one' axis of a and the 'B' axis of b are each decided at run time.
    ma, mb = r.uniform(-1, 1, (2, 1, 3, 4)), r.uniform(-1, 1, (5, 4, 2))
    check_vjp("MatMul", {"a": ma, "b": mb}, opset=12, dynamic={"a": {0: "N", 1: "one"}, "b": {0: "B"}})
    slope = r.uniform(0.1, 0.5, (3, 1)).astype(np.float32)  # onnxruntime's PRelu-9 has no double kernel
    check_vjp("PRelu", {"x": a.astype(np.float32), "slope": slope}, opset=11,
              dynamic={"x": {0: "N", 2: "W"}, "slope": {1: "one"}})


def _rec_like_model(opset):
    """Paddle recogniser in miniature: dynamic batch, H and W; a computed Reshape that ends ONNX shape
    inference; a MatMul + bias-Add head (Paddle's Linear) at opset 11/12."""
    w = Weights(2)
    nodes = _backbone(reshape_between=True) + _gap_head() + [
        helper.make_node("MatMul", ["pooled", "fcT"], ["mm"]),
        helper.make_node("Add", ["mm", "fb"], ["logits"])]
    x = helper.make_tensor_value_info("x", F32, ["p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1",
                                                 "p2o.DynamicDimension.2"])
    return _model(nodes, [x], [helper.make_tensor_value_info("logits", F32, None)], w.inits(), opset), w


@pytest.mark.parametrize("opset", [11, 12])
def test_rank_recovery_and_bias_add_with_dynamic_dims(opset):
    m, w = _rec_like_model(opset)
    plain = shape_inference.infer_shapes(m, data_prop=True)
    before = {vi.name: dims_of(vi.type) for vi in plain.graph.value_info}
    assert dims_of(next(vi.type for vi in plain.graph.value_info if vi.name == "si")) is not None
    assert "feat" not in before or before["feat"] is None  # the quirk: no rank after the Reshape
    view = ModelView(infer_shapes(m))
    for name in ("a1r", "c2", "feat", "gap", "pooled", "mm"):
        assert view.rank(name) == {"pooled": 2, "mm": 2}.get(name, 4), name
    # Dims no probe changes are static (channels, the pooled 1x1); the one that follows the batch gets the
    # image batch's symbol (so the score's sample axis can be found); H, W stay unknown.
    n = "p2o.DynamicDimension.0"
    assert view.shape("feat") == [n, 6, None, None]
    assert view.shape("gap") == [n, 6, 1, 1]
    assert view.shape("logits") == [n, 5]
    # Rank recovery only fills gaps: what inference found stays as it was.
    for name, dims in before.items():
        if dims is not None:
            assert view.shape(name) == dims, name
    ex = Explainer(m)
    assert ex.layer == "feat"
    x = _rng(3).standard_normal((2, 3, 6, 10)).astype(np.float32)
    r = ex.explain(x, targets=[0, 4])
    np.testing.assert_allclose(r.scores, w.logits(x), rtol=0, atol=1e-5)
    ref = _gradcam_gap_linear(w.feat(x), w.fc.astype(np.float64), np.array([0, 4]))
    assert _rel_l2(r.maps, ref) < MAPS_RTOL


def test_guided_backprop_through_dynamic_add_opset12():
    """An FPN-style Add of two maps whose dims are unrelated symbols (as after Paddle's Resize) on the image ->
    score path, as in PP-OCRv4 det: Guided Backprop differentiates it back to the image. The model has no
    ReLU, so the guided gradient is the plain gradient: checked against float64 central differences."""
    r = _rng(11)
    wa = r.standard_normal((4, 3, 1, 1)).astype(np.float32)
    wb = r.standard_normal((4, 3, 1, 1)).astype(np.float32)
    fc = r.standard_normal((5, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ca"]),
             helper.make_node("Conv", ["x", "wb"], ["cb"]),
             helper.make_node("AveragePool", ["cb"], ["pb"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Resize", ["pb", "roi", "scales"], ["ub"], mode="nearest"),
             helper.make_node("Add", ["ca", "ub"], ["sum"]),
             helper.make_node("Conv", ["sum", "wc"], ["feat"]),
             ] + _gap_head() + [helper.make_node("Gemm", ["pooled", "fc"], ["logits"], transB=1)]
    wc = np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)
    inits = [_init("wa", wa), _init("wb", wb), _init("wc", wc), _init("fc", fc),
             _init("roi", np.zeros(0)), _init("scales", [1, 1, 2, 2])]
    x_vi = helper.make_tensor_value_info("x", F32, ["N", 3, "H", "W"])
    m = _model(nodes, [x_vi], [helper.make_tensor_value_info("logits", F32, None)], inits, 12)
    view = ModelView(infer_shapes(m))
    assert view.shape("ub")[2] != view.shape("ca")[2]  # unrelated symbols: the run-time un-broadcast
    ex = Explainer(m, method="guided-backprop")
    x = r.standard_normal((1, 3, 4, 6)).astype(np.float32)
    res = ex.explain(x, targets=[2])
    # Linear model: d logit_2 / dx = sum over the path, computed here in float64.
    x64 = x.astype(np.float64)

    def score(v):
        ca = np.einsum("oc,nchw->nohw", wa[:, :, 0, 0].astype(np.float64), v)
        cb = np.einsum("oc,nchw->nohw", wb[:, :, 0, 0].astype(np.float64), v)
        pb = cb.reshape(1, 4, 2, 2, 3, 2).mean(axis=(3, 5))
        ub = pb.repeat(2, axis=2).repeat(2, axis=3)
        return ((ca + ub).mean(axis=(2, 3)) @ fc.T.astype(np.float64))[0, 2]

    eps = 1e-6
    grad = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        d = np.zeros_like(x64)
        d[idx] = eps
        grad[idx] = (score(x64 + d) - score(x64 - d)) / (2 * eps)
    assert res.guided is not None
    got = np.asarray(res.guided, np.float64).reshape(grad.shape)
    assert _rel_l2(got, grad) < MAPS_RTOL


# --------------------------------------------------------------------------- (c) control flow capturing


def _branch(name, nodes, out):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F32, None)])


def _if_model(reads_pooled: bool, nested: bool = False):
    """backbone -> GAP -> 'pooled' -> If -> Gemm. With `reads_pooled` the branches read 'pooled' from the
    outer scope (then: pooled * 2, else: pooled); otherwise they only produce a constant scale."""
    w = Weights(4)
    two = helper.make_tensor("two", F32, [], [2.0])
    if reads_pooled:
        then_nodes = [helper.make_node("Constant", [], ["k2"], value=two),
                      helper.make_node("Mul", ["pooled", "k2"], ["t_out"])]
        if nested:  # the capture sits one If deeper
            inner = helper.make_node("If", ["cond"], ["t_out"], name="inner_if",
                                     then_branch=_branch("ti", then_nodes, "t_out"),
                                     else_branch=_branch("ei", [helper.make_node("Identity", ["pooled"], ["t_out"])],
                                                         "t_out"))
            then_nodes = [inner]
        then_g = _branch("then", then_nodes, "t_out")
        else_g = _branch("else", [helper.make_node("Identity", ["pooled"], ["e_out"])], "e_out")
        nodes = _backbone() + _gap_head() + [
            helper.make_node("If", ["cond"], ["scaled"], name="pick_scale", then_branch=then_g, else_branch=else_g),
            # A second, direct path: dropping the If's share of the gradient gives a plausible, wrong map.
            helper.make_node("Add", ["scaled", "pooled"], ["mix"]),
            helper.make_node("Gemm", ["mix", "fc", "fb"], ["logits"], transB=1)]
    else:
        then_g = _branch("then", [helper.make_node("Constant", [], ["t_out"], value=two)], "t_out")
        three = helper.make_tensor("three", F32, [], [3.0])
        else_g = _branch("else", [helper.make_node("Constant", [], ["e_out"], value=three)], "e_out")
        nodes = _backbone() + _gap_head() + [
            helper.make_node("If", ["cond"], ["scale"], name="pick_scale", then_branch=then_g, else_branch=else_g),
            helper.make_node("Gemm", ["pooled", "fc", "fb"], ["lin"], transB=1),
            helper.make_node("Mul", ["lin", "scale"], ["logits"])]
    inits = w.inits() + [numpy_helper.from_array(np.array(True), "cond")]
    x = helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8])
    return _model(nodes, [x], [helper.make_tensor_value_info("logits", F32, None)], inits, 13), w


@pytest.mark.parametrize("nested", [False, True], ids=["if", "nested-if"])
def test_if_reading_the_differentiated_path_is_refused(nested):
    m, _ = _if_model(reads_pooled=True, nested=nested)
    with pytest.raises(OnnxcamError, match="If node 'pick_scale'") as info:
        Explainer(m, layer="feat")
    assert "\n" not in str(info.value)


def test_loop_reading_the_differentiated_path_is_refused():
    w = Weights(6)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["pooled"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("it", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("scan_out", F32, None)])
    nodes = _backbone() + _gap_head() + [
        helper.make_node("Loop", ["trip", "cond"], ["stacked"], name="once", body=body),
        helper.make_node("Squeeze", ["stacked", "ax0"], ["again"]),
        helper.make_node("Add", ["again", "pooled"], ["mix"]),
        helper.make_node("Gemm", ["mix", "fc", "fb"], ["logits"], transB=1)]
    inits = w.inits() + [numpy_helper.from_array(np.array(True), "cond"),
                         numpy_helper.from_array(np.array(1, np.int64), "trip"),
                         numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    x = helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8])
    m = _model(nodes, [x], [helper.make_tensor_value_info("logits", F32, None)], inits, 13)
    with pytest.raises(OnnxcamError, match="Loop node 'once'"):
        Explainer(m, layer="feat")


def test_if_off_the_differentiated_path_still_works():
    m, w = _if_model(reads_pooled=False)
    ex = Explainer(m)
    assert ex.layer == "feat"
    x = _rng(9).standard_normal((2, 3, 8, 8)).astype(np.float32)
    r = ex.explain(x, targets=[2, 0])
    np.testing.assert_allclose(r.scores, 2.0 * w.logits(x), rtol=0, atol=2e-5)
    ref = _gradcam_gap_linear(w.feat(x), 2.0 * w.fc.astype(np.float64), np.array([2, 0]))
    assert _rel_l2(r.maps, ref) < MAPS_RTOL
