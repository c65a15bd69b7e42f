"""Adjoint checks of the convolution, pooling and normalisation rules (onnxcam/rules/conv.py)."""
from __future__ import annotations

import numpy as np
import pytest

import onnxcam.rules  # noqa: F401  (registers the rules)
from onnxcam.rules import registry
from tests.adjoint import check_vjp

F32 = np.float32
F64 = np.float64


def rand(shape, seed=0, dtype=F32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def distinct(shape, seed=0, dtype=F32):
    """Values without ties and with gaps >> finite-difference eps, for max-type ops."""
    n = int(np.prod(shape))
    perm = np.random.default_rng(seed).permutation(n).astype(np.float64)
    return (perm * 0.5 - n / 4).reshape(shape).astype(dtype)


def dyn_batch(name="x"):
    return {name: {0: "N"}}


def dyn_all(rank, name="x"):
    return {name: {i: f"d{i}" for i in range(rank) if i != 1}}


# --------------------------------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------------------------------
CONV_CASES = [
    # (x shape, w shape, attrs)
    ((2, 3, 7, 6), (4, 3, 3, 3), {}),
    ((1, 3, 9, 8), (5, 3, 3, 2), {"strides": [2, 3], "pads": [1, 0, 0, 2]}),
    ((2, 4, 10, 9), (6, 2, 3, 3), {"group": 2, "dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    ((1, 6, 11, 11), (6, 1, 3, 3), {"group": 6, "strides": [2, 2], "pads": [0, 0, 1, 1]}),  # depthwise
    ((1, 4, 8, 8), (8, 1, 5, 5), {"group": 4, "strides": [2, 2], "pads": [2, 2, 2, 2]}),   # multiplier 2
    ((1, 3, 9, 7), (4, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 3, 8, 7), (4, 3, 4, 2), {"strides": [3, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 3, 9, 7), (4, 3, 3, 3), {"strides": [2, 2], "auto_pad": "VALID"}),
    ((2, 3, 13), (4, 3, 3), {"strides": [2], "pads": [1, 2]}),                            # 1-D
    ((2, 3, 12), (3, 1, 5), {"group": 3, "dilations": [2], "pads": [4, 0]}),               # 1-D depthwise
    ((1, 2, 5, 6, 7), (3, 2, 3, 2, 3), {"strides": [2, 1, 2], "pads": [1, 0, 1, 0, 1, 1]}),  # 3-D
    ((1, 3, 8, 8), (4, 3, 1, 1), {"strides": [2, 2]}),                                    # 1x1 stride 2
]


@pytest.mark.parametrize("xs,ws,attrs", CONV_CASES)
def test_conv(xs, ws, attrs):
    inputs = {"x": rand(xs, 1), "w": rand(ws, 2), "b": rand(ws[:1], 3)}
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4)


@pytest.mark.parametrize("xs,ws,attrs", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[5], CONV_CASES[6],
                                         CONV_CASES[8], CONV_CASES[10]])
def test_conv_dynamic(xs, ws, attrs):
    inputs = {"x": rand(xs, 1), "w": rand(ws, 2)}
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, dynamic=dyn_batch())
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, dynamic=dyn_all(len(xs)))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_conv_opsets(opset):
    inputs = {"x": rand((1, 3, 9, 8), 1), "w": rand((4, 3, 3, 3), 2)}
    attrs = {"strides": [2, 2], "pads": [1, 0, 0, 1]}
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, opset=opset)
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, opset=opset, dynamic=dyn_all(4))

