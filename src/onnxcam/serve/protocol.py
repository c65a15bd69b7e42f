"""The protocols `onnxcam serve` speaks, with no server in them: KServe V1 and Open Inference Protocol (v2)
requests parsed into samples, samples explained in groups, results encoded as JSON, and the limits on what one
request may make a server decode (`Limits`, `PixelBudget`). Plain functions of bytes and numpy arrays: the
FastAPI app (`app.py`) calls them in its codec threads whoever hosts it.
"""
import base64
import binascii
import io
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..cam import methods as methods_registry
from ..errors import OnnxcamError
from ..images import preprocess, render
from ..images.labels import match_label
from ..run.explainer import Explainer

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
