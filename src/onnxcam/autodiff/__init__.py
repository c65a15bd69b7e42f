"""Differentiation: reverse mode over an ONNX graph (`driver`), one vector-Jacobian rule per op (`rules`)."""
from .driver import FLOAT_TYPES, NON_DIFFERENTIABLE, STRAIGHT_THROUGH, active_tensors, gradient

__all__ = ["gradient", "active_tensors", "FLOAT_TYPES", "NON_DIFFERENTIABLE", "STRAIGHT_THROUGH"]
