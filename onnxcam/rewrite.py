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

from .errors import OnnxcamError
from .graph import Dim, ModelView

# Ops that follow a softmax output without changing what it means.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
_SOFTMAX = {"Softmax", "LogSoftmax"}
# Shrinking a spatial tensor with these is "collapsing the spatial dims"; the layer is their input.
_POOLING = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool", "MaxPool", "LpPool",
            "ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "ReduceLogSumExp", "ReduceMin",
            "Slice", "Gather"}
# Pure relabelling: never a collapse, even when a batch-folding reshape hides the per-sample size.
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"}
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
    elif output not in view.graph_outputs and output not in view.producer:
        raise OnnxcamError(f"unknown output '{output}'; model outputs: {', '.join(view.graph_outputs)}")
    t = output
    while True:
        node = view.producer.get(t)
        if node is None:
            return output
        if node.op_type in _SOFTMAX:
            return node.input[0]
        if node.op_type in _PASS_THROUGH:
            t = node.input[0]
            continue
        return output


def path_tensors(view: ModelView, source: str, sink: str) -> set[str]:
    """Float tensors that depend on `source` and feed `sink`."""
    from .autodiff import active_tensors

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


def _head_input(view: ModelView, image: str, score: str, path: set[str]) -> str | None:
    """Dense outputs are per-position predictions by a last conv (the segmentation classifier, the detection
    head) followed by resizing and reshaping: the feature map that conv reads is what Grad-CAM explains. None
    when something collapses the spatial dims first (then the score is a class vector after all)."""
    t = score
    while (node := view.producer.get(t)) is not None and t != image:
        x = _main_input(view, node, path)
        if x is None:
            return None
        if node.op_type in ("Conv", "ConvTranspose"):
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


def default_layer(view: ModelView, image: str, score: str) -> str:
    path = path_tensors(view, image, score)
    if _dense(view, score) and (head := _head_input(view, image, score, path)) is not None:
        return head
    # A feature map has at most the image's rank; higher-rank tensors on the way are index plumbing
    # (e.g. dynamo's GatherND decomposition of adaptive pooling).
    max_rank = max(view.rank(image) or 4, 3)
    t = score
    first_spatial = None
    while True:
        node = view.producer.get(t)
        if node is None or t == image:
            break
        x = _main_input(view, node, path)
        if x is None:
            break
        xs = view.shape(x)
        if first_spatial is None and view.rank(t) is not None and 3 <= view.rank(t) <= max_rank:
            first_spatial = t
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
        return first_spatial
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
    from . import layouts

    path = path_tensors(view, image, score)
    try:
        chosen = default_layer(view, image, score)
    except OnnxcamError:
        chosen = None
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
                out.append(LayerCandidate(o, node.op_type, tuple(shape),
                                          tuple(layouts.spatial_dims(layout, list(shape))), o == chosen,
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
        return image, score, (default_layer(view, image, score),)
    layers = [layer] if isinstance(layer, str) else list(layer)
    if not layers:
        raise OnnxcamError("no layer given")
    for name in layers:
        check_layer(view, name, image, score)
    return image, score, tuple(layers)
