"""`onnxcam serve`: an HTTP server for predictions and CAM explanations of one ONNX model.

Protocols (FastAPI/Starlette on uvicorn):

* KServe V1: `POST /v1/models/{name}:predict` and `:explain` take `{"instances": [...]}`; an instance is a
  base64 PNG/JPEG string (or `{"b64": ...}`), preprocessed with the model's preprocessing, or a nested
  array already in the model's input shape without the batch dimension (or `{"data": ...}`). Optional
  `"target"` (class index or label) and `"overlay": true`, per request or per object instance.
  `GET /v1/models/{name}` says whether the model is ready.
* Open Inference Protocol (v2): `GET /v2/health/live|ready`, `GET /v2/models/{name}` (metadata),
  `POST /v2/models/{name}/infer` with the image tensor and an optional INT64 `target` (-1 = argmax),
  answering `scores`, `heatmap` and `class` tensors.
* `GET /metrics`: Prometheus text format.

Samples of concurrent requests are gathered into micro-batches (`Batcher`) and explained by one
`Explainer.explain` call in a worker thread. Errors are JSON `{"error": "..."}`: 400 bad input, 404 unknown
model, 413 body too large, 503 queue full. FastAPI, uvicorn and prometheus-client are imported only when a
server is built: `pip install 'onnxcam[serve]'`.
"""
import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import preprocess, render
from .errors import OnnxcamError
from .explainer import Explainer

INSTALL_HINT = "onnxcam serve needs FastAPI, uvicorn and prometheus-client: pip install 'onnxcam[serve]'"
MAX_IMAGE_PIXELS = 40_000_000  # decoded image size limit, far below PIL's decompression-bomb threshold
CODEC_THREADS = 4  # threads decoding requests and encoding responses
HEATMAP_DECIMALS = 4  # V1 explanations round heatmaps (display use); v2 returns them exactly
TARGET = "target"
OUTPUTS = ("scores", "heatmap", "class")
_V2_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
             np.dtype(np.uint8): "UINT8", np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32",
             np.dtype(np.int64): "INT64"}


class ApiError(Exception):
    """A request the server refuses: HTTP status + one-line message, sent as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class QueueFull(Exception):
    """The batch queue has no room: answered with 503."""


# --------------------------------------------------------------------------- batching

@dataclass(frozen=True)
class Sample:
    x: np.ndarray  # one input, without the batch dimension, in the model's dtype
    target: int | None = None  # None: the top-scoring class


@dataclass(frozen=True)
class Output:
    scores: np.ndarray  # (K,)
    heatmap: np.ndarray  # (H, W) in [0, 1]
    target: int  # the class explained


class Batcher:
    """Gathers samples from concurrent `submit` calls into batches of at most `max_batch`, waiting at most
    `wait_s` after a batch's first sample for more, and runs `run_batch(samples) -> results` (one result or
    exception per sample) in `workers` threads. At most `max_queue` samples wait; beyond that `submit`
    raises QueueFull. `close` stops taking samples and finishes the queued and running ones."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = 16, max_queue: int = 64,
                 wait_s: float = 0.005, workers: int = 1,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or workers < 1 or wait_s < 0:
            raise OnnxcamError("max_batch, max_queue and workers must be positive, the batch wait not negative")
        self.run_batch, self.max_batch, self.max_queue = run_batch, max_batch, max_queue
        self.wait_s, self.workers, self.on_batch = wait_s, workers, on_batch
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._closing = False
        self._started = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Call from the running event loop (the app's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._free = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="onnxcam-batch")
        self._running: set[asyncio.Task] = set()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._started = True

    async def submit(self, samples: Sequence) -> list:
        """Queues all samples (or none) and returns their results in order."""
        if not self._started or self._closing:
            raise QueueFull("the server is not accepting work (starting or shutting down)")
        if len(samples) > self.max_queue:
            raise ApiError(413, f"{len(samples)} instances in one request; at most {self.max_queue} (--max-queue)")
        if len(self._queue) + len(samples) > self.max_queue:  # forget samples whose request went away
            self._queue = deque(item for item in self._queue if not item[1].done())
        if len(self._queue) + len(samples) > self.max_queue:
            raise QueueFull(f"server busy: {len(self._queue)} samples queued (--max-queue {self.max_queue})")
        futures = [self._loop.create_future() for _ in samples]
        self._queue.extend(zip(samples, futures))
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        if not self._started:
            return
        self._closing = True
        self._arrived.set()
        await self._dispatcher
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _dispatch(self) -> None:
        while True:
            await self._free.acquire()  # a worker is free: whatever queued meanwhile joins the next batch
            batch = await self._collect()
            if not batch:  # closing and drained
                self._free.release()
                return
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list:
        batch: list = []
        deadline = 0.0
        while len(batch) < self.max_batch:
            if self._queue:
                item = self._queue.popleft()
                if not item[1].done():  # skip samples whose request went away
                    if not batch:
                        deadline = self._loop.time() + self.wait_s
                    batch.append(item)
                continue
            if self._closing:
                break
            self._arrived.clear()
            if not batch:
                await self._arrived.wait()
                continue
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, batch: list) -> None:
        try:
            start = time.perf_counter()
            try:
                results = await self._loop.run_in_executor(self._executor, self.run_batch,
                                                           [sample for sample, _ in batch])
            except Exception as exc:
                results = [exc] * len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._free.release()


def explain_batch(explainer: Explainer, samples: Sequence[Sample], one_by_one: bool = False) -> list:
    """One `explain` call per group of samples with the same shape and the same kind of target (argmax or
    given); returns an Output or an ApiError per sample. A failing group is retried sample by sample so
    that one bad sample fails alone."""
    results: list = [None] * len(samples)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.x.shape, s.target is None), []).append(i)
    for idx in groups.values():
        for chunk in ([[i] for i in idx] if one_by_one else [idx]):
            _explain_group(explainer, samples, chunk, results)
    return results


def _explain_group(explainer: Explainer, samples: Sequence[Sample], idx: list[int], results: list) -> None:
    x = np.stack([samples[i].x for i in idx])
    targets = None if samples[idx[0]].target is None else [samples[i].target for i in idx]
    try:
        r = explainer.explain(x, targets)
    except OnnxcamError as exc:
        if len(idx) > 1:
            for i in idx:
                _explain_group(explainer, samples, [i], results)
        else:
            results[idx[0]] = ApiError(400, str(exc))
        return
    for j, i in enumerate(idx):
        results[i] = Output(scores=r.scores[j].ravel(), heatmap=r.heatmaps[j], target=int(r.targets[j]))


# --------------------------------------------------------------------------- the model as the protocols see it

@dataclass
class ModelSpec:
    name: str
    explainer: Explainer
    sample_shape: tuple  # input shape without the batch dim; None where dynamic
    dtype: np.dtype
    pp: preprocess.Preprocess | None  # None: images cannot be preprocessed (pp_error says why)
    pp_error: str = ""
    labels: list[str] | None = None
    fixed_batch: bool = False  # the model's batch dim is a static 1

    @classmethod
    def of(cls, explainer: Explainer, name: str) -> "ModelSpec":
        if len(explainer.input_names) != 1:
            raise OnnxcamError(f"onnxcam serve takes models with one input; this one has "
                               f"{', '.join(explainer.input_names)}")
        shape = explainer.input_shapes[explainer.image_input]
        if shape is None:
            raise OnnxcamError(f"input '{explainer.image_input}' has no known rank")
        dims = tuple(d if isinstance(d, int) and d > 0 else None for d in shape)
        if dims[0] not in (None, 1):
            raise OnnxcamError(f"onnxcam serve needs a dynamic batch dimension or a batch of 1; the model's "
                               f"is {dims[0]}")
        dtype = np.dtype(explainer.input_dtypes[explainer.image_input])
        if dtype not in _V2_TYPES:
            raise OnnxcamError(f"input dtype {dtype} is not supported by onnxcam serve")
        try:
            pp, pp_error = explainer.preprocessing(), ""
        except OnnxcamError as exc:
            pp, pp_error = None, str(exc)
        labels = explainer.labels
        if labels is not None and explainer.num_classes is not None and len(labels) != explainer.num_classes:
            labels = None
        return cls(name=name, explainer=explainer, sample_shape=dims[1:], dtype=dtype, pp=pp, pp_error=pp_error,
                   labels=labels, fixed_batch=dims[0] == 1)

    @property
    def datatype(self) -> str:
        return _V2_TYPES[self.dtype]

    @property
    def image_input(self) -> str:
        return self.explainer.image_input

    def label(self, k: int) -> str:
        return self.labels[k] if self.labels is not None and 0 <= k < len(self.labels) else str(k)

    def heatmap_shape(self) -> list[int]:
        spatial = self.sample_shape[:-1] if self.explainer.layout == "NHWC" else self.sample_shape[1:]
        return [-1 if d is None else d for d in spatial]

    def tensor_from_image(self, image: Image.Image, where: str) -> np.ndarray:
        if self.pp is None:
            raise ApiError(400, f"{where}: images cannot be preprocessed for this model ({self.pp_error}); "
                                f"send an array")
        return preprocess.to_tensor(image, self.pp)[0].astype(self.dtype, copy=False)

    def image_from_tensor(self, x: np.ndarray) -> Image.Image:
        """Undoes the preprocessing, for overlays on array instances."""
        pp = self.pp
        if pp is None:
            a = np.moveaxis(x, 0, -1) if self.explainer.layout == "NCHW" else x
            a = (a - a.min()) / max(float(np.ptp(a)), 1e-12) * 255
        else:
            a = np.moveaxis(x, 0, -1) if pp.layout == "NCHW" else x
            a = (a.astype(np.float64) * np.asarray(pp.std) + np.asarray(pp.mean)) / pp.scale
            if a.shape[-1] == 3 and pp.channel_order == "BGR":
                a = a[..., ::-1]
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")


# --------------------------------------------------------------------------- protocol parsing and encoding

def parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return payload


def decode_image(text: str, where: str) -> Image.Image:
    """A base64 (optionally data-URL) PNG or JPEG -> RGB PIL image."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # line-wrapped base64 (e.g. from `base64` without -w0)
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG")) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ApiError(400, f"{where}: image of {im.width}x{im.height} pixels is too large")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # malformed EXIF: keep the pixels as stored
                pass
            return preprocess.load_image(im)
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(400, f"{where}: cannot decode the image (PNG or JPEG expected)") from None


def parse_array(value: Any, spec: ModelSpec, where: str, shape: tuple | None = None) -> np.ndarray:
    """A JSON number array -> the model's dtype; checked against `shape` (default: one sample's shape)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        raise ApiError(400, f"{where}: expected numbers in a regular nested array")
    want = spec.sample_shape if shape is None else shape
    if arr.ndim != len(want) or any(w is not None and g != w for g, w in zip(arr.shape, want)) or 0 in arr.shape:
        raise ApiError(400, f"{where}: array of shape {list(arr.shape)}; the model expects {_fmt(want)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ApiError(400, f"{where}: the array has NaN or infinite values")
    if spec.dtype.kind in "iu" and arr.dtype.kind == "f":
        raise ApiError(400, f"{where}: the model takes {spec.dtype} values, got floats")
    return np.ascontiguousarray(arr, dtype=spec.dtype)


def parse_target(value: Any, spec: ModelSpec, where: str) -> int | None:
    """A class index or label (V1); None means the top class."""
    if value is None:
        return None
    if isinstance(value, str):
        matches = [i for i, name in enumerate(spec.labels or []) if name.lower() == value.lower()]
        if not matches:
            raise ApiError(400, f"{where}: '{value}' matches no class label")
        return matches[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{where}: a target is a class index or label, got {json.dumps(value)[:40]}")
    return check_class(value, spec, where)


def check_class(k: int, spec: ModelSpec, where: str) -> int:
    n = spec.explainer.num_classes
    if k < 0 or (n is not None and k >= n):
        limit = f": the model has {n} classes (0..{n - 1})" if n is not None else ""
        raise ApiError(400, f"{where}: class {k} is out of range{limit}")
    return k


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{where} must be true or false")
    return value


@dataclass
class V1Request:
    samples: list[Sample] = field(default_factory=list)
    images: list[Image.Image | None] = field(default_factory=list)  # decoded images, for overlays
    overlay: list[bool] = field(default_factory=list)


def parse_v1(body: bytes, spec: ModelSpec) -> V1Request:
    payload = parse_json(body)
    unknown = set(payload) - {"instances", "target", "overlay"}
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown))}; expected instances, target, overlay")
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ApiError(400, 'expected {"instances": [...]} with at least one instance')
    default_target = parse_target(payload.get("target"), spec, "target")
    default_overlay = _flag(payload.get("overlay", False), "overlay")
    req = V1Request()
    for i, inst in enumerate(instances):
        where = f"instance {i}"
        target, overlay, value = default_target, default_overlay, inst
        if isinstance(inst, dict):
            unknown = set(inst) - {"b64", "data", "target", "overlay"}
            if unknown or ("b64" in inst) == ("data" in inst):
                raise ApiError(400, f'{where}: an object instance has "b64" (an encoded image) or "data" (an '
                                    f'array), and optionally "target" and "overlay"')
            if "target" in inst:
                target = parse_target(inst["target"], spec, f"{where}: target")
            if "overlay" in inst:
                overlay = _flag(inst["overlay"], f"{where}: overlay")
            value = inst["b64"] if "b64" in inst else inst["data"]
            if "b64" in inst and not isinstance(value, str):
                raise ApiError(400, f'{where}: "b64" must be a base64 string')
        if isinstance(value, str):
            image = decode_image(value, where)
            x = spec.tensor_from_image(image, where)
        elif isinstance(value, list):
            image, x = None, parse_array(value, spec, where)
        else:
            raise ApiError(400, f"{where}: expected a base64 image string or a nested array of shape "
                                f"{_fmt(spec.sample_shape)}")
        req.samples.append(Sample(x, target))
        req.images.append(image)
        req.overlay.append(overlay)
    return req


def v1_response(kind: str, req: V1Request, outputs: Sequence[Output], spec: ModelSpec) -> bytes:
    if kind == "predict":
        return _json_list("predictions", [_prediction(o, spec) for o in outputs])
    explanations = []
    for o, image, overlay, sample in zip(outputs, req.images, req.overlay, req.samples):
        probs = _softmax(o.scores)
        e = {"class": o.target, "label": spec.label(o.target), "score": float(o.scores[o.target]),
             "probability": float(probs[o.target])}
        if overlay:
            picture = render.overlay(image if image is not None else spec.image_from_tensor(sample.x), o.heatmap)
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            e["overlay"] = base64.b64encode(buf.getvalue()).decode("ascii")
        explanations.append(_json_with(e, heatmap=_heatmap_json(o.heatmap)))
    return _json_list("explanations", explanations)


def _prediction(o: Output, spec: ModelSpec) -> str:
    top = int(np.argmax(o.scores))
    probs = _softmax(o.scores)
    return _json_with({"class": top, "label": spec.label(top), "probability": float(probs[top])},
                      scores=_floats_json(o.scores))


@dataclass
class V2Request:
    samples: list[Sample]
    outputs: list[str]
    id: str | None = None


def parse_v2(body: bytes, spec: ModelSpec) -> V2Request:
    payload = parse_json(body)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, 'expected {"inputs": [...]} with at least one tensor')
    tensors: dict[str, dict] = {}
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not {"name", "shape", "datatype", "data"} <= set(t):
            raise ApiError(400, f"inputs[{i}]: a tensor has name, shape, datatype and data")
        if t["name"] not in (spec.image_input, TARGET):
            raise ApiError(400, f"unknown input '{t['name']}'; inputs: {spec.image_input}, {TARGET} (optional)")
        if t["name"] in tensors:
            raise ApiError(400, f"input '{t['name']}' given twice")
        shape = t["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ApiError(400, f"input '{t['name']}': shape must be a list of non-negative integers")
        tensors[t["name"]] = t
    if spec.image_input not in tensors:
        raise ApiError(400, f"missing input '{spec.image_input}'")
    image = tensors[spec.image_input]
    where = f"input '{spec.image_input}'"
    if image["datatype"] != spec.datatype:
        raise ApiError(400, f"{where}: datatype {image['datatype']}; the model takes {spec.datatype}")
    shape = image["shape"]
    if len(shape) != len(spec.sample_shape) + 1 or shape[0] < 1:
        raise ApiError(400, f"{where}: shape {shape}; the model expects {_fmt((None,) + spec.sample_shape)}")
    x = _v2_data(image, spec, where)
    n = shape[0]
    targets: list[int | None] = [None] * n
    if TARGET in tensors:
        t = tensors[TARGET]
        if t["datatype"] not in ("INT64", "INT32"):
            raise ApiError(400, f"input '{TARGET}': datatype {t['datatype']}; expected INT64")
        if t["shape"] not in ([n], [1]):
            raise ApiError(400, f"input '{TARGET}': shape {t['shape']}; expected [{n}] or [1]")
        values = t["data"]
        if isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        if not isinstance(values, list) or len(values) != t["shape"][0] or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ApiError(400, f"input '{TARGET}': data must be {t['shape'][0]} integer(s)")
        values = values * n if len(values) == 1 else values
        targets = [None if v == -1 else check_class(v, spec, f"input '{TARGET}'") for v in values]
    outputs = list(OUTPUTS)
    if payload.get("outputs") is not None:
        wanted = payload["outputs"]
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and o.get("name") in OUTPUTS for o in wanted):
            raise ApiError(400, f"outputs: a list of {{\"name\": ...}} with names among {', '.join(OUTPUTS)}")
        outputs = [o["name"] for o in wanted]
    request_id = payload.get("id")
    return V2Request([Sample(x[i], targets[i]) for i in range(n)], outputs,
                     str(request_id) if request_id is not None else None)


def _v2_data(tensor: dict, spec: ModelSpec, where: str) -> np.ndarray:
    shape = tensor["shape"]
    try:
        arr = np.asarray(tensor["data"])
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        raise ApiError(400, f"{where}: data must be numbers (row-major, flattened)")
    if arr.size != math.prod(shape):
        raise ApiError(400, f"{where}: {arr.size} values for shape {shape}")
    return parse_array(arr.reshape(shape), spec, where, shape=(shape[0],) + spec.sample_shape)


def v2_response(req: V2Request, outputs: Sequence[Output], spec: ModelSpec) -> bytes:
    tensors = {
        "scores": lambda: _v2_tensor("scores", "FP32", np.stack([o.scores for o in outputs])),
        "heatmap": lambda: _v2_tensor("heatmap", "FP32", np.stack([o.heatmap for o in outputs])),
        "class": lambda: _v2_tensor("class", "INT64", np.array([o.target for o in outputs], np.int64)),
    }
    head = {"model_name": spec.name, "model_version": "1"}
    if req.id is not None:
        head["id"] = req.id
    body = _json_with(head, outputs="[" + ",".join(tensors[name]() for name in req.outputs) + "]")
    return body.encode()


def _v2_tensor(name: str, datatype: str, a: np.ndarray) -> str:
    data = json.dumps(a.ravel().tolist()) if a.dtype.kind in "iu" else _floats_json(a)
    return _json_with({"name": name, "datatype": datatype, "shape": list(a.shape)}, data=data)


def v2_metadata(spec: ModelSpec) -> dict:
    batch = [-1]
    k = spec.explainer.num_classes
    return {
        "name": spec.name, "versions": ["1"], "platform": "onnxcam",
        "inputs": [
            {"name": spec.image_input, "datatype": spec.datatype,
             "shape": batch + [-1 if d is None else d for d in spec.sample_shape]},
            {"name": TARGET, "datatype": "INT64", "shape": batch,
             "parameters": {"optional": True, "description": "class to explain per sample; -1: the top class"}},
        ],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": batch + [-1 if k is None else k]},
            {"name": "heatmap", "datatype": "FP32", "shape": batch + spec.heatmap_shape()},
            {"name": "class", "datatype": "INT64", "shape": batch},
        ],
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - np.max(x))
    return e / e.sum()


def _fmt(shape: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# Responses carry large float arrays; json.dumps spends ~1 us per float on repr(), so they are formatted here
# (5-10x faster) and spliced into the JSON text.

def _json_with(obj: dict, **raw: str) -> str:
    """json.dumps(obj) plus members whose values are JSON text already."""
    text = json.dumps(obj, separators=(",", ":"))[:-1]
    extra = ",".join(f"{json.dumps(k)}:{v}" for k, v in raw.items())
    return text + ("," if len(text) > 1 and extra else "") + extra + "}"


def _json_list(key: str, items: list[str]) -> bytes:
    return ("{" + json.dumps(key) + ":[" + ",".join(items) + "]}").encode()


def _floats_json(a: np.ndarray) -> str:
    """A flat JSON array of float32 values; '%.9g' round-trips float32 exactly."""
    flat = np.asarray(a, np.float64).ravel()
    if not np.isfinite(flat).all():
        return json.dumps(flat.tolist())  # NaN/Infinity tokens, as json.dumps writes them
    return "[" + (",".join(["%.9g"] * flat.size) % tuple(flat.tolist())) + "]"


_ROUNDED: list = []  # _ROUNDED[0][i] = the JSON text of i / 10**HEATMAP_DECIMALS


def _heatmap_json(h: np.ndarray) -> str:
    """A heatmap in [0, 1] as nested JSON arrays, rounded to HEATMAP_DECIMALS (table look-ups)."""
    if not _ROUNDED:
        scale = 10 ** HEATMAP_DECIMALS
        _ROUNDED.append(np.array([repr(i / scale) for i in range(scale + 1)], dtype=object))
    table = _ROUNDED[0]
    q = np.rint(np.clip(np.nan_to_num(h.astype(np.float64)), 0, 1) * (len(table) - 1)).astype(np.intp)

    def nested(texts: np.ndarray) -> str:
        if texts.ndim == 1:
            return "[" + ",".join(texts.tolist()) + "]"
        return "[" + ",".join(nested(sub) for sub in texts) + "]"

    return nested(table[q])


# --------------------------------------------------------------------------- the app

def _serving_modules():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise OnnxcamError(INSTALL_HINT) from None


class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self, queued: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        self.requests = Counter("onnxcam_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("onnxcam_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.batch_size = Histogram("onnxcam_batch_size", "Samples per explain call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram("onnxcam_batch_duration_seconds", "Time per explain call",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                       registry=self.registry)
        Gauge("onnxcam_queue_samples", "Samples waiting for a batch",
              registry=self.registry).set_function(queued)
        ProcessCollector(registry=self.registry)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _MetricsMiddleware:
    """Pure ASGI: counts every HTTP request by route template and status, and times it."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.observe_request(endpoint, scope["method"], status[0], time.perf_counter() - start)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as Content-Length or the bytes received pass `limit`."""
    from starlette.requests import ClientDisconnect

    too_large = f"request body larger than {limit} bytes (--max-body-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, too_large)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_large)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(499, "client closed the connection") from None
    return b"".join(chunks)


async def unless_disconnected(request, work: Awaitable):
    """Awaits `work`, or cancels it (its queued samples are then skipped) when the client goes away."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(499, "client closed the connection")
    return task.result()


def create_app(explainer_or_model, name: str | None = None, max_batch: int = 16, max_queue: int = 64,
               max_body_bytes: int = 32 * 2**20, batch_wait_ms: float = 5.0, workers: int = 1, **explainer_kwargs):
    """The FastAPI app serving one model. `explainer_or_model`: an Explainer (shared, thread-safe) or
    anything Explainer() takes (path, bytes, ModelProto), built with `explainer_kwargs`."""
    _serving_modules()
    from fastapi import FastAPI, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if max_body_bytes < 1:
        raise OnnxcamError("the body size limit must be positive")
    if isinstance(explainer_or_model, Explainer):
        explainer = explainer_or_model
    else:
        explainer = Explainer(explainer_or_model, **explainer_kwargs)
        if name is None and isinstance(explainer_or_model, (str, os.PathLike)):
            name = Path(explainer_or_model).stem
    spec = ModelSpec.of(explainer, name or "model")
    if spec.image_input == TARGET:
        raise OnnxcamError(f"the model's input is named '{TARGET}', which the v2 protocol uses for the class")
    one_by_one = spec.fixed_batch
    batcher = Batcher(lambda samples: explain_batch(explainer, samples, one_by_one),
                      max_batch=1 if one_by_one else max_batch, max_queue=max_queue,
                      wait_s=batch_wait_ms / 1000.0, workers=workers)
    # Decoding, preprocessing and JSON encoding hold the GIL mostly: a few threads keep them off the event
    # loop; more would only add malloc arenas (memory) without adding speed.
    codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="onnxcam-codec")
    metrics = Metrics(lambda: batcher.queued)
    batcher.on_batch = metrics.observe_batch
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.close()  # after uvicorn has finished the in-flight requests: drains the queue
            codec.shutdown(wait=True)

    app = FastAPI(title="onnxcam", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.spec, app.state.batcher, app.state.metrics = spec, batcher, metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc: QueueFull):
        return error(503, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(400, "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}")

    def model(requested: str) -> ModelSpec:
        if requested != spec.name:
            raise ApiError(404, f"model '{requested}' not found; this server serves '{spec.name}'")
        return spec

    async def handle(request: Request, parse, encode):
        body = await read_body(request, max_body_bytes)
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(codec, parse, body, spec)
        outputs = await unless_disconnected(request, batcher.submit(parsed.samples))
        return Response(await loop.run_in_executor(codec, encode, parsed, outputs, spec),
                        media_type="application/json")

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2")
    async def server_metadata():
        from . import __version__
        return {"name": "onnxcam", "version": __version__, "extensions": []}

    @app.get("/v2/models/{name}")
    async def v2_model(name: str):
        return v2_metadata(model(name))

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str):
        model(name)
        return JSONResponse({"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request):
        model(name)
        return await handle(request, parse_v2, v2_response)

    @app.get("/v1/models")
    async def v1_models():
        return {"models": [spec.name]}

    @app.get("/v1/models/{name}")
    async def v1_model(name: str):
        model(name)
        return {"name": name, "ready": state["ready"]}

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request):
        model(name)
        return await handle(request, parse_v1, lambda req, outs, s: v1_response("predict", req, outs, s))

    @app.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request):
        model(name)
        return await handle(request, parse_v1, lambda req, outs, s: v1_response("explain", req, outs, s))

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def run(model, host: str = "127.0.0.1", port: int = 8080, name: str | None = None, max_batch: int = 16,
        max_queue: int = 64, workers: int = 1, max_body_mb: float = 32.0, batch_wait_ms: float = 5.0,
        layer=None, method: str = "gradcam", log_level: str = "info", graceful_timeout: float = 30.0,
        device: str | None = None) -> None:
    """Serves `model` until SIGTERM/SIGINT; in-flight requests finish first (up to `graceful_timeout` s)."""
    _serving_modules()
    import uvicorn

    if isinstance(model, Explainer):
        explainer = model
    else:
        if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
            raise OnnxcamError(f"model not found: {model}")
        explainer = Explainer(model, layer=layer, method=method, device=device)
        if name is None and isinstance(model, (str, os.PathLike)):
            name = Path(model).stem
    app = create_app(explainer, name=name, max_batch=max_batch, max_queue=max_queue,
                     max_body_bytes=int(max_body_mb * 2**20), batch_wait_ms=batch_wait_ms, workers=workers)
    spec = app.state.spec
    print(f"onnxcam: serving '{spec.name}' (layer {explainer.layer}, {explainer.method}, {explainer.provider}) on http://{host}:{port} "
          f"-- max batch {app.state.batcher.max_batch}, queue {max_queue}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, server_header=False)
    uvicorn.Server(config).run()
