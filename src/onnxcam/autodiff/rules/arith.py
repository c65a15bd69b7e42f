"""Rules for element-wise arithmetic with broadcasting.

Binary and variadic ops broadcast numpy-style in every direction; each operand's gradient is the
gradient with respect to the broadcast result summed back to the operand's shape (`ctx.unbroadcast`,
static axes when shapes are known, a Shape-driven ReduceSum otherwise).

Conventions:
  * Max / Min: the gradient goes to the selected operand(s); ties share it equally (as torch.maximum
    does for two operands), so the operands' gradients always add up to gy.
  * Pow: d/dbase = exponent * base^(exponent - 1); d/dexponent = y * ln(base), taken as 0 where
    base == 0 (opset >= 11), as PyTorch does. Non-float exponents get no gradient.
  * Where: the condition carries no gradient.
(Einsum's rule lives in linalg.py.)
"""
from __future__ import annotations

from .registry import Context, register

FLOAT_ELEM_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _none(ctx: Context) -> list:
    return [None] * len(ctx.node.input)


def _is_float(ctx: Context, name: str) -> bool:
    return ctx.view.elem_type(name) in FLOAT_ELEM_TYPES


def _k(ctx: Context, value: float, like: str) -> str:
    return ctx.scalar(value, like)


@register("Add", "Sum")
def add(ctx: Context, gy):
    """gA, gB, ... = gy summed over each operand's broadcast axes (Add, and Sum with any number of inputs)."""
    out = _none(ctx)
    for i, name in enumerate(ctx.node.input):
        if ctx.needs[i]:
            out[i] = ctx.unbroadcast(gy[0], name)
    return out


@register("Mean")
def mean(ctx: Context, gy):
    """g_i = gy / n summed over operand i's broadcast axes, n = number of inputs."""
    out = _none(ctx)
    g = ctx.op("Div", [gy[0], _k(ctx, float(len(ctx.node.input)), ctx.output(0))])
    for i, name in enumerate(ctx.node.input):
        if ctx.needs[i]:
            out[i] = ctx.unbroadcast(g, name)
    return out


@register("Sub")
def sub(ctx: Context, gy):
    """gA = gy, gB = -gy, each summed over its operand's broadcast axes."""
    a, b = ctx.input(0), ctx.input(1)
    out = _none(ctx)
    if ctx.needs[0]:
        out[0] = ctx.unbroadcast(gy[0], a)
    if ctx.needs[1]:
        out[1] = ctx.op("Neg", [ctx.unbroadcast(gy[0], b)])
    return out


@register("Mul")
def mul(ctx: Context, gy):
    """gA = gy * B, gB = gy * A, each summed over its operand's broadcast axes."""
    a, b = ctx.input(0), ctx.input(1)
    out = _none(ctx)
    if ctx.needs[0]:
        out[0] = ctx.unbroadcast(ctx.op("Mul", [gy[0], b]), a)
    if ctx.needs[1]:
        out[1] = ctx.unbroadcast(ctx.op("Mul", [gy[0], a]), b)
    return out


@register("Div")
def div(ctx: Context, gy):
    """gA = gy / B, gB = -(gy / B) * y, each summed over its operand's broadcast axes."""
    # y = a / b: da = gy / b, db = -gy a / b^2 = -(gy / b) y
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    out = _none(ctx)
    g_over_b = ctx.op("Div", [gy[0], b])
    if ctx.needs[0]:
        out[0] = ctx.unbroadcast(g_over_b, a)
    if ctx.needs[1]:
        out[1] = ctx.op("Neg", [ctx.unbroadcast(ctx.op("Mul", [g_over_b, y]), b)])
    return out


@register("Pow")
def pow_(ctx: Context, gy):
    """gbase = gy * e * base^(e - 1); gexp = gy * y * ln(base), 0 where base == 0; each unbroadcast.

    A constant scalar exponent is folded at build time. Only a float exponent gets a gradient; the
    base == 0 guard needs opset >= 11 (Where / Equal on floats).
    """
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    g = gy[0]
    out = _none(ctx)
    if ctx.needs[0]:
        bv = ctx.value(b)
        if bv is not None and bv.size == 1:  # constant exponent: fold e and e - 1
            e = float(bv.reshape(-1)[0])
            if e == 0.0:
                local = None
            elif e == 1.0:
                local = _k(ctx, 1.0, a)
            elif e == 2.0:
                local = ctx.op("Mul", [a, _k(ctx, 2.0, a)])
            else:
                local = ctx.op("Mul", [ctx.op("Pow", [a, _k(ctx, e - 1.0, a)]), _k(ctx, e, a)])
        else:
            bf = b if ctx.view.elem_type(b) == ctx.view.elem_type(a) else \
                ctx.op("Cast", [b], to=ctx.view.elem_type(a))
            local = ctx.op("Mul", [bf, ctx.op("Pow", [a, ctx.op("Sub", [bf, _k(ctx, 1.0, a)])])])
        if local is None:  # x ** 0
            out[0] = ctx.emit.zeros_like(a, ctx.dtype(a))
        else:
            out[0] = ctx.unbroadcast(ctx.op("Mul", [g, local]), a)
    if ctx.needs[1] and _is_float(ctx, b):
        gb = ctx.op("Mul", [ctx.op("Mul", [g, y]), ctx.op("Log", [a])])
        if ctx.opset >= 11:  # 0 * log(0) = nan: the exponent has no influence where base == 0
            zero = _k(ctx, 0.0, y)
            gb = ctx.op("Where", [ctx.op("Equal", [a, _k(ctx, 0.0, a)]), zero, gb])
        if ctx.view.elem_type(b) != ctx.view.elem_type(y):
            gb = ctx.op("Cast", [gb], to=ctx.view.elem_type(b))
        out[1] = ctx.unbroadcast(gb, b)
    return out


def _select(ctx: Context, gy, cmp: str) -> list:
    """Max (cmp=Less) / Min (cmp=Greater): operand i is selected where not cmp(x_i, y)."""
    y, g = ctx.output(0), gy[0]
    names = list(ctx.node.input)
    out = _none(ctx)
    if len(names) == 1:
        out[0] = g
        return out
    masks = [ctx.op("Cast", [ctx.op("Not", [ctx.op(cmp, [x, y])])], to=ctx.view.elem_type(y)) for x in names]
    share = ctx.op("Div", [g, ctx.op("Sum", masks)])  # count >= 1 everywhere: y is one of the operands
    for i, x in enumerate(names):
        if ctx.needs[i]:
            out[i] = ctx.unbroadcast(ctx.op("Mul", [share, masks[i]]), x)
    return out


@register("Max")
def max_(ctx: Context, gy):
    """g_i = gy * [x_i == y] / (number of operands equal to y), summed over operand i's broadcast axes."""
    return _select(ctx, gy, "Less")


@register("Min")
def min_(ctx: Context, gy):
    """g_i = gy * [x_i == y] / (number of operands equal to y), summed over operand i's broadcast axes."""
    return _select(ctx, gy, "Greater")


@register("Where")
def where(ctx: Context, gy):
    """gX = Where(cond, gy, 0), gY = Where(cond, 0, gy), each summed over its broadcast axes; cond gets none."""
    cond, x, z = ctx.input(0), ctx.input(1), ctx.input(2)
    out = _none(ctx)
    zero = _k(ctx, 0.0, ctx.output(0))
    if ctx.needs[1]:
        out[1] = ctx.unbroadcast(ctx.op("Where", [cond, gy[0], zero]), x)
    if ctx.needs[2]:
        out[2] = ctx.unbroadcast(ctx.op("Where", [cond, zero, gy[0]]), z)
    return out


@register("Expand")
def expand(ctx: Context, gy):
    """gx = gy summed over the axes Expand broadcast x along."""
    out = _none(ctx)
    if ctx.needs[0]:
        out[0] = ctx.unbroadcast(gy[0], ctx.input(0))
    return out


@register("Tile")
def tile(ctx: Context, gy):
    """gx = gy viewed as (r0, d0, r1, d1, ...) and summed over the repeat axes r_i."""
    # y has shape (r0 d0, r1 d1, ...) laid out tile-major per axis: view it as (r0, d0, r1, d1, ...)
    # and sum over the r axes.
    x, reps = ctx.input(0), ctx.input(1)
    out = _none(ctx)
    if not ctx.needs[0]:
        return out
    emit = ctx.emit
    rank = ctx.rank(x)
    if rank == 0:
        out[0] = gy[0]
        return out
    xs, rv = ctx.shape(x), ctx.value(reps)
    if rv is not None and xs is not None and all(isinstance(d, int) for d in xs):
        pairs = [int(v) for r, d in zip(rv.reshape(-1), xs) for v in (r, d)]
        split = emit.ints(pairs, "tile_shape")
    else:
        xshape = emit.shape_of(x)
        pair = emit.op("Concat", [emit.unsqueeze(reps, [1]),
                                  emit.unsqueeze(xshape, [1])], axis=1)
        split = ctx.op("Reshape", [pair, emit.ints([-1])])
    viewed = ctx.op("Reshape", [gy[0], split])
    out[0] = emit.reduce("ReduceSum", viewed, list(range(0, 2 * rank, 2)), keepdims=0)
    return out
