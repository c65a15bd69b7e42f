"""Which execution provider runs each node of a session's graph (`onnxcam providers`)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Sequence

import numpy as np
import onnx

from ..cam.build import GROUP, SELECT, SIGN, TARGET, WEIGHTS
from ..errors import OnnxcamError
from ..model.graph import load_model
from .explainer import Explainer
from .runtime import NP_TYPES, first_line, inference_session, ort, resolve_providers


def node_placement(session_or_model, providers: Sequence | None = None, feeds: dict | None = None,
                   dynamic_dim: int = 224) -> dict[str, list[tuple[str, str]]]:
    """Which execution provider runs each node of the (onnxruntime-optimised) graph:
    {provider: [(node name, op type), ...]}, read from an onnxruntime profile of one run.

    `session_or_model`: an onnx.ModelProto, a path or bytes, an InferenceSession (its model is reloaded) or an
    onnxcam Explainer (its fused explain graph). `providers` default: the session's / Explainer's own, else CPU.
    `feeds`: inputs for the profiled run; by default random data, batch 1, other dynamic dims `dynamic_dim`,
    onnxcam's target input -1 (argmax) and sign +1. Works on every build: the profile's node events carry
    `args.provider` and `args.op_name`."""

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = session_or_model
    if isinstance(model, Explainer):  # its providers as given (with their options), its optimisation level
        options.graph_optimization_level = model.session.get_session_options().graph_optimization_level
        if providers is None:
            providers = model.providers if model.providers is not None else model.session.get_providers()
        model = model.model
    elif isinstance(model, ort.InferenceSession):
        src = getattr(model, "_model_bytes", None) or getattr(model, "_model_path", None)
        if src is None:
            raise OnnxcamError("cannot recover the model from this InferenceSession; pass the model instead")
        options.graph_optimization_level = model.get_session_options().graph_optimization_level
        providers = providers if providers is not None else model.get_providers()
        model = src
    if isinstance(model, (bytes, str, os.PathLike)) and not isinstance(model, onnx.ModelProto):

        model = load_model(model)  # the same checks (external data, DAG) as every other entry point
    elif not isinstance(model, onnx.ModelProto):
        raise OnnxcamError(f"node_placement takes a model, a session or an Explainer, not {type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="onnxcam-placement-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "placement")
        try:
            session = inference_session(model, options, resolve_providers(providers))
        except OnnxcamError:
            raise
        except Exception as exc:
            raise OnnxcamError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        run_feeds = dict(feeds or {})
        rng = np.random.default_rng(0)
        for i in session.get_inputs():
            if i.name in run_feeds:
                continue
            shape = [d if isinstance(d, int) else (1 if axis == 0 else dynamic_dim) for axis, d in enumerate(i.shape)]
            dtype = NP_TYPES.get(i.type)
            if dtype is None:
                raise OnnxcamError(f"input '{i.name}' has type {i.type}; pass feeds=")
            if i.name == TARGET:
                run_feeds[i.name] = np.full(shape, -1, np.int64)
            elif i.name == SIGN:
                run_feeds[i.name] = np.ones(shape, np.float32)
            elif i.name in (WEIGHTS, SELECT, GROUP):  # no weights besides the argmax: zeros that broadcast
                run_feeds[i.name] = np.zeros([1] * len(i.shape), dtype)
            elif dtype.kind == "f":
                run_feeds[i.name] = rng.standard_normal(shape).astype(dtype)
            else:
                run_feeds[i.name] = np.zeros(shape, dtype)
        try:
            session.run(None, run_feeds)
        except Exception as exc:
            raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None
        with open(session.end_profiling()) as f:
            events = json.load(f)
    placement: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        args = e.get("args", {})
        provider = args.get("provider", "?")
        if (node, provider) in seen:
            continue
        seen.add((node, provider))
        placement.setdefault(provider, []).append((node, args.get("op_name", "?")))
    return placement
