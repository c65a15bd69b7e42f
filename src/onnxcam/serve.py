"""`onnxcam serve`: an HTTP server for predictions and CAM explanations of one ONNX model.

Protocols (FastAPI/Starlette on uvicorn):

* KServe V1: `POST /v1/models/{name}:predict` and `:explain` take `{"instances": [...]}`; an instance is a
  base64 PNG/JPEG string (or `{"b64": ...}`), preprocessed with the model's preprocessing, or a nested
  array already in the model's input shape without the batch dimension (or `{"data": ...}`). Optional
  `"target"` (class index or label) and `"overlay": true`, per request or per object instance; per request,
  `"method"` (one of the server's methods, `GET /ui/info`) and `"counterfactual": true` (:explain).
  `GET /v1/models/{name}` says whether the model is ready.
* Open Inference Protocol (v2): `GET /v2/health/live|ready`, `GET /v2/models/{name}` (metadata),
  `POST /v2/models/{name}/infer` with the image tensor and an optional INT64 `target` (-1 = argmax),
  answering `scores`, `heatmap` and `class` tensors.
* `GET /metrics`: Prometheus text format.
* `GET /`: a page to explore the model in a browser (onnxcam/ui: plain HTML/CSS/JS, nothing fetched from
  elsewhere), using the V1 endpoints and `GET /ui/info` (labels, methods, limits).

Samples of concurrent requests are gathered into micro-batches (`Batcher`) and explained by one
`Explainer.explain` call in a worker thread. Errors are JSON `{"error": "..."}`: 400 bad input, 404 unknown
model, 408 request not received in time, 413 body or decoded pixels too large, 503 queue or pixel budget
full. The limits on hostile input are in `Limits` (docs/serving.md, "Security"). FastAPI, uvicorn and
prometheus-client are imported only when a server is built: `pip install 'onnxcam[serve]' (from a clone: pip install -e '.[serve]')`.
"""
import asyncio
import base64
import binascii
import contextlib
import importlib.resources
import io
import json
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import __version__
from .cam import methods as methods_registry
from .errors import OnnxcamError
from .images import preprocess, render
from .images.labels import match_label
from .run.explainer import Explainer

INSTALL_HINT = "onnxcam serve needs FastAPI, uvicorn and prometheus-client: pip install 'onnxcam[serve]' (from a clone: pip install -e '.[serve]')"
CODEC_THREADS = 4  # threads decoding requests and encoding responses
HEATMAP_DECIMALS = 4  # V1 explanations round heatmaps (display use); v2 returns them exactly
TARGET = "target"
OUTPUTS = ("scores", "heatmap", "class")
_V2_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
             np.dtype(np.uint8): "UINT8", np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32",
             np.dtype(np.int64): "INT64"}


class ApiError(Exception):
    """A request the server refuses: HTTP status + one-line message, sent as {"error": message}. `close`: the
    body was not read to its end, so the connection is closed after the answer (else the client could keep
    it busy sending the rest)."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class QueueFull(Exception):
    """The batch queue has no room: answered with 503."""


@dataclass(frozen=True)
class Limits:
    """What one request may make the server decode and hold; see docs/serving.md, "Security".

    A base64 image costs about 4 bytes per pixel once decoded (PIL keeps RGB as RGBX), but a PNG of one colour
    compresses ~1000:1, so the body size limit alone does not bound memory: these count decoded pixels,
    read from the image headers before anything is decoded."""

    image_pixels: int = 40_000_000  # one image (--max-image-mp)
    request_pixels: int = 100_000_000  # all images of one request together (--max-request-mp): decode time
    inflight_pixels: int = 100_000_000  # all requests together (--max-inflight-mp): memory
    overlay_side: int = 1024  # longest side of an overlay PNG (--max-overlay-side)
    body_timeout: float = 60.0  # seconds to receive a whole body (--body-timeout)

    def __post_init__(self):
        if min(self.image_pixels, self.request_pixels, self.inflight_pixels, self.overlay_side) < 1:
            raise OnnxcamError("the pixel limits and the overlay size must be positive")
        if not self.body_timeout > 0:
            raise OnnxcamError("the body timeout must be positive")
        if self.image_pixels > self.inflight_pixels:  # else an image allowed alone could never be decoded
            raise OnnxcamError("the in-flight pixel budget (--max-inflight-mp) must be at least the per-image "
                               "limit (--max-image-mp)")


class PixelBudget:
    """Decoded pixels held by all requests together (codec threads take and give concurrently). A take that
    does not fit fails at once rather than waiting: the request is answered 503 and the client may retry,
    while the pixels already held are bounded by the limit."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Held:
    """The pixels one request holds in a PixelBudget; all given back when the request ends, however it ends."""

    def __init__(self, budget: PixelBudget | None):
        self.budget, self.pixels = budget, 0

    def take(self, n: int, where: str) -> None:
        if self.budget is None:
            return
        if not self.budget.take(n):
            raise QueueFull(f"server busy: {where} needs {n / 1e6:.1f} Mpx decoded, {self.budget.used / 1e6:.1f} "
                            f"of {self.budget.limit / 1e6:.1f} Mpx are in use (--max-inflight-mp)")
        self.pixels += n

    def give(self, n: int) -> None:
        if self.budget is not None and n > 0:
            self.budget.give(n)
            self.pixels -= n

    def release(self) -> None:
        self.give(self.pixels)


# --------------------------------------------------------------------------- batching

@dataclass(frozen=True)
class Sample:
    x: np.ndarray  # one input, without the batch dimension, in the model's dtype
    target: int | None = None  # None: the top-scoring class
    method: str | None = None  # None: the server's own method (MethodSet)
    counterfactual: bool = False


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


class MethodSet:
    """The methods a server explains with: its own Explainer's, plus `others` (CAM methods a request may ask
    for by name), each built on first use from the same model, layer and providers, and kept: at most one
    session per method. Perturbation methods are never offered unless named: Score-CAM runs one forward per
    channel, which would let any request occupy the server for minutes."""

    DEFAULT_OTHERS = tuple(name for name, m in methods_registry.METHODS.items() if m.kind in ("gradient", "eigen"))

    def __init__(self, explainer: Explainer, others: Sequence[str] | None = None):
        self.default = explainer
        others = self.DEFAULT_OTHERS if others is None else tuple(others)
        for name in others:
            methods_registry.get_method(name)  # an unknown name is the operator's error: say so at start
        self.names = tuple(dict.fromkeys((explainer.method, *others)))
        self._built: dict[str, Explainer | OnnxcamError] = {explainer.method: explainer}
        self._lock = threading.Lock()

    def info(self) -> list[dict]:
        return [{"name": n, "gradients": methods_registry.METHODS[n].uses_gradients,
                 "default": n == self.default.method, "help": methods_registry.METHODS[n].help} for n in self.names]

    def check(self, name: Any, where: str) -> str | None:
        if name is None or name == self.default.method:
            return None
        if not isinstance(name, str) or name not in self.names:
            raise ApiError(400, f"{where}: {json.dumps(name)[:40]} is not a method this server runs; it runs "
                                f"{', '.join(self.names)}")
        return name

    def get(self, name: str | None) -> Explainer:
        if name is None:
            return self.default
        with self._lock:  # a build takes seconds; concurrent first requests for one method build it once
            if name not in self._built:
                try:
                    self._built[name] = self._build(name)
                except OnnxcamError as exc:  # kept: a failing build is not retried on every request
                    self._built[name] = exc
            built = self._built[name]
        if isinstance(built, OnnxcamError):
            raise built
        return built

    def _build(self, name: str) -> Explainer:
        d = self.default
        built = Explainer(d.source_model, layer=list(d.layers), method=name, providers=d.providers,
                          session_options=d.session_options, layout=d.layout, batch_size=d.batch_size,
                          batch_axis=d.batching.axis)
        if (built.score, built.layers, built.image_input) != (d.score, d.layers, d.image_input):
            # an Explainer made with output= cannot be rebuilt from what it keeps
            raise OnnxcamError(f"method '{name}' would explain another output than the server's; use {d.method}")
        return built


def explain_batch(explainer: Explainer | MethodSet, samples: Sequence[Sample], one_by_one: bool = False) -> list:
    """One `explain` call per group of samples with the same shape, the same kind of target (argmax or
    given), method and counterfactual flag; returns an Output or an ApiError per sample. A failing group is
    retried sample by sample so that one bad sample fails alone."""
    method_set = explainer if isinstance(explainer, MethodSet) else MethodSet(explainer, ())
    results: list = [None] * len(samples)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.x.shape, s.target is None, s.method, s.counterfactual), []).append(i)
    for (_, _, method, _), idx in groups.items():
        try:
            chosen = method_set.get(method)
        except OnnxcamError as exc:
            for i in idx:
                results[i] = ApiError(400, f"method {method}: {exc}")
            continue
        for chunk in ([[i] for i in idx] if one_by_one else [idx]):
            _explain_group(chosen, samples, chunk, results)
    return results


def _explain_group(explainer: Explainer, samples: Sequence[Sample], idx: list[int], results: list) -> None:
    x = np.stack([samples[i].x for i in idx])
    targets = None if samples[idx[0]].target is None else [samples[i].target for i in idx]
    try:
        r = explainer.explain(x, targets, counterfactual=samples[idx[0]].counterfactual)
    except OnnxcamError as exc:
        if len(idx) > 1:
            for i in idx:
                _explain_group(explainer, samples, [i], results)
        else:
            results[idx[0]] = ApiError(400, str(exc))
        return
    for j, i in enumerate(idx):
        scores, heatmap = r.scores[j].ravel(), r.heatmaps[j]
        if not (np.isfinite(scores).all() and np.isfinite(heatmap).all()):
            # finite inputs far outside the model's range overflow inside it; an argmax over NaN scores
            # would name class 0 with a NaN heatmap
            results[i] = ApiError(400, "the model's output for this input is not finite (NaN or infinity): its "
                                       "values are far outside what the model takes")
        else:
            results[i] = Output(scores=scores, heatmap=heatmap, target=int(r.targets[j]))


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
    fixed_batch: bool = False  # the graph computes one sample per run (Explainer.batching.fixed)
    methods: "MethodSet | None" = None  # what a V1 :explain may ask for by "method"; None: the explainer's only

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
                   labels=labels, fixed_batch=explainer.batching.fixed)

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


def b64_bytes(text: str, where: str) -> bytes:
    """A base64 string (optionally a data URL or line-wrapped) -> bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # line-wrapped base64 (e.g. from `base64` without -w0)
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: not valid base64") from None


_FORMATS = ("PNG", "JPEG")


def image_size(raw: bytes, where: str) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, without decoding pixels."""
    try:
        with Image.open(io.BytesIO(raw), formats=_FORMATS) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(400, f"{where}: cannot decode the image (PNG or JPEG expected)") from None


def overlay_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def decode_image(raw: bytes, spec: "ModelSpec", where: str, limits: Limits, held: Held,
                 overlay: bool) -> tuple[np.ndarray, Image.Image | None]:
    """An encoded image -> (the model's input tensor, the picture for its overlay or None). The full-size
    pixels are counted in `held` while they exist; only the overlay picture (at most
    limits.overlay_side) stays counted until the request ends."""
    if spec.pp is None:
        raise ApiError(400, f"{where}: images cannot be preprocessed for this model ({spec.pp_error}); "
                            f"send an array")
    w, h = image_size(raw, where)
    held.take(w * h, where)
    keep = 0
    try:
        model_h, model_w = spec.pp.size
        need = (model_w, model_h)
        if overlay:  # the overlay's short side, square: the same need whichever way EXIF turns the image
            side = min(overlay_size((w, h), limits.overlay_side))
            need = (max(model_w, side), max(model_h, side))
        try:
            image = preprocess.load_image_sized(raw, need, max_pixels=limits.image_pixels, formats=_FORMATS)
        except OnnxcamError:
            raise ApiError(400, f"{where}: cannot decode the image (PNG or JPEG expected)") from None
        x = spec.tensor_from_image(image, where)
        picture = None
        if overlay:
            picture = image if max(image.size) <= limits.overlay_side else \
                image.resize(overlay_size(image.size, limits.overlay_side), Image.BILINEAR)
            keep = picture.width * picture.height
        del image
    finally:
        held.give(w * h - keep)
    return x, picture


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
    if spec.dtype.kind in "iu":
        if arr.dtype.kind == "f":
            raise ApiError(400, f"{where}: the model takes {spec.dtype} values, got floats")
        info = np.iinfo(spec.dtype)
        if arr.min() < info.min or arr.max() > info.max:  # a cast would wrap around silently
            raise ApiError(400, f"{where}: values outside the {spec.dtype} range {info.min}..{info.max}")
        return np.ascontiguousarray(arr, dtype=spec.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(arr, dtype=spec.dtype)
    # checked after the cast: 1e39 is a finite float64 but an infinite float32
    if not np.isfinite(x).all():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ApiError(400, f"{where}: the array has NaN or infinite values")
        raise ApiError(400, f"{where}: values beyond the {spec.dtype} range (largest "
                            f"{float(np.finfo(spec.dtype).max):.6g})")
    return x


def parse_target(value: Any, spec: ModelSpec, where: str) -> int | None:
    """A class index or label (V1); None means the top class."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return match_label(value[:200], spec.labels, f"{where}: label")
        except OnnxcamError as exc:
            raise ApiError(400, str(exc)) from None
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
    images: list[Image.Image | None] = field(default_factory=list)  # overlay pictures, where wanted
    overlay: list[bool] = field(default_factory=list)


def parse_v1(body: bytes, spec: ModelSpec, limits: Limits = Limits(), held: Held | None = None) -> V1Request:
    held = Held(None) if held is None else held
    payload = parse_json(body)
    unknown = set(payload) - {"instances", "target", "overlay", "method", "counterfactual"}
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown))[:200]}; expected instances, target, "
                            f"overlay, method, counterfactual")
    if spec.methods is not None:
        method = spec.methods.check(payload.get("method"), "method")
    elif payload.get("method") not in (None, spec.explainer.method):
        raise ApiError(400, f"method: this server runs {spec.explainer.method} only")
    else:
        method = None
    counterfactual = _flag(payload.get("counterfactual", False), "counterfactual")
    chosen = method or spec.explainer.method
    if counterfactual and not methods_registry.get_method(chosen).uses_gradients:
        # Explainer.explain would return the plain map labelled counterfactual (EigenCAM has no gradient to negate)
        raise ApiError(400, f"counterfactual: counterfactual maps need gradients; method '{chosen}' uses none")
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ApiError(400, 'expected {"instances": [...]} with at least one instance')
    default_target = parse_target(payload.get("target"), spec, "target")
    default_overlay = _flag(payload.get("overlay", False), "overlay")
    items = []
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
            value = b64_bytes(value, where)
        elif isinstance(value, list):
            value = parse_array(value, spec, where)
        else:
            raise ApiError(400, f"{where}: expected a base64 image string or a nested array of shape "
                                f"{_fmt(spec.sample_shape)}")
        items.append((where, value, target, overlay))
    # Every image's size from its header before any is decoded: an over-budget request costs no decoding.
    total = 0
    for where, value, _, _ in items:
        if isinstance(value, bytes):
            w, h = image_size(value, where)
            if w * h > limits.image_pixels:
                raise ApiError(413, f"{where}: image of {w}x{h} pixels is larger than {limits.image_pixels / 1e6:g} "
                                    f"Mpx (--max-image-mp)")
            total += w * h
    if total > limits.request_pixels:
        raise ApiError(413, f"the request's images have {total / 1e6:.1f} Mpx in all; at most "
                            f"{limits.request_pixels / 1e6:g} Mpx (--max-request-mp)")
    req = V1Request()
    for i, (where, value, target, overlay) in enumerate(items):
        if isinstance(value, bytes):
            x, picture = decode_image(value, spec, where, limits, held, overlay)
            items[i] = None  # the encoded bytes are not needed any more
        else:
            x, picture = value, None
        req.samples.append(Sample(x, target, method, counterfactual))
        req.images.append(picture)
        req.overlay.append(overlay)
    return req


def v1_response(kind: str, req: V1Request, outputs: Sequence[Output], spec: ModelSpec,
                limits: Limits = Limits()) -> bytes:
    if kind == "predict":
        return _json_list("predictions", [_prediction(o, spec) for o in outputs])
    explanations = []
    for o, image, overlay, sample in zip(outputs, req.images, req.overlay, req.samples):
        probs = _softmax(o.scores)
        e = {"class": o.target, "label": spec.label(o.target), "score": float(o.scores[o.target]),
             "probability": float(probs[o.target]), "method": sample.method or spec.explainer.method,
             "counterfactual": sample.counterfactual}
        if overlay:
            picture = render.overlay(image if image is not None else spec.image_from_tensor(sample.x), o.heatmap,
                                     max_side=limits.overlay_side)
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


def parse_v2(body: bytes, spec: ModelSpec, limits: Limits = Limits(), held: Held | None = None) -> V2Request:
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
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)[:-1]
    except ValueError:
        raise _non_finite() from None
    extra = ",".join(f"{json.dumps(k)}:{v}" for k, v in raw.items())
    return text + ("," if len(text) > 1 and extra else "") + extra + "}"


def _json_list(key: str, items: list[str]) -> bytes:
    return ("{" + json.dumps(key) + ":[" + ",".join(items) + "]}").encode()


def _floats_json(a: np.ndarray) -> str:
    """A flat JSON array of float32 values; '%.9g' round-trips float32 exactly."""
    flat = np.asarray(a, np.float64).ravel()
    if not np.isfinite(flat).all():
        raise _non_finite()
    return "[" + (",".join(["%.9g"] * flat.size) % tuple(flat.tolist())) + "]"


def _non_finite() -> ApiError:
    # The last guard: NaN/Infinity tokens are not JSON, and many clients reject the whole answer. Inputs and
    # model outputs are checked before this, so reaching it is a bug; ApiError keeps it one JSON line (500).
    return ApiError(500, "internal error: the response would contain NaN or infinite numbers")


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


async def read_body(request, limit: int, timeout: float = 60.0) -> bytes:
    """The request body, refused with 413 as soon as Content-Length or the bytes received pass `limit`, and
    with 408 when it has not all arrived `timeout` seconds after the headers (a client trickling bytes)."""
    from starlette.requests import ClientDisconnect

    too_large = f"request body larger than {limit} bytes (--max-body-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, too_large, close=True)
    chunks: list[bytes] = []

    async def receive():
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_large, close=True)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s (--body-timeout)", close=True) from None
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
               max_body_bytes: int = 32 * 2**20, batch_wait_ms: float = 5.0, workers: int = 1,
               limits: Limits | None = None, methods: Sequence[str] | None = None, **explainer_kwargs):
    """The FastAPI app serving one model. `explainer_or_model`: an Explainer (shared, thread-safe) or
    anything Explainer() takes (path, bytes, ModelProto), built with `explainer_kwargs`. `limits`: the
    decoded-pixel budgets, overlay size and body timeout (default `Limits()`). `methods`: the other methods a
    V1 :explain (and the page at `/`) may ask for (default: the gradient and Eigen CAM methods, built on first
    use; `()`: the explainer's own only)."""
    _serving_modules()
    from fastapi import FastAPI, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if max_body_bytes < 1:
        raise OnnxcamError("the body size limit must be positive")
    limits = Limits() if limits is None else limits
    pixels = PixelBudget(limits.inflight_pixels)
    if isinstance(explainer_or_model, Explainer):
        explainer = explainer_or_model
    else:
        explainer = Explainer(explainer_or_model, **explainer_kwargs)
        if name is None and isinstance(explainer_or_model, (str, os.PathLike)):
            name = Path(explainer_or_model).stem
    spec = ModelSpec.of(explainer, name or "model")
    if spec.image_input == TARGET:
        raise OnnxcamError(f"the model's input is named '{TARGET}', which the v2 protocol uses for the class")
    spec.methods = MethodSet(explainer, methods)
    ui_files = {asset: (importlib.resources.files("onnxcam") / "ui" / asset).read_bytes() for asset in UI_ASSETS}
    one_by_one = spec.fixed_batch
    batcher = Batcher(lambda samples: explain_batch(spec.methods, samples, one_by_one),
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
    app.state.spec, app.state.batcher, app.state.metrics, app.state.pixels = spec, batcher, metrics, pixels
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        response = error(exc.status, exc.message)
        if exc.close:
            response.headers["connection"] = "close"
        return response

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
        body = await read_body(request, max_body_bytes, limits.body_timeout)
        loop = asyncio.get_running_loop()
        held = Held(pixels)
        parsing = loop.run_in_executor(codec, parse, body, spec, limits, held)
        try:
            parsed = await parsing
            del body
            outputs = await unless_disconnected(request, batcher.submit(parsed.samples))
            return Response(await loop.run_in_executor(codec, encode, parsed, outputs, spec),
                            media_type="application/json")
        finally:
            if parsing.done():
                held.release()
            else:  # cancelled while a codec thread still decodes: it gives back once it is done
                parsing.add_done_callback(lambda _: held.release())

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2")
    async def server_metadata():
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
        return await handle(request, parse_v1, lambda req, outs, s: v1_response("predict", req, outs, s, limits))

    @app.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request):
        model(name)
        return await handle(request, parse_v1, lambda req, outs, s: v1_response("explain", req, outs, s, limits))

    def ui_asset(asset: str):
        return Response(ui_files[asset], media_type=UI_ASSETS[asset], headers=UI_HEADERS)

    @app.get("/")
    async def ui_page():
        return ui_asset("index.html")

    @app.get("/ui/info")
    async def ui_info():
        # What the page needs to draw its controls; everything else it asks through the V1 endpoints.
        return {"name": spec.name, "method": explainer.method, "methods": spec.methods.info(),
                "layer": explainer.layer, "provider": explainer.provider, "labels": spec.labels,
                "num_classes": explainer.num_classes, "images": spec.pp is not None, "images_error": spec.pp_error,
                "input_size": list(spec.pp.size) if spec.pp is not None else None,
                "max_body_bytes": max_body_bytes, "overlay_side": limits.overlay_side}

    @app.get("/ui/{asset}")
    async def ui_static(asset: str):
        if asset not in UI_ASSETS or asset == "index.html":
            raise ApiError(404, "not found")
        return ui_asset(asset)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# The page at `/` (onnxcam/ui): plain files, no build step, nothing fetched from elsewhere -- the policy below
# lets the browser load scripts, styles and data from this server only.
UI_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8"}
UI_HEADERS = {"content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                         "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                         "form-action 'none'; frame-ancestors 'none'",
              "x-content-type-options": "nosniff", "cache-control": "no-cache"}

LINGER_S = 2.0  # how long a closing connection still reads (and drops) what the client sends


class _LingeringTransport:
    """A transport whose close() sends the pending answer and a FIN, then reads and drops what the client
    still sends for up to LINGER_S before closing. Closing a socket with unread input makes the kernel send
    RST, and a RST can destroy an answer the client has not read yet: the 408 or 413 told to a client that
    is still sending its request."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol, self._closing = transport, protocol, False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._protocol.discard_input = True
        transport = self._transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.resume_reading()
        transport.write_eof()
        self._protocol.loop.call_later(LINGER_S, transport.close)


def header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol, plus a deadline for a request's head (request line and headers): `timeout`
    seconds from the connection's opening, or from the first byte of a later request on it. uvicorn itself
    times out only idle keep-alive connections (uvicorn#157), so a client trickling header bytes, or sending
    none, would hold its connection for ever. Past the deadline the client gets 408 and the connection is
    closed; the body has its own deadline in `read_body`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    text = json.dumps({"error": f"request headers not received within {timeout:g} s (--header-timeout)"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(text), text))

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            self._head_timer = None
            self.discard_input = False
            super().connection_made(_LingeringTransport(transport, self))
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            if self.discard_input:
                return
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc):
            self._stop_head_timer()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            # IDLE: no complete request head yet. Between requests the keep-alive timer runs instead, until
            # the next request's first byte (data_received) arms this one.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(timeout, self._head_timed_out)
            else:
                self._stop_head_timer()

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeaderTimeoutProtocol


def run(model, host: str = "127.0.0.1", port: int = 8080, name: str | None = None, max_batch: int = 16,
        max_queue: int = 64, workers: int = 1, max_body_mb: float = 32.0, batch_wait_ms: float = 5.0,
        layer=None, method: str = "gradcam", log_level: str = "info", graceful_timeout: float = 30.0,
        device: str | None = None, limits: Limits | None = None, header_timeout: float = 10.0,
        keep_alive_timeout: float = 5.0, max_connections: int = 256, methods: Sequence[str] | None = None,
        labels: Sequence[str] | None = None, preprocess_overrides: dict | None = None) -> None:
    """Serves `model` until SIGTERM/SIGINT; in-flight requests finish first (up to `graceful_timeout` s).
    `header_timeout`: seconds for a request's headers to arrive (else 408); `keep_alive_timeout`: an idle
    connection is closed after that long; `max_connections`: open connections (and running requests) beyond
    which requests get 503. `labels`, `preprocess_overrides` (preset, mean, std, size, layout): for a model that
    carries no (or wrong) metadata."""
    _serving_modules()
    import uvicorn

    if not (header_timeout > 0 and keep_alive_timeout > 0 and max_connections >= 1):
        raise OnnxcamError("the timeouts must be positive and the connection limit at least 1")
    if isinstance(model, Explainer):
        explainer = model
    else:
        if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
            raise OnnxcamError(f"model not found: {model}")
        explainer = Explainer(model, layer=layer, method=method, device=device)
        if name is None and isinstance(model, (str, os.PathLike)):
            name = Path(model).stem
    if labels is not None or preprocess_overrides:
        explainer.use_defaults(labels, **(preprocess_overrides or {}))
    app = create_app(explainer, name=name, max_batch=max_batch, max_queue=max_queue,
                     max_body_bytes=int(max_body_mb * 2**20), batch_wait_ms=batch_wait_ms, workers=workers,
                     limits=limits, methods=methods)
    spec = app.state.spec
    print(f"onnxcam: serving '{spec.name}' (layer {explainer.layer}, {explainer.method}, {explainer.provider}) on http://{host}:{port} "
          f"-- max batch {app.state.batcher.max_batch}, queue {max_queue}", file=sys.stderr, flush=True)
    # uvicorn's limit_concurrency counts the connection asking too, hence the + 1
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, server_header=False,
                            http=header_timeout_protocol(header_timeout), timeout_keep_alive=keep_alive_timeout,
                            limit_concurrency=max_connections + 1)
    uvicorn.Server(config).run()
