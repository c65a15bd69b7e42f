"""onnxruntime sessions and execution providers."""
from __future__ import annotations

from typing import Sequence

import onnx
import onnxruntime as ort

from .errors import OnnxcamError


def resolve_providers(providers: Sequence | None) -> list:
    """None means the CPU; names must be ones this onnxruntime build offers."""
    if providers is None:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    out = []
    for p in providers:
        name = p[0] if isinstance(p, tuple) else p
        if name not in available:
            raise OnnxcamError(f"execution provider '{name}' is not available in this onnxruntime "
                               f"(available: {', '.join(available)})")
        out.append(p)
    return out


def make_session(model: onnx.ModelProto, providers: Sequence | None = None,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=resolve_providers(providers))
    except OnnxcamError:
        raise
    except Exception as exc:
        raise OnnxcamError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
