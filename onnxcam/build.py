"""Builds the fused explain graph: forward + backward (score -> layers, and -> input for pixel methods)
+ CAM arithmetic, as one ONNX model; plus the small auxiliary graphs some methods need.

Fused graph interface (batch-leading, batch dynamic):
  inputs : the model's own inputs, `onnxcam_target` int64 (N,) (-1 = argmax of the score),
           optionally `onnxcam_sign` float (1,) (+1, or -1 for counterfactual: negated gradients)
  outputs: `onnxcam_scores` (N, K), `onnxcam_targets` (N,), and by method kind
           gradient: `onnxcam_maps` (N, *layer spatial) and `onnxcam_heatmaps` (N, *input spatial),
                     per layer i `onnxcam_maps_i` and `onnxcam_weighted_i` (N, C, *spatial)
           eigen:    `onnxcam_weighted_i`
           perturbation: `onnxcam_activations_i`
           pixel:    as gradient, plus `onnxcam_guided` (like the input) and for guided-gradcam
                     `onnxcam_guided_gradcam`
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import methods
from .autodiff import active_tensors, gradient
from .errors import OnnxcamError
from .graph import Emitter, ModelView, ensure_opset, infer_shapes, opset_version
from .layouts import LayerLayout, effective_rank, to_channels_first

TARGET = "onnxcam_target"
SIGN = "onnxcam_sign"
SCORES = "onnxcam_scores"
TARGETS = "onnxcam_targets"
MAPS = "onnxcam_maps"
HEATMAPS = "onnxcam_heatmaps"
GUIDED = "onnxcam_guided"
GUIDED_GRADCAM = "onnxcam_guided_gradcam"


def weighted_name(i: int) -> str:
    return f"onnxcam_weighted_{i}"


def maps_name(i: int) -> str:
    return f"onnxcam_maps_{i}"


def activations_name(i: int) -> str:
    return f"onnxcam_activations_{i}"


def grad_peak_name(i: int) -> str:
    return f"onnxcam_grad_peak_{i}"


# Ops whose gradient rules need opset 16 (ScatterElements with reduction='add').
_NEEDS_OPSET_16 = {"MaxPool", "Gather", "GatherElements", "GatherND"}
# The ops whose backward Guided Backprop / deconvnet modify: the rectifiers, Relu and Clip (ReLU6), since
# the method suppresses negative gradients where a rectifier passes them. HardSwish and SiLU (Sigmoid*Mul)
# are not rectifiers (smooth, non-monotone near 0) and keep their true gradient. Captum's GuidedBackprop
# and pytorch-grad-cam modify nn.ReLU only; pass guided_ops=("Relu",) to reproduce them exactly on models
# with ReLU6 (MobileNetV2) -- with that choice a ReLU6-only model (EfficientNet-Lite) gets plain gradients.
DEFAULT_GUIDED_OPS = ("Relu", "Clip")


@dataclass(frozen=True)
class Spec:
    """Which tensors to explain and how."""

    image: str
    layers: tuple[str, ...]
    score: str
    method: str = "gradcam"
    layout: str = "NCHW"  # of the image input: where its spatial dims are
    guided_ops: tuple[str, ...] = DEFAULT_GUIDED_OPS
    layer_layouts: tuple[LayerLayout, ...] = ()  # per layer; empty: all channels-first

    def layouts(self) -> tuple[LayerLayout, ...]:
        return self.layer_layouts or tuple(LayerLayout() for _ in self.layers)


def _spatial_size(emit: Emitter, image: str, rank: int, layout: str) -> str:
    shape = emit.shape_of(image)
    if layout == "NHWC":
        return emit.op("Slice", [shape, emit.ints([1]), emit.ints([rank - 1])])
    return emit.op("Slice", [shape, emit.ints([2]), emit.ints([rank])])


def prepare(model: onnx.ModelProto, spec: Spec) -> onnx.ModelProto:
    """Upgrades the opset where the ops on the differentiated path need it, re-inferring shapes."""
    view = ModelView(model)
    sources = list(spec.layers) + ([spec.image] if methods.get_method(spec.method).kind == "pixel" else [])
    path = active_tensors(view, spec.score, sources)
    ops = {view.producer[t].op_type for t in path if t in view.producer}
    need = 16 if ops & _NEEDS_OPSET_16 else 11
    before = opset_version(model)
    model = ensure_opset(model, need)
    return infer_shapes(model) if opset_version(model) != before else model


def _seed(emit: Emitter, view: ModelView, score: str, sign_input: bool) -> tuple[str, str, str]:
    """(seed shaped like the score, score as float (N, K), resolved targets): a one-hot of the target per
    sample, since samples do not interact and one backward pass serves the whole batch."""
    score2d = emit.op("Reshape", [score, emit.ints([0, -1])], hint="score2d")
    score_t = view.elem_type(score)
    score_f = emit.op("Cast", [score2d], to=TensorProto.FLOAT, hint="scores") if score_t != TensorProto.FLOAT \
        else score2d
    argmax = emit.op("ArgMax", [score2d], axis=1, keepdims=0, hint="argmax")
    zero_i = emit.const(np.array(0, np.int64), hint="zero_i")
    target = emit.op("Where", [emit.op("Less", [TARGET, zero_i]), argmax, TARGET], hint="target")
    k = emit.op("Gather", [emit.shape_of(score2d), emit.const(np.array(1, np.int64))], axis=0)
    classes = emit.op("Range", [zero_i, k, emit.const(np.array(1, np.int64))], hint="classes")
    onehot = emit.op("Equal", [emit.unsqueeze(classes, [0]), emit.unsqueeze(target, [1])])
    seed2d = emit.op("Cast", [onehot], to=score_t, hint="onehot")
    if sign_input:
        sign = emit.op("Cast", [SIGN], to=score_t) if score_t != TensorProto.FLOAT else SIGN
        seed2d = emit.op("Mul", [seed2d, sign], hint="signed_seed")
    return emit.op("Reshape", [seed2d, emit.shape_of(score)], hint="seed"), score_f, target


def _as_float(emit: Emitter, view: ModelView, name: str, like: str) -> str:
    # CAM arithmetic (means, ReLU, min-max) runs in float32 even for float16 models.
    return emit.op("Cast", [name], to=TensorProto.FLOAT) if view.elem_type(like) != TensorProto.FLOAT else name


def build_explain_graph(model: onnx.ModelProto, spec: Spec, *, sign_input: bool = True,
                        keep_outputs: bool = False, weights_axis: int | None = None) -> onnx.ModelProto:
    """Rewrites a (shape-inferred, private) copy of `model` into the fused explain graph described above.
    `weights_axis` set: the seed is a per-sample weight tensor over the score instead of the one-hot
    (inputs `onnxcam_weights`/`_select`/`_group`, outputs the score in its own shape and
    `onnxcam_target_scores`; see onnxcam/targets.py, whose in-graph argmax runs over that axis).
    `model` itself is left untouched: callers keep it for the other graphs they derive from it."""
    method = methods.get_method(spec.method)
    private = onnx.ModelProto()
    private.CopyFrom(model)
    model = prepare(private, spec)
    view = ModelView(model)
    graph = model.graph
    emit = Emitter.for_model(model)
    raw_ranks = [view.rank(layer) for layer in spec.layers]
    image_rank = view.rank(spec.image)
    layouts = spec.layouts()
    for layer, rank in zip(spec.layers, raw_ranks):
        if rank is None or rank < 3:
            raise OnnxcamError(f"layer '{layer}' is not a feature map (rank {rank})")
    ranks = [effective_rank(lay, r) for lay, r in zip(layouts, raw_ranks)]
    for layer, rank in zip(spec.layers, ranks):
        if image_rank is not None and rank != image_rank:
            raise OnnxcamError(f"layer '{layer}' has rank {rank} but the input has rank {image_rank}: its "
                               f"spatial dims cannot be mapped onto the input's")
    outputs: list[onnx.ValueInfoProto] = []
    f32 = TensorProto.FLOAT

    def output(tensor: str, name: str, elem_type: int, shape) -> None:
        emit.op("Identity", [tensor], outputs=[name])
        outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    if weights_axis is None:
        seed, score_f, target = _seed(emit, view, spec.score, sign_input)
        output(score_f, SCORES, f32, ["N", "K"])
        output(target, TARGETS, TensorProto.INT64, ["N"])
        target_inputs = [helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["N"])]
    else:
        from .targets import weighted_seed

        seed, target_outputs, target_inputs = weighted_seed(emit, view, spec.score, weights_axis, sign_input)
        for tensor, name, elem_type, shape in target_outputs:
            output(tensor, name, elem_type, shape)
    layer_dims = [["N", f"C{i}", *[f"h{i}_{d}" for d in range(r - 2)]] for i, r in enumerate(ranks)]
    image_dims = ["N", *[f"H{d}" for d in range(image_rank - 2)]]

    if method.kind == "perturbation":
        for i, layer in enumerate(spec.layers):
            acts = to_channels_first(emit, _as_float(emit, view, layer, layer), layouts[i], raw_ranks[i])
            output(acts, activations_name(i), f32, layer_dims[i])
    else:
        grads = {}
        if method.needs_gradients:
            grads = gradient(model, of=spec.score, wrt=list(spec.layers), seed=seed, emit=emit)
        cams = []
        for i, layer in enumerate(spec.layers):
            # The same relabelling of activations and gradients: exactly the channels-first view's gradient.
            acts = to_channels_first(emit, _as_float(emit, view, layer, layer), layouts[i], raw_ranks[i])
            g = to_channels_first(emit, _as_float(emit, view, grads[layer], layer), layouts[i], raw_ranks[i]) \
                if grads else acts
            if grads:
                # max |dy/dA| per sample: exactly 0 when the score does not depend on the layer at all, which
                # the Explainer reports instead of handing back a blank map as if it were an answer.
                peak = emit.reduce("ReduceMax", emit.op("Reshape", [emit.op("Abs", [g]), emit.ints([0, -1])]),
                                   [1], keepdims=0)
                output(peak, grad_peak_name(i), f32, ["N"])
            weighted = method.weighting(emit, acts, g, ranks[i]) if method.weighting else methods.gradcam(
                emit, acts, g, ranks[i])
            output(weighted, weighted_name(i), f32, layer_dims[i])
            if method.kind != "eigen":
                cam = methods.cam_from_weighted(emit, weighted)
                output(cam, maps_name(i), f32, layer_dims[i][:1] + layer_dims[i][2:])
                cams.append(cam)
        if cams:
            emit.op("Identity", [cams[0]], outputs=[MAPS])
            outputs.append(helper.make_tensor_value_info(MAPS, f32, layer_dims[0][:1] + layer_dims[0][2:]))
            size = _spatial_size(emit, spec.image, image_rank, spec.layout)
            output(_combine(emit, cams, ranks, size, image_rank), HEATMAPS, f32, image_dims)
        if method.kind == "pixel":
            guided = gradient(model, of=spec.score, wrt=[spec.image], seed=seed, emit=emit,
                              relu_mode=method.relu_mode, relu_ops=spec.guided_ops)[spec.image]
            guided = _as_float(emit, view, guided, spec.image)
            in_shape = ["N", *[f"D{d}" for d in range(image_rank - 1)]]
            output(guided, GUIDED, f32, in_shape)
            if spec.method == "guided-gradcam":
                # Paper: Guided Backprop times the bilinearly upsampled raw Grad-CAM (as Captum's
                # GuidedGradCam with interpolate_mode="bilinear").
                up = methods.upsample(emit, cams[0], _spatial_size(emit, spec.image, image_rank, spec.layout))
                up = emit.unsqueeze(up, [image_rank - 1 if spec.layout == "NHWC" else 1])
                output(emit.op("Mul", [guided, up]), GUIDED_GRADCAM, f32, in_shape)
    emit.commit(model)

    graph.input.extend(target_inputs)
    if sign_input:
        graph.input.append(helper.make_tensor_value_info(SIGN, TensorProto.FLOAT, [1]))
    if not keep_outputs:
        del graph.output[:]
    graph.output.extend(outputs)
    return model


def _combine(emit: Emitter, cams: Sequence[str], ranks: Sequence[int], size: str, image_rank: int) -> str:
    """Heatmap from one or several layers' maps, as pytorch-grad-cam aggregates target layers: per layer
    scale to [0, 1] and resize to the input, average, scale again."""
    if len(cams) == 1:
        return methods.heatmap(emit, cams[0], ranks[0] - 1, size)
    ups = [emit.unsqueeze(methods.upsample(emit, methods.normalize(emit, c, r - 1), size), [1])
           for c, r in zip(cams, ranks)]
    mean = emit.reduce("ReduceMean", emit.op("Concat", ups, axis=1), [1], keepdims=0)
    return methods.normalize(emit, mean, image_rank - 1)


def build_postprocess_graph(ranks: Sequence[int], image_rank: int, opset: int = 17,
                            ir_version: int = 8) -> onnx.ModelProto:
    """Maps computed outside the fused graph (eigen methods, Score-CAM ...) -> heatmaps, with the same
    nodes as the fused graph. Inputs `map_i` (N, *spatial) float, `size` int64 (spatial dims)."""
    emit = Emitter(opset=opset, taken=set())
    cams = [f"map_{i}" for i in range(len(ranks))]
    heat = _combine(emit, cams, ranks, "size", image_rank)
    emit.op("Identity", [heat], outputs=[HEATMAPS])
    inputs = [helper.make_tensor_value_info(c, TensorProto.FLOAT, ["N", *[f"h{i}_{d}" for d in range(r - 2)]])
              for i, (c, r) in enumerate(zip(cams, ranks))]
    inputs.append(helper.make_tensor_value_info("size", TensorProto.INT64, [image_rank - 2]))
    graph = helper.make_graph(emit.nodes, "onnxcam_postprocess", inputs,
                              [helper.make_tensor_value_info(HEATMAPS, TensorProto.FLOAT,
                                                             ["N", *[f"H{d}" for d in range(image_rank - 2)]])],
                              emit.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model
