"""Reverse-mode differentiation of an ONNX graph, from one tensor back to chosen tensors.

Only nodes that lie on a path from a `wrt` tensor to the `of` tensor are differentiated (no weight
gradients, no side branches); each is handed to its rule from `rules.RULES`.
"""
from __future__ import annotations

from typing import Collection, Sequence

import onnx
from onnx import TensorProto

from . import rules
from ..errors import OnnxcamError, UnsupportedOpError

# Where a gradient cannot be built, the one method that needs none of the model's internals.
NO_GRADIENTS = "; --method rise (method='rise') explains any model without gradients"
from ..model.graph import Emitter, ModelView, ancestors, node_label, subgraph_reads
from .rules.registry import Context, lookup

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# Outputs of these carry no gradient even when their inputs do (indices, shapes, comparisons ...).
NON_DIFFERENTIABLE = {
    "Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round",
    "ConstantOfShape", "RandomNormalLike", "RandomUniformLike", "EyeLike",
    "BitShift", "OneHot",
}


# Integer outputs that still carry a gradient: quantised values, differentiated straight through.
STRAIGHT_THROUGH = {"QuantizeLinear"}


def _is_float(view: ModelView, name: str) -> bool:
    return view.elem_type(name) in FLOAT_TYPES


def active_tensors(view: ModelView, of: str, wrt: Sequence[str]) -> set[str]:
    """Tensors that both depend (differentiably) on some `wrt` and feed `of`."""
    forward: set[str] = set(wrt)
    for node in view.graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        # A control-flow body reading a tensor from the outer scope depends on it as much as an input does.
        if any(i in forward for i in node.input if i) or (
                node.attribute and any(r in forward for r in subgraph_reads(node))):
            for o in node.output:
                if o and (_is_float(view, o) or node.op_type in STRAIGHT_THROUGH):
                    forward.add(o)
    return forward & ancestors(view, [of])


def gradient(model: onnx.ModelProto, of: str, wrt: Sequence[str], seed: str,
             emit: Emitter | None = None, relu_mode: str = "grad",
             relu_ops: Collection[str] | None = None, one_hot_seed: bool = False) -> dict[str, str]:
    """Appends to `model` the nodes computing d<seed, of>/d(wrt); returns {wrt name: gradient name}.

    `relu_mode` ("guided", "deconvnet") changes the backward of the ReLU-family ops named in `relu_ops`
    (all of them when None); every other node gets its true gradient.

    `seed` must already be a tensor of the graph (an input, or built by the caller in `emit`) with the
    shape of `of`. The forward graph may gain optional outputs on existing nodes (MaxPool Indices).
    `one_hot_seed`: the seed often holds one nonzero per row (a class target); the nodes it reaches unchanged
    are told so (Context.seed_rows), and may check it at run time to skip work (never assume it).
    """
    view = ModelView(model)
    own_emitter = emit is None
    if emit is None:
        emit = Emitter.for_model(model)
    active = active_tensors(view, of, wrt)
    missing = [w for w in wrt if w not in active]
    if missing:
        raise OnnxcamError(f"'{of}' does not depend on {', '.join(repr(m) for m in missing)}")

    grads: dict[str, list[str]] = {of: [seed]}

    def total(name: str) -> str | None:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            grads[name] = [emit.op("Sum", parts, hint="grad_sum")]
        return grads[name][0]

    for node in reversed(list(view.graph.node)):
        if not any(o in active for o in node.output if o):
            continue
        captured = sorted(r for r in subgraph_reads(node) if r in active) if node.attribute else []
        if captured:
            # Bodies are not differentiated; skipping them would silently drop this share of the gradient.
            raise UnsupportedOpError(
                f"cannot differentiate {node_label(node)}: its body reads '{captured[0]}' from the outer scope, "
                f"on the path being differentiated to the score; gradients through control-flow bodies are "
                f"not supported (choose a layer after it with --layer)")
        needs = [bool(i) and i in active for i in node.input]
        if not any(needs):
            continue
        gy = [total(o) if o in active else None for o in node.output]
        if all(g is None for g in gy):
            continue
        rule = lookup(node)
        if rule is None:
            raise UnsupportedOpError(
                f"no gradient rule for op '{node.op_type}' ({node_label(node)}) on the path from the "
                f"score to the layer; supported ops: see `onnxcam ops`{NO_GRADIENTS}")
        mode = relu_mode if relu_ops is None or node.op_type in relu_ops else "grad"
        ctx = Context(view=view, emit=emit, node=node, needs=needs, relu_mode=mode,
                      seed_rows=one_hot_seed and len(gy) == 1 and gy[0] == seed)
        try:
            gx = rule(ctx, gy)
        except OnnxcamError:
            raise
        except Exception as exc:
            raise UnsupportedOpError(f"cannot differentiate {node_label(node)}: {exc}{NO_GRADIENTS}") from None
        for i, (need, g) in enumerate(zip(needs, gx)):
            if need and g is not None:
                grads.setdefault(node.input[i], []).append(g)

    result = {}
    for w in wrt:
        g = total(w)
        if g is None:
            raise OnnxcamError(f"no gradient reaches '{w}' from '{of}'")
        result[w] = g
    if own_emitter:
        emit.commit(model)
    return result


__all__ = ["gradient", "active_tensors"]
