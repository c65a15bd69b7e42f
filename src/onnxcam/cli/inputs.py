"""The CLI's own syntax for targets and extra inputs: `--target 0,3,5`, `--region CLASS[:MASK.png]`,
`--box I --field ...`, `--input NAME=FILE.npy`. The target kinds themselves live in onnxcam/cam/targets.py."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..cam.targets import FIELDS, DetectionTarget, IndexTarget, RegionTarget
from ..errors import OnnxcamError
from ..images.labels import match_label
from ..model.safeio import regular_file


def load_mask(path) -> np.ndarray:
    """A PNG (or any image PIL reads) as a boolean mask: nonzero = inside."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 0
    except FileNotFoundError:
        raise OnnxcamError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise OnnxcamError(f"cannot read mask {path}: {exc}") from None




def _class_of(text: str, labels, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    if not labels:
        raise OnnxcamError(f"{what} '{text}' is not a class index and the model has no labels")
    return match_label(text, labels, what)


def parse_index(text: str) -> IndexTarget:
    """`--target 0,3,5`: an index tuple into one sample's output."""
    try:
        return IndexTarget(tuple(int(p) for p in text.split(",")))
    except ValueError:
        raise OnnxcamError(f"--target '{text}' is not an index tuple (integers separated by commas, e.g. 0,3,5)") \
            from None


def parse_region(text: str, labels=None) -> RegionTarget:
    """`--region CLASS[:MASK.png]`: class c's logits summed over the mask (nonzero pixels, resized to the output
    grid), or over the predicted mask of c when no PNG is given."""
    cls_text, sep, path = text.partition(":")
    if not cls_text.strip() or (sep and not path):
        raise OnnxcamError(f"--region takes CLASS or CLASS:MASK.png, got '{text}'")
    cls = _class_of(cls_text, labels, "--region class")
    if cls < 0:
        raise OnnxcamError(f"--region class {cls} is out of range")
    return RegionTarget(cls, load_mask(path) if sep else None)


def parse_box(box: int, field: str | None) -> DetectionTarget:
    """`--box I [--field objectness|class|class:C]`."""
    if box < 0:
        raise OnnxcamError(f"--box {box} is out of range")
    if field is None:  # objectness where the output has it, else the class score (ultralytics)
        return DetectionTarget(box, None)
    field = field.strip().lower()
    name, sep, cls_text = field.partition(":")
    if name not in FIELDS or (sep and name != "class"):
        raise OnnxcamError(f"--field takes objectness, class or class:C, got '{field}'")
    cls = None
    if sep:
        try:
            cls = int(cls_text)
        except ValueError:
            raise OnnxcamError(f"--field class:C takes a class index, got '{field}'") from None
        if cls < 0:
            raise OnnxcamError(f"--field class {cls} is out of range")
    return DetectionTarget(box, name, cls)


def load_inputs(specs: Sequence[str], ex) -> dict:
    """`--input NAME=FILE.npy` values for the model's other inputs, checked against the model: one sample
    (without the batch axis, or with a batch of 1; shared by every image) or one per image."""
    values = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise OnnxcamError(f"--input takes NAME=FILE.npy, got '{spec}'")
        if name == ex.image_input:
            raise OnnxcamError(f"input '{name}' is the explained image: give it as IMAGE, not --input")
        if name not in ex.input_names:
            raise OnnxcamError(f"--input '{name}': the model has no such input; inputs: {', '.join(ex.input_names)}")
        regular_file(path, f"--input {name} file")  # a FIFO or a device would block or never end
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise OnnxcamError(f"--input {name}: file not found: {path}") from None
        except (ValueError, OSError, EOFError) as exc:
            raise OnnxcamError(f"--input {name}: cannot read {path} as a .npy array: {str(exc).splitlines()[0]}") \
                from None
        if not isinstance(arr, np.ndarray):
            arr.close()
            raise OnnxcamError(f"--input {name}: {path} holds several arrays (.npz); give one .npy array")
        want = ex.input_shapes.get(name)
        dtype = ex.input_dtypes[name]
        shown = "(" + ", ".join("?" if d is None else str(d) for d in want) + ")" if want else "?"
        if want is not None:
            if arr.ndim == len(want) - 1:
                arr = arr[None]
            if arr.ndim != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want[1:], arr.shape[1:])):
                raise OnnxcamError(f"--input {name}: {path} has shape {arr.shape}; the model expects {shown} "
                                   f"(the batch axis may be left out)")
        if arr.dtype != dtype:
            same_kind = (arr.dtype.kind == "f" and dtype.kind == "f") or (arr.dtype.kind in "iu" and dtype.kind in "iu") \
                or (arr.dtype.kind == "b" and dtype.kind == "b")
            if not same_kind:
                raise OnnxcamError(f"--input {name}: {path} has dtype {arr.dtype}; the model expects {dtype}")
            arr = arr.astype(dtype)
        values[name] = arr
    missing = [n for n in ex.input_names if n != ex.image_input and n not in values]
    if missing:
        raise OnnxcamError(f"the model also needs input(s) {', '.join(missing)}: give --input NAME=FILE.npy")
    return values


def batch_feeds(ex, batch: np.ndarray, values: dict) -> np.ndarray | dict:
    """The image batch plus the other inputs, a one-sample value repeated for every image."""
    if not values:
        return batch
    n = batch.shape[0]
    feeds = {ex.image_input: batch}
    for name, arr in values.items():
        if arr.shape[0] == 1:
            arr = np.repeat(arr, n, axis=0)
        elif arr.shape[0] != n:
            raise OnnxcamError(f"--input {name} holds {arr.shape[0]} samples for {n} image(s); give 1 or one per "
                               f"image")
        feeds[name] = arr
    return feeds


__all__ = ["load_mask", "parse_index", "parse_region", "parse_box", "load_inputs", "batch_feeds"]
