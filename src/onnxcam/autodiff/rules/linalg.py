"""Rules for matrix products, reductions and softmax."""
from __future__ import annotations

import numpy as np
import onnx

from .registry import Context, _unbroadcast_axes, _unbroadcast_dynamic, register
from .shape import const_ints, no_grads, norm_axis, static_dim


# Matrices below this many elements are multiplied whole: reading them costs less than the one-hot check.
ONE_HOT_MIN_ELEMENTS = 1 << 16


def one_hot_product(ctx: Context, g: str, matrix: str, axis: int, alpha: float, dense) -> str:
    """alpha * g @ R, R the rows of `matrix` along `axis` (0: R = matrix, 1: R = matrix^T), for the seed `g`
    (N, K), the cotangent of the node's 2-D output. Where every row of g holds at most one nonzero (a class
    target) that is those rows of R times it: a Gather of N rows instead of a pass over the whole matrix (a
    classifier's last layer: 5 MB for 1000 x 1280, read whole per explanation otherwise). Checked at run time
    (an If); any other seed takes `dense(emitter)`, the plain product. Exact either way: the dense sum adds
    only zeros to that product."""
    emit = ctx.emit
    shape = ctx.shape(matrix)
    if (not ctx.seed_rows or emit.opset < 11 or shape is None or len(shape) != 2
            or not all(isinstance(d, int) for d in shape) or shape[0] * shape[1] < ONE_HOT_MIN_ELEMENTS):
        return dense(emit)
    int64 = onnx.TensorProto.INT64
    nonzero = emit.op("Cast", [emit.op("Cast", [g], to=onnx.TensorProto.BOOL)], to=int64)
    per_row = emit.reduce("ReduceSum", nonzero, [1], keepdims=0)
    # ReduceMax of no rows would be the smallest int64: an empty batch takes the (empty) gather, correctly.
    one_hot = emit.op("Less", [emit.reduce("ReduceMax", per_row, None, keepdims=0),
                               emit.const(np.array(2, np.int64), hint="two")], hint="one_hot")

    def gather(branch):
        at = branch.op("ArgMax", [branch.op("Abs", [g])], axis=1, keepdims=1)
        value = branch.op("GatherElements", [g, at], axis=1)
        if alpha != 1.0:
            value = branch.op("Mul", [value, branch.scalar(alpha, ctx.dtype(ctx.output(0)))])
        rows = branch.op("Gather", [matrix, branch.squeeze(at, [1])], axis=axis)
        if axis == 1:
            rows = branch.op("Transpose", [rows], perm=[1, 0])
        return branch.op("Mul", [rows, value])

    return emit.if_else(one_hot, gather, dense, ctx.view.elem_type(ctx.output(0)), hint="seed_product")


@register("Gemm")
def gemm(ctx: Context, gy):
    """gA = alpha * gy op(B)^T, gB = alpha * op(A)^T gy (transposed per transA/B), gC = beta * unbroadcast(gy)."""
    # Y = alpha * op(A) op(B) + beta * C, op() transposing when transA / transB is set.
    a, b = ctx.input(0), ctx.input(1)
    alpha = float(ctx.attr("alpha", 1.0))
    beta = float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    g = gy[0]
    out: list = [None] * len(ctx.node.input)
    if ctx.needs[0]:
        if ta:
            out[0] = ctx.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1)
        else:  # op(B)'s columns are B's rows when transB
            out[0] = one_hot_product(ctx, g, b, 0 if tb else 1, alpha,
                                     lambda e: e.op("Gemm", [g, b], alpha=alpha, transB=1 - tb))
    if ctx.needs[1]:
        out[1] = (ctx.op("Gemm", [a, g], alpha=alpha, transA=1 - ta) if not tb
                  else ctx.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta))
    if len(out) > 2 and ctx.needs[2]:
        gc = ctx.unbroadcast(g, ctx.input(2))
        out[2] = ctx.op("Mul", [gc, ctx.scalar(beta, g)]) if beta != 1.0 else gc
    return out


# --- MatMul ----------------------------------------------------------------------------------------

def _batch_sum_axes(mine: list, other: list, uncertain: list | None = None) -> list[int] | None:
    """Axes of the broadcast batch to sum for the operand with batch dims `mine`; None if unknowable.
    With an `uncertain` list, unknowable axes go there as (axis of mine, axis of the batch) instead."""
    n = max(len(mine), len(other))
    lead = n - len(mine)
    axes = list(range(lead))
    for i, d in enumerate(mine):
        j = i + lead - (n - len(other))   # index into `other`, negative when absent
        o = other[j] if j >= 0 else None
        if d == 1:
            axes.append(lead + i)          # harmless when the result dim is 1 too
        elif isinstance(d, int):
            continue
        elif j < 0 or o == 1 or (o is not None and o == d):
            continue
        elif uncertain is not None:
            uncertain.append((i, lead + i))
        else:
            return None                    # symbolic dim that may be 1 while the other is not
    return axes


def _matmul_operand_grad(ctx: Context, g: str, operand: str, expanded: str, mine, other) -> str:
    """Sums the product-shaped gradient `g` over broadcast batch axes, then reshapes to `operand`."""
    emit = ctx.emit
    uncertain: list = []
    if mine is None or other is None:
        axes = None
    else:
        # Before opset 13 there is no run-time axes list: unknowable axes are decided one by one instead.
        axes = _batch_sum_axes(mine[:-2], other[:-2], uncertain if emit.opset < 13 else None)
    if axes is None:
        g = _unbroadcast_dynamic(ctx, g, expanded)
    else:
        if axes:
            g = emit.reduce("ReduceSum", g, axes, keepdims=1)
        if uncertain:
            g = _unbroadcast_axes(ctx, g, expanded, uncertain)
    return ctx.op("Reshape", [g, emit.shape_of(operand)])


@register("MatMul")
def matmul(ctx: Context, gy):
    """gA = gy @ B^T, gB = A^T @ gy, each summed over its broadcast batch axes (1-D operands promoted as numpy)."""
    a, b = ctx.input(0), ctx.input(1)
    ra, rb = ctx.rank(a), ctx.rank(b)
    g = gy[0]
    out = no_grads(ctx)
    emit = ctx.emit
    if ra == 1 and rb == 1:
        if ctx.needs[0]:
            out[0] = ctx.op("Mul", [g, b])
        if ctx.needs[1]:
            out[1] = ctx.op("Mul", [g, a])
        return out
    sa, sb = ctx.shape(a), ctx.shape(b)
    # Promote 1-D operands as numpy does: a (k) -> (1, k), b (k) -> (k, 1); the gradient gets the axis too.
    if ra == 1:
        a_e, a_t = emit.unsqueeze(a, [0]), emit.unsqueeze(a, [1])
        g = emit.unsqueeze(g, [rb - 2])
        sa = None if sa is None else [1] + list(sa)
        ra = 2
    else:
        a_e = a
        a_t = ctx.op("Transpose", [a], perm=list(range(ra - 2)) + [ra - 1, ra - 2]) if ctx.needs[1] else None
    if rb == 1:
        b_e, b_t = emit.unsqueeze(b, [1]), emit.unsqueeze(b, [0])
        g = emit.unsqueeze(g, [ra - 1])
        sb = None if sb is None else list(sb) + [1]
        rb = 2
    else:
        b_e = b
        b_t = ctx.op("Transpose", [b], perm=list(range(rb - 2)) + [rb - 1, rb - 2]) if ctx.needs[0] else None
    if ctx.needs[0]:
        def dense(e):
            return e.op("MatMul", [g, b_t])

        # two matrices as given (none promoted from 1-D): the seed's rows may be gathered from b
        plain = (a_e, b_e, ra, rb) == (a, b, 2, 2)
        product = one_hot_product(ctx, g, b, 1, 1.0, dense) if plain else dense(emit)
        out[0] = _matmul_operand_grad(ctx, product, a, a_e, sa, sb)
    if ctx.needs[1]:
        out[1] = _matmul_operand_grad(ctx, ctx.op("MatMul", [a_t, g]), b, b_e, sb, sa)
    return out


# --- reductions ------------------------------------------------------------------------------------

def _reduced_axes(ctx: Context, rank: int) -> list[int]:
    """Normalized, sorted axes the node reduces ([] for a no-op reduction, all axes by default)."""
    op = ctx.node.op_type
    axes_as_input = ctx.opset >= 18 or (op == "ReduceSum" and ctx.opset >= 13)
    if axes_as_input:
        name = ctx.input(1)
        axes = const_ints(ctx, name) if name else []
        if name and axes is None:
            raise ValueError("reduction with non-constant axes")
        if not axes:
            return [] if int(ctx.attr("noop_with_empty_axes", 0)) else list(range(rank))
    else:
        axes = ctx.attr("axes")
        if axes is None:
            return list(range(rank))
    return sorted({norm_axis(a, rank) for a in axes})


def _keep(ctx: Context, t: str, axes: list[int], rank: int) -> str:
    """`t` (the reduction's output or its gradient) with reduced axes restored as size 1."""
    if not axes or int(ctx.attr("keepdims", 1)):
        return t
    return ctx.emit.unsqueeze(t, axes)


@register("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
          "ReduceLogSumExp", "ReduceMax", "ReduceMin")
def reduce(ctx: Context, gy):
    """gx = gy * (Sum 1, Mean 1/n, SumSquare 2x, L1 Sign(x), L2 x/y, LogSum e^-y, LogSumExp e^(x-y), Max/Min [x==y]/k).

    gy is broadcast back over the reduced axes (restored as size 1 when keepdims=0). ReduceL2: 0 where
    y == 0. ReduceMax / ReduceMin: k = number of elements equal to y, so tied extremes share gy equally.
    """
    op = ctx.node.op_type
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x)
    axes = _reduced_axes(ctx, rank)
    emit = ctx.emit
    out = no_grads(ctx)
    g = _keep(ctx, gy[0], axes, rank)
    if op in ("ReduceSum", "ReduceMean"):
        gx = ctx.op("Expand", [g, emit.shape_of(x)])
        if op == "ReduceMean" and axes:
            dims = [static_dim(ctx, x, a) for a in axes]
            if all(d is not None for d in dims):
                count = ctx.scalar(float(np.prod(dims)), x)
            else:
                ratio = ctx.op("Div", [ctx.op("Size", [x]), ctx.op("Size", [y])])
                count = ctx.op("CastLike", [ratio, x]) if ctx.opset >= 15 else ctx.op(
                    "Cast", [ratio], to=ctx.view.elem_type(x))
            gx = ctx.op("Div", [gx, count])
    elif op == "ReduceSumSquare":
        gx = ctx.op("Mul", [ctx.op("Mul", [g, ctx.scalar(2.0, x)]), x])
    elif op == "ReduceL1":
        gx = ctx.op("Mul", [g, ctx.op("Sign", [x])])
    elif op == "ReduceL2":
        yk = _keep(ctx, y, axes, rank)
        zero = ctx.scalar(0.0, x)
        # d||x|| = x / ||x||; 0 where the norm is 0 (as PyTorch does).
        ratio = ctx.op("Where", [ctx.op("Equal", [yk, zero]), zero, ctx.op("Div", [g, yk])])
        gx = ctx.op("Mul", [ratio, x])
    elif op == "ReduceLogSum":
        yk = _keep(ctx, y, axes, rank)
        gx = ctx.op("Expand", [ctx.op("Mul", [g, ctx.op("Exp", [ctx.op("Neg", [yk])])]), emit.shape_of(x)])
    elif op == "ReduceLogSumExp":
        yk = _keep(ctx, y, axes, rank)
        gx = ctx.op("Mul", [g, ctx.op("Exp", [ctx.op("Sub", [x, yk])])])
    else:  # ReduceMax / ReduceMin: the gradient is shared equally by the tied extreme elements.
        yk = _keep(ctx, y, axes, rank)
        mask = ctx.op("Cast", [ctx.op("Equal", [x, yk])], to=ctx.view.elem_type(x))
        if axes:
            g = ctx.op("Div", [g, emit.reduce("ReduceSum", mask, axes, keepdims=1)])
        gx = ctx.op("Mul", [mask, g])
    out[0] = gx
    return out


# --- softmax ---------------------------------------------------------------------------------------

def _softmax_axes(ctx: Context, rank: int) -> list[int]:
    if ctx.opset < 13:
        # Before opset 13 the input is coerced to 2-D at `axis`: the normalization spans axis..rank-1.
        return list(range(norm_axis(ctx.attr("axis", 1), rank), rank))
    return [norm_axis(ctx.attr("axis", -1), rank)]


@register("Softmax")
def softmax(ctx: Context, gy):
    """gx = y * (gy - sum(gy * y)) over the softmax axis (axis..rank-1 before opset 13)."""
    x, y = ctx.input(0), ctx.output(0)
    axes = _softmax_axes(ctx, ctx.rank(x))
    g = gy[0]
    dot = ctx.emit.reduce("ReduceSum", ctx.op("Mul", [g, y]), axes, keepdims=1)
    return [ctx.op("Mul", [y, ctx.op("Sub", [g, dot])])]


@register("LogSoftmax")
def log_softmax(ctx: Context, gy):
    """gx = gy - exp(y) * sum(gy) over the softmax axis (axis..rank-1 before opset 13)."""
    x, y = ctx.input(0), ctx.output(0)
    axes = _softmax_axes(ctx, ctx.rank(x))
    g = gy[0]
    total = ctx.emit.reduce("ReduceSum", g, axes, keepdims=1)
    return [ctx.op("Sub", [g, ctx.op("Mul", [ctx.op("Exp", [y]), total])])]


# --- Einsum ----------------------------------------------------------------------------------------

def _einsum_terms(ctx: Context) -> tuple[list[str], str, set[str]]:
    """Input terms and output term with '...' replaced by explicit letters; also those letters."""
    eq = ctx.attr("equation")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ctx.node.input):
        raise ValueError(f"Einsum equation '{eq}' does not match {len(ctx.node.input)} inputs")
    ell_letters = ""
    if "..." in eq:
        used = {c for c in eq if c.isalpha()}
        free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
        widths = [ctx.rank(x) - len(t.replace("...", "")) if "..." in t else 0
                  for t, x in zip(terms, ctx.node.input)]
        ell_letters = "".join(free[:max(widths)])
        terms = [t.replace("...", ell_letters[len(ell_letters) - w:] if w else "") for t, w in zip(terms, widths)]
        rhs = rhs.replace("...", ell_letters)
    if not arrow:
        counts: dict[str, int] = {}
        for c in "".join(terms):
            counts[c] = counts.get(c, 0) + 1
        rhs = ell_letters + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell_letters))
    return terms, rhs, set(ell_letters)


@register("Einsum")
def einsum(ctx: Context, gy):
    """gX_i = Einsum(gy, X_j for j != i -> term_i); letters summed away only in term_i come back by Expand.

    '...' dims where X_i has size 1 but the others do not are summed back. Repeated letters within one
    term (diagonals) are not supported.
    """
    # d/dX_i of einsum(X_1..X_n -> Y) is einsum(gY, X_j (j != i) -> term_i), for terms without repeated
    # letters; letters summed away only inside term_i come back through Expand.
    terms, rhs, ell = _einsum_terms(ctx)
    out = no_grads(ctx)
    emit = ctx.emit
    for i, x in enumerate(ctx.node.input):
        if not ctx.needs[i]:
            continue
        term = terms[i]
        if len(set(term)) != len(term):
            raise ValueError("Einsum gradient for an operand with a repeated index (diagonal)")
        others = [j for j in range(len(terms)) if j != i]
        avail = set(rhs).union(*[set(terms[j]) for j in others])
        kept = "".join(c for c in term if c in avail)
        equation = ",".join([rhs] + [terms[j] for j in others]) + "->" + kept
        g = ctx.op("Einsum", [gy[0]] + [ctx.node.input[j] for j in others], equation=equation)
        shape = ctx.shape(x)
        # '...' dims broadcast: where this operand has size 1 the others may not -> sum those back.
        reduce_axes = []
        for p, c in enumerate(kept):
            if c not in ell:
                continue
            d = shape[term.index(c)] if shape is not None else None
            if d == 1:
                reduce_axes.append(p)
            elif not isinstance(d, int):
                for j in others:
                    sj = ctx.shape(ctx.node.input[j])
                    if c in terms[j] and (sj is None or sj[terms[j].index(c)] not in (1, d)):
                        raise ValueError("Einsum gradient through a '...' dim that may broadcast at run time")
        if reduce_axes:
            g = emit.reduce("ReduceSum", g, reduce_axes, keepdims=1)
        if kept != term:
            g = emit.unsqueeze(g, [p for p, c in enumerate(term) if c not in avail])
            g = ctx.op("Expand", [g, emit.shape_of(x)])
        out[i] = g
    return out
