"""Gradient rules, one small function per op type, all found through `registry.RULES`.

Importing this package imports every rule module so that their `@register` decorators run.
"""
from . import activations, arith, conv, linalg, quant, recurrent, shape  # noqa: F401  (registration side effects)
from .registry import RULES, Context, coverage_markdown, lookup, register, supported_ops

__all__ = ["RULES", "Context", "coverage_markdown", "lookup", "register", "supported_ops"]
