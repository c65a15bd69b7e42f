"""Which tensors to explain: the score (pre-softmax logits) and the target layer.

Grad-CAM uses the last convolutional feature map, i.e. the last spatial tensor on the way to the score
before the spatial dimensions are collapsed. We find it structurally: walk back from the score to the
first node that shrinks a rank>=3 tensor (a global pool, a reduce, a pooling layer ...), then step back
over pooling and identity-like nodes. That lands on a conv's activation, a residual Add (+Relu) or a
Concat of branches, whatever the exporter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from onnx import TensorProto

from ..autodiff import active_tensors
from ..errors import OnnxcamError
from . import layouts
from .graph import Dim, Emitter, ModelView, attr as attr_of, prune, weightless_copy

# Ops that follow a softmax output without changing what it means.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
_SOFTMAX = {"Softmax", "LogSoftmax"}
# Shrinking a spatial tensor with these is "collapsing the spatial dims"; the layer is their input.
_POOLING = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool", "MaxPool", "LpPool",
            "ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "ReduceLogSumExp", "ReduceMin",
            "Slice", "Gather"}
# Pure relabelling: never a collapse, even when a batch-folding reshape hides the per-sample size.
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"}
# Learned per-token ops of a sequence head: behind them, the last feature map of the image's rank is the layer.
_SEQUENCE_HEADS = {"MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum"}
# Stepping back over these does not change which feature map is meant.
_SKIP_BACK = {"MaxPool", "AveragePool", "LpPool", "Identity", "Dropout"}
_FLOAT = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class LayerCandidate:
    name: str
    op: str
    shape: tuple
    spatial: tuple
    default: bool = False
    layout: str = "channels-first"


def image_input(view: ModelView) -> str:
    """The explained input: the first float input of rank >= 3 (the image)."""
    for name in view.graph_inputs:
        shape = view.shape(name)
        if view.elem_type(name) in _FLOAT and shape is not None and len(shape) >= 3:
            return name
    for name in view.graph_inputs:
        if view.elem_type(name) in _FLOAT:
            return name
    raise OnnxcamError("model has no floating-point input to explain")


def find_score(view: ModelView, output: str | None = None) -> str:
    """The model output to differentiate, moved before a trailing Softmax/LogSoftmax."""
    if output is None:
        if not view.graph_outputs:
            raise OnnxcamError("model has no outputs")
        output = view.graph_outputs[0]
        # Several heads (MTCNN: boxes, landmarks, face probability): the one that ends in a softmax is the
        # classifier a person explains, whichever comes first.
        softmaxed = [o for o in view.graph_outputs if _before_softmax(view, o) is not None]
        if len(view.graph_outputs) > 1 and len(softmaxed) == 1:
            output = softmaxed[0]
    elif output not in view.graph_outputs and output not in view.producer:
        raise OnnxcamError(f"unknown output '{output}'; model outputs: {', '.join(view.graph_outputs)}")
    return _before_softmax(view, output) or output


def _before_softmax(view: ModelView, output: str) -> str | None:
    """The input of the Softmax/LogSoftmax that `output` is (behind pass-through ops), else None."""
    t = output
    while (node := view.producer.get(t)) is not None:
        if node.op_type in _SOFTMAX:
            return node.input[0]
        if node.op_type not in _PASS_THROUGH:
            return None
        t = node.input[0]
    return None


def after_sigmoid(view: ModelView, score: str) -> bool:
    """Whether the score is a Sigmoid's probability (possibly relabelled), not a logit."""
    t = score
    while (node := view.producer.get(t)) is not None and node.op_type in _PASS_THROUGH | {"Transpose"}:
        t = node.input[0]
    return node is not None and node.op_type in ("Sigmoid", "HardSigmoid")


def path_tensors(view: ModelView, source: str, sink: str) -> set[str]:
    """Float tensors that depend on `source` and feed `sink`."""
    return active_tensors(view, sink, [source])


def _per_sample_size(shape: list[Dim] | None) -> float:
    if shape is None or len(shape) < 2:  # rank 0/1: the batch may be folded in; size unknown
        return math.inf
    dims = shape[1:]
    if all(isinstance(d, int) for d in dims):
        return float(math.prod(dims))
    return math.inf


def _spatial(shape: list[Dim] | None) -> tuple:
    return tuple(shape[2:]) if shape is not None and len(shape) >= 3 else ()


def _main_input(view: ModelView, node, path: set[str]) -> str | None:
    """The input through which the image reaches this node (the largest one if several)."""
    ins = [i for i in node.input if i in path]
    if not ins:
        return None
    return max(ins, key=lambda i: _per_sample_size(view.shape(i)))


def _dense(view: ModelView, score: str) -> bool:
    """A score with positions of its own (segmentation (N, K, H, W), detection (N, boxes, fields)), not a vector
    of class logits (possibly written as (N, K, 1, 1))."""
    shape = view.shape(score)
    return shape is not None and len(shape) >= 3 and any(d != 1 for d in shape[2:])


def _head_input(view: ModelView, image: str, score: str, path: set[str]) -> str | tuple[str, ...] | None:
    """Dense outputs are per-position predictions by a last conv (the segmentation classifier, the detection
    head) followed by resizing and reshaping: the feature map that conv reads is what Grad-CAM explains. None
    when something collapses the spatial dims first (then the score is a class vector after all). A score
    assembled from several branches before any conv (a detector's box and class fields, its strides) gets the
    feature maps those branches fork from: every element of the score passes one of them (see _branch_roots)."""
    t = score
    learned = False  # a sequence head (MatMul / RNN on tokens) was passed on the way back
    while (node := view.producer.get(t)) is not None and t != image:
        if learned and t != score and view.rank(t) == view.rank(image):
            # Sequence outputs (CRNN / CTC recognisers): the backbone's last map before it became a sequence.
            return t
        if node.op_type in _SEQUENCE_HEADS:
            learned = True
        if len([i for i in node.input if i in path]) > 1:
            roots = _branch_roots(view, image, t, path, {})
            if len(roots) == 1 and next(iter(roots)) not in (t, image) and not _is_map(view, next(iter(roots)), image):
                t = next(iter(roots))  # a local merge of one tensor's parts (YOLOv5's boxes and sigmoid scores)
                continue
            if roots and all(_is_map(view, r, image) for r in roots):
                return tuple(sorted(roots, key=_topo_order(view).get))
            return None
        x = _main_input(view, node, path)
        if x is None:
            return None
        if node.op_type == "Conv":  # a ConvTranspose upsamples a decoder's map (PP-OCR's DB head): walk on
            while (p := view.producer.get(x)) is not None and p.op_type in _SKIP_BACK:
                nxt = _main_input(view, p, path)
                if nxt is None or nxt == image:
                    break
                x = nxt
            return None if x == image else x
        if node.op_type in _POOLING and node.op_type not in ("Slice", "Gather"):
            return None
        t = x
    return None


def _batch_first_map(view: ModelView, t: str, image: str, path: set[str]) -> str:
    """A map permuted to put time first ((W, N, C, H) before a CRNN's LSTM) has lost its batch-first layout:
    the map is the Transpose's input."""
    while (p := view.producer.get(t)) is not None and p.op_type == "Transpose" \
            and list(attr_of(p, "perm") or [0])[0] != 0 and p.input[0] in path and p.input[0] != image:
        t = p.input[0]
    return t


def _has_positions(view: ModelView, t: str) -> bool:
    """A map with more than one position (not a pooled (N, C, 1, 1) vector)."""
    shape = view.shape(t)
    return shape is not None and any(d != 1 for d in shape[2:])


def _topo_order(view: ModelView) -> dict[str, int]:
    return {o: i for i, n in enumerate(view.graph.node) for o in n.output}


def _is_map(view: ModelView, t: str, image: str) -> bool:
    return t != image and view.rank(t) == view.rank(image) and view.rank(t) is not None and view.rank(t) >= 3


def _branch_roots(view: ModelView, image: str, t: str, path: set[str], memo: dict, top: bool = True) -> frozenset:
    """The feature maps a dense score's value is computed from. Walking back, a branch stops at the map the
    first conv reads (the dense rule: a per-position predictor reads its features), or at a map that also feeds
    another branch. Where inputs merge: one root for all is a local merge (DFL's arithmetic, YOLOv5's boxes and
    sigmoid scores); roots of one resolution are parallel branches of one stride (YOLOv8's box and class convs),
    replaced by the map they fork from; roots of several resolutions (strides concatenated along anchors) are
    kept together."""
    start = t
    while True:
        if t in memo:
            return memo[t]
        node = view.producer.get(t)
        if node is None or t == image:
            result = frozenset([t])
            break
        if (t != start or not top) and _is_map(view, t, image) and _path_consumers(view, t, path) > 1:
            result = frozenset([t])
            break
        ins = [i for i in dict.fromkeys(node.input) if i in path]
        if not ins:
            result = frozenset([t])
            break
        if node.op_type in ("Conv", "ConvTranspose") and _true_map(view, ins[0], image, path):
            x = ins[0]
            while (p := view.producer.get(x)) is not None and p.op_type in _SKIP_BACK:
                nxt = _main_input(view, p, path)
                if nxt is None or nxt == image:
                    break
                x = nxt
            result = frozenset([x])
            break
        if len(ins) == 1:
            t = ins[0]
            continue
        result = frozenset().union(*(_branch_roots(view, image, i, path, memo, top=False) for i in ins))
        if len(result) > 1 and all(_is_map(view, r, image) for r in result) \
                and len({tuple(view.shape(r)[2:]) for r in result}) == 1:
            fork = _nearest_common_ancestor(view, result, path)
            if fork is not None and _is_map(view, fork, image) and view.shape(fork)[2:] == view.shape(next(iter(result)))[2:]:
                result = frozenset([fork])
        break
    memo[start] = result
    return result


def _path_consumers(view: ModelView, t: str, path: set[str]) -> int:
    return sum(1 for c in view.consumers.get(t, ()) if any(o in path for o in c.output))


def _true_map(view: ModelView, t: str, image: str, path: set[str]) -> bool:
    """A map of the image: reached from it through tensors of the image's rank only, not a sequence or a box
    table reshaped to that rank (YOLOv8's DFL reads bins reshaped to (N, 16, 4, anchors))."""
    rank = view.rank(image)
    while t != image:
        if view.rank(t) != rank:
            return False
        node = view.producer.get(t)
        x = _main_input(view, node, path) if node is not None else None
        if x is None:
            return False
        t = x
    return True


def _nearest_common_ancestor(view: ModelView, tensors, path: set[str]) -> str | None:
    """The last tensor (in graph order) that every one of `tensors` is computed from, along the path."""
    common = None
    for t in tensors:
        seen, stack = set(), [t]
        while stack:
            u = stack.pop()
            if u in seen or u not in path:
                continue
            seen.add(u)
            node = view.producer.get(u)
            if node is not None:
                stack.extend(node.input)
        common = seen if common is None else common & seen
    if not common:
        return None
    order = _topo_order(view)
    return max(common, key=lambda u: order.get(u, -1))


def default_layers(view: ModelView, image: str, score: str) -> tuple[str, ...]:
    """The default target layer(s): one feature map, or for a multi-branch detection head the maps its
    branches fork from (their maps are averaged, so every element of the score has a map)."""
    path = path_tensors(view, image, score)
    if _dense(view, score) and (head := _head_input(view, image, score, path)) is not None:
        return head if isinstance(head, tuple) else (head,)
    return (default_layer(view, image, score),)


def default_layer(view: ModelView, image: str, score: str) -> str:
    path = path_tensors(view, image, score)
    if _dense(view, score) and (head := _head_input(view, image, score, path)) is not None:
        return head if isinstance(head, str) else head[0]
    # A feature map has at most the image's rank; higher-rank tensors on the way are index plumbing
    # (e.g. dynamo's GatherND decomposition of adaptive pooling).
    max_rank = max(view.rank(image) or 4, 3)
    t = score
    first_spatial = None
    sequence = False  # behind a sequence head (MatMul / RNN over time steps) only a map of the image's rank
    while True:
        node = view.producer.get(t)
        if node is None or t == image:
            break
        x = _main_input(view, node, path)
        if x is None:
            break
        xs = view.shape(x)
        low = max_rank if sequence else 3
        if first_spatial is None and view.rank(t) is not None and low <= view.rank(t) <= max_rank \
                and (not sequence or _true_map(view, t, image, path)):
            first_spatial = t
        sequence = sequence or node.op_type in _SEQUENCE_HEADS
        if node.op_type in ("Conv", "ConvTranspose") and first_spatial is not None and _has_positions(
                view, first_spatial):
            # A conv before anything collapsed the map (conv -> Flatten -> dense, MTCNN's O-Net): its map is the
            # last one; pooling further back belongs to earlier blocks.
            return _batch_first_map(view, first_spatial, image, path)
        if (node.op_type not in _RESHAPES and xs is not None and 3 <= len(xs) <= max_rank
                and _per_sample_size(view.shape(t)) < _per_sample_size(xs)):
            if node.op_type in _POOLING:
                layer = x
                while (p := view.producer.get(layer)) is not None and p.op_type in _SKIP_BACK:
                    nxt = _main_input(view, p, path)
                    if nxt is None or nxt == image:
                        break
                    layer = nxt
                if view.rank(layer) == max_rank - 1 and node.op_type in ("Gather", "Slice"):
                    return _token_mixing_input(view, layer, path)
                return _before_final_norm(view, layer, path)
            # A learned layer shrinks the map (e.g. a strided conv straight into Flatten): the layer
            # is the last spatial tensor after it.
            return first_spatial if first_spatial is not None else t
        t = x
    if first_spatial is not None:
        return _batch_first_map(view, first_spatial, image, path)
    raise OnnxcamError("cannot choose the target layer automatically (no spatial feature map found on the "
                       "way to the score); pass --layer NAME (see `onnxcam layers MODEL`)")


def _before_final_norm(view: ModelView, layer: str, path: set[str]) -> str:
    """Transformers (Swin) end with a per-position LayerNorm, then move channels first for the pool: the last
    block's output is the tensor before both, as for CNNs the last block's output is what gets pooled."""
    p = view.producer.get(layer)
    if p is None or p.op_type != "Transpose" or p.input[0] not in path:
        return layer
    norm = view.producer.get(p.input[0])
    if norm is None or norm.op_type != "LayerNormalization" or norm.input[0] not in path:
        return layer
    return norm.input[0]


def _token_mixing_input(view: ModelView, tokens: str, path: set[str]) -> str:
    """A head that reads one token (ViT's class token) sees the other tokens of the last block's output only
    through that block's attention: after it, their gradient is exactly zero and so would be the map. The
    layer is therefore the input of the last attention -- the nearest tensor shaped like the tokens behind the
    last Softmax (torchvision's `encoder.layers[-1].ln_1`, pytorch-grad-cam's `blocks[-1].norm1`)."""
    softmax = _nearest_back(view, tokens, path, lambda t: (p := view.producer.get(t)) is not None
                            and p.op_type == "Softmax")
    if softmax is None:
        return tokens
    want = view.shape(tokens)[1:]
    found = _nearest_back(view, view.producer[softmax].input[0], path,
                          lambda t: (s := view.shape(t)) is not None and len(s) == 3 and s[1:] == want)
    return found or tokens


def _nearest_back(view: ModelView, start: str, path: set[str], pred) -> str | None:
    """Breadth-first walk back from `start` along the differentiated path: the nearest tensor satisfying pred."""
    queue, seen = [start], {start}
    while queue:
        nxt = []
        for t in queue:
            if pred(t):
                return t
            node = view.producer.get(t)
            for i in node.input if node is not None else ():
                if i in path and i not in seen:
                    seen.add(i)
                    nxt.append(i)
        queue = nxt
    return None


def layer_candidates(view: ModelView, image: str, score: str) -> list[LayerCandidate]:
    """Every spatial tensor (rank >= 3, produced by a node) between the image and the score, in graph order."""
    path = path_tensors(view, image, score)
    try:
        chosen = set(default_layers(view, image, score))
    except OnnxcamError:
        chosen = set()
    image_layout = layouts.guess_image_layout(view.shape(image))
    out = []
    for node in view.graph.node:
        for o in node.output:
            if o in path and o != image:
                shape = view.shape(o)
                if shape is None or len(shape) < 3:
                    continue
                try:
                    layout = layouts.layer_layout(view, o, image, image_layout, path=path)
                except OnnxcamError:
                    continue  # tokens that tile no grid: not a map
                spatial = tuple(layouts.spatial_dims(layout, list(shape)))
                if spatial and all(d == 1 for d in spatial):
                    continue  # a 1x1 map (a pooled vector) has no positions to highlight: its map is blank
                out.append(LayerCandidate(o, node.op_type, tuple(shape),
                                          tuple(layouts.spatial_dims(layout, list(shape))), o in chosen,
                                          layout.describe()))
    return out


def check_layer(view: ModelView, layer: str, image: str, score: str) -> None:
    if not view.has_tensor(layer) or layer in view.initializers:
        raise OnnxcamError(f"unknown layer '{layer}': no such tensor in the model (see `onnxcam layers MODEL`)")
    if layer not in path_tensors(view, image, score):
        raise OnnxcamError(f"layer '{layer}' does not lie between input '{image}' and score '{score}'")
    shape = view.shape(layer)
    if shape is None or len(shape) < 3:
        raise OnnxcamError(f"layer '{layer}' has shape {shape}; Grad-CAM needs a feature map (N, C, spatial...)")


def resolve(view: ModelView, layer=None, output: str | None = None) -> tuple[str, str, tuple[str, ...]]:
    """(image input, score, layers) for a model: the defaults above unless the user named them."""
    image = image_input(view)
    score = find_score(view, output)
    if layer is None:
        return image, score, default_layers(view, image, score)
    layers = [layer] if isinstance(layer, str) else list(layer)
    if not layers:
        raise OnnxcamError("no layer given")
    for name in layers:
        check_layer(view, name, image, score)
    return image, score, tuple(layers)


# -- which axis of the score holds the samples ------------------------------------------------------------
BATCH_SYMBOL = "onnxcam_batch"


@dataclass(frozen=True)
class Batching:
    """How samples flow through the model: `axis` is the score's sample axis (CTC recognisers emit (T, N, K),
    so it need not be 0); `fixed` means the graph computes one sample per run (a static batch of 1 on the
    image input, or a Reshape to a constant shape that starts with 1), so batches are run sample by sample."""

    axis: int = 0
    fixed: bool = False
    rank: int | None = None  # the score's rank as it comes out, where the model declares another one


def _hard_coded_batch(view: ModelView, image: str, score: str) -> bool:
    dims = view.shape(image)
    if dims and isinstance(dims[0], int) and dims[0] > 0:
        return dims[0] == 1
    path = path_tensors(view, image, score)
    for node in view.graph.node:
        if node.op_type == "Reshape" and node.input[0] in path:
            shape = view.constant_value(node.input[1]) if len(node.input) > 1 else None
            # 0 copies the batch, -1 infers it; a literal 1 first pins every run to one sample.
            if shape is not None and shape.ndim == 1 and shape.size >= 2 and int(shape[0]) == 1:
                return True
    return False


def _symbol_axis(model, image: str, score: str) -> int | None:
    """Relabels the image's batch dim with a fresh symbol and lets ONNX shape inference carry it to the score:
    the axis where it lands (None when it is lost on the way, e.g. behind a constant-shape Reshape)."""
    from onnx import shape_inference

    probe = weightless_copy(model)
    for vi in probe.graph.input:
        if vi.name == image and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            d0.Clear()
            d0.dim_param = BATCH_SYMBOL
    del probe.graph.value_info[:]
    for out in probe.graph.output:  # declared output shapes would be kept over inferred ones
        out.type.tensor_type.ClearField("shape")
    try:
        shape = ModelView(shape_inference.infer_shapes(probe, data_prop=True)).shape(score)
    except Exception:  # inference gave up: the axis stays unknown
        return None
    hits = [i for i, d in enumerate(shape or []) if d == BATCH_SYMBOL]
    return hits[0] if len(hits) == 1 else None


def batching(model, view: ModelView, image: str, score: str, axis: int | None = None) -> Batching:
    """The score's sample axis, found by following the image's batch dim (see Batching), or `axis` as given.
    Refuses, naming the way out, when it cannot be told: a wrong guess would explain the wrong scalar."""
    shape = view.shape(score)
    rank = None if shape is None else len(shape)
    fixed = _hard_coded_batch(view, image, score)
    if axis is not None:
        if rank is not None and not -rank <= axis < rank:
            raise OnnxcamError(f"batch axis {axis} is out of range for output '{score}' of rank {rank}")
        return Batching(axis % rank if rank else axis, fixed)
    if rank is None or rank == 0:
        return Batching(0, fixed)
    in_dims = view.shape(image) or [None]
    if isinstance(in_dims[0], str) and shape.count(in_dims[0]) == 1:
        return Batching(shape.index(in_dims[0]), fixed)
    found = _symbol_axis(model, image, score) if rank >= 2 else 0
    if found is not None:
        return Batching(found, fixed)
    if fixed:
        # One sample per run: dropping any size-1 axis leaves the per-sample data in the same order. Declared
        # output shapes can be wrong (a CRNN declaring (1, T) for its (T, 1, K) logits), so ask the model itself.
        actual = _probe_shape(model, view, image, score)
        if actual is not None and 1 in actual:
            return Batching(actual.index(1), fixed, len(actual) if len(actual) != rank else None)
        if shape[0] != 1 and 1 in shape:
            return Batching(shape.index(1), fixed)
    # Unknown: axis 0, as nearly every model has it. A wrong guess cannot pass unnoticed: the Explainer checks
    # that the score comes out with one row per sample (check_samples) and refuses otherwise.
    return Batching(0, fixed)


def _probe_shape(model, view: ModelView, image: str, score: str) -> tuple | None:
    """The score's shape from one run on zeros: static dims as declared, the batch 1, other dynamic dims the
    input's largest static spatial dim (or 224). None when the model does not run on that."""
    import numpy as np
    import onnx
    from onnx import helper

    feeds = {}
    for name in view.graph_inputs:
        dims = view.shape(name)
        if dims is None:
            return None
        known = [d for d in dims[2:] if isinstance(d, int) and d > 0]
        fill = max(known) if known else 224
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else fill) for i, d in enumerate(dims)]
        if np.prod(shape, dtype=np.float64) > 2 ** 26:  # no probe worth a huge allocation
            return None
        feeds[name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(view.elem_type(name)))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(score, view.elem_type(score), None))
    prune(m, [score])
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        from ..run.runtime import inference_session  # weights load_model left on disk: mapped, not serialised

        session = inference_session(m, opts, ["CPUExecutionProvider"])
        return tuple(session.run(None, {k: v for k, v in feeds.items()
                                        if k in {i.name for i in session.get_inputs()}})[0].shape)
    except Exception:
        return None


def batch_first(model, score: str, axis: int, rank: int | None = None) -> str:
    """Appends a Transpose that moves the score's sample axis first; returns the new score tensor. Everything
    downstream (seeds, targets, perturbation scores) then reads (N, ...) as for any classifier. `rank`: the
    score's real rank where its declared shape is wrong (those dims are then unknown)."""
    from onnx import helper

    view = ModelView(model)
    shape = view.shape(score) if rank is None else [None] * rank
    rank = len(shape)
    perm = [axis] + [i for i in range(rank) if i != axis]
    emit = Emitter.for_model(model)
    out = emit.op("Transpose", [score], perm=perm, hint="score_batch_first")
    emit.commit(model)
    model.graph.value_info.append(helper.make_tensor_value_info(out, view.elem_type(score),
                                                                [shape[p] for p in perm]))
    return out
