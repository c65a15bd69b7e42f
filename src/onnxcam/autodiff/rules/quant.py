"""Quantisation ops, differentiated straight through (the rounding's derivative is taken as 1).

QDQ-quantised models put QuantizeLinear -> DequantizeLinear pairs on the path; with these rules the pair's
gradient is gy * scale / scale = gy, so CAMs of a QDQ model are those of the float model it approximates.
"""
from __future__ import annotations

from .registry import Context, register


def _scale_like(ctx: Context, x: str) -> str:
    """The scale input, reshaped to broadcast against `x` (per-tensor scalar, or 1-D along `axis`)."""
    scale = ctx.input(1)
    shape = ctx.shape(scale)
    if shape is None or len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
        return scale
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", 1)) % rank
    dims = [1] * rank
    dims[axis] = -1
    return ctx.op("Reshape", [scale, ctx.emit.ints(dims, "scale_shape")])


@register("QuantizeLinear")
def quantize_linear(ctx: Context, gy):
    """gx = gy / scale (straight-through estimator: round() and saturation count as identity)."""
    x = ctx.input(0)
    scale = _scale_like(ctx, x)
    g = ctx.op("Div", [gy[0], ctx.op("Cast", [scale], to=ctx.view.elem_type(x))])
    return [g] + [None] * (len(ctx.node.input) - 1)


@register("DequantizeLinear")
def dequantize_linear(ctx: Context, gy):
    """gx = gy * scale: the derivative of (x - zero_point) * scale, handed to the integer input."""
    scale = _scale_like(ctx, ctx.output(0))  # same shape as the integer input, and always inferred
    g = ctx.op("Mul", [gy[0], ctx.op("Cast", [scale], to=ctx.view.elem_type(ctx.output(0)))])
    return [g] + [None] * (len(ctx.node.input) - 1)
