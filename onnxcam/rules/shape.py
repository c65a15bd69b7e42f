"""Rules for ops that only move, copy or relabel elements."""
from __future__ import annotations

from .registry import Context, register


@register("Identity", "Dropout")
def identity(ctx: Context, gy):
    # Dropout in an inference graph is the identity; its mask output carries no gradient.
    return [gy[0]] + [None] * (len(ctx.node.input) - 1)


@register("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape_like(ctx: Context, gy):
    x = ctx.input(0)
    g = ctx.op("Reshape", [gy[0], ctx.emit.shape_of(x)])
    return [g] + [None] * (len(ctx.node.input) - 1)
