"""CAM arithmetic on activations A and gradients G, emitted as ONNX nodes.

A and G are (N, C, *spatial) float32 tensors. Each method returns the raw map (N, *spatial) after
its ReLU; `normalize` and `upsample` turn maps into heatmaps the way pytorch-grad-cam does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import OnnxcamError
from .graph import Emitter

CamMethod = Callable[[Emitter, str, str, int], str]

METHODS: dict[str, CamMethod] = {}


def method(name: str):
    def wrap(fn: CamMethod) -> CamMethod:
        METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> CamMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise OnnxcamError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}") from None


@method("gradcam")
def gradcam(emit: Emitter, acts: str, grads: str, rank: int) -> str:
    """L = ReLU(sum_k alpha_k A^k), alpha_k = mean over positions of dy/dA^k (Selvaraju et al.)."""
    spatial = list(range(2, rank))
    alpha = emit.reduce("ReduceMean", grads, spatial, keepdims=1)
    weighted = emit.reduce("ReduceSum", emit.op("Mul", [alpha, acts]), [1], keepdims=0)
    return emit.op("Relu", [weighted], hint="cam")


def normalize(emit: Emitter, cam: str, rank: int) -> str:
    """Per-sample (x - min) / (max - min + 1e-7) over all non-batch axes (pytorch-grad-cam's scaling)."""
    axes = list(range(1, rank))
    shifted = emit.op("Sub", [cam, emit.reduce("ReduceMin", cam, axes, keepdims=1)])
    peak = emit.reduce("ReduceMax", shifted, axes, keepdims=1)
    return emit.op("Div", [shifted, emit.op("Add", [peak, emit.scalar(1e-7, np.float32)])])


def upsample(emit: Emitter, cam: str, size: str) -> str:
    """Bilinear (half-pixel, like cv2.resize and F.interpolate(align_corners=False)) resize of an (N, *spatial)
    map to `size`, an int64 tensor holding the target spatial dims."""
    x = emit.unsqueeze(cam, [1])
    n = emit.op("Slice", [emit.shape_of(x), emit.ints([0]), emit.ints([2])])
    sizes = emit.op("Concat", [n, size], axis=0)
    empty = emit.const(np.zeros((0,), np.float32), hint="empty")
    resized = emit.op("Resize", [x, empty, empty, sizes], mode="linear",
                      coordinate_transformation_mode="half_pixel")
    return emit.squeeze(resized, [1])
