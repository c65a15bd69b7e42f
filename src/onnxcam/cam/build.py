"""Builds the fused explain graph: forward + backward (score -> layers, and -> input for pixel methods)
+ CAM arithmetic, as one ONNX model; plus the small auxiliary graph of heatmaps computed outside it.

Fused graph interface (batch-leading, batch dynamic):
  inputs : the model's own inputs; the target, as the weights W of y = <W, score> (onnxcam/cam/targets.py):
           `onnxcam_target` int64 (N,) (a flat element's one-hot; -1 the argmax, -2 none), `onnxcam_weights`
           float, `onnxcam_select` and `onnxcam_group` bool (N, *score dims, or broadcastable);
           optionally `onnxcam_sign` float (1,) (+1, or -1 for counterfactual: negated gradients)
  outputs: `onnxcam_scores` (N, K) (the flattened score), `onnxcam_targets` (N,) (the flat index used),
           `onnxcam_target_scores` (N,) (y), `onnxcam_grad_peak_i` (N,) (max |dy/dA|), and by method kind
           gradient: `onnxcam_maps` (N, *layer spatial) and `onnxcam_heatmaps` (N, *input spatial),
                     per layer i `onnxcam_maps_i` and `onnxcam_weighted_i` (N, C, *spatial)
           eigen:    `onnxcam_weighted_i`
           perturbation: `onnxcam_activations_i` and `onnxcam_weights_used` (W); second-order (ShapleyCAM)
                     methods output both as well
           pixel:    as gradient, plus `onnxcam_guided` (like the input) and for guided-gradcam
                     `onnxcam_guided_gradcam`
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import methods
from .targets import ARGMAX
from ..autodiff import active_tensors, gradient
from ..errors import OnnxcamError
from ..model.graph import (Emitter, ModelView, ancestors, ensure_opset, head_nodes, infer_shapes, opset_version,
                           prune, subgraph_reads)
from ..model.layouts import LayerLayout, effective_rank, to_channels_first

TARGET = "onnxcam_target"  # int64 (N,): flat element whose one-hot is W (ARGMAX: the largest; NO_INDEX: none)
WEIGHTS = "onnxcam_weights"  # float (N, *score dims): added to W (a region's mask)
SELECT = "onnxcam_select"  # bool (N, *score dims): where the argmax part of W may be 1
GROUP = "onnxcam_group"  # bool (N, *score dims): the elements that argmax compares (over axis 1)
RANK = "onnxcam_rank"  # int64 (N,): in the ranked graph, which class by score ARGMAX stands for (0: the top)
SIGN = "onnxcam_sign"
SCORES = "onnxcam_scores"
TARGETS = "onnxcam_targets"
TARGET_SCORES = "onnxcam_target_scores"  # float (N,): y = <W, score> per sample
WEIGHTS_USED = "onnxcam_weights_used"  # float (N, *score dims): W, for methods that score perturbed inputs
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


def _seed(emit: Emitter, view: ModelView, score: str, sign_input: bool, ranked: bool = False):
    """The one seed: W shaped like the score, y = <W, score> per sample (samples do not interact, so one
    backward pass serves the whole batch). W = one-hot at the flat element `onnxcam_target` (ARGMAX: the largest;
    NO_INDEX: none) + `onnxcam_weights` + `onnxcam_select & (score == max over axis 1 of score where
    onnxcam_group)` (a predicted mask; an ultralytics box's best class). Returns (seed, W as float, outputs)."""
    st = view.elem_type(score)
    np_t = helper.tensor_dtype_to_np_dtype(st)
    as_f = (lambda t: t) if st == TensorProto.FLOAT else (lambda t: emit.op("Cast", [t], to=TensorProto.FLOAT))
    score2d = emit.op("Reshape", [score, emit.ints([0, -1])], hint="score2d")
    if ranked:  # the class ranked `onnxcam_rank`: TopK keeps ArgMax's tie-break (the lower index first)
        depth = emit.op("Add", [emit.reduce("ReduceMax", RANK, None, keepdims=1), emit.ints([1])])
        order = emit.op("TopK", [score2d, depth], n_out=2, axis=1, largest=1, sorted=1)[1]
        argmax = emit.squeeze(emit.op("GatherElements", [order, emit.unsqueeze(RANK, [1])], axis=1), [1])
    else:
        argmax = emit.op("ArgMax", [score2d], axis=1, keepdims=0, hint="argmax")
    index = emit.op("Where", [emit.op("Equal", [TARGET, emit.const(np.array(ARGMAX, np.int64))]), argmax, TARGET],
                    hint="target")
    zero_i = emit.const(np.array(0, np.int64), hint="zero_i")
    k = emit.op("Gather", [emit.shape_of(score2d), emit.const(np.array(1, np.int64))], axis=0)
    classes = emit.op("Range", [zero_i, k, emit.const(np.array(1, np.int64))], hint="classes")
    onehot = emit.op("Cast", [emit.op("Equal", [emit.unsqueeze(classes, [0]), emit.unsqueeze(index, [1])])], to=st)
    w = emit.op("Add", [emit.op("Reshape", [onehot, emit.shape_of(score)]),
                        WEIGHTS if st == TensorProto.FLOAT else emit.op("Cast", [WEIGHTS], to=st)], hint="weights")
    if (view.rank(score) or 0) >= 2:
        masked = emit.op("Where", [GROUP, score, emit.const(np.array(-np.inf, np_t), hint="neg_inf")])
        top = emit.reduce("ReduceMax", masked, [1], keepdims=1)
        hit = emit.op("And", [SELECT, emit.op("Equal", [score, top])], hint="argmax_hit")
        w = emit.op("Add", [w, emit.op("Cast", [hit], to=st)], hint="weights")
    seed = w
    if sign_input:
        sign = emit.op("Cast", [SIGN], to=st) if st != TensorProto.FLOAT else SIGN
        seed = emit.op("Mul", [w, sign], hint="signed_weights")
    w_f = as_f(w)
    y = emit.reduce("ReduceSum", emit.op("Reshape", [emit.op("Mul", [w_f, as_f(score)]), emit.ints([0, -1])]),
                    [1], keepdims=0)
    outputs = [(as_f(score2d), SCORES, TensorProto.FLOAT, ["N", "K"]), (index, TARGETS, TensorProto.INT64, ["N"]),
               (y, TARGET_SCORES, TensorProto.FLOAT, ["N"])]
    return seed, w_f, outputs


def target_inputs(view: ModelView, score: str) -> list[onnx.ValueInfoProto]:
    """The fused graph's target inputs. The weights' dims are symbolic even where the score's are static, so
    that (N, 1, ..., 1) arrays (all zero: a class target) broadcast."""
    rank = view.rank(score)
    dims = None if rank is None else ["N", *[f"S{i}" for i in range(rank - 1)]]
    return [helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info(WEIGHTS, TensorProto.FLOAT, dims),
            helper.make_tensor_value_info(SELECT, TensorProto.BOOL, dims),
            helper.make_tensor_value_info(GROUP, TensorProto.BOOL, dims)]


def weights_as_constants(model: onnx.ModelProto, rank: int) -> None:
    """An exported graph keeps only its class index input: zero weights and no selection become constants."""
    zeros = {WEIGHTS: np.zeros([1] * rank, np.float32), SELECT: np.zeros([1] * rank, bool),
             GROUP: np.zeros([1] * rank, bool)}
    keep = [i for i in model.graph.input if i.name not in zeros]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in zeros.items())


def _as_float(emit: Emitter, view: ModelView, name: str, like: str) -> str:
    # CAM arithmetic (means, ReLU, min-max) runs in float32 even for float16 models.
    return emit.op("Cast", [name], to=TensorProto.FLOAT) if view.elem_type(like) != TensorProto.FLOAT else name


def build_explain_graph(model: onnx.ModelProto, spec: Spec, *, sign_input: bool = True,
                        keep_outputs: bool = False, ranked: bool = False) -> onnx.ModelProto:
    """Rewrites a (shape-inferred, private) copy of `model` into the fused explain graph described above.
    `model` itself is left untouched: callers keep it for the other graphs they derive from it. `ranked`: an
    `onnxcam_rank` input says which class by score a target of -1 stands for (the graph of repeat_layers)."""
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

    seed, w_f, seed_outputs = _seed(emit, view, spec.score, sign_input, ranked)
    for tensor, name, elem_type, shape in seed_outputs:
        output(tensor, name, elem_type, shape)
    if method.kind == "perturbation" or method.second_order:
        output(w_f, WEIGHTS_USED, f32, None)
    target_inputs_ = target_inputs(view, spec.score)
    layer_dims = [["N", f"C{i}", *[f"h{i}_{d}" for d in range(r - 2)]] for i, r in enumerate(ranks)]
    image_dims = ["N", *[f"H{d}" for d in range(image_rank - 2)]]

    if method.kind == "perturbation":
        for i, layer in enumerate(spec.layers):
            acts = to_channels_first(emit, _as_float(emit, view, layer, layer), layouts[i], raw_ranks[i])
            output(acts, activations_name(i), f32, layer_dims[i])
    else:
        grads = {}
        if method.needs_gradients:
            grads = gradient(model, of=spec.score, wrt=list(spec.layers), seed=seed, emit=emit, one_hot_seed=True)
        cams = []
        for i, layer in enumerate(spec.layers):
            # The same relabelling of activations and gradients: exactly the channels-first view's gradient.
            acts = to_channels_first(emit, _as_float(emit, view, layer, layer), layouts[i], raw_ranks[i])
            g = to_channels_first(emit, _as_float(emit, view, grads[layer], layer), layouts[i], raw_ranks[i]) \
                if grads else acts
            if grads:
                # max |dy/dA| per sample: exactly 0 when the score does not depend on the layer at all, which
                # the Explainer reports instead of handing back a blank map as if it were an answer.
                spread = emit.broadcast_of(g)  # a tensor repeated along some axes has its source's peak
                peak = emit.reduce("ReduceMax", emit.op("Reshape", [emit.op("Abs", [spread[0] if spread else g]),
                                                                    emit.ints([0, -1])]), [1], keepdims=0)
                output(peak, grad_peak_name(i), f32, ["N"])
            if method.second_order:  # H A comes from the head run on these activations
                output(acts, activations_name(i), f32, layer_dims[i])
            weighted = method.weighting(emit, acts, g, ranks[i]) if method.weighting else methods.gradcam(
                emit, acts, g, ranks[i])
            output(weighted, weighted_name(i), f32, layer_dims[i])  # eigen methods and eigen_smooth read it
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
                              relu_mode=method.relu_mode, relu_ops=spec.guided_ops, one_hot_seed=True)[spec.image]
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

    present = {i.name for i in graph.input}  # repeat_layers declared the target input already
    graph.input.extend(t for t in target_inputs_ if t.name not in present)
    if ranked:
        graph.input.append(helper.make_tensor_value_info(RANK, TensorProto.INT64, ["N"]))
    if sign_input:
        graph.input.append(helper.make_tensor_value_info(SIGN, TensorProto.FLOAT, [1]))
    if not keep_outputs:
        del graph.output[:]
    graph.output.extend(outputs)
    # onnxruntime runs a node whose output nothing reads: drop those (a gradient a shortcut made unused, the
    # model's other outputs); the inputs stay, the caller feeds them by name.
    prune(model, [o.name for o in graph.output], nodes_only=True)
    return model


def repeat_layers(model: onnx.ModelProto, layers: Sequence[str], score: str, image: str) -> tuple[onnx.ModelProto, tuple]:
    """Several targets per sample for the price of one forward: the part of the graph after the layers (the
    head) runs on each layer's activations repeated K times per sample, K = rows of `onnxcam_target` / samples,
    so one run explains K targets of each of N samples as N*K rows (sample-major), and the trunk before the
    layers runs once. Returns the rewritten copy and the repeated layers' names, which the fused graph explains
    (their gradients are the K per-target gradients). Refuses (OnnxcamError, the reason) where the head reads
    something else that carries the samples in a way the repetition cannot follow: the caller then runs the
    targets one after the other."""
    view = ModelView(model)
    head = head_nodes(view, layers, score)
    if any(subgraph_reads(n) for n in head):
        raise OnnxcamError("the head holds control flow (If/Loop/Scan)")
    batch = (view.shape(image) or [None])[0]
    if not isinstance(batch, str):
        raise OnnxcamError("the input's batch dimension is not symbolic")
    inputs_of_model = set(view.graph_inputs)
    produced_in_head = {o for n in head for o in n.output}
    outside = [i for n in head for i in n.input
               if i and i not in produced_in_head and i not in layers and i not in view.initializers]
    repeated, scaled = list(layers), []
    for t in dict.fromkeys(outside):
        if not (ancestors(view, [t]) & inputs_of_model):
            continue  # a constant of the graph
        shape = view.shape(t)
        if shape and shape[0] == batch:
            repeated.append(t)
            continue
        if _batch_size_first(view, t, batch) and all(
                n.op_type == "Reshape" and list(n.input).index(t) == 1 for n in head if t in n.input):
            scaled.append(t)  # `x.view(x.size(0), -1)`: the shape's first element is the number of samples
            continue
        raise OnnxcamError(f"the head reads '{t}', which depends on the input without a batch axis first")
    for layer in layers:
        shape = view.shape(layer)
        if not shape or shape[0] != batch:
            raise OnnxcamError(f"layer '{layer}' does not hold the samples on its first axis")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    emit = Emitter.for_model(model)
    # K, once, from the image: its first axis holds the N samples the layers hold (checked above)
    samples = emit.op("Gather", [emit.shape_of(image), emit.const(np.array([0], np.int64))], axis=0)
    k = emit.op("Div", [emit.op("Shape", [TARGET]), samples], hint="repeats")
    front, emit.nodes = emit.nodes, []
    renamed, after = {}, {}  # after: tensor -> the nodes repeating it, placed right after its producer
    for t in repeated:
        rank = view.rank(t)
        tiled = emit.op("Expand", [emit.unsqueeze(t, [1]), emit.op("Concat", [emit.ints([1]), k,
                                                                              emit.ints([1] * (rank - 1))], axis=0)])
        rest = emit.op("Slice", [emit.shape_of(t), emit.ints([1]), emit.ints([rank])])
        renamed[t] = emit.op("Reshape", [tiled, emit.op("Concat", [emit.ints([-1]), rest], axis=0)],
                             hint="repeated")
        after[t], emit.nodes = emit.nodes, []
    for t in scaled:
        first = emit.op("Mul", [emit.op("Slice", [t, emit.ints([0]), emit.ints([1])]), k])
        renamed[t] = emit.op("Concat", [first, emit.op("Slice", [t, emit.ints([1]), emit.ints([2 ** 62])])], axis=0,
                             hint="repeated_shape")
        after[t], emit.nodes = emit.nodes, []
    head_ids = {id(n) for n in head}
    nodes = front + [n for t in repeated if t not in view.producer for n in after[t]]  # graph inputs: first
    for node in view.graph.node:
        if id(node) in head_ids and any(i in renamed for i in node.input):
            node_copy = onnx.NodeProto()
            node_copy.CopyFrom(node)
            node_copy.input[:] = [renamed.get(i, i) for i in node.input]
            node = node_copy
        nodes.append(node)
        nodes.extend(n for o in node.output if o in after for n in after[o])
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(emit.initializers)
    out.graph.input.append(helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["N"]))
    return out, tuple(renamed[layer] for layer in layers)


def _batch_size_first(view: ModelView, t: str, batch: str) -> bool:
    """Whether the 1-D int64 tensor `t` is [number of samples, ...] as `x.view(x.size(0), -1)` exports it:
    Concat(Unsqueeze(Gather(Shape(y), 0)), ...) (or a Slice [0:1] of the shape) with y holding the samples first."""
    node = view.producer.get(t)
    if node is None or node.op_type != "Concat" or view.rank(t) != 1:
        return False
    first = view.producer.get(node.input[0])
    if first is not None and first.op_type == "Unsqueeze":
        first = view.producer.get(first.input[0])
        if first is None or first.op_type != "Gather":
            return False
        index = view.constant_value(first.input[1])
        if index is None or index.size != 1 or int(index.reshape(-1)[0]) != 0:
            return False
    elif first is not None and first.op_type == "Slice":
        starts, ends = (view.constant_value(first.input[j]) if len(first.input) > j else None for j in (1, 2))
        if starts is None or ends is None or starts.reshape(-1).tolist() != [0] or ends.reshape(-1).tolist() != [1]:
            return False
    else:
        return False
    shape = view.producer.get(first.input[0])
    if shape is None or shape.op_type != "Shape" or any(a.name in ("start", "end") for a in shape.attribute):
        return False
    source = view.shape(shape.input[0])
    return bool(source) and source[0] == batch


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
