"""Rules for convolutions, pooling and normalisation layers."""
from __future__ import annotations

import math

from .registry import Context, register


def spatial_count(ctx: Context, x: str) -> str:
    """Number of spatial positions of NC... tensor `x`, as a scalar of x's dtype."""
    shape = ctx.shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        return ctx.scalar(float(math.prod(shape[2:])), x)
    emit = ctx.emit
    dims = emit.op("Slice", [emit.shape_of(x), emit.ints([2]), emit.ints([2**62])])
    return emit.op("Cast", [emit.reduce("ReduceProd", dims, None, keepdims=0)], to=ctx.view.elem_type(x))


@register("GlobalAveragePool")
def global_average_pool(ctx: Context, gy):
    x = ctx.input(0)
    g = ctx.op("Div", [gy[0], spatial_count(ctx, x)])
    return [ctx.op("Expand", [g, ctx.emit.shape_of(x)])]
