"""onnxruntime sessions and execution providers."""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import weakref
from typing import Sequence

import numpy as np
import onnx

from ..errors import OnnxcamError, first_line
from ..model import safeio

INSTALL_HINT = "pip install 'onnxcam[cpu]' (or 'onnxcam[gpu]' for onnxruntime-gpu)"
try:
    import onnxruntime as ort
except ImportError:
    raise ImportError(f"onnxcam needs onnxruntime: {INSTALL_HINT}") from None


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
                 options: ort.SessionOptions | None = None, strict: bool = False) -> ort.InferenceSession:
    """strict: the first provider must be the one the session gets. onnxruntime-gpu lists CUDA even where its
    libraries cannot load, then logs an error and runs on the CPU; an explicit --device cuda must not
    silently do that. Its log is then captured and its reason becomes the error."""
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    _drop_unused_initializers(model)
    resolved = resolve_providers(providers)
    wanted = resolved[0][0] if isinstance(resolved[0], tuple) else resolved[0]
    strict = strict and wanted != CPU
    try:
        with _captured_output(strict) as log:
            session = inference_session(model, options, resolved)
    except OnnxcamError:
        raise
    except Exception as exc:
        raise OnnxcamError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
    if strict and session.get_providers()[0] != wanted:
        reason = _provider_failure("".join(log))
        raise OnnxcamError(f"{wanted} was requested but onnxruntime could not start it"
                           f"{': ' + reason if reason else ''} (--device auto falls back to the CPU)")
    return session


def inference_session(model: onnx.ModelProto, options: ort.SessionOptions | None, providers: list):
    """An InferenceSession for `model` whose large weights may still be on disk (sealed by onnxcam.safeio).

    Those never pass through the serialised proto (protobuf cannot hold more than 2 GB, and serialising
    copies every weight once more): the proto handed over keeps them as external data, relative to a folder
    given to onnxruntime in the session options, and onnxruntime memory-maps them itself. (OrtValues given
    with add_external_initializers were copied into onnxruntime's own memory: twice the weights at peak.)
    Only locations onnxcam checked and sealed get there; any other external reference is refused, since
    onnxruntime would resolve it against that folder or the working directory."""
    sealed, stray = [], []
    for t, top in safeio.model_tensors(model):
        if safeio.is_external(t):
            loc = safeio.sealed_location(t)
            (sealed if loc is not None and top else stray).append(t.name)
    if stray:
        raise OnnxcamError(f"tensor '{stray[0]}' refers to external data onnxcam did not check")
    keep = None
    if sealed and not _EXTERNAL_FOLDER_OPTION:
        # Before onnxruntime 1.21 a model from memory has no folder for its external data: hand the weights
        # over as memory-mapped OrtValues (onnxruntime copies them: twice the weights at peak, but it loads).
        options = _copy_options(options)
        keep = [safeio.sealed_array(t) for t in model.graph.initializer if t.name in sealed]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in keep]
        options.add_external_initializers([t.name for t in model.graph.initializer if t.name in sealed], values)
        keep = (keep, values)
    elif sealed:
        located = {t.name: safeio.sealed_location(t) for t in model.graph.initializer if t.name in sealed}
        folder = os.path.commonpath([os.path.dirname(loc[0]) for loc in located.values()])
        handed = onnx.ModelProto()
        handed.CopyFrom(model)  # cheap: the large weights are references, not bytes
        for t in handed.graph.initializer:
            if t.name in located:
                path, offset, length = located[t.name]
                del t.external_data[:]
                for k, v in (("location", os.path.relpath(path, folder)), ("offset", str(offset)),
                             ("length", str(length))):
                    t.external_data.add(key=k, value=v)
        model = handed
        options = _copy_options(options)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        # Prepacking copies each constant MatMul/Gemm weight into a blocked layout, once per use: the forward
        # Gemm and its gradient both pack the same weight. With weights this large that doubles or triples
        # the peak memory for a few percent of speed.
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit, on weights stored in the proto itself
        raise OnnxcamError(f"the model is too large to hand to onnxruntime in one piece ({first_line(exc)}); "
                           f"store its weights as external data") from None
    session = ort.InferenceSession(data, options, providers=providers)
    if keep is not None:
        _KEPT_ALIVE[session] = keep  # external initializers must outlive the session
    return session


# Arrays handed to onnxruntime as external initializers, per session: they must live as long as it does.
_KEPT_ALIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# session.model_external_initializers_file_folder_path: onnxruntime PR #23557, first released in 1.21.
_EXTERNAL_FOLDER_OPTION = tuple(int(p) for p in re.findall(r"\d+", ort.__version__)[:2]) >= (1, 21)


_OPTION_FIELDS = ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                  "execution_order", "enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse",
                  "enable_profiling", "profile_file_prefix", "log_severity_level", "log_verbosity_level",
                  "logid", "optimized_model_filepath", "use_deterministic_compute")


def _copy_options(options: ort.SessionOptions | None) -> ort.SessionOptions:
    """A fresh SessionOptions with the caller's settings: external initializers are added to the options object,
    which the caller may reuse for other sessions (and whose config entries cannot be listed, so only the
    documented fields carry over)."""
    out = ort.SessionOptions()
    if options is None:
        out.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return out
    for name in _OPTION_FIELDS:
        try:
            setattr(out, name, getattr(options, name))
        except (AttributeError, TypeError):
            pass
    return out


def require_finite(arr, what: str) -> None:
    """An OnnxcamError naming the first sample where `arr` (batch first) holds NaN or Inf: a silent NaN heatmap
    (and an argmax of 0 over NaN scores) would pass for an explanation."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fc" or a.size == 0:
        return
    # One NaN or Inf makes the sum NaN or Inf, so a finite sum clears the array in one pass that allocates
    # nothing (an all-finite array whose sum overflows takes the full check below).
    if np.isfinite(a.sum()):
        return
    finite = np.isfinite(a)
    if finite.all():
        return
    bad = ~finite.reshape(a.shape[0], -1).all(axis=1) if a.ndim else np.array([True])
    sample = int(np.flatnonzero(bad)[0])
    kind = "NaN" if np.isnan(a).any() else "Inf"
    raise OnnxcamError(f"{what} holds {kind} values (sample {sample})")


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """onnxruntime logs a warning per initializer no node reads; a constant a rule emitted for a branch it did not
    take should not reach the user's terminal as that noise. Graph inputs and names read inside subgraphs
    (If/Loop/Scan bodies see outer-scope initializers) count as used."""
    g = model.graph
    used = {o.name for o in g.output} | {i.name for i in g.input}
    stack = [g]
    while stack:
        graph = stack.pop()
        for n in graph.node:
            used.update(n.input)
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    for i in reversed(range(len(g.initializer))):  # in place: no copy of the weights
        if g.initializer[i].name not in used:
            del g.initializer[i]


@contextlib.contextmanager
def _captured_output(enabled: bool):
    """With `enabled`, what onnxruntime writes during the block -- its C++ logger on file descriptor 2, its
    Python layer's provider fallbacks ("EP Error ... Falling back") on sys.stdout -- is kept out of the terminal
    and appended to the yielded list as one string when the block ends."""
    log: list[str] = []
    if not enabled:
        yield log
        return
    sys.stdout.flush()
    sys.stderr.flush()
    printed = io.StringIO()
    with tempfile.TemporaryFile() as file:
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            log.append(file.read().decode("utf-8", "replace") + printed.getvalue())


def _provider_failure(log: str) -> str:
    """The useful part of onnxruntime's log when a provider did not start, e.g. 'libcublasLt.so.13: cannot
    open shared object file: No such file or directory; Require cuDNN 9.* and CUDA 13.*'."""
    parts = []
    missing = re.search(r"Please install (\w+) libraries", log)
    if missing:
        parts.append(f"{missing.group(1)} libraries not found")
    library = re.search(r"with error: ([^\n\x1b]+)", log)
    if library:
        parts.append(library.group(1).strip())
    needs = re.search(r"(Require [^.\n\x1b]*(?:\.\*[^.\n\x1b]*)*)", log)
    if needs:
        parts.append(needs.group(1).strip().rstrip("."))
    if not parts:
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines() if ln.strip()]
        parts = lines[-1:]
    return "; ".join(parts)


# -- devices ------------------------------------------------------------------------------------
DEVICES = ("cpu", "cuda", "tensorrt", "auto")
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_HINT = "replace onnxruntime with onnxruntime-gpu: pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def resolve_device(device: str | None) -> list[str]:
    """The execution providers, in priority order, for a device name (CPU last as the fallback).

    cpu: CPU. cuda: CUDA then CPU; an error if this onnxruntime has no CUDA EP. tensorrt: TensorRT, CUDA
    (when present), CPU; an error without the TensorRT EP. auto: CUDA then CPU when onnxruntime reports
    CUDAExecutionProvider (onnxruntime-gpu), else CPU."""
    name = (device or "cpu").lower()
    if name not in DEVICES:
        raise OnnxcamError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if name == "cpu":
        return [CPU]
    if name == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if name == "cuda":
        if CUDA not in available:
            raise OnnxcamError(f"CUDA was requested but this onnxruntime has no {CUDA} ({_gpu_hint()})")
        return [CUDA, CPU]
    if TENSORRT not in available:
        raise OnnxcamError(f"TensorRT was requested but this onnxruntime has no {TENSORRT} ({_gpu_hint()}, "
                           f"and TensorRT itself)")
    return [TENSORRT] + ([CUDA] if CUDA in available else []) + [CPU]


def explicit_gpu(device: str | None) -> bool:
    """A GPU device named outright (not `auto`): its session must really get that device (make_session strict)."""
    return (device or "cpu").lower() in ("cuda", "tensorrt")


def _gpu_hint() -> str:
    from importlib import metadata

    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        return (f"{' and '.join(installed)} are both installed and share one module, and the CPU build is the one "
                f"loaded: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return GPU_HINT


def session_device(session: ort.InferenceSession) -> tuple[str, int]:
    """(device_type, device_id) for OrtValue.ortvalue_from_numpy / IOBinding on the session's first provider."""
    first = session.get_providers()[0]
    kind = {CUDA: "cuda", TENSORRT: "cuda", "ROCMExecutionProvider": "cuda",
            "MIGraphXExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}.get(first, "cpu")
    if kind == "cpu":
        return "cpu", 0
    try:
        return kind, int(session.get_provider_options().get(first, {}).get("device_id", 0))
    except (TypeError, ValueError):
        return kind, 0


def ortvalue_dtype(value: ort.OrtValue) -> np.dtype:
    """numpy dtype of an OrtValue tensor ('tensor(float)' -> float32)."""
    t = value.data_type()
    if t not in NP_TYPES:
        raise OnnxcamError(f"unsupported OrtValue type {t}")
    return NP_TYPES[t]


NP_TYPES = {f"tensor({k})": np.dtype(v) for k, v in (
    ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("int64", "int64"), ("int32", "int32"),
    ("int8", "int8"), ("uint8", "uint8"), ("bool", "bool"))}
