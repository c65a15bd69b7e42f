"""The one table of vector-Jacobian products: op type -> rule.

A rule receives a `Context` for one forward node and the gradients flowing into its outputs, and returns
the gradient of each of its inputs (None where an input is not differentiable or not needed). Rules only
append standard ONNX operators through `ctx.emit`; they never change the forward graph except through
`ctx.add_output` (asking an existing node for one of its optional outputs, e.g. MaxPool's Indices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from ...model.graph import Dim, Emitter, ModelView, attr

Grad = Optional[str]
Rule = Callable[["Context", list], list]

RULES: dict[tuple[str, str], Rule] = {}


def register(*op_types: str, domain: str = ""):
    """`@register("Relu")` puts the decorated function in the table for those op types."""

    def wrap(fn: Rule) -> Rule:
        for op in op_types:
            RULES[(domain, op)] = fn
        return fn

    return wrap


def lookup(node: onnx.NodeProto) -> Rule | None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return RULES.get((domain, node.op_type))


def supported_ops() -> list[str]:
    return sorted(op if not dom else f"{dom}.{op}" for dom, op in RULES)


def coverage_markdown() -> str:
    """The operator-coverage table for the docs, generated from the registry itself."""
    rows = ["| op | rule | module | what the backward does |", "|---|---|---|---|"]
    for dom, op in sorted(RULES, key=lambda k: (k[0], k[1].lower())):
        fn = RULES[(dom, op)]
        doc = (fn.__doc__ or "").strip().splitlines()
        summary = doc[0].rstrip(".").replace("|", "\\|") if doc else ""
        name = op if not dom else f"{dom}.{op}"
        rows.append(f"| {name} | `{fn.__name__}` | `{fn.__module__.rsplit('.', 1)[-1]}` | {summary} |")
    return "\n".join(rows) + "\n"


@dataclass
class Context:
    view: ModelView
    emit: Emitter
    node: onnx.NodeProto
    needs: Sequence[bool]
    # Guided Backprop / deconvnet change the ReLU-family rules only; everything else ignores it.
    relu_mode: str = "grad"
    # gy[0] is the seed itself, which for a class target holds one nonzero per row: a product with a large
    # matrix may then read just the rows it selects (linalg's one_hot_product) instead of the whole matrix.
    seed_rows: bool = False

    # --- facts about the forward graph -------------------------------------------------------
    def input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def output(self, i: int) -> str:
        return self.node.output[i] if i < len(self.node.output) else ""

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def shape(self, name: str) -> list[Dim] | None:
        return self.view.shape(name)

    def rank(self, name: str) -> int:
        r = self.view.rank(name)
        if r is None:
            raise ValueError(f"rank of '{name}' is unknown (shape inference gave none)")
        return r

    def dtype(self, name: str) -> np.dtype:
        return self.view.np_dtype(name)

    def value(self, name: str) -> np.ndarray | None:
        """Constant value of an input (initializer / Constant), else None."""
        return self.view.constant_value(name)

    @property
    def opset(self) -> int:
        return self.emit.opset

    def add_output(self, index: int, hint: str) -> str:
        """Makes the forward node produce its optional output `index` and returns its name."""
        node = self.node
        while len(node.output) <= index:
            node.output.append("")
        if not node.output[index]:
            node.output[index] = self.emit.fresh(hint)
        return node.output[index]

    # --- small building blocks shared by many rules -----------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
        return self.emit.op(op_type, inputs, **attrs)

    def scalar(self, value: float, like: str) -> str:
        return self.emit.scalar(value, self.dtype(like))

    def scatter_add(self, op_type: str, data: str, indices: str, updates: str, like: str, **attrs) -> str:
        """ScatterElements / ScatterND with reduction='add' on tensors of `like`'s dtype. onnxruntime's CPU
        kernels add only float32/64 and ints ("MLFloat16 data type is not supported ... when reduction is
        'add'"), so half-precision gradients are summed in float32 and cast back."""
        elem = self.view.elem_type(like)
        if elem not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            return self.op(op_type, [data, indices, updates], reduction="add", **attrs)
        f32 = onnx.TensorProto.FLOAT
        summed = self.op(op_type, [self.op("Cast", [data], to=f32), indices, self.op("Cast", [updates], to=f32)],
                         reduction="add", **attrs)
        return self.op("Cast", [summed], to=elem)

    def unbroadcast(self, g: str, x: str) -> str:
        """Sums `g` (shaped like the broadcast result) back to the shape of operand `x`."""
        return unbroadcast(self, g, x, self.output(0))


def unbroadcast(ctx: Context, g: str, x: str, y: str) -> str:
    emit = ctx.emit
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs is None or ys is None or len(ys) < len(xs):
        if emit.opset < 13:
            raise ValueError(f"broadcast gradient with unknown ranks ('{x}' or '{y}') needs opset >= 13")
        return _unbroadcast_dynamic(ctx, g, x)
    # Unknown dims (None) compare equal in a list but need not be the same size.
    if list(xs) == list(ys) and all(d is not None for d in xs):
        return g
    lead = len(ys) - len(xs)
    axes = list(range(lead))
    uncertain = []  # operand axes that may or may not be broadcast: decided at run time
    for i, dx in enumerate(xs):
        dy = ys[lead + i]
        if dx == 1:
            if dy != 1:
                axes.append(lead + i)  # summing a size-1 axis is harmless when dy turns out to be 1
        elif isinstance(dx, int) or dy == 1 or (dx is not None and dx == dy):
            continue  # a static size other than 1 is never broadcast; nor is anything into a 1
        else:
            uncertain.append(i)
    if uncertain and emit.opset >= 13:
        return _unbroadcast_dynamic(ctx, g, x)
    summed = emit.reduce("ReduceSum", g, axes, keepdims=1) if axes else g
    if uncertain:
        summed = _unbroadcast_axes(ctx, summed, x, [(i, lead + i) for i in uncertain])
    if lead:
        summed = emit.squeeze(summed, list(range(lead))) if len(xs) else emit.op(
            "Reshape", [summed, emit.ints([], "scalar_shape")])
    return summed


def _unbroadcast_axes(ctx: Context, g: str, x: str, pairs: list) -> str:
    """Sums `g` over each axis (of `x`'s axis i, `g`'s axis ax) in `pairs` where `x` has size 1 at run time.

    Before opset 13 ReduceSum takes its axes as an attribute, so the choice cannot be a run-time axes list.
    Per axis: Concat([sum over ax (keepdims), g], ax) holds the sum at index 0 and g after it; a Slice of
    length dim_x starting at 0 when dim_x == 1, else at 1, picks whichever is right (dim_x == dim_g when
    `x` is not broadcast). Slice with tensor bounds needs opset 10."""
    emit = ctx.emit
    if emit.opset < 10:
        raise ValueError(f"broadcast gradient with dynamic shapes needs opset >= 10 (the model has {emit.opset})")
    xshape = emit.shape_of(x)
    one = emit.ints([1], "one")
    for i, ax in pairs:
        dim = emit.op("Gather", [xshape, emit.ints([i], "axis")], axis=0)
        is_one = emit.op("Cast", [emit.op("Equal", [dim, one])], to=onnx.TensorProto.INT64)
        start = emit.op("Sub", [one, is_one])
        end = emit.op("Add", [start, dim])
        both = emit.op("Concat", [emit.reduce("ReduceSum", g, [ax], keepdims=1), g], axis=ax)
        g = emit.op("Slice", [both, start, end, emit.ints([ax], "axes")])
    return g


def _unbroadcast_dynamic(ctx: Context, g: str, x: str) -> str:
    """Same as above when shapes are only known at run time: reduce where the operand's dim is 1."""
    emit = ctx.emit
    if emit.opset < 13:  # ReduceSum's axes became an input in 13; callers with known ranks use _unbroadcast_axes
        raise ValueError("broadcast gradient with dynamic shapes and unknown ranks needs opset >= 13")
    gshape = emit.shape_of(g)
    xshape = emit.shape_of(x)
    g_rank = emit.op("Size", [gshape])
    x_rank = emit.op("Size", [xshape])
    lead = emit.op("Sub", [g_rank, x_rank])
    ones = emit.op("Expand", [emit.ints([1]), emit.op("Reshape", [lead, emit.ints([1])])])
    x_padded = emit.op("Concat", [ones, xshape], axis=0)
    reduce_mask = emit.op("And", [emit.op("Equal", [x_padded, emit.ints([1])]),
                                  emit.op("Not", [emit.op("Equal", [gshape, emit.ints([1])])])])
    axes = emit.op("Reshape", [emit.op("NonZero", [reduce_mask]), emit.ints([-1])])
    summed = emit.op("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
    return emit.op("Reshape", [summed, xshape])
