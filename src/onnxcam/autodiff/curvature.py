"""Whether the path from a layer to the score has a second derivative, without building one.

ShapleyCAM needs the Hessian-vector product H A of the explained score at the layer. onnxcam builds first-order
graphs only; but where every op between the layer and the score is piecewise linear in the layer (convolutions,
matrix products with constant weights, pooling, ReLU-family kinks, shape ops), the score's own curvature is all
there is: y = f(h(A)) with h piecewise linear gives H A = J^T H_f (J A) almost everywhere, one more VJP.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.graph import ModelView, node_label
from .driver import active_tensors

# Linear in the active input(s) when every other input is constant with respect to the layer.
LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "Mul", "Div", "Add", "Sub", "Neg", "Sum", "Mean",
          "GlobalAveragePool", "AveragePool", "ReduceMean", "ReduceSum", "BatchNormalization",
          "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather", "GatherElements",
          "GatherND", "Split", "Identity", "Pad", "Cast", "Expand", "Tile", "Resize", "Upsample", "DepthToSpace",
          "SpaceToDepth", "Dropout", "CumSum"}
# Piecewise linear: zero second derivative away from the kinks (as autograd's double backward treats them).
KINKED = {"Relu", "LeakyRelu", "PRelu", "Clip", "Max", "Min", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin",
          "Abs", "ThresholdedRelu", "Where"}
# Linear in one operand only: a product of two layer-dependent tensors is curved.
ONE_ACTIVE = {"Mul", "Gemm", "MatMul", "Einsum", "Conv", "ConvTranspose"}


@dataclass(frozen=True)
class Head:
    """The path from the layer to the score: `curved` names the first node with a second derivative (None: the
    path is piecewise linear); `kinked`: whether it has kinks (else it is affine in the layer)."""

    curved: str | None
    kinked: bool


def head_curvature(view: ModelView, layer: str, score: str) -> Head:
    active = active_tensors(view, score, [layer])
    kinked = False
    for node in view.graph.node:
        inputs = [i for i in node.input if i in active]
        if not inputs or not any(o in active for o in node.output):
            continue
        op = node.op_type
        if op in KINKED:
            kinked = True
            if op == "PRelu" and node.input[1] in active:  # a layer-dependent slope multiplies the input
                return Head(node_label(node), kinked)
            continue
        if op not in LINEAR:
            return Head(node_label(node), kinked)
        if op in ONE_ACTIVE and len(inputs) > 1:  # x * x counts twice
            return Head(node_label(node), kinked)
        if op == "Div" and node.input[1] in active:
            return Head(node_label(node), kinked)
        if op == "BatchNormalization" and any(i in active for i in node.input[1:]):
            return Head(node_label(node), kinked)
    return Head(None, kinked)
