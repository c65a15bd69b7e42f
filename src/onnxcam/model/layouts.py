"""Where a layer keeps its channels and its spatial positions, and how to see it as (N, C, *spatial).

The CAM arithmetic assumes channels-first feature maps. Exporters do not all produce them:
  * tf2onnx and Swin keep channels last, (N, H, W, C);
  * Vision Transformers keep tokens, (N, L, C): class/distillation tokens first, then the patch grid in
    row-major order.
Both views are a permutation (plus, for tokens, dropping the non-patch tokens), i.e. linear maps that only
relabel elements. Applying the same map to the activations and to their gradients therefore gives exactly
the activations and gradients of the channels-first view -- what pytorch-grad-cam's `reshape_transform`
does in PyTorch. The layout is found from the graph, never from the user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..autodiff import active_tensors
from ..errors import OnnxcamError
from .graph import Emitter, ModelView

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
TOKENS = "tokens"


@dataclass(frozen=True)
class LayerLayout:
    kind: str = CHANNELS_FIRST
    prefix: int = 0  # tokens: leading non-patch tokens (class, distillation) dropped from the map
    grid: tuple[int, ...] = ()  # tokens: the patch grid, row-major

    def describe(self) -> str:
        if self.kind == TOKENS:
            grid = "x".join(map(str, self.grid))
            return f"tokens ({self.prefix} leading token(s) dropped, {grid} patch grid)"
        return self.kind.replace("_", "-")


# Ops whose data layout is channels-first by the ONNX spec.
_CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "BatchNormalization",
                       "InstanceNormalization", "GroupNormalization", "MaxPool", "AveragePool", "LpPool", "LRN",
                       "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "DepthToSpace", "SpaceToDepth",
                       "MaxUnpool"}
# Ops that keep the axis meaning of their main input (elementwise, per-position linear maps on the last axis,
# last-axis normalisations, concatenations and slices that do not reorder axes).
_KEEPS_LAYOUT = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
                 "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Clip", "Abs", "Neg", "Exp", "Log",
                 "Sqrt", "Reciprocal", "Pow", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where",
                 "Identity", "Cast", "CastLike", "Dropout", "QuantizeLinear", "DequantizeLinear",
                 "LayerNormalization", "MatMul", "Concat", "Slice", "Pad", "Resize", "Upsample", "Split"}


def _main_input(view: ModelView, node, path: set[str]) -> str | None:
    """The input through which the image reaches a layout-keeping node (the largest if several; for MatMul
    the left operand, since x @ W acts on x's last axis)."""
    data = list(node.input[1:]) if node.op_type == "Where" else list(node.input)
    ins = [i for i in data if i and i in path]
    if node.op_type == "MatMul":
        return node.input[0] if node.input[0] in path else None
    if not ins:
        return None

    def size(name: str) -> float:
        shape = view.shape(name)
        if shape is None:
            return -1.0
        return float(math.prod(d for d in shape if isinstance(d, int)))

    return max(ins, key=size)


def guess_image_layout(shape) -> str:
    """NHWC when the last dim looks like colour channels and the second does not."""
    if shape is not None and len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def channel_axis(view: ModelView, tensor: str, image: str, image_layout: str, limit: int = 100000,
                 path: set[str] | None = None) -> int | None:
    """The channel axis of `tensor`, found by walking back to an op whose layout the ONNX spec fixes (a
    convolution, a norm, a pool) or to the image, and replaying the Transposes met on the way. None when a
    reshape (or an unknown op) makes it ambiguous."""
    # Any image-dependent input of a node behind `tensor` is itself behind it: a wider path gives the same walk.
    path = path if path is not None else active_tensors(view, tensor, [image])
    perms: list = []  # Transpose perms and last-axis-keeping reshapes met, latest first
    t = tensor
    for _ in range(limit):
        rank = view.rank(t)
        if t == image:
            axis = (rank - 1 if image_layout == "NHWC" else 1) if rank is not None else None
            break
        node = view.producer.get(t)
        if node is None:
            return None
        if node.op_type in _CHANNELS_FIRST_OPS:
            axis = 1
            break
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is None:
                if rank is None:
                    return None
                perm = list(range(rank))[::-1]
            perms.append(perm)
            t = node.input[0]
            continue
        if node.op_type == "Reshape":
            # A reshape that keeps the last axis only regroups the others (tf2onnx's Tensordot: a Dense on a
            # feature map is Reshape (N*H*W, C) -> MatMul -> Reshape back): a last-axis channel stays last.
            src, dst = view.shape(node.input[0]), view.shape(t)
            if not src or not dst or not isinstance(src[-1], int) or src[-1] != dst[-1]:
                return None
            perms.append(("last", len(src), len(dst)))
            t = node.input[0]
            continue
        if node.op_type in _KEEPS_LAYOUT:
            if view.rank(node.output[0]) != rank:
                return None
            nxt = _main_input(view, node, path)
            if nxt is None or view.rank(nxt) != rank:
                return None
            t = nxt
            continue
        return None
    else:
        return None
    if axis is None:
        return None
    for step in reversed(perms):  # forward order: the earliest Transpose/Reshape was appended last
        if isinstance(step, tuple):
            _, src_rank, dst_rank = step
            if axis != src_rank - 1:
                return None
            axis = dst_rank - 1
        else:
            axis = step.index(axis)
    return axis


def token_grid(view: ModelView, layer: str, image: str, image_layout: str) -> LayerLayout:
    """(N, L, C) tokens -> the patch grid: the smallest number of leading tokens whose removal leaves a grid of
    square patches tiling the image."""
    shape, image_shape = view.shape(layer), view.shape(image)
    spatial = None
    if image_shape is not None and len(image_shape) == 4:
        spatial = image_shape[1:3] if image_layout == "NHWC" else image_shape[2:4]
    tokens = shape[1] if shape is not None and len(shape) == 3 else None
    if not isinstance(tokens, int) or spatial is None or not all(isinstance(d, int) for d in spatial):
        raise OnnxcamError(f"layer '{layer}' holds tokens {_fmt(shape)} but the patch grid cannot be found: "
                           f"it needs a static token count and a static input size (input {_fmt(image_shape)})")
    h, w = spatial
    for prefix in range(0, 9):
        n = tokens - prefix
        for patch in range(1, min(h, w) + 1):
            if h % patch == 0 and w % patch == 0 and (h // patch) * (w // patch) == n:
                return LayerLayout(TOKENS, prefix, (h // patch, w // patch))
    raise OnnxcamError(f"layer '{layer}' holds {tokens} tokens, which do not tile the {h}x{w} input as a grid of "
                       f"square patches after dropping up to 8 leading tokens")


def _pooled_channel_axis(view: ModelView, layer: str, rank: int) -> int | None:
    """When the walk back is inconclusive: a reduction over every axis but the batch and one, applied to the
    layer (a global pool written as ReduceMean/ReduceMax), says the remaining axis holds the channels."""
    for node in view.consumers.get(layer, []):
        if not node.op_type.startswith("Reduce"):
            continue
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = view.constant_value(node.input[1])
            axes = None if value is None else [int(a) for a in value.reshape(-1)]
        if not axes:
            continue
        kept = set(range(1, rank)) - {a % rank for a in axes}
        if len(kept) == 1 and 0 not in {a % rank for a in axes}:
            return kept.pop()
    return None


def layer_layout(view: ModelView, layer: str, image: str, image_layout: str,
                 path: set[str] | None = None) -> LayerLayout:
    rank, image_rank = view.rank(layer), view.rank(image)
    if rank == 3 and image_rank == 4:
        return token_grid(view, layer, image, image_layout)
    axis = channel_axis(view, layer, image, image_layout, path=path)
    if axis is None and rank is not None:
        axis = _pooled_channel_axis(view, layer, rank)
    if rank is not None and rank >= 3 and axis == rank - 1:
        return LayerLayout(CHANNELS_LAST)
    return LayerLayout(CHANNELS_FIRST)


def effective_rank(layout: LayerLayout, rank: int) -> int:
    """Rank of the channels-first view."""
    return rank + len(layout.grid) - 1 if layout.kind == TOKENS else rank


def spatial_dims(layout: LayerLayout, shape: list) -> list:
    """The spatial dims of a layer of this shape, in the channels-first view."""
    if layout.kind == TOKENS:
        return list(layout.grid)
    return list(shape[1:-1]) if layout.kind == CHANNELS_LAST else list(shape[2:])


def to_channels_first(emit: Emitter, tensor: str, layout: LayerLayout, rank: int) -> str:
    if layout.kind == CHANNELS_LAST:
        return emit.op("Transpose", [tensor], perm=[0, rank - 1, *range(1, rank - 1)])
    if layout.kind == TOKENS:
        patches = emit.op("Slice", [tensor, emit.ints([layout.prefix]), emit.ints([2 ** 62]), emit.ints([1])])
        grid = emit.op("Reshape", [patches, emit.ints([0, *layout.grid, -1])])
        return emit.op("Transpose", [grid], perm=[0, len(layout.grid) + 1, *range(1, len(layout.grid) + 1)])
    return tensor


def _fmt(shape) -> str:
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"
