"""Rules for convolutions, pooling and normalisation layers.

Only the gradient with respect to the data input is built; weights, biases and normalisation statistics
get None. Spatial geometry (kernel, strides, dilations, pads) is read from attributes and the inferred
shapes; where spatial sizes are symbolic the same quantities are computed in the graph from `Shape`.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
from onnx import helper

from .registry import Context, register

BIG = 2**62
# Static per-dimension values (python ints) or an int64 tensor of length n_spatial in the graph.
IntsOrTensor = Union[list, str]


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def spatial_count(ctx: Context, x: str) -> str:
    """Number of spatial positions of NC... tensor `x`, as a scalar of x's dtype."""
    shape = ctx.shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        return ctx.scalar(float(math.prod(shape[2:])), x)
    emit = ctx.emit
    dims = emit.op("Slice", [emit.shape_of(x), emit.ints([2]), emit.ints([BIG])])
    return emit.op("Cast", [emit.reduce("ReduceProd", dims, None, keepdims=0)], to=ctx.view.elem_type(x))


def _static_spatial(ctx: Context, name: str) -> list[int] | None:
    shape = ctx.shape(name)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return [int(d) for d in shape[2:]]


def _spatial_shape(ctx: Context, name: str) -> str:
    """int64 tensor with the spatial dims of `name` (static constant when known)."""
    static = _static_spatial(ctx, name)
    if static is not None:
        return ctx.emit.ints(static, "spatial")
    emit = ctx.emit
    return emit.op("Slice", [emit.shape_of(name), emit.ints([2]), emit.ints([BIG]), emit.ints([0])])


def _as_tensor(ctx: Context, v: IntsOrTensor) -> str:
    return ctx.emit.ints(v) if isinstance(v, list) else v


def _n_spatial(ctx: Context, x: str) -> int:
    return ctx.rank(x) - 2


def _geometry(ctx: Context, n: int, w: str | None = None):
    """kernel, strides, dilations of the current node (kernel from the attribute or the weight's shape)."""
    kernel = ctx.attr("kernel_shape")
    if kernel is None and w is not None:
        ws = ctx.shape(w)
        if ws is not None and all(isinstance(d, int) for d in ws[2:]):
            kernel = ws[2:]
    if kernel is not None:
        kernel = [int(k) for k in kernel]
        if len(kernel) != n:
            raise ValueError(f"kernel_shape {kernel} does not match {n} spatial dims")
    strides = [int(s) for s in (ctx.attr("strides") or [1] * n)]
    dilations = [int(d) for d in (ctx.attr("dilations") or [1] * n)]
    return kernel, strides, dilations


def _auto_pad(ctx: Context) -> str:
    ap = ctx.attr("auto_pad", "NOTSET")
    return ap.decode() if isinstance(ap, bytes) else ap


def _max0(ctx: Context, t: str) -> str:
    zero = ctx.emit.ints([0])
    return ctx.op("Where", [ctx.op("Less", [t, zero]), zero, t])


def _resolve_pads(ctx: Context, x: str, y: str, kernel, strides, dilations) -> tuple[IntsOrTensor, IntsOrTensor]:
    """(pads_begin, pads_end) of a Conv/pool node, with auto_pad turned into explicit numbers.

    SAME_*: total = max(0, (out-1)*stride + dilation*(k-1) + 1 - in), the odd one at the end for
    SAME_UPPER and at the beginning for SAME_LOWER (as onnxruntime does).
    """
    n = len(strides)
    mode = _auto_pad(ctx)
    if mode in ("NOTSET", ""):
        pads = [int(p) for p in (ctx.attr("pads") or [0] * (2 * n))]
        return pads[:n], pads[n:]
    if mode == "VALID":
        return [0] * n, [0] * n
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad '{mode}'")
    if kernel is None:
        raise ValueError("auto_pad SAME needs a known kernel shape "
                         "(kernel_shape attribute or a weight of static shape)")
    dk = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    xin, yout = _static_spatial(ctx, x), _static_spatial(ctx, y)
    if xin is not None and yout is not None:
        total = [max(0, (o - 1) * s + k - i) for i, o, s, k in zip(xin, yout, strides, dk)]
        if mode == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        return begin, [t - b for t, b in zip(total, begin)]
    # Symbolic spatial dims: the same arithmetic in the graph (out = ceil(in / stride) for SAME).
    emit = ctx.emit
    xin_t = _spatial_shape(ctx, x)
    s = emit.ints(strides)
    out = ctx.op("Div", [ctx.op("Add", [xin_t, emit.ints([v - 1 for v in strides])]), s])
    total = _max0(ctx, ctx.op("Sub", [ctx.op("Add", [ctx.op("Mul", [ctx.op("Sub", [out, emit.ints([1] * n)]), s]),
                                                     emit.ints(dk)]), xin_t]))
    half = ctx.op("Div", [total, emit.ints([2] * n)])
    begin = half if mode == "SAME_UPPER" else ctx.op("Sub", [total, half])
    return begin, ctx.op("Sub", [total, begin])


def _transpose_conv(ctx: Context, g: str, w: str, x: str, yout: list[int] | None, strides, dilations, group: int,
                    pads_begin: IntsOrTensor, pads_end: IntsOrTensor, kernel) -> str:
    """Adjoint of Conv(x, w, strides, dilations, group, pads) applied to `g` (shaped like y): shaped like x.

    With static sizes: ConvTranspose with the forward's explicit pads and
    output_padding = in - ((out-1)*stride - pad_begin - pad_end + dilation*(k-1) + 1).
    Otherwise (symbolic sizes, dynamic pads, or an output_padding out of range, as ceil-mode pools give):
    ConvTranspose without pads (covers the whole padded input), Slice [pad_begin, pad_begin + in) and
    zero-Pad the end up to `in` (input positions no window reached).
    """
    emit = ctx.emit
    n = len(strides)
    xin = _static_spatial(ctx, x)
    if (xin is not None and yout is not None and kernel is not None
            and isinstance(pads_begin, list) and isinstance(pads_end, list)):
        opad = [i - ((o - 1) * s - pb - pe + d * (k - 1) + 1)
                for i, o, s, pb, pe, d, k in zip(xin, yout, strides, pads_begin, pads_end, dilations, kernel)]
        # onnxruntime's ConvTranspose rejects output_padding >= stride (the spec allows < dilation too)
        if all(s == 1 for s in strides):  # then opad is 0
            # onnxruntime's Conv kernels beat its ConvTranspose (col2im) by 1.1-1.5x per op on the CPU; with
            # stride 1 the adjoint is a Conv with the kernel flipped and in/out channels swapped per group
            # (Guided Backprop on ResNet-50: 2.87x -> 2.55x a forward).
            conv_pads = ([d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads_begin)]
                         + [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads_end)])
            flipped = _adjoint_kernel(ctx, w, group, kernel) if min(conv_pads) >= 0 else None
            if flipped is not None:
                return ctx.op("Conv", [g, flipped], dilations=dilations, group=group, pads=conv_pads)
        if all(0 <= p < s for p, s in zip(opad, strides)):
            return ctx.op("ConvTranspose", [g, w], strides=strides, dilations=dilations, group=group,
                          pads=list(pads_begin) + list(pads_end),
                          output_padding=opad if any(opad) else None)
    if ctx.opset < 11:
        raise ValueError("this gradient (symbolic spatial sizes or ceil_mode) needs opset >= 11 "
                         f"(Slice/Pad with tensor inputs); the model has opset {ctx.opset}")
    full = ctx.op("ConvTranspose", [g, w], strides=strides, dilations=dilations, group=group)
    axes = emit.ints(range(2, 2 + n))
    xin_t = _spatial_shape(ctx, x)
    start = _as_tensor(ctx, pads_begin)
    sliced = ctx.op("Slice", [full, start, ctx.op("Add", [start, xin_t]), axes])
    missing = _max0(ctx, ctx.op("Sub", [xin_t, _spatial_shape_of_tensor(ctx, sliced)]))
    pads = ctx.op("Concat", [emit.ints([0] * (n + 4)), missing], axis=0)
    return ctx.op("Pad", [sliced, pads])


def _adjoint_kernel(ctx: Context, w: str, group: int, kernel: list[int]) -> str | None:
    """Conv weight (C_out, C_in/g, k...) as the weight of its stride-1 adjoint Conv: (C_in, C_out/g, k...),
    each group's in/out swapped and every spatial axis reversed. Built from graph ops, so onnxruntime folds
    it into a constant at session start when the weight is an initializer. None when the shape is unknown."""
    shape = ctx.shape(w)
    if shape is None or not all(isinstance(d, int) for d in shape) or ctx.opset < 10:
        return None
    c_out, c_in_g, n = int(shape[0]), int(shape[1]), len(kernel)
    if c_out % group:
        return None
    emit = ctx.emit
    spatial = list(range(2, 2 + n))
    if group == 1:
        swapped = ctx.op("Transpose", [w], perm=[1, 0] + spatial)
    elif c_in_g == 1 and c_out == group:  # depthwise: (C, 1, k...) is already its own swap
        swapped = w
    else:
        grouped = ctx.op("Reshape", [w, emit.ints([group, c_out // group, c_in_g] + kernel)])
        swapped = ctx.op("Reshape", [ctx.op("Transpose", [grouped], perm=[0, 2, 1] + [a + 1 for a in spatial]),
                                     emit.ints([group * c_in_g, c_out // group] + kernel)])
    axes = [a for a, k in zip(spatial, kernel) if k > 1]
    if not axes:
        return swapped
    return ctx.op("Slice", [swapped, emit.ints([-1] * len(axes)), emit.ints([-BIG] * len(axes)), emit.ints(axes),
                            emit.ints([-1] * len(axes))])


def _spatial_shape_of_tensor(ctx: Context, t: str) -> str:
    emit = ctx.emit
    return emit.op("Slice", [emit.shape_of(t), emit.ints([2]), emit.ints([BIG]), emit.ints([0])])


# --------------------------------------------------------------------------------------------------
# Conv / ConvTranspose
# --------------------------------------------------------------------------------------------------
@register("Conv")
def conv(ctx: Context, gy):
    """gx = ConvTranspose(gy, W) with the forward's strides, dilations, group and explicit pads + output_padding.

    auto_pad is resolved to explicit pads first. When sizes are symbolic (or output_padding would be out of
    range): ConvTranspose without pads, sliced to [pad_begin, pad_begin + in) and zero-padded at the end.
    W and B get no gradient.
    """
    x, w, y = ctx.input(0), ctx.input(1), ctx.output(0)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0]:
        return result
    n = _n_spatial(ctx, x)
    kernel, strides, dilations = _geometry(ctx, n, w)
    group = int(ctx.attr("group", 1))
    pb, pe = _resolve_pads(ctx, x, y, kernel, strides, dilations)
    result[0] = _transpose_conv(ctx, gy[0], w, x, _static_spatial(ctx, y), strides, dilations, group, pb, pe,
                                kernel)
    return result


def _conv_transpose_pads(ctx: Context, x: str, y: str, kernel, strides, dilations, opad):
    """Explicit (begin, end) pads of a ConvTranspose node, as onnxruntime resolves auto_pad/output_shape."""
    n = len(strides)
    mode = _auto_pad(ctx)
    output_shape = ctx.attr("output_shape")
    if mode in ("NOTSET", "") and output_shape is None:
        pads = [int(p) for p in (ctx.attr("pads") or [0] * (2 * n))]
        return pads[:n], pads[n:]
    if mode == "VALID" and output_shape is None:
        return [0] * n, [0] * n
    xin, yout = _static_spatial(ctx, x), _static_spatial(ctx, y)
    if xin is None or yout is None or kernel is None:
        raise ValueError("ConvTranspose with auto_pad/output_shape needs static spatial sizes and kernel shape")
    total = [max(0, s * (i - 1) + p + d * (k - 1) + 1 - o)
             for i, o, s, p, d, k in zip(xin, yout, strides, opad, dilations, kernel)]
    # As the spec says and onnxruntime 1.32 does (checked by probing): SAME_UPPER puts the odd pad at the
    # end; SAME_LOWER and NOTSET/VALID with output_shape put it at the beginning.
    if mode == "SAME_UPPER":
        begin = [t // 2 for t in total]
    else:
        begin = [t - t // 2 for t in total]
    return begin, [t - b for t, b in zip(total, begin)]


@register("ConvTranspose")
def conv_transpose(ctx: Context, gy):
    """gx = Conv(gy, W) with the forward's strides, dilations, group and resolved pads (sliced to x's size).

    y = ConvTranspose(x, W) is the adjoint of Conv(., W) with the same attributes, so gx = Conv(gy, W).
    The ConvTranspose weight layout (C_in, C_out/group, k...) is exactly a Conv weight from C_out/group
    channels per group to C_in channels, so W is used as is.
    """
    x, w, y = ctx.input(0), ctx.input(1), ctx.output(0)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0]:
        return result
    n = _n_spatial(ctx, x)
    kernel, strides, dilations = _geometry(ctx, n, w)
    group = int(ctx.attr("group", 1))
    opad = [int(p) for p in (ctx.attr("output_padding") or [0] * n)]
    pb, pe = _conv_transpose_pads(ctx, x, y, kernel, strides, dilations, opad)
    gx = ctx.op("Conv", [gy[0], w], strides=strides, dilations=dilations, group=group, pads=pb + pe,
                kernel_shape=kernel)
    if any(p >= s for p, s in zip(opad, strides)):
        # Conv gives in + floor(output_padding / stride) positions; the extra ones are padding.
        emit = ctx.emit
        gx = ctx.op("Slice", [gx, emit.ints([0] * n), _spatial_shape(ctx, x), emit.ints(range(2, 2 + n))])
    result[0] = gx
    return result


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------
@register("MaxPool")
def max_pool(ctx: Context, gy):
    """gx = ScatterElements(0, Indices, gy, reduction='add'): each window's gradient to its argmax.

    Scatter-add of gy to the argmax of each window, located by MaxPool's own Indices output.
    Exact with overlapping windows (duplicates add up, unlike MaxUnpool). Indices are flat over the
    whole N*C*spatial tensor; with storage_order=1 the spatial part is column-major and is converted.
    """
    x = ctx.input(0)
    if gy[0] is None:
        return [None]
    if ctx.opset < 16:
        raise ValueError(f"the MaxPool gradient needs ScatterElements with reduction='add', i.e. opset >= 16 "
                         f"(the model has opset {ctx.opset}); upgrade the model's opset first")
    emit = ctx.emit
    indices = ctx.add_output(1, "maxpool_indices")
    flat_idx = ctx.op("Reshape", [indices, emit.ints([-1])])
    if int(ctx.attr("storage_order", 0)) == 1:
        flat_idx = _column_to_row_major(ctx, flat_idx, x)
    flat_g = ctx.op("Reshape", [gy[0], emit.ints([-1])])
    zeros = ctx.op("Reshape", [emit.zeros_like(x, ctx.dtype(x)), emit.ints([-1])])
    scattered = ctx.scatter_add("ScatterElements", zeros, flat_idx, flat_g, like=x, axis=0)
    return [ctx.op("Reshape", [scattered, emit.shape_of(x)])]


def _column_to_row_major(ctx: Context, idx: str, x: str) -> str:
    dims = _static_spatial(ctx, x)
    if dims is None:
        raise ValueError("MaxPool with storage_order=1 needs static spatial sizes")
    emit = ctx.emit
    size = math.prod(dims)
    rest = ctx.op("Mod", [idx, emit.ints([size])])
    out = ctx.op("Sub", [idx, rest])
    row_strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    for d, dim in enumerate(dims):  # column-major: the first spatial dim varies fastest
        pos = ctx.op("Mod", [rest, emit.ints([dim])])
        rest = ctx.op("Div", [rest, emit.ints([dim])])
        out = ctx.op("Add", [out, ctx.op("Mul", [pos, emit.ints([row_strides[d]])])])
    return out


def _valid_counts(ctx: Context, x: str, y: str, yout: list[int] | None, kernel, strides, dilations,
                  pads_begin: IntsOrTensor) -> str:
    """Tensor (1, 1, out...) with the number of real (non-pad) inputs in each pooling window."""
    xin = _static_spatial(ctx, x)
    dtype = ctx.dtype(x)
    n = len(strides)
    if xin is not None and yout is not None and isinstance(pads_begin, list):
        total = np.ones((), dtype=np.float64)
        for d in range(n):
            pos = (np.arange(yout[d])[:, None] * strides[d] - pads_begin[d]
                   + np.arange(kernel[d])[None, :] * dilations[d])
            total = np.multiply.outer(total, ((pos >= 0) & (pos < xin[d])).sum(axis=1))
        total = np.maximum(total, 1).reshape([1, 1] + yout)
        return ctx.emit.const(total.astype(dtype), hint="pool_counts")
    emit = ctx.emit
    xin_t = _spatial_shape(ctx, x)
    yout_t = _spatial_shape_of_tensor(ctx, y)  # run-time size, never the inferred one (see above)
    pb_t = _as_tensor(ctx, pads_begin)
    total = None
    for d in range(n):
        pick = emit.ints([d])
        i_d = ctx.op("Gather", [xin_t, pick], axis=0)                        # [1]
        o_d = emit.squeeze(ctx.op("Gather", [yout_t, pick], axis=0), [0])     # scalar
        start = ctx.op("Sub", [ctx.op("Mul", [ctx.op("Range", [emit.const(np.array(0, np.int64)), o_d,
                                                                   emit.const(np.array(1, np.int64))]),
                                              emit.ints([strides[d]])]),
                               ctx.op("Gather", [pb_t, pick], axis=0)])       # [out]
        pos = ctx.op("Add", [emit.unsqueeze(start, [1]),
                             emit.const(np.arange(kernel[d], dtype=np.int64)[None, :] * dilations[d])])
        valid = ctx.op("And", [ctx.op("Not", [ctx.op("Less", [pos, emit.ints([0])])]), ctx.op("Less", [pos, i_d])])
        counts = emit.reduce("ReduceSum", ctx.op("Cast", [valid], to=ctx.view.elem_type(x)), [1], keepdims=0)
        shape = [1] * n
        shape[d] = -1
        counts = ctx.op("Reshape", [counts, emit.ints(shape)])
        total = counts if total is None else ctx.op("Mul", [total, counts])
    return emit.unsqueeze(ctx.op("Max", [total, ctx.scalar(1.0, x)]), [0, 1])


def _pool_output_size(ctx: Context, x: str, kernel, strides, dilations, pads_begin, pads_end) -> list[int] | None:
    """Spatial output size of a pool as onnxruntime (and PyTorch) compute it, or None if not static.

    None also when ceil_mode drops a last window that would start inside the end padding: onnxruntime
    does (e.g. in 4, kernel 2, stride 2, pads 0/1 gives 2), but onnx shape inference, which onnxruntime
    itself runs when it loads the gradient graph, keeps it (3): constants shaped from the true size would
    then clash with inferred shapes ("Incompatible dimensions"), so sizes must come from Shape at run time.
    """
    xin = _static_spatial(ctx, x)
    if xin is None or not isinstance(pads_begin, list) or not isinstance(pads_end, list):
        return None
    ceil = int(ctx.attr("ceil_mode", 0)) == 1 and _auto_pad(ctx) in ("NOTSET", "")
    out = []
    for i, k, s, d, pb, pe in zip(xin, kernel, strides, dilations, pads_begin, pads_end):
        num = i + pb + pe - (d * (k - 1) + 1)
        o = (-(-num // s) if ceil else num // s) + 1
        if ceil and (o - 1) * s >= i + pb:
            return None
        out.append(o)
    return out


@register("AveragePool")
def average_pool(ctx: Context, gy):
    """gx = S^T(gy / D): S sums each window (zero padding), D is the divisor onnxruntime used there.

    D is not computed by re-deriving onnxruntime's rules (count_include_pad, ceil_mode windows that run
    past the padded input): 1/D = AveragePool(ones)/V, with V the number of real inputs per window and
    AveragePool(ones) run with the node's own attributes. S^T is a ConvTranspose with a ones kernel on
    (N*C, 1, ...) so that the channel count need not be static.
    """
    x, y = ctx.input(0), ctx.output(0)
    if gy[0] is None:
        return [None]
    emit = ctx.emit
    n = _n_spatial(ctx, x)
    kernel, strides, dilations = _geometry(ctx, n)
    pb, pe = _resolve_pads(ctx, x, y, kernel, strides, dilations)
    dtype = ctx.dtype(x)
    ones = ctx.op("Expand", [emit.scalar(1.0, dtype),
                             ctx.op("Concat", [emit.ints([1, 1]), _spatial_shape(ctx, x)], axis=0)])
    attrs = {a.name: helper.get_attribute_value(a) for a in ctx.node.attribute}
    avg_ones = ctx.op("AveragePool", [ones], **attrs)
    yout = _pool_output_size(ctx, x, kernel, strides, dilations, pb, pe)
    factor = ctx.op("Div", [avg_ones, _valid_counts(ctx, x, y, yout, kernel, strides, dilations, pb)])
    g = ctx.op("Mul", [gy[0], factor])
    g_shape = emit.ints([-1, 1] + yout) if yout is not None else ctx.op(
        "Concat", [emit.ints([-1, 1]), _spatial_shape_of_tensor(ctx, y)], axis=0)
    g = ctx.op("Reshape", [g, g_shape])
    w = emit.const(np.ones([1, 1] + kernel, dtype=dtype), hint="ones_kernel")
    gx = _transpose_conv(ctx, g, w, x, yout, strides, dilations, 1, pb, pe, kernel)
    return [ctx.op("Reshape", [gx, emit.shape_of(x)])]


@register("GlobalAveragePool")
def global_average_pool(ctx: Context, gy):
    """gx = gy / (number of spatial positions), broadcast over the spatial axes."""
    x = ctx.input(0)
    g = ctx.op("Div", [gy[0], spatial_count(ctx, x)])
    gx = ctx.op("Expand", [g, ctx.emit.shape_of(x)])
    rank = ctx.view.rank(x)
    if rank is not None:  # Grad-CAM's spatial mean of it is g itself
        ctx.emit.mark_broadcast(gx, g, range(2, rank))
    return [gx]


@register("GlobalMaxPool")
def global_max_pool(ctx: Context, gy):
    """gx[n, c] = gy[n, c] at the first (row-major) argmax of x[n, c], 0 elsewhere; ties are not split.

    All of gy[n, c] goes to the first (row-major) position of the channel's maximum (ArgMax's choice,
    also what onnxruntime's MaxPool Indices and PyTorch pick).
    """
    x = ctx.input(0)
    emit = ctx.emit
    flat = ctx.op("Reshape", [x, emit.ints([0, 0, -1])])
    arg = ctx.op("ArgMax", [flat], axis=2, keepdims=1)                        # (N, C, 1)
    size = emit.squeeze(ctx.op("Slice", [emit.shape_of(flat), emit.ints([2]), emit.ints([3])]), [0])
    positions = ctx.op("Range", [emit.const(np.array(0, np.int64)), size, emit.const(np.array(1, np.int64))])
    onehot = ctx.op("Cast", [ctx.op("Equal", [positions, arg])], to=ctx.view.elem_type(x))
    g = ctx.op("Mul", [onehot, ctx.op("Reshape", [gy[0], emit.ints([0, 0, 1])])])
    return [ctx.op("Reshape", [g, emit.shape_of(x)])]


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def _channel_view(ctx: Context, v: str, rank: int) -> str:
    """A per-channel vector (C,) reshaped to (C, 1, ..., 1) to broadcast against an NC... tensor."""
    return ctx.op("Reshape", [v, ctx.emit.ints([-1] + [1] * (rank - 2))])


@register("BatchNormalization")
def batch_normalization(ctx: Context, gy):
    """gx = gy * scale / sqrt(var + epsilon), per channel (inference mode: the statistics are constants)."""
    x, scale, var = ctx.input(0), ctx.input(1), ctx.input(4)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0] or gy[0] is None:
        return result
    if int(ctx.attr("training_mode", 0)) == 1 or (ctx.opset < 7 and int(ctx.attr("is_test", 0)) == 0):
        raise ValueError("BatchNormalization in training mode (batch statistics) is not supported; "
                         "export the model in eval mode")
    eps = float(ctx.attr("epsilon", 1e-5))
    rank = ctx.rank(x)
    factor = ctx.op("Div", [scale, ctx.op("Sqrt", [ctx.op("Add", [var, ctx.scalar(eps, x)])])])
    if ctx.opset < 9 and int(ctx.attr("spatial", 1)) == 0:
        factor = ctx.emit.unsqueeze(factor, [0])  # per-activation statistics of shape (C, D1, ...)
    else:
        factor = _channel_view(ctx, factor, rank)
    result[0] = ctx.op("Mul", [gy[0], factor])
    return result


def _count_over(ctx: Context, x: str, axes: Sequence[int]) -> str:
    """Number of elements of `x` over `axes`, as a scalar of x's dtype."""
    shape = ctx.shape(x)
    if shape is not None and all(isinstance(shape[a], int) for a in axes):
        return ctx.scalar(float(math.prod(shape[a] for a in axes)), x)
    emit = ctx.emit
    dims = ctx.op("Gather", [emit.shape_of(x), emit.ints(axes)], axis=0)
    return ctx.op("Cast", [emit.reduce("ReduceProd", dims, None, keepdims=0)], to=ctx.view.elem_type(x))


def _normalised_grad(ctx: Context, x: str, gs: str, axes: Sequence[int], eps: float,
                     g_mean: str | None = None, g_invstd: str | None = None) -> str:
    """Gradient of xhat = (x - mean) * invstd over `axes` given gs = d/dxhat (already times scale):

        gx = invstd * (gs - mean(gs) - xhat * mean(gs * xhat))

    plus the contributions of the statistics themselves when they are outputs with gradients
    (d mean / dx = 1/n, d invstd / dx = -invstd^2 * xhat / n).
    """
    emit = ctx.emit
    mean = emit.reduce("ReduceMean", x, axes, keepdims=1)
    centred = ctx.op("Sub", [x, mean])
    var = emit.reduce("ReduceMean", ctx.op("Mul", [centred, centred]), axes, keepdims=1)
    invstd = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.scalar(eps, x)])])])
    xhat = ctx.op("Mul", [centred, invstd])
    mg = emit.reduce("ReduceMean", gs, axes, keepdims=1)
    mgx = emit.reduce("ReduceMean", ctx.op("Mul", [gs, xhat]), axes, keepdims=1)
    inner = ctx.op("Sub", [ctx.op("Sub", [gs, mg]), ctx.op("Mul", [xhat, mgx])])
    if g_invstd is not None:
        scaled = ctx.op("Div", [ctx.op("Mul", [g_invstd, invstd]), _count_over(ctx, x, axes)])
        inner = ctx.op("Sub", [inner, ctx.op("Mul", [xhat, scaled])])
    gx = ctx.op("Mul", [inner, invstd])
    if g_mean is not None:
        gx = ctx.op("Add", [gx, ctx.op("Div", [g_mean, _count_over(ctx, x, axes)])])
    return gx


@register("LayerNormalization")
def layer_normalization(ctx: Context, gy):
    """gx = invstd * (gs - mean(gs) - xhat * mean(gs * xhat)), gs = gy * scale, over axes axis..rank-1.

    Gradients reaching the optional Mean / InvStdDev outputs add gMean / n and
    -invstd^2 * xhat * gInvStdDev / n.
    """
    x, scale = ctx.input(0), ctx.input(1)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0]:
        return result
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = float(ctx.attr("epsilon", 1e-5))
    # Mean / InvStdDev are of the stash type (float by default) even for double X.
    elem = ctx.view.elem_type(x)
    g_mean, g_invstd = [ctx.op("Cast", [g], to=elem) if g is not None else None
                        for g in (list(gy[1:3]) + [None, None])[:2]]
    if gy[0] is not None:
        gs = ctx.op("Mul", [gy[0], scale])
    else:
        gs = ctx.emit.zeros_like(x, ctx.dtype(x))
    result[0] = _normalised_grad(ctx, x, gs, axes, eps, g_mean, g_invstd)
    return result


@register("InstanceNormalization")
def instance_normalization(ctx: Context, gy):
    """gx = invstd * (gs - mean(gs) - xhat * mean(gs * xhat)), gs = gy * scale[c], over the spatial axes."""
    x, scale = ctx.input(0), ctx.input(1)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0] or gy[0] is None:
        return result
    rank = ctx.rank(x)
    gs = ctx.op("Mul", [gy[0], _channel_view(ctx, scale, rank)])
    result[0] = _normalised_grad(ctx, x, gs, list(range(2, rank)), float(ctx.attr("epsilon", 1e-5)))
    return result


@register("GroupNormalization")
def group_normalization(ctx: Context, gy):
    """gx = invstd * (gs - mean(gs) - xhat * mean(gs * xhat)) per group of C/G channels, gs = gy * scale.

    Statistics over (C/G, spatial...) per group; the scale is per group at opset 18 (per channel from 21).
    """
    x, scale = ctx.input(0), ctx.input(1)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0] or gy[0] is None:
        return result
    emit = ctx.emit
    groups = int(ctx.attr("num_groups"))
    eps = float(ctx.attr("epsilon", 1e-5))
    rank = ctx.rank(x)
    grouped = emit.ints([0, groups, -1])
    xg = ctx.op("Reshape", [x, grouped])
    if ctx.opset >= 21:
        gs = ctx.op("Reshape", [ctx.op("Mul", [gy[0], _channel_view(ctx, scale, rank)]), grouped])
    else:
        gs = ctx.op("Mul", [ctx.op("Reshape", [gy[0], grouped]), ctx.op("Reshape", [scale, emit.ints([-1, 1])])])
    gx = _normalised_grad(ctx, xg, gs, [2], eps)
    result[0] = ctx.op("Reshape", [gx, emit.shape_of(x)])
    return result


# --------------------------------------------------------------------------------------------------
# Resize / Upsample
# --------------------------------------------------------------------------------------------------
def _str_attr(ctx: Context, name: str, default: str) -> str:
    v = ctx.attr(name, default)
    return v.decode() if isinstance(v, bytes) else v


@register("Resize", "Upsample")
def resize(ctx: Context, gy):
    """gx = M_a^T applied to gy along each resized axis a; M_a (out_a x in_a) = the node's own Resize of an identity.

    Resize is linear in X and separable over axes (nearest, linear, cubic, antialias alike), so
    gx = gy contracted, axis by axis, with the 1-D interpolation matrix M_a (out_a x in_a) of each resized
    axis. M_a is not re-derived from the coordinate-transformation formulas: it is obtained by running the
    node's own Resize (same mode and attributes) on an identity matrix laid out as (in_a, 1, .., in_a, .., 1)
    with only axis `a` resized (the columns ride on axis 0, which must not be resized).
    """
    x = ctx.input(0)
    result: list = [None] * len(ctx.node.input)
    if not ctx.needs[0] or gy[0] is None:
        return result
    emit = ctx.emit
    rank = ctx.rank(x)
    dtype = ctx.dtype(x)
    op_type = ctx.node.op_type
    if _str_attr(ctx, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ValueError("Resize with keep_aspect_ratio_policy other than 'stretch' is not supported")
    ctm = _str_attr(ctx, "coordinate_transformation_mode", "half_pixel")
    axes = ctx.attr("axes")
    axes = [a + rank if a < 0 else a for a in axes] if axes is not None else list(range(rank))
    n_axes = len(axes)

    scales_attr = None
    roi = scales = sizes = ""
    if op_type == "Upsample" and ctx.opset < 9:
        scales_attr = [float(s) for s in ctx.attr("scales")]
    elif op_type == "Upsample" or ctx.opset < 11:
        scales = ctx.input(1)
    else:
        roi, scales, sizes = ctx.input(1), ctx.input(2), ctx.input(3)
    scales_val = np.array(scales_attr) if scales_attr is not None else ctx.value(scales) if scales else None
    sizes_val = ctx.value(sizes) if sizes else None
    use_sizes = bool(sizes) and not (sizes_val is not None and sizes_val.size == 0)
    if scales_val is not None and scales_val.size == 0:
        scales_val = None
    xshape = ctx.shape(x) or [None] * rank

    def resized(p: int) -> bool | None:
        """Whether position p (axis axes[p]) changes; None if unknown before run time."""
        change = None
        if use_sizes:
            if sizes_val is not None and isinstance(xshape[axes[p]], int):
                change = int(sizes_val[p]) != xshape[axes[p]]
        elif scales_val is not None:
            change = float(scales_val[p]) != 1.0
        if ctm == "tf_crop_and_resize" and change is False:
            roi_val = ctx.value(roi) if roi else None
            if roi_val is None or roi_val.size == 0:
                return None
            return not (float(roi_val[p]) == 0.0 and float(roi_val[p + n_axes]) == 1.0)
        return change

    attrs = {a.name: helper.get_attribute_value(a) for a in ctx.node.attribute}
    if ctm == "tf_crop_and_resize":
        attrs["extrapolation_value"] = 0.0  # outside the crop, y is a constant: no dependence on x
    g = gy[0]
    for p, a in enumerate(axes):
        change = resized(p)
        if a == 0:
            if change:
                raise ValueError("the gradient of a Resize that resizes the batch axis is not supported")
            continue  # assumed unchanged when unknown (batch axes are not resized in practice)
        if change is False:
            continue
        mask = np.arange(n_axes) == p
        # Identity laid out as (in_a, 1, ..., in_a at a, ..., 1)
        in_a = xshape[a]
        if isinstance(in_a, int):
            e_shape = [1] * rank
            e_shape[0] = e_shape[a] = in_a
            eye = emit.const(np.eye(in_a, dtype=dtype).reshape(e_shape), hint="resize_eye")
            e_shape_t = emit.ints(e_shape) if use_sizes else None  # only the `sizes` form reads it
        else:
            n_t = ctx.op("Gather", [emit.shape_of(x), emit.ints([a])], axis=0)
            square = ctx.op("ConstantOfShape", [ctx.op("Concat", [n_t, n_t], axis=0)],
                            value=helper.make_tensor("v", helper.np_dtype_to_tensor_dtype(dtype), [1], [0]))
            parts = [n_t] + [emit.ints([1])] * (a - 1) + [n_t] + ([emit.ints([1] * (rank - a - 1))]
                                                                 if a < rank - 1 else [])
            e_shape_t = ctx.op("Concat", parts, axis=0)
            eye = ctx.op("Reshape", [ctx.op("EyeLike", [square]), e_shape_t])
        node_attrs = dict(attrs)
        inputs = [eye]
        if scales_attr is not None:
            node_attrs["scales"] = [s if m else 1.0 for s, m in zip(scales_attr, mask)]
        elif op_type == "Upsample" or ctx.opset < 11:
            inputs.append(_where_const(ctx, mask, scales, np.ones(n_axes, np.float32)))
        else:
            if ctm == "tf_crop_and_resize":
                default_roi = np.array([0.0] * n_axes + [1.0] * n_axes, dtype=ctx.dtype(roi))
                inputs.append(_where_const(ctx, np.concatenate([mask, mask]), roi, default_roi))
            else:
                inputs.append(roi)
            if use_sizes:
                e_sizes = ctx.op("Gather", [e_shape_t, emit.ints(axes)], axis=0)
                inputs += ["", ctx.op("Where", [emit.const(mask), sizes, e_sizes])]
            else:
                inputs.append(_where_const(ctx, mask, scales, np.ones(n_axes, np.float32)))
        interp = ctx.op(op_type, inputs, **node_attrs)                          # (in_a, ..., out_a, ...)
        matrix = ctx.op("Transpose", [ctx.op("Flatten", [interp], axis=1)], perm=[1, 0])  # (out_a, in_a)
        if a == rank - 1:
            g = ctx.op("MatMul", [g, matrix])
        else:
            perm = [i for i in range(rank) if i != a] + [a]
            inverse = [perm.index(i) for i in range(rank)]
            g = ctx.op("Transpose", [ctx.op("MatMul", [ctx.op("Transpose", [g], perm=perm), matrix])], perm=inverse)
    result[0] = g
    return result


def _where_const(ctx: Context, mask: np.ndarray, values: str, default: np.ndarray) -> str:
    """`values` where mask, else `default` (folded to a constant when `values` is one)."""
    const = ctx.value(values)
    if const is not None:
        return ctx.emit.const(np.where(mask, const, default).astype(const.dtype), hint="resize_param")
    return ctx.op("Where", [ctx.emit.const(mask), values, ctx.emit.const(default.astype(ctx.dtype(values)))])


# --------------------------------------------------------------------------------------------------
# LpNormalization / LRN
# --------------------------------------------------------------------------------------------------
@register("LpNormalization")
def lp_normalization(ctx: Context, gy):
    """gx = (gy - s * sum(gy * y)) / N(x) along axis; p = 2: s = y, N = L2 norm; p = 1: s = Sign(x), N = L1 norm.

    y = x / N(x) along `axis` with N the L_p norm (p = 1 or 2).
    """
    x, y = ctx.input(0), ctx.output(0)
    if gy[0] is None:
        return [None]
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    p = int(ctx.attr("p", 2))
    if p not in (1, 2):
        raise ValueError(f"LpNormalization with p={p}")
    emit = ctx.emit
    norm = emit.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=1)
    dot = emit.reduce("ReduceSum", ctx.op("Mul", [gy[0], y]), [axis], keepdims=1)
    s = y if p == 2 else ctx.op("Sign", [x])
    return [ctx.op("Div", [ctx.op("Sub", [gy[0], ctx.op("Mul", [s, dot])]), norm])]


def _channel_window_sum(ctx: Context, t: str, size: int, before: int, after: int) -> str:
    """sum over channels c-before .. c+after of NC... tensor `t` (zero outside), as a Conv over (N,1,C,L)."""
    emit = ctx.emit
    t4 = emit.unsqueeze(ctx.op("Reshape", [t, emit.ints([0, 0, -1])]), [1])
    ones = emit.const(np.ones((1, 1, size, 1), dtype=ctx.dtype(t)), hint="lrn_window")
    summed = ctx.op("Conv", [t4, ones], pads=[before, 0, after, 0])
    return ctx.op("Reshape", [summed, emit.shape_of(t)])


@register("LRN")
def lrn(ctx: Context, gy):
    """gx = gy * d^-beta - 2 alpha beta / size * x * S^T(gy * x * d^(-beta-1)), d = bias + alpha/size * S(x^2).

    y = x * d^-beta, d = bias + alpha/size * S, S = channel-window sum of x^2 (window from
    c - floor((size-1)/2) to c + ceil((size-1)/2)); its adjoint is the mirrored window sum:
    gx = g * d^-beta - 2 alpha beta / size * x * S^T(g * x * d^(-beta-1))."""
    x = ctx.input(0)
    if gy[0] is None:
        return [None]
    size = int(ctx.attr("size"))
    alpha, beta, bias = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)), float(ctx.attr("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = ctx.op("Mul", [x, x])
    d = ctx.op("Add", [ctx.scalar(bias, x), ctx.op("Mul", [ctx.scalar(alpha / size, x),
                                                           _channel_window_sum(ctx, sq, size, before, after)])])
    d_beta = ctx.op("Pow", [d, ctx.scalar(-beta, x)])
    direct = ctx.op("Mul", [gy[0], d_beta])
    inner = ctx.op("Mul", [ctx.op("Mul", [gy[0], x]), ctx.op("Div", [d_beta, d])])
    back = _channel_window_sum(ctx, inner, size, after, before)
    coupled = ctx.op("Mul", [ctx.scalar(2.0 * alpha * beta / size, x), ctx.op("Mul", [x, back])])
    return [ctx.op("Sub", [direct, coupled])]
