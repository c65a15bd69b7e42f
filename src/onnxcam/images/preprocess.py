"""Image loading and preprocessing (pure numpy + PIL).

Conventions used throughout this module
---------------------------------------

* A decoded image is a PIL image whose pixels are integers in ``0..255``
  (``RGB`` for colour models, ``L`` for single-channel models).
* Preprocessing is, per channel ``c`` and in this order::

      resized = image squashed (bilinear) to exactly size = (H, W)
      x[c]    = (pixel[c] * scale - mean[c]) / std[c]

  where ``pixel`` is already in the model's channel order (``channel_order``:
  ``"RGB"``, or ``"BGR"`` meaning the R and B planes are swapped *before*
  normalising). ``mean`` and ``std`` are therefore listed **in the model's
  channel order** and **on the scale after multiplying by** ``scale``:

  - ``scale = 1/255``: mean/std are on the 0..1 scale (torchvision style,
    e.g. ImageNet ``mean=(0.485, 0.456, 0.406)`` for R, G, B);
  - ``scale = 1``: mean/std are on the raw 0..255 scale (Caffe style, e.g.
    ``mean=(103.939, 116.779, 123.68)`` for B, G, R).

* ``size`` is ``(height, width)``. ``layout`` is ``"NCHW"`` or ``"NHWC"``;
  :func:`to_tensor` always produces a batch of one.
* Resizing is always ``"squash"``: the whole image is stretched to ``(H, W)``
  without cropping or padding, so a heat map at model resolution maps back
  onto the full original image by stretching it the other way.

Model metadata (``metadata_props`` of the ONNX model) understood here:

* ``onnxcam.labels``: JSON list of class names, index = class id;
* ``onnxcam.preprocess``: JSON object, e.g.
  ``{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "size": [224, 224],
  "layout": "NCHW", "channel_order": "RGB", "resize": "squash"}``;
  mean/std are on the 0..1 scale unless the object also has ``"scale"``
  (the multiplier applied to raw 0..255 pixels, default ``1/255``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import OnnxcamError
from ..model.safeio import MAX_MODEL_BYTES, regular_file

__all__ = [
    "Preprocess",
    "PRESETS",
    "LABELS_KEY",
    "PREPROCESS_KEY",
    "load_image",
    "load_image_sized",
    "model_metadata",
    "resolve_preprocess",
    "to_tensor",
    "labels_from_file",
]

LABELS_KEY = "onnxcam.labels"
PREPROCESS_KEY = "onnxcam.preprocess"

_LAYOUTS = ("NCHW", "NHWC")
# Limits on what a (possibly hostile) image or model may make onnxcam allocate. An image is refused above
# PIL's own decompression-bomb warning threshold (~89 Mpx, 268 MB as RGB); a model input above 16384 per side
# or 8192x8192 pixels in all (800 MB as float32 RGB, before the gradients) is refused as a size.
_FLOAT32_LIMIT = 1e38
MAX_IMAGE_BYTES = 512 * 2 ** 20
MAX_IMAGE_PIXELS = 89_478_485
MAX_INPUT_SIDE = 16384
MAX_INPUT_PIXELS = 8192 * 8192
_CHANNEL_ORDERS = ("RGB", "BGR")
_RESIZES = ("squash",)

ImageSource = Union[str, "os.PathLike[str]", Image.Image]
Dim = Union[int, str, None]


@dataclass(frozen=True)
class Preprocess:
    """How to turn a decoded image into the model's input tensor.

    ``x[c] = (pixel[c] * scale - mean[c]) / std[c]`` with ``pixel`` the raw
    0..255 value in ``channel_order``; ``mean``/``std`` are listed in that
    same channel order. ``len(mean)`` is the number of channels the model
    takes: 3 (colour) or 1 (grayscale; the image is converted to ``L``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    size: tuple[int, int]  # (height, width)
    layout: str = "NCHW"  # "NCHW" | "NHWC"
    channel_order: str = "RGB"  # "RGB" | "BGR"
    resize: str = "squash"
    # Where the normalisation came from: "flags", "preset", "metadata" or "default" (ImageNet, guessed).
    source: str = "default"

    def __post_init__(self) -> None:
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise OnnxcamError(
                f"preprocessing needs 1 or 3 mean and std values of equal count; "
                f"got mean={list(self.mean)}, std={list(self.std)}"
            )
        if not all(math.isfinite(m) for m in self.mean):
            raise OnnxcamError(f"mean values must be finite numbers; got {list(self.mean)}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise OnnxcamError(f"std values must be finite and positive; got {list(self.std)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise OnnxcamError(f"pixel scale must be a positive number; got {self.scale}")
        # The largest |value| a pixel can become must fit float32, or the model sees inf (and NaN scores).
        reach = (255.0 * self.scale + max(abs(m) for m in self.mean)) / min(self.std)
        if not reach < _FLOAT32_LIMIT:
            raise OnnxcamError(f"preprocessing (scale {self.scale}, mean {list(self.mean)}, std {list(self.std)}) "
                               f"maps pixels beyond the float32 range")
        if len(self.size) != 2 or not all(isinstance(v, int) and v > 0 for v in self.size):
            raise OnnxcamError(f"image size must be two positive integers (height, width); got {self.size}")
        if self.layout not in _LAYOUTS:
            raise OnnxcamError(f"layout must be NCHW or NHWC; got {self.layout!r}")
        if self.channel_order not in _CHANNEL_ORDERS:
            raise OnnxcamError(f"channel order must be RGB or BGR; got {self.channel_order!r}")
        if self.resize not in _RESIZES:
            raise OnnxcamError(f"resize mode must be 'squash'; got {self.resize!r}")

    @property
    def channels(self) -> int:
        """Number of input channels (1 or 3)."""
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored under ``onnxcam.preprocess``."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "size": list(self.size),
            "layout": self.layout,
            "channel_order": self.channel_order,
            "resize": self.resize,
        }


@dataclass(frozen=True)
class _Norm:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    channel_order: str


#: Named normalisations. mean/std are in the preset's channel order and on
#: the scale given by ``scale`` (see the module docstring).
PRESETS: dict[str, _Norm] = {
    # torchvision / timm ImageNet statistics, 0..1 pixels, RGB.
    "imagenet": _Norm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255, "RGB"),
    # plain 0..1 pixels, RGB.
    "unit": _Norm((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1 / 255, "RGB"),
    # -1..1 pixels (Inception / TF-slim style), RGB.
    "symmetric": _Norm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255, "RGB"),
    # Caffe / Keras "caffe" mode: BGR, raw 0..255 minus the per-channel mean
    # (listed B, G, R), no division.
    "caffe": _Norm((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), 1.0, "BGR"),
    # raw 0..255 pixels, RGB.
    "none": _Norm((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0, "RGB"),
}


# --------------------------------------------------------------------------- images


def load_image(path_or_pil: ImageSource) -> Image.Image:
    """Decode an image file (or take a PIL image) and return a new RGB image.

    EXIF orientation is applied, transparency is flattened onto white and
    16-bit / float images are scaled to 0..255. The user's file and a passed
    PIL image are never modified.
    """
    if isinstance(path_or_pil, Image.Image):
        return _to_rgb(path_or_pil)
    if not isinstance(path_or_pil, (str, os.PathLike)):
        raise OnnxcamError(f"expected an image path or a PIL image; got {type(path_or_pil).__name__}")
    path = Path(path_or_pil)
    if not path.exists():
        raise OnnxcamError(f"image not found: {path}")
    if path.is_dir():
        raise OnnxcamError(f"cannot read image {path}: it is a directory")
    # A FIFO blocks the open, /dev/zero never ends: regular files of a bounded size only.
    regular_file(path, "image", MAX_IMAGE_BYTES)
    try:
        with _open_image(path) as im:
            # The header's size, before any pixel is decoded: a small file can announce gigapixels.
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise OnnxcamError(f"cannot read image {path}: {im.width}x{im.height} pixels is more than the "
                                   f"limit of {MAX_IMAGE_PIXELS} pixels")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # malformed EXIF: keep the pixels as stored
                pass
            return _to_rgb(im)
    except PermissionError:
        raise OnnxcamError(f"cannot read image {path}: permission denied") from None
    except Image.DecompressionBombError:
        raise OnnxcamError(f"cannot read image {path}: more than the limit of {MAX_IMAGE_PIXELS} pixels") from None
    except MemoryError:
        raise OnnxcamError(f"cannot read image {path}: out of memory decoding it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise OnnxcamError(f"cannot read image {path}: not a supported image") from None


def _open_image(path) -> Image.Image:
    import warnings

    # PIL warns (on stderr, several lines) about images over its threshold; the pixel limit in load_image
    # refuses them in one line instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        else:
            hi = 65535.0 if a.size and a.max() > 255 else 255.0
        a = np.clip(np.nan_to_num(a) / hi * 255.0, 0, 255)
        return Image.fromarray(np.round(a).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    out = im.convert("RGB")
    if out is im:  # never hand back the caller's own object
        out = im.copy()
    return out


# Image.reduce() box-averages these modes correctly (LA/RGBA premultiplied); palette, bilevel and 16-bit
# images are converted first, or their indices/codes would be averaged.
_REDUCIBLE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F", "CMYK", "YCbCr")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def load_image_sized(
    source: Union[str, "os.PathLike[str]", bytes, Any],
    min_size: tuple[int, int] | None = None,
    *,
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode an image like :func:`load_image`, without keeping more pixels than a caller needs.

    ``source`` is a path, the encoded bytes or a binary file object. ``min_size`` is the smallest
    ``(width, height)`` the caller will use, after EXIF rotation. An image at least twice that large in
    both axes comes back reduced by an integer factor, but still at least twice ``min_size``, so that a
    later bilinear resize sees almost the same picture: JPEG is decoded reduced (DCT scaling, 1/2 to 1/8),
    other formats are box-reduced right after decoding and the full-size pixels are released before this
    returns. Other images come back exactly as :func:`load_image` returns them.

    ``max_pixels`` refuses images whose header announces more pixels, before any is decoded.
    ``formats`` restricts the decoders tried, as in :func:`PIL.Image.open`.
    """
    name = f"image {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "the image"
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise OnnxcamError(f"image not found: {os.fspath(source)}")
    try:
        with Image.open(source, formats=formats) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise OnnxcamError(f"image of {im.width}x{im.height} pixels is larger than "
                                   f"{max_pixels} pixels")
            if min_size is not None and im.format == "JPEG":
                side = 2 * max(min_size)  # the orientation is not known yet: enough either way round
                im.draft(im.mode, (side, side))
            im.load()
            try:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
            except Exception:  # malformed EXIF: keep the pixels as stored
                orientation = 1
            factor = 1
            if min_size is not None:
                need_w, need_h = min_size if orientation < 5 else min_size[::-1]
                factor = min(im.width // (2 * need_w), im.height // (2 * need_h))
            if factor < 2:
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:
                    pass
                return _to_rgb(im)
            full = im
            if full.mode.startswith("I;16"):
                full = full.convert("I")
            elif full.mode not in _REDUCIBLE:
                full = _to_rgb(full)
            small = full.reduce(factor)
            del full  # with `im` closed below, the full-size pixels are gone before the conversions
    except OnnxcamError:
        raise
    except PermissionError:
        raise OnnxcamError(f"cannot read {name}: permission denied") from None
    except MemoryError:
        raise OnnxcamError(f"cannot read {name}: out of memory decoding it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise OnnxcamError(f"cannot read {name}: not a supported image") from None
    if orientation in _TRANSPOSE:
        small = small.transpose(_TRANSPOSE[orientation])
    return _to_rgb(small)


# --------------------------------------------------------------------------- metadata


def model_metadata(model: Any) -> dict[str, Any]:
    """Read onnxcam's keys from a model's ``metadata_props``.

    ``model`` is an ``onnx.ModelProto`` (a path is also accepted). Returns
    ``{"labels": list[str] | None, "preprocess": dict | None}``.
    """
    if isinstance(model, (str, os.PathLike)):
        import onnx

        regular_file(model, "model", MAX_MODEL_BYTES)  # a FIFO would block the load forever
        try:
            model = onnx.load(os.fspath(model), load_external_data=False)
        except FileNotFoundError:
            raise OnnxcamError(f"model not found: {model}") from None
        except Exception as exc:
            raise OnnxcamError(f"cannot read model {model}: {exc}") from None
    props = {p.key: p.value for p in getattr(model, "metadata_props", [])}
    labels = None
    if LABELS_KEY in props:
        value = _parse_json(props[LABELS_KEY], LABELS_KEY)
        if not isinstance(value, list):
            raise OnnxcamError(f"model metadata '{LABELS_KEY}' must be a JSON list of class names")
        labels = [v if isinstance(v, str) else json.dumps(v) for v in value]
    preprocess = None
    if PREPROCESS_KEY in props:
        value = _parse_json(props[PREPROCESS_KEY], PREPROCESS_KEY)
        if not isinstance(value, dict):
            raise OnnxcamError(f"model metadata '{PREPROCESS_KEY}' must be a JSON object")
        preprocess = value
    return {"labels": labels, "preprocess": preprocess}


MAX_METADATA_CHARS = 16 * 2 ** 20
MAX_METADATA_DEPTH = 32


def _parse_json(text: str, key: str) -> Any:
    if len(text) > MAX_METADATA_CHARS:
        raise OnnxcamError(f"model metadata '{key}' is too long ({len(text)} characters)")
    try:
        value = json.loads(text)
    except RecursionError:
        raise OnnxcamError(f"model metadata '{key}' is nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise OnnxcamError(f"model metadata '{key}' is not valid JSON ({exc})") from None
    # onnxcam's keys are a flat list or object; deep nesting that json accepted would still overflow the
    # stack later (json.dumps of a label, repr in a message).
    if _depth(value) > MAX_METADATA_DEPTH:
        raise OnnxcamError(f"model metadata '{key}' is nested too deeply")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d > MAX_METADATA_DEPTH:
                return d
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


# --------------------------------------------------------------------------- resolution


def resolve_preprocess(
    input_shape: Sequence[Dim],
    *,
    preset: str | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    size: Sequence[int] | int | None = None,
    layout: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Preprocess:
    """Decide the preprocessing for a model input of shape ``input_shape``.

    ``input_shape`` has rank 4; each dim is an int, or a str/None (or an int
    <= 0) for a symbolic dim. ``metadata`` is either the dict returned by
    :func:`model_metadata` or its ``"preprocess"`` part.

    Precedence:

    * layout: ``layout`` > metadata > inferred from the shape (a channel dim
      of 1 or 3 at axis 1 means NCHW, at axis 3 NHWC; ambiguous -> NCHW);
    * size (H, W): ``size`` > static dims of the model shape > metadata >
      error; an explicit size that contradicts a static dim is an error;
    * normalisation: ``mean``/``std`` > ``preset`` > metadata > ``imagenet``.
      Scale and channel order come from the preset if given, else the
      metadata, else imagenet; explicit ``mean``/``std`` are read on that
      scale and in that channel order (0..1 RGB unless a preset or the
      metadata says otherwise);
    * channels: from the shape (1 -> grayscale, using the first mean/std).
    """
    shape = list(input_shape)
    if len(shape) != 4:
        raise OnnxcamError(
            f"model input must be an image batch of rank 4 (NCHW or NHWC); got shape {_fmt_shape(shape)}"
        )
    dims = [_static(d) for d in shape]
    meta = _meta_preprocess(metadata)

    # ---- layout
    if layout is not None:
        lay = str(layout).upper()
        if lay not in _LAYOUTS:
            raise OnnxcamError(f"layout must be NCHW or NHWC; got {layout!r}")
    elif "layout" in meta:
        lay = str(meta["layout"]).upper()
        if lay not in _LAYOUTS:
            raise OnnxcamError(f"model metadata '{PREPROCESS_KEY}' has an invalid layout {meta['layout']!r}")
    else:
        first, last = dims[1] in (1, 3), dims[3] in (1, 3)
        lay = "NHWC" if (last and not first) else "NCHW"
    c_axis, h_axis, w_axis = (1, 2, 3) if lay == "NCHW" else (3, 1, 2)

    # ---- channels
    channels = dims[c_axis] if dims[c_axis] is not None else 3
    if channels not in (1, 3):
        raise OnnxcamError(
            f"model input {_fmt_shape(shape)} read as {lay} has {channels} channels; "
            "only 1 (grayscale) or 3 (colour) are supported"
        )
    if dims[0] is not None and dims[0] != 1:
        raise OnnxcamError(
            f"model input has a fixed batch size of {dims[0]}; onnxcam feeds one image (batch 1)"
        )

    # ---- size
    model_hw = (dims[h_axis], dims[w_axis])
    if size is not None:
        hw = _parse_size(size)
        for name, want, have in (("height", hw[0], model_hw[0]), ("width", hw[1], model_hw[1])):
            if have is not None and have != want:
                raise OnnxcamError(
                    f"size {hw[0]}x{hw[1]} conflicts with the model input {_fmt_shape(shape)}, "
                    f"whose {name} is fixed at {have}"
                )
    elif model_hw[0] is not None and model_hw[1] is not None:
        hw = (model_hw[0], model_hw[1])
    else:
        hw = None
        if "size" in meta:
            try:
                cand = _parse_size(meta["size"])
            except OnnxcamError:
                raise OnnxcamError(
                    f"model metadata '{PREPROCESS_KEY}' has an invalid size {meta['size']!r}"
                ) from None
            if all(have is None or have == want for want, have in zip(cand, model_hw)):
                hw = cand
        if hw is None:
            raise OnnxcamError("model input has dynamic height/width; pass --size")
    if max(hw) > MAX_INPUT_SIDE or hw[0] * hw[1] > MAX_INPUT_PIXELS:
        raise OnnxcamError(f"input size {hw[0]}x{hw[1]} is too large (at most {MAX_INPUT_SIDE} per side and "
                           f"{MAX_INPUT_PIXELS} pixels)")

    # ---- normalisation
    if preset is not None:
        key = str(preset).lower()
        if key not in PRESETS:
            raise OnnxcamError(f"unknown preprocessing preset {preset!r}; choose from {', '.join(PRESETS)}")
        base, source = PRESETS[key], "preset"
    elif any(k in meta for k in ("mean", "std", "scale", "channel_order")):
        base, source = _meta_norm(meta), "metadata"
    else:
        base, source = PRESETS["imagenet"], "default"
    if mean is not None or std is not None:
        source = "flags"
    m = _vector(mean, "mean") if mean is not None else base.mean
    s = _vector(std, "std") if std is not None else base.std
    m = _fit_channels(m, channels, "mean")
    s = _fit_channels(s, channels, "std")

    return Preprocess(
        mean=m,
        std=s,
        scale=base.scale,
        size=hw,
        layout=lay,
        channel_order=base.channel_order if channels == 3 else "RGB",
        resize="squash",
        source=source,
    )


def _static(d: Dim) -> int | None:
    if isinstance(d, (bool, np.bool_)):
        return None
    if isinstance(d, (int, np.integer)) and int(d) > 0:
        return int(d)
    return None


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _meta_preprocess(metadata: dict[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise OnnxcamError(f"model metadata '{PREPROCESS_KEY}' must be a JSON object")
    if "preprocess" in metadata or "labels" in metadata:  # the model_metadata() dict
        metadata = metadata.get("preprocess") or {}
        if not isinstance(metadata, dict):
            raise OnnxcamError(f"model metadata '{PREPROCESS_KEY}' must be a JSON object")
    return metadata


def _meta_norm(meta: dict[str, Any]) -> _Norm:
    where = f"model metadata '{PREPROCESS_KEY}'"
    try:
        scale = float(meta.get("scale", 1 / 255))
    except (TypeError, ValueError):
        raise OnnxcamError(f"{where} has an invalid scale {meta.get('scale')!r}") from None
    order = str(meta.get("channel_order", "RGB")).upper()
    if order not in _CHANNEL_ORDERS:
        raise OnnxcamError(f"{where} has an invalid channel_order {meta.get('channel_order')!r}")
    default = PRESETS["imagenet"] if scale == 1 / 255 and order == "RGB" else PRESETS["none"]
    try:
        mean = _vector(meta["mean"], "mean") if "mean" in meta else default.mean
        std = _vector(meta["std"], "std") if "std" in meta else default.std
    except OnnxcamError as exc:
        raise OnnxcamError(f"{where}: {exc}") from None
    return _Norm(mean, std, scale, order)


def _vector(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, str):
        values = [v for v in value.replace(",", " ").split() if v]
    else:
        try:
            values = list(value)
        except TypeError:
            raise OnnxcamError(f"{name} must be one or three numbers; got {value!r}") from None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OnnxcamError(f"{name} must be one or three numbers; got {value!r}") from None
    if len(out) not in (1, 3):
        raise OnnxcamError(f"{name} must be one or three numbers; got {len(out)}")
    return out


def _fit_channels(values: tuple[float, ...], channels: int, name: str) -> tuple[float, ...]:
    if channels == 1:
        return values[:1]
    if len(values) == 1:
        return values * 3
    return values


def _parse_size(size: Any) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        vals: list[Any] = [size, size]
    elif isinstance(size, str):
        vals = [v for v in size.lower().replace("x", " ").replace(",", " ").split() if v]
        if len(vals) == 1:
            vals = vals * 2
    else:
        try:
            vals = list(size)
        except TypeError:
            raise OnnxcamError(f"size must be HEIGHT WIDTH (or one number); got {size!r}") from None
    try:
        ints = [int(v) for v in vals]
        ok = len(ints) == 2 and all(i > 0 and float(v) == i for i, v in zip(ints, vals))
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 parses to inf
        ok = False
    if not ok:
        raise OnnxcamError(f"size must be two positive integers HEIGHT WIDTH; got {size!r}")
    return ints[0], ints[1]


# --------------------------------------------------------------------------- tensor


def to_tensor(img: ImageSource, pp: Preprocess) -> np.ndarray:
    """Preprocess one image into a float32 batch of one.

    Returns shape ``(1, C, H, W)`` for NCHW or ``(1, H, W, C)`` for NHWC.
    The image is squashed with PIL bilinear resampling to exactly
    ``pp.size``; it is converted to ``L`` first when the model takes one
    channel.
    """
    if not isinstance(img, Image.Image):
        img = load_image(img)
    h, w = pp.size
    if pp.channels == 1:
        im = img if img.mode == "L" else _to_rgb(img).convert("L")
    else:
        im = img if img.mode == "RGB" else _to_rgb(img)
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    a = np.asarray(im, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if pp.channels == 3 and pp.channel_order == "BGR":
        a = a[:, :, ::-1]
    mean = np.asarray(pp.mean, dtype=np.float64)
    std = np.asarray(pp.std, dtype=np.float64)
    x = (a * pp.scale - mean) / std
    if pp.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], dtype=np.float32)


# --------------------------------------------------------------------------- labels


def labels_from_file(path: str | os.PathLike[str]) -> list[str]:
    """Read class names: a JSON list, a JSON object ``{"0": name, ...}``, or
    plain text with one label per line (line ``i`` is class ``i``)."""
    p = Path(path)
    if not p.exists():
        raise OnnxcamError(f"labels file not found: {p}")
    if p.is_dir():
        raise OnnxcamError(f"cannot read labels file {p}: it is a directory")
    regular_file(p, "labels file", MAX_METADATA_CHARS * 4)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except PermissionError:
        raise OnnxcamError(f"cannot read labels file {p}: permission denied") from None
    except UnicodeDecodeError:
        raise OnnxcamError(f"cannot read labels file {p}: not UTF-8 text") from None
    except OSError as exc:
        raise OnnxcamError(f"cannot read labels file {p}: {exc.strerror or exc}") from None
    stripped = text.strip()
    if not stripped:
        raise OnnxcamError(f"labels file {p} is empty")
    if stripped[0] in "[{":
        try:
            value = json.loads(stripped)
        except RecursionError:
            raise OnnxcamError(f"labels file {p} is nested too deeply") from None
        except ValueError as exc:
            raise OnnxcamError(f"labels file {p} looks like JSON but does not parse ({exc})") from None
        if isinstance(value, list):
            return [v if isinstance(v, str) else json.dumps(v) for v in value]
        if isinstance(value, dict):
            try:
                items = sorted((int(k), v) for k, v in value.items())
            except (TypeError, ValueError):
                raise OnnxcamError(f"labels file {p}: JSON object keys must be class indices") from None
            if [k for k, _ in items] != list(range(len(items))):
                raise OnnxcamError(f"labels file {p}: JSON object keys must be 0..{len(items) - 1}")
            return [v if isinstance(v, str) else json.dumps(v) for _, v in items]
        raise OnnxcamError(f"labels file {p}: JSON must be a list of class names")
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines
