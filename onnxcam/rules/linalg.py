"""Rules for matrix products and reductions."""
from __future__ import annotations

from .registry import Context, register


@register("Gemm")
def gemm(ctx: Context, gy):
    # Y = alpha * op(A) op(B) + beta * C, op() transposing when transA / transB is set.
    a, b = ctx.input(0), ctx.input(1)
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    g = gy[0]
    out: list = [None] * len(ctx.node.input)
    if ctx.needs[0]:
        out[0] = (ctx.op("Gemm", [g, b], alpha=alpha, transB=1 - tb) if not ta
                  else ctx.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1))
    if ctx.needs[1]:
        out[1] = (ctx.op("Gemm", [a, g], alpha=alpha, transA=1 - ta) if not tb
                  else ctx.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta))
    if len(out) > 2 and ctx.needs[2]:
        gc = ctx.unbroadcast(g, ctx.input(2))
        out[2] = ctx.op("Mul", [gc, ctx.scalar(beta, g)]) if beta != 1.0 else gc
    return out
