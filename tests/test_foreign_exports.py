"""onnxcam on real exports from other frameworks: Keras via tf2onnx, PaddlePaddle via paddle2onnx.

The models in tests/data are written by tools/export_keras.py and tools/export_paddle.py (random seeded
weights, random BatchNorm statistics), each with an .npz holding a fixed batch of 2 inputs and the
framework's own outputs on it (`probs`, pre-softmax `logits`, and `feature`: the output of the framework layer
Grad-CAM is meant to explain). No TensorFlow or Paddle is needed here.

  keras_cnn       Conv/BN/ReLU + residual Add + DepthwiseConv, GlobalAveragePooling2D, Dense, Softmax layer;
                  NHWC input, Transposes, BN folded into Conv by tf2onnx except after the depthwise conv.
  keras_flatten   the Keras tutorial CNN: Conv-MaxPool-Conv-MaxPool-Flatten-Dropout-Dense(softmax); the
                  flatten is tf2onnx's Transpose-to-NHWC + Shape/Gather/Cast/Slice/Concat/Cast -> Reshape.
  keras_flatten_strided  Conv-MaxPool-Conv(stride 2)-Flatten-Dense(softmax): the Flatten reads tf2onnx's
                  NHWC Transpose of the last conv map.
  keras_pointwise_head   a Dense layer on the 4-D map before GlobalAveragePooling2D: tf2onnx's Tensordot
                  (Reshape-MatMul-Reshape) keeps the last feature map channels-last, (N, 15, 15, 32), pooled by
                  ReduceMean over axes [1, 2].
  keras_convnext  Keras's ConvNeXt block structure (LayerNormalization and Dense layers on channels-last maps,
                  decomposed by tf2onnx into ReduceMean/Sub/Mul/Sqrt/Reciprocal and Tensordot Reshapes),
                  GAP, LayerNormalization, Dense, softmax.
  paddle_mbv3     a MobileNetV3-small in miniature as PaddleClas builds it: un-fused BatchNormalization,
                  hardswish as x * HardSigmoid(x), squeeze-excitation gates, Identity nodes, dynamic batch/H/W,
                  a 1x1 conv + hardswish + Dropout (Mul) + Shape-driven Flatten head.

For each model, batch 2:
  forward  onnxruntime reproduces the framework's probabilities (max abs error <= 1e-5);
  layer    `Explainer(...).layer` is the last feature map before the spatial collapse, found structurally
           (see `expected_layer`) *and* numerically: its value is the framework's `feature` output;
  score    `.scores` are the framework's pre-softmax logits, softmax(scores) the model's output, and the
           scores are not the probabilities themselves;
  maps     `.maps` (argmax and a non-argmax target) equal a finite-difference Grad-CAM computed on the head
           subgraph (layer -> score) in float64 by onnx's reference evaluator, i.e. without onnxcam's gradient
           graph and without onnxruntime.

keras_pointwise_head's last feature map is channels-last (N, h, w, C): its maps must be (N, h, w) over the
positions, computed on the channels-first view. onnxcam finds that layout itself (onnxcam/layouts.py: the channel
axis survives the Tensordot's last-axis-keeping Reshapes, and the ReduceMean over axes [1, 2] confirms it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from onnxcam import Explainer

DATA = Path(__file__).resolve().parent / "data"

# onnxruntime vs the framework, float32 through <= 15 layers of O(1) activations: measured <= 8e-8 (probs),
# <= 5e-7 (logits; |logits| <= 2) and <= 5e-7 relative (features); a wrong tensor or a missing BatchNorm/bias
# differs by O(0.1 .. 1).
FORWARD_ATOL = 1e-5
FEATURE_RTOL = 1e-4  # of max |feature|
# Grad-CAM map vs the float64 finite-difference reference, relative L2. onnxcam computes in float32, so the map
# carries float32 rounding of the forward and backward passes (measured 8e-8 .. 5e-6); the reference's own error
# is float64 rounding plus the O(eps^2) truncation of central differences (eps = 1e-3 x the layer's RMS), both
# far below that. A wrong layer, channel axis, target, alpha normalisation (sum vs mean) or a wrong gradient rule
# gives O(0.1 .. 1).
MAPS_RTOL = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    input: str
    framework_layout: str  # of the framework's own feature maps (the .npz `feature`): NHWC or NCHW
    collapse_op: str  # the node that collapses the last feature map's spatial dims
    layer_producer: str  # op type that produces the expected layer (the last block's output)
    why: str  # why that tensor is the layer Grad-CAM should use


CASES = [
    Case("keras_cnn", "image", "NHWC", "GlobalAveragePool", "Relu",
         "the pointwise conv block's ReLU (Keras layer pw_relu) is what GlobalAveragePooling2D averages"),
    Case("keras_flatten", "image", "NHWC", "Reshape", "Relu",
         "conv2's ReLU: the final MaxPooling2D only subsamples it before Flatten, as VGG's last pool does"),
    Case("keras_flatten_strided", "image", "NHWC", "Reshape", "Relu",
         "conv2's ReLU, the map Flatten reads (through tf2onnx's Transpose back to NHWC)"),
    # The layer is channels-last here: (N, 15, 15, 32), pooled by ReduceMean over axes [1, 2].
    Case("keras_pointwise_head", "image", "NHWC", "ReduceMean", "Relu",
         "the per-position Dense layer's ReLU (Keras layer pw) is what GlobalAveragePooling2D averages"),
    Case("keras_convnext", "image", "NHWC", "GlobalAveragePool", "Add",
         "the last ConvNeXt block's residual sum (Keras layer s2b2_add) is what is globally pooled"),
    Case("paddle_mbv3", "x", "NCHW", "GlobalAveragePool", "Mul",
         "the last ConvBNLayer's hardswish (x * HardSigmoid(x)) feeds the head's AdaptiveAvgPool2D(1); "
         "the squeeze-excitation pools earlier only gate channels"),
]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def _run_with_outputs(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[np.ndarray]:
    """Runs `model` with extra graph outputs (typed from shape inference), at the model's own IR version:
    onnxruntime refuses the newer IR that current onnx writes by default."""
    inferred = shape_inference.infer_shapes(model)
    infos = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(infos[n] for n in names if n not in have)
    m.ir_version = model.ir_version
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def _to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64: float initializers, Constant values, Cast targets and graph I/O
    types become double (only the reference evaluator runs it, so no kernel has to exist in onnxruntime)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64),
                                                              init.name))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    return m


def expected_layer(model: onnx.ModelProto, case: Case) -> str:
    """The last feature map, read off the graph independently of onnxcam: the input of the last
    `collapse_op` node (in graph order: the one nearest the score), stepping back over Transposes (tf2onnx's
    layout changes) and a MaxPool (subsampling the last conv map, as VGG's last pool does, is not a new
    feature map)."""
    nodes = [n for n in model.graph.node if n.op_type == case.collapse_op]
    assert nodes, f"{case.name}: no {case.collapse_op} node"
    producer = {o: n for n in model.graph.node for o in n.output}
    t = nodes[-1].input[0]
    while t in producer and producer[t].op_type in ("Transpose", "MaxPool"):
        t = producer[t].input[0]
    return t


def finite_difference_gradcam(head: onnx.ModelProto, layer_value: np.ndarray, channel_axis: int,
                              targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, h, w), head scores (N, K)) from central differences on the head subgraph in float64.

    Grad-CAM's alpha_k = mean_ij dS/dA_kij is the derivative of S along 'add the same amount to every
    position of channel k', divided by the number of positions: alpha_k = (S(A + eps 1_k) - S(A - eps 1_k))
    / (2 eps h w) up to O(eps^2). All 2 x C perturbations of all N samples run as one batch (the head is
    per-sample, with a dynamic batch dimension).
    """
    head64 = ReferenceEvaluator(_to_float64(head))
    a = np.moveaxis(layer_value.astype(np.float64), channel_axis, 1)  # (N, C, h, w) view
    n, c = a.shape[:2]
    eps = 1e-3 * float(np.sqrt(np.mean(a ** 2)))
    bump = np.zeros((c, 1, c) + (1,) * (a.ndim - 2))  # bump[k] adds eps to all of channel k
    bump[np.arange(c), 0, np.arange(c)] = eps
    batch = np.concatenate([a[None] + bump, a[None] - bump]).reshape(2 * c * n, *a.shape[1:])
    name = head.graph.input[0].name
    scores = head64.run(None, {name: np.moveaxis(batch, 1, channel_axis)})[0].reshape(2, c, n, -1)
    picked = scores[:, :, np.arange(n), targets]  # (2, C, N)
    spatial = float(np.prod(a.shape[2:]))
    alpha = (picked[0] - picked[1]).T / (2 * eps * spatial)  # (N, C)
    maps = np.maximum(np.einsum("nc,nc...->n...", alpha, a), 0.0)
    base = head64.run(None, {name: layer_value.astype(np.float64)})[0]
    return maps, base


class Prepared:
    def __init__(self, case: Case):
        self.case = case
        self.path = DATA / f"{case.name}.onnx"
        self.model = onnx.load(str(self.path))
        ref = np.load(DATA / f"{case.name}.npz")
        self.x, self.probs, self.logits, self.feature = ref["x"], ref["probs"], ref["logits"], ref["feature"]
        self.explainer = Explainer(str(self.path))
        self.expected = expected_layer(self.model, case)
        out = self.model.graph.output[0].name
        self.ort_probs, self.layer_value = _run_with_outputs(self.model, {case.input: self.x},
                                                             [out, self.expected])
        # Which axis of the layer tensor holds the channels, decided by comparing with the framework's own
        # feature map rather than by onnxcam's layout detection (the shapes here are never square in H, W, C).
        if self.layer_value.shape == self.feature.shape:
            self.channel_axis = 3 if case.framework_layout == "NHWC" else 1
        else:
            assert self.layer_value.shape == np.moveaxis(self.feature, 3, 1).shape, "not the framework's feature map"
            self.channel_axis = 1
        head = onnx.utils.Extractor(shape_inference.infer_shapes(self.model)).extract_model(
            [self.expected], [self.explainer.score])
        head.ir_version = self.model.ir_version
        self.head = head


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def prepared(request) -> Prepared:
    return Prepared(request.param)


def test_onnx_reproduces_the_framework(prepared: Prepared):
    np.testing.assert_allclose(prepared.ort_probs, prepared.probs, rtol=0, atol=FORWARD_ATOL)


def test_layer_is_the_last_feature_map(prepared: Prepared):
    p, case = prepared, prepared.case
    nodes = {o: n for n in p.model.graph.node for o in n.output}
    assert nodes[p.expected].op_type == case.layer_producer, (case.why, nodes[p.expected].op_type)
    # The expected tensor, or a Transpose of it (tf2onnx's NHWC copy of the same map, which is what a Flatten
    # reads): the same feature map in another layout.
    chosen = p.explainer.layer
    same_map = chosen == p.expected or (chosen in nodes and nodes[chosen].op_type == "Transpose"
                                        and nodes[chosen].input[0] == p.expected)
    assert same_map, f"{case.name}: expected {p.expected} ({case.why}), got {chosen}"
    # The same tensor, numerically: the framework's output of that layer, in either layout.
    value = _run_with_outputs(p.model, {case.input: p.x}, [chosen])[0]
    if value.shape != p.feature.shape:
        perm = (0, 2, 3, 1) if case.framework_layout == "NHWC" else (0, 3, 1, 2)
        value = value.transpose(perm)
    assert value.shape == p.feature.shape
    err = np.abs(value - p.feature).max() / np.abs(p.feature).max()
    assert err <= FEATURE_RTOL, f"{case.name}: layer value differs from the framework's feature map by {err:.2e}"


def test_scores_are_the_pre_softmax_logits(prepared: Prepared):
    p = prepared
    r = p.explainer.explain(p.x)
    scale = np.abs(p.logits).max()
    np.testing.assert_allclose(r.scores, p.logits, rtol=0, atol=FORWARD_ATOL * scale)
    np.testing.assert_allclose(_softmax(r.scores.astype(np.float64)), p.ort_probs, rtol=0, atol=FORWARD_ATOL)
    # Not the probabilities: those sum to 1 and lie in [0, 1]; these logits do not.
    assert np.abs(r.scores - p.ort_probs).max() > 0.1
    np.testing.assert_array_equal(r.targets, p.logits.argmax(axis=1))


@pytest.mark.parametrize("which", ["argmax", "second"])
def test_maps_equal_finite_difference_gradcam(prepared: Prepared, which: str):
    p = prepared
    order = np.argsort(-p.logits, axis=1)
    targets = order[:, 0] if which == "argmax" else order[:, 1]  # "second": a non-argmax class
    r = p.explainer.explain(p.x, targets=[int(t) for t in targets])
    np.testing.assert_array_equal(r.targets, targets)
    ref, head_scores = finite_difference_gradcam(p.head, p.layer_value, p.channel_axis, targets)
    # The head really is the part of the model after the layer: at the layer's value it gives the scores.
    np.testing.assert_allclose(head_scores, r.scores, rtol=0, atol=FORWARD_ATOL * np.abs(r.scores).max())
    for i in range(len(targets)):  # an all-zero reference would make the comparison vacuous
        assert ref[i].max() > 0, f"{p.case.name}: reference map {i} is all zero; pick other targets"
    # (N, h, w) over the layer's spatial positions whatever the layer's layout: for a channels-last layer
    # (keras_pointwise_head) the CAM arithmetic must run on its channels-first view.
    assert r.maps.shape == ref.shape, (
        f"{p.case.name}: maps {r.maps.shape}, expected {ref.shape} (layer {p.explainer.layer} has its channels on "
        f"axis {p.channel_axis}; onnxcam's layout: {getattr(p.explainer, 'layer_layouts', '?')})")
    err = _rel_l2(r.maps, ref)
    print(f"{p.case.name} {which}: maps rel L2 error {err:.2e}")
    assert err <= MAPS_RTOL, f"{p.case.name} ({which} targets {targets.tolist()}): maps rel L2 error {err:.2e}"


def test_paddle_dynamic_input_size():
    """paddle2onnx keeps H and W dynamic: another input size (non-square, 8 x 6 feature map) explains too, and
    the maps still equal the finite-difference reference."""
    p = Prepared(next(c for c in CASES if c.name == "paddle_mbv3"))
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)
    probs, layer_value = _run_with_outputs(p.model, {"x": x}, [p.model.graph.output[0].name, p.expected])
    targets = np.array([probs[0].argmax(), np.argsort(-probs[1])[1]])  # argmax, and a non-argmax class
    r = p.explainer.explain(x, targets=[int(t) for t in targets])
    ref, head_scores = finite_difference_gradcam(p.head, layer_value, 1, targets)
    np.testing.assert_allclose(_softmax(head_scores), probs, rtol=0, atol=FORWARD_ATOL)
    assert ref.shape == (2, 8, 6) and all(m.max() > 0 for m in ref)
    assert r.maps.shape == ref.shape
    assert _rel_l2(r.maps, ref) <= MAPS_RTOL


def test_ablationcam_on_channels_first_and_channels_last_layers(prepared: Prepared):
    # Ablation-CAM recomputed from its definition on the float64 head: set channel k of the layer (all positions)
    # to the ablation value, weight_k = (S - S_k) / S, map = ReLU(sum_k weight_k A_k). keras_pointwise_head's
    # layer is channels-last, so onnxcam must ablate through its channels-first view.
    from onnxcam.cam.perturb import ablation_value

    ex = Explainer(str(prepared.path), method="ablationcam", layer=prepared.expected)
    r = ex.explain(prepared.x)
    head64 = ReferenceEvaluator(_to_float64(prepared.head))
    name = prepared.head.graph.input[0].name
    a = np.moveaxis(prepared.layer_value.astype(np.float64), prepared.channel_axis, 1)
    for s in range(len(a)):
        c = a.shape[1]
        batch = np.repeat(a[s][None], c, axis=0)
        batch[np.arange(c), np.arange(c)] = ablation_value(np.float32(a[s]))
        target = int(r.targets[s])
        ablated = head64.run(None, {name: np.moveaxis(batch, 1, prepared.channel_axis)})[0][:, target]
        original = head64.run(None, {name: np.moveaxis(a[s][None], 1, prepared.channel_axis)})[0][0, target]
        weights = (original - ablated) / original
        ref = np.maximum(np.einsum("c,c...->...", weights, a[s]), 0)
        assert np.abs(ref).max() > 0
        assert _rel_l2(r.maps[s], ref) < 1e-4, prepared.case.name
