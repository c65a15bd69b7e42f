"""Rules for ops that only move, copy or relabel elements.

Index-like inputs (shapes, axes, indices, starts/ends, pads, split sizes) are never differentiable; their
gradient slot is always None. Where a value the rule needs is a constant of the model it is used at
build time (cheaper graph), otherwise it is computed in the graph from `Shape` so that symbolic
(batch) dimensions keep working.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from onnx import TensorProto

from .registry import Context, register

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)

IntsOrTensor = Union[Sequence[int], str]


# --- small helpers shared with linalg.py ---------------------------------------------------------

def no_grads(ctx: Context) -> list:
    return [None] * len(ctx.node.input)


def first_only(ctx: Context, g) -> list:
    return [g] + [None] * (len(ctx.node.input) - 1)


def norm_axis(axis: int, rank: int) -> int:
    axis = int(axis)
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def static_dim(ctx: Context, name: str, axis: int) -> int | None:
    shape = ctx.shape(name)
    if shape is None or axis >= len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def static_shape(ctx: Context, name: str) -> list[int] | None:
    shape = ctx.shape(name)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return list(shape)


def const_ints(ctx: Context, name: str) -> list[int] | None:
    if not name:
        return None
    v = ctx.value(name)
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


def ints_tensor(ctx: Context, v: IntsOrTensor) -> str:
    return v if isinstance(v, str) else ctx.emit.ints(v)


def dim_tensor(ctx: Context, name: str, axis: int) -> str:
    """1-element int64 tensor holding dimension `axis` of `name` (a constant when known)."""
    d = static_dim(ctx, name, axis)
    if d is not None:
        return ctx.emit.ints([d], "dim")
    return ctx.op("Gather", [ctx.emit.shape_of(name), ctx.emit.ints([axis])], axis=0)


def shape_slice(ctx: Context, shape: str, start: int, end: int) -> str:
    return slice_op(ctx, shape, [start], [end], [0])


def slice_op(ctx: Context, x: str, starts: IntsOrTensor, ends: IntsOrTensor, axes: IntsOrTensor,
             steps: IntsOrTensor | None = None) -> str:
    if ctx.opset >= 10:
        inputs = [x, ints_tensor(ctx, starts), ints_tensor(ctx, ends), ints_tensor(ctx, axes)]
        if steps is not None:
            inputs.append(ints_tensor(ctx, steps))
        return ctx.op("Slice", inputs)
    if any(isinstance(v, str) for v in (starts, ends, axes)) or (steps is not None and any(s != 1 for s in steps)):
        raise ValueError("Slice with computed bounds or steps needs opset >= 10")
    return ctx.op("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))


def pad_op(ctx: Context, x: str, pads: IntsOrTensor, axes: IntsOrTensor | None = None) -> str:
    """Constant-zero Pad; negative pads crop."""
    if ctx.opset >= 11:
        inputs = [x, ints_tensor(ctx, pads)]
        if axes is not None:
            inputs += ["", ints_tensor(ctx, axes)]
        return ctx.op("Pad", inputs)
    if isinstance(pads, str) or axes is not None:
        raise ValueError("Pad with computed pads needs opset >= 11")
    return ctx.op("Pad", [x], pads=list(pads))


def as_int64(ctx: Context, name: str) -> str:
    if ctx.view.elem_type(name) == TensorProto.INT64:
        return name
    return ctx.op("Cast", [name], to=TensorProto.INT64)


def scatter_add_axis(ctx: Context, g: str, axis: int, idx: str, n: str, out_shape: str, dtype,
                     k: int | None = None) -> str:
    """Adjoint of `Gather(data, idx, axis)` for 1-D int64 `idx` with entries in [0, n).

    `g` has the gathered shape (data's dims with dim `axis` replaced by idx's dims), `n` is a
    1-element int64 tensor (data's dim `axis`), `out_shape` the shape of data, `k` the number of indices
    when known. Repeated indices add up.
    """
    emit = ctx.emit
    _need_opset(ctx, 11, f"{ctx.node.op_type} gradient")
    flat = ctx.op("Flatten", [g], axis=axis)                                # (pre, K*post)
    if k is not None:
        g3 = ctx.op("Reshape", [flat, emit.ints([0, k, -1])])
    else:
        k_t = ctx.op("Reshape", [ctx.op("Size", [idx]), emit.ints([1])])
        g3 = ctx.op("Reshape", [flat, ctx.op("Concat", [emit.ints([0]), k_t, emit.ints([-1])], axis=0)])
    if ctx.opset >= 16:
        g3_shape = emit.shape_of(g3)
        z_shape = ctx.op("Concat", [shape_slice(ctx, g3_shape, 0, 1), n, shape_slice(ctx, g3_shape, 2, 3)], axis=0)
        zeros = ctx.op("Expand", [emit.const(np.zeros((), dtype=dtype), hint="zero"), z_shape])
        i3 = ctx.op("Expand", [ctx.op("Reshape", [idx, emit.ints([1, -1, 1])]), g3_shape])
        r3 = ctx.scatter_add("ScatterElements", zeros, i3, g3, like=ctx.input(0), axis=1)
    else:
        # No scatter-add before opset 16: multiply by the (n, K) one-hot matrix of the indices.
        n_scalar = ctx.op("Reshape", [n, emit.ints([])])
        rng = ctx.op("Range", [emit.const(np.int64(0)), n_scalar, emit.const(np.int64(1))])
        onehot = ctx.op("Equal", [emit.unsqueeze(rng, [1]), idx])             # (n, K)
        onehot = ctx.op("Cast", [onehot], to=_onnx_type(dtype))
        r3 = ctx.op("MatMul", [onehot, g3])                                  # (pre, n, post)
    return ctx.op("Reshape", [r3, out_shape])


def _need_opset(ctx: Context, version: int, what: str) -> None:
    if ctx.opset < version:
        raise ValueError(f"{what} needs opset {version} or newer (model has {ctx.opset})")


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def normalized_indices(ctx: Context, idx: str, n: str, n_static: int | None) -> str:
    """int64 copy of `idx` with negative entries wrapped by `n` (1-element tensor; `n_static` if known)."""
    v = ctx.value(idx)
    if v is not None:
        v = np.asarray(v, dtype=np.int64)
        if not (v < 0).any():
            return ctx.emit.const(v, hint="indices")
        if n_static is not None:
            return ctx.emit.const(np.where(v < 0, v + n_static, v), hint="indices")
    i64 = as_int64(ctx, idx)
    negative = ctx.op("Less", [i64, ctx.emit.const(np.int64(0))])
    return ctx.op("Where", [negative, ctx.op("Add", [i64, n]), i64])


# --- identity-like ---------------------------------------------------------------------------------

@register("Identity", "Dropout")
def identity(ctx: Context, gy):
    """gx = gy (Identity; Dropout at inference, whose mask output carries no gradient)."""
    # Dropout in an inference graph is the identity; its mask output carries no gradient.
    return first_only(ctx, gy[0])


@register("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape_like(ctx: Context, gy):
    """gx = Reshape(gy, Shape(x)) (Flatten, Reshape, Squeeze, Unsqueeze keep the element order)."""
    # Same elements in the same order: reshape back. Covers the attribute (< 13) and input forms of axes.
    x = ctx.input(0)
    return first_only(ctx, ctx.op("Reshape", [gy[0], ctx.emit.shape_of(x)]))


@register("Cast", "CastLike")
def cast(ctx: Context, gy):
    """gx = Cast(gy, to=x's type) when x is float, else no gradient (Cast, CastLike)."""
    x = ctx.input(0)
    to = ctx.view.elem_type(x)
    if to not in FLOAT_TYPES:
        return no_grads(ctx)
    return first_only(ctx, ctx.op("Cast", [gy[0]], to=to))


# --- permutations ----------------------------------------------------------------------------------

@register("Transpose")
def transpose(ctx: Context, gy):
    """gx = Transpose(gy, inverse of perm)."""
    x = ctx.input(0)
    perm = ctx.attr("perm")
    if perm is None:
        perm = list(reversed(range(ctx.rank(x))))
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[int(p)] = i
    return first_only(ctx, ctx.op("Transpose", [gy[0]], perm=inverse))


@register("DepthToSpace")
def depth_to_space(ctx: Context, gy):
    """gx = SpaceToDepth(gy) for mode DCR; CRD: gy reshaped and transposed by the inverse permutation."""
    b = int(ctx.attr("blocksize"))
    mode = ctx.attr("mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "DCR":
        return first_only(ctx, ctx.op("SpaceToDepth", [gy[0]], blocksize=b))
    # CRD: y = reshape(transpose(reshape(x, [N, C/b², b, b, H, W]), [0,1,4,2,5,3]), [N, C/b², H*b, W*b])
    x = ctx.input(0)
    emit = ctx.emit
    xs = emit.shape_of(x)
    gs = emit.shape_of(gy[0])
    six = ctx.op("Concat", [shape_slice(ctx, gs, 0, 2), shape_slice(ctx, xs, 2, 3), emit.ints([b]),
                            shape_slice(ctx, xs, 3, 4), emit.ints([b])], axis=0)
    t = ctx.op("Transpose", [ctx.op("Reshape", [gy[0], six])], perm=[0, 1, 3, 5, 2, 4])
    return first_only(ctx, ctx.op("Reshape", [t, xs]))


@register("SpaceToDepth")
def space_to_depth(ctx: Context, gy):
    """gx = DepthToSpace(gy, blocksize, mode DCR), the inverse permutation."""
    # SpaceToDepth is exactly the inverse permutation of DepthToSpace in DCR mode (the default).
    b = int(ctx.attr("blocksize"))
    return first_only(ctx, ctx.op("DepthToSpace", [gy[0]], blocksize=b))


# --- joining and splitting ---------------------------------------------------------------------------

@register("Concat")
def concat(ctx: Context, gy):
    """g_i = Slice(gy, offset_i, offset_i + size_i) along the concat axis."""
    rank = ctx.rank(ctx.input(0))
    axis = norm_axis(ctx.attr("axis"), rank)
    out = no_grads(ctx)
    offset: int | str = 0
    for i, x in enumerate(ctx.node.input):
        size = static_dim(ctx, x, axis)
        size_t = size if size is not None else dim_tensor(ctx, x, axis)
        if isinstance(offset, int) and isinstance(size_t, int):
            end: int | str = offset + size_t
        else:
            end = ctx.op("Add", [ints_tensor(ctx, [offset]) if isinstance(offset, int) else offset,
                                 ints_tensor(ctx, [size_t]) if isinstance(size_t, int) else size_t])
        if ctx.needs[i]:
            start_v = [offset] if isinstance(offset, int) else offset
            end_v = [end] if isinstance(end, int) else end
            out[i] = slice_op(ctx, gy[0], start_v, end_v, [axis])
        offset = end
    return out


@register("Split")
def split(ctx: Context, gy):
    """gx = Concat(gy_0, gy_1, ...) along the split axis, zeros for outputs that got no gradient."""
    # Whatever the form of the sizes (attribute, input, num_outputs), the outputs have them: concatenate
    # the output gradients back, zeros for outputs no gradient reached.
    x = ctx.input(0)
    axis = norm_axis(ctx.attr("axis", 0), ctx.rank(x))
    dtype = ctx.dtype(x)
    parts = []
    for i, g in enumerate(gy):
        if g is None:
            if not ctx.output(i):
                raise ValueError("Split output without a name and without a gradient")
            g = ctx.emit.zeros_like(ctx.output(i), dtype)
        parts.append(g)
    gx = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, axis=axis)
    return first_only(ctx, gx)


# --- selecting ------------------------------------------------------------------------------------

def _slice_positions(dim: int, start: int, end: int, step: int) -> np.ndarray:
    """Indices Slice picks along one axis, with ONNX's clamping (differs from Python's for step < 0)."""
    if step == 0:
        raise ValueError("Slice step 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return np.arange(start, end, step, dtype=np.int64)


def _scatter_axis(ctx: Context, g: str, axis: int, rank: int, positions: str, dim: str, dtype) -> str:
    """Places `g` (sliced along `axis` at distinct `positions`) into zeros of length `dim` on that axis."""
    emit = ctx.emit
    _need_opset(ctx, 11, "Slice gradient with steps or computed bounds")
    gs = emit.shape_of(g)
    target = ctx.op("Concat", [shape_slice(ctx, gs, 0, axis), dim, shape_slice(ctx, gs, axis + 1, INT64_MAX)], axis=0)
    zeros = ctx.op("Expand", [emit.const(np.zeros((), dtype=dtype), hint="zero"), target])
    view = [1] * rank
    view[axis] = -1
    idx = ctx.op("Expand", [ctx.op("Reshape", [positions, emit.ints(view)]), gs])
    return ctx.op("ScatterElements", [zeros, idx, g], axis=axis)


@register("Slice")
def slice_(ctx: Context, gy):
    """gx = gy put back at the sliced positions, 0 elsewhere (Pad, flip for negative steps, or ScatterElements)."""
    x = ctx.input(0)
    rank = ctx.rank(x)
    dtype = ctx.dtype(x)
    emit = ctx.emit
    if ctx.opset < 10:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes = list(ctx.attr("axes", list(range(len(starts)))))
        steps = [1] * len(starts)
        names = ("", "", "", "")
    else:
        names = (ctx.input(1), ctx.input(2), ctx.input(3), ctx.input(4))
        starts, ends = const_ints(ctx, names[0]), const_ints(ctx, names[1])
        axes = const_ints(ctx, names[2]) if names[2] else None
        steps = const_ints(ctx, names[3]) if names[3] else None
        count = len(starts) if starts is not None else len(ends) if ends is not None else None
        if count is None:
            shape = ctx.shape(names[0])
            count = shape[0] if shape and isinstance(shape[0], int) else None
        if names[2] and axes is None:
            raise ValueError("Slice with non-constant axes")
        if axes is None:
            if count is None:
                raise ValueError("Slice with unknown number of sliced axes")
            axes = list(range(count))
        if not names[3]:
            steps = [1] * len(axes)

    g = gy[0]
    pads = [0] * (2 * rank)
    padded = False
    reversed_axes: list[int] = []
    for j, a in enumerate(axes):
        a = norm_axis(a, rank)
        dim = static_dim(ctx, x, a)
        known = dim is not None and starts is not None and ends is not None and steps is not None
        if known:
            pos = _slice_positions(dim, starts[j], ends[j], steps[j])
            if len(pos) == dim and steps[j] > 0:
                continue
            if not len(pos):
                pads[a], pads[rank + a] = dim, 0
                padded = True
                continue
            if len(pos) == 1 or abs(steps[j]) == 1:
                # A contiguous run: zero-pad around it (after flipping it back for step -1).
                lo, hi = int(pos.min()), int(pos.max())
                pads[a], pads[rank + a] = lo, dim - 1 - hi
                padded = padded or lo > 0 or hi < dim - 1
                if steps[j] < 0 and len(pos) > 1:
                    reversed_axes.append(a)
                continue
            positions = emit.const(pos, hint="positions")
        else:
            _need_opset(ctx, 11, "Slice gradient on an axis of unknown size or with computed bounds")

            def part(vals, name, default=None):
                if vals is not None:
                    return emit.ints([vals[j]])
                if not name:
                    return emit.ints([default])
                return slice_op(ctx, as_int64(ctx, name), [j], [j + 1], [0])

            d = dim_tensor(ctx, x, a)
            rng = ctx.op("Range", [emit.const(np.int64(0)), ctx.op("Reshape", [d, emit.ints([])]),
                                   emit.const(np.int64(1))])
            positions = slice_op(ctx, rng, part(starts, names[0]), part(ends, names[1]), [0],
                                 part(steps, names[3], 1))
        g = _scatter_axis(ctx, g, a, rank, positions, dim_tensor(ctx, x, a), dtype)
    if reversed_axes:
        n = len(reversed_axes)
        g = slice_op(ctx, g, [-1] * n, [INT64_MIN] * n, reversed_axes, [-1] * n)
    if padded:
        g = pad_op(ctx, g, pads)
    return first_only(ctx, g)


@register("Gather")
def gather(ctx: Context, gy):
    """gx = zeros with gy scatter-added at the gathered indices along axis (repeated indices add up)."""
    out = no_grads(ctx)
    if not ctx.needs[0]:
        return out
    data, idx = ctx.input(0), ctx.input(1)
    axis = norm_axis(ctx.attr("axis", 0), ctx.rank(data))
    n = dim_tensor(ctx, data, axis)
    idx_n = normalized_indices(ctx, idx, n, static_dim(ctx, data, axis))
    flat = ctx.op("Reshape", [idx_n, ctx.emit.ints([-1])])
    idx_shape = static_shape(ctx, idx)
    k = int(np.prod(idx_shape)) if idx_shape is not None else None
    out[0] = scatter_add_axis(ctx, gy[0], axis, flat, n, ctx.emit.shape_of(data), ctx.dtype(data), k)
    return out


@register("GatherElements")
def gather_elements(ctx: Context, gy):
    """gx = ScatterElements(zeros, indices, gy, axis, reduction='add') (one-hot sum before opset 16)."""
    out = no_grads(ctx)
    if not ctx.needs[0]:
        return out
    emit = ctx.emit
    data, idx = ctx.input(0), ctx.input(1)
    rank = ctx.rank(data)
    axis = norm_axis(ctx.attr("axis", 0), rank)
    dtype = ctx.dtype(data)
    if ctx.opset >= 16:
        out[0] = ctx.scatter_add("ScatterElements", emit.zeros_like(data, dtype), idx, gy[0], like=data, axis=axis)
        return out
    # Before opset 16: one-hot along a new last axis, sum over `axis`, move the new axis into its place.
    n = dim_tensor(ctx, data, axis)
    i64 = normalized_indices(ctx, idx, n, static_dim(ctx, data, axis))
    rng = ctx.op("Range", [emit.const(np.int64(0)), ctx.op("Reshape", [n, emit.ints([])]), emit.const(np.int64(1))])
    onehot = ctx.op("Cast", [ctx.op("Equal", [emit.unsqueeze(i64, [rank]), rng])], to=_onnx_type(dtype))
    summed = emit.reduce("ReduceSum", ctx.op("Mul", [onehot, emit.unsqueeze(gy[0], [rank])]), [axis], keepdims=0)
    perm = list(range(axis)) + [rank - 1] + list(range(axis, rank - 1))
    g = ctx.op("Transpose", [summed], perm=perm)
    ds, isz = static_shape(ctx, data), static_shape(ctx, idx)
    if ds is None or isz is None or any(ds[i] != isz[i] for i in range(rank) if i != axis):
        grow = ctx.op("Sub", [emit.shape_of(data), emit.shape_of(g)])
        g = pad_op(ctx, g, ctx.op("Concat", [emit.ints([0] * rank), grow], axis=0))
    out[0] = g
    return out


@register("Pad")
def pad(ctx: Context, gy):
    """constant mode: gx = Pad(gy, -pads), gvalue = sum(gy) - sum(gx); reflect/edge/wrap: scatter-add to sources.

    reflect / edge / wrap: each padded axis is a Gather with the constant index map np.pad(arange(dim)), so
    gy is scatter-added back through that map (axis by axis).
    """
    x = ctx.input(0)
    rank = ctx.rank(x)
    mode = ctx.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    out = no_grads(ctx)
    axes_name = ctx.input(3) if ctx.opset >= 18 else ""
    if ctx.opset < 11:
        pads_v: list[int] | None = list(ctx.attr("pads"))
        pads_name = ""
    else:
        pads_name = ctx.input(1)
        pads_v = const_ints(ctx, pads_name)
    axes_v = const_ints(ctx, axes_name) if axes_name else list(range(rank))
    if mode == "constant":
        if pads_v is not None:
            neg: IntsOrTensor = [-p for p in pads_v]
        else:
            neg = ctx.op("Neg", [as_int64(ctx, pads_name)])
        axes_arg = None
        if axes_name:
            axes_arg = axes_v if axes_v is not None else axes_name
        gx = pad_op(ctx, gy[0], neg, axes_arg)
        if ctx.needs[0]:
            out[0] = gx
        if len(out) > 2 and ctx.needs[2]:
            # Every output element that is not a copy of an input element is the constant.
            value = ctx.input(2)
            total = ctx.op("Sub", [ctx.emit.reduce("ReduceSum", gy[0], None, keepdims=0),
                                   ctx.emit.reduce("ReduceSum", gx, None, keepdims=0)])
            out[2] = ctx.op("Reshape", [total, ctx.emit.shape_of(value)])
        return out
    if mode not in ("reflect", "edge", "wrap"):
        raise ValueError(f"Pad mode '{mode}'")
    _need_opset(ctx, 11, f"Pad mode '{mode}' gradient")
    if pads_v is None or axes_v is None:
        raise ValueError(f"Pad mode '{mode}' with non-constant pads")
    if not ctx.needs[0]:
        return out
    # Each padded axis is a Gather with a constant index map (np.pad of arange): scatter-add back.
    k = len(axes_v)
    g = gy[0]
    dtype = ctx.dtype(x)
    for j, a in enumerate(axes_v):
        a = norm_axis(a, rank)
        b, e = pads_v[j], pads_v[k + j]
        if b == 0 and e == 0:
            continue
        if b < 0 or e < 0:
            raise ValueError(f"Pad mode '{mode}' with negative pads")
        dim = static_dim(ctx, x, a)
        if dim is None:
            raise ValueError(f"Pad mode '{mode}' on an axis of unknown size")
        index_map = np.pad(np.arange(dim, dtype=np.int64), (b, e), mode=mode)
        gs = ctx.emit.shape_of(g)
        target = ctx.op("Concat", [shape_slice(ctx, gs, 0, a), ctx.emit.ints([dim]),
                                   shape_slice(ctx, gs, a + 1, INT64_MAX)], axis=0)
        g = scatter_add_axis(ctx, g, a, ctx.emit.const(index_map, hint="pad_map"), ctx.emit.ints([dim]),
                             target, dtype, len(index_map))
    out[0] = g
    return out


@register("GatherND")
def gather_nd(ctx: Context, gy):
    """gx = ScatterND(zeros like data, indices, gy, reduction='add'): repeated index tuples add up."""
    out = no_grads(ctx)
    if not ctx.needs[0]:
        return out
    if int(ctx.attr("batch_dims", 0)) != 0:
        raise ValueError("GatherND with batch_dims > 0 has no gradient rule yet")
    if ctx.opset < 16:
        raise ValueError("GatherND's gradient needs ScatterND with reduction='add' (opset >= 16)")
    data, indices = ctx.input(0), ctx.input(1)
    emit = ctx.emit
    # ScatterND reads negative indices as they are in onnxruntime, but the spec does not promise it:
    # wrap them (idx + dim where idx < 0) against the indexed dims of data.
    k = emit.op("Slice", [emit.shape_of(indices), emit.ints([-1]), emit.ints([2**62])])
    dims = emit.op("Slice", [emit.shape_of(data), emit.ints([0]), k])
    idx = emit.op("Cast", [indices], to=7)
    wrapped = emit.op("Where", [emit.op("Less", [idx, emit.const(np.array(0, np.int64))]),
                                emit.op("Add", [idx, dims]), idx])
    out[0] = ctx.scatter_add("ScatterND", emit.zeros_like(data, ctx.dtype(data)), wrapped, gy[0], like=data)
    return out
