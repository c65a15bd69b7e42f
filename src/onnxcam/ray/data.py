"""Batch explanations on Ray Data: `ExplainImages` is the callable class for `Dataset.map_batches`,
`explain_dataset` maps a dataset with it and `explain_folder` runs files -> parquet on a cluster (docs/ray.md).

ExplainImages itself needs no Ray (it maps a dict of numpy columns to another), so it is built and tested like
any other object; Ray is imported only by the two helpers, which say what to install when it is missing.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import OnnxcamError, first_line
from ..images import preprocess
from ..run.explainer import Explainer
from ..run.runtime import ort

INSTALL_HINT = "onnxcam.ray needs Ray Data: pip install 'onnxcam[ray]' (from a clone: pip install -e '.[ray]')"
RESOLUTIONS = ("layer", "input")
HEATMAP_DTYPES = ("float32", "float16")
# read_images' default extensions, and WebP, which onnxcam's decoder (PIL) reads as well.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif", "webp")
# Columns that hold the picture: decoded pixels (read_images) or the encoded file (read_binary_files).
PIXELS, ENCODED = "image", "bytes"


class ExplainImages:
    """One CAM per image of a Ray Data batch; each actor builds its Explainer once, here.

    `__call__` takes a batch of numpy columns with either an `image` column (decoded pixels as
    `ray.data.read_images` gives them: HWC uint8 of any size, HW grayscale, RGBA; an object array when the
    sizes differ) or a `bytes` column (encoded files, `ray.data.read_binary_files`), which is decoded here
    exactly as the CLI decodes a file (EXIF rotation, transparency flattened onto white). It returns the other
    columns (e.g. `path`) with `target`, `label`, `score`, `probability`, `heatmap` and `error` added and the
    picture column dropped unless `keep_image`. A picture that cannot be decoded or explained gets its message
    in `error` (else ""), target -1, label "", NaN score, probability and heatmap; the rest of the batch is
    unaffected.

    `heatmap` is float32 (or `heatmap_dtype="float16"`), each map min-max scaled to [0, 1] per image:
    `resolution="layer"` (default) at the layer's resolution (e.g. 7x7), which is compact; `"input"` at the
    model's input size, exactly `Explanation.heatmaps`.
    """

    def __init__(self, model, *, layer: str | Sequence[str] | None = None, method: str = "gradcam",
                 target: int | str | None = None, preset: str | None = None, mean=None, std=None, size=None,
                 layout: str | None = None, resolution: str = "layer", heatmap_dtype: str = "float32",
                 device: str | None = None, providers: Sequence | None = None, threads: int | None = None,
                 batch_size: int = 32, output: str | None = None, keep_image: bool = False):
        if resolution not in RESOLUTIONS:
            raise OnnxcamError(f"resolution must be {' or '.join(RESOLUTIONS)}; got {resolution!r}")
        if heatmap_dtype not in HEATMAP_DTYPES:
            raise OnnxcamError(f"heatmap_dtype must be {' or '.join(HEATMAP_DTYPES)}; got {heatmap_dtype!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OnnxcamError(f"threads must be a positive integer; got {threads!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise OnnxcamError(f"batch size must be a positive integer; got {batch_size!r}")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer, str))):
            raise OnnxcamError(f"target must be a class index or label (or None for the top class); got {target!r}")
        options = None
        if threads is not None:
            # Several actors share a node's cores; onnxruntime would otherwise give each of them all the cores.
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = threads
        self.explainer = Explainer(model, layer=layer, method=method, providers=providers, output=output,
                                   batch_size=batch_size, session_options=options, device=device)
        if self.explainer.is_detector or (self.explainer.score_rank not in (None, 2)):
            raise OnnxcamError("ExplainImages explains classifiers, whose score is (N, classes); use "
                               "Explainer.explain with target objects for this model's output")
        if resolution == "layer" and len(self.explainer.layers) > 1:
            raise OnnxcamError(f"{len(self.explainer.layers)} layers have one map each at their own resolution; "
                               f"use resolution='input' for their combined heatmap")
        self.pp = self.explainer.preprocessing(preset=preset, mean=mean, std=std, size=size, layout=layout)
        self.target = self.explainer.class_index(target) if isinstance(target, str) else target
        self.labels = self.explainer.labels
        self.resolution, self.heatmap_dtype = resolution, np.dtype(heatmap_dtype)
        self.batch_size, self.keep_image = batch_size, keep_image
        # One run on a blank picture: a target out of range or a model that cannot run fails here, in one line,
        # and not in every batch of a long job; it also gives the map's shape for rows that fail.
        blank = Image.new("RGB", (self.pp.size[1], self.pp.size[0]))
        self.heatmap_shape = self._heatmaps(self._explain(preprocess.to_tensor(blank, self.pp))).shape[1:]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = PIXELS if PIXELS in batch else ENCODED if ENCODED in batch else None
        if column is None:
            raise OnnxcamError(f"the batch has no '{PIXELS}' column (ray.data.read_images) or '{ENCODED}' column "
                               f"(ray.data.read_binary_files); its columns: {', '.join(batch) or 'none'}")
        pictures = batch[column]
        n = len(pictures)
        errors = [""] * n
        tensors: list[np.ndarray | None] = [None] * n
        for i in range(n):
            try:
                pil = _from_array(pictures[i]) if column == PIXELS else _from_bytes(pictures[i])
                tensors[i] = preprocess.to_tensor(pil, self.pp)
            except OnnxcamError as exc:
                errors[i] = first_line(exc)
        targets = np.full(n, -1, np.int64)
        scores = np.full(n, np.nan)
        probabilities = np.full(n, np.nan)
        heatmaps = np.full((n, *self.heatmap_shape), np.nan, self.heatmap_dtype)
        done = [i for i in range(n) if tensors[i] is not None]
        for start in range(0, len(done), self.batch_size):
            rows = done[start:start + self.batch_size]
            for part, result in self._explain_rows(rows, tensors, errors):
                t = result.targets.astype(np.int64)
                raw = result.scores.astype(np.float64).reshape(len(part), -1)
                targets[part] = t
                scores[part] = raw[np.arange(len(part)), t]
                probabilities[part] = _softmax(raw)[np.arange(len(part)), t]
                heatmaps[part] = self._heatmaps(result)
        out = {k: v for k, v in batch.items() if k not in (PIXELS, ENCODED) or self.keep_image}
        out["target"] = targets
        out["label"] = np.array([self._label(int(t)) for t in targets], dtype=object)
        out["score"] = scores
        out["probability"] = probabilities
        out["heatmap"] = heatmaps
        out["error"] = np.array(errors, dtype=object)
        return out

    def _explain(self, x: np.ndarray):
        return self.explainer.explain(x, self.target)

    def _explain_rows(self, rows: list[int], tensors: list, errors: list[str]):
        """(rows, Explanation) for the rows that ran; a batch that fails is retried image by image, so that
        one bad picture (e.g. non-finite activations) costs only its own row."""
        try:
            yield rows, self._explain(np.concatenate([tensors[i] for i in rows]))
            return
        except OnnxcamError as exc:
            if len(rows) == 1:
                errors[rows[0]] = first_line(exc)
                return
        for i in rows:
            try:
                yield [i], self._explain(tensors[i])
            except OnnxcamError as exc:
                errors[i] = first_line(exc)

    def _heatmaps(self, result) -> np.ndarray:
        if self.resolution == "input":
            return np.asarray(result.heatmaps, self.heatmap_dtype)
        maps = np.asarray(result.maps, np.float32)
        # The fused graph's own scaling of a map (onnxcam.cam.methods.normalize), at the layer's resolution.
        axes = tuple(range(1, maps.ndim))
        shifted = maps - maps.min(axis=axes, keepdims=True)
        scaled = shifted / (shifted.max(axis=axes, keepdims=True) + np.float32(1e-7))
        return scaled.astype(self.heatmap_dtype)

    def _label(self, t: int) -> str:
        return self.labels[t] if self.labels is not None and 0 <= t < len(self.labels) else ""


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _from_array(value) -> Image.Image:
    """A decoded picture as read_images gives it: HW or HWC (1, 3 or 4 channels) uint8; HW uint16."""
    a = np.asarray(value)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    shape_ok = a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))
    dtype_ok = a.dtype == np.uint8 or (a.dtype == np.uint16 and a.ndim == 2)
    if not (shape_ok and dtype_ok) or a.size == 0:
        raise OnnxcamError(f"an image array is HxW or HxWx3/4 uint8; got shape {a.shape} {a.dtype}")
    if a.shape[0] * a.shape[1] > preprocess.MAX_IMAGE_PIXELS:
        raise OnnxcamError(f"image of {a.shape[1]}x{a.shape[0]} pixels is more than the limit of "
                           f"{preprocess.MAX_IMAGE_PIXELS} pixels")
    return Image.fromarray(np.ascontiguousarray(a))


def _from_bytes(value) -> Image.Image:
    if not isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        raise OnnxcamError(f"the '{ENCODED}' column holds {type(value).__name__}, not an encoded image")
    data = value.tobytes() if isinstance(value, np.ndarray) else bytes(value)
    if len(data) > preprocess.MAX_IMAGE_BYTES:
        raise OnnxcamError(f"image file of {len(data)} bytes is more than the limit of "
                           f"{preprocess.MAX_IMAGE_BYTES} bytes")
    return preprocess.load_image_sized(data, max_pixels=preprocess.MAX_IMAGE_PIXELS)


# --------------------------------------------------------------------------- Ray helpers

_OPTIONS = tuple(p for p in inspect.signature(ExplainImages.__init__).parameters if p not in ("self", "model"))


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 -- ray without its data extra imports, then fails at the first read
    except ImportError:
        raise OnnxcamError(INSTALL_HINT) from None
    return ray


def _check_options(function: str, options: Mapping[str, Any]) -> None:
    unknown = [k for k in options if k not in _OPTIONS]
    if unknown:
        guesses = [g for k in unknown for g in difflib.get_close_matches(k, _OPTIONS, n=1)]
        hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
        raise OnnxcamError(f"{function}() got unknown option(s) {', '.join(repr(k) for k in unknown)}{hint}; "
                           f"ExplainImages accepts {', '.join(_OPTIONS)}")


def explain_dataset(ds, model, *, concurrency: int | tuple[int, int] = 1, num_gpus: float | None = None,
                    num_cpus: float | None = None, batch_size: int = 32, **options):
    """`ds.map_batches(ExplainImages, ...)`: `ds` has an `image` (read_images) or `bytes` (read_binary_files)
    column; `options` are ExplainImages' (layer, method, target, preset, resolution, device ...).
    `concurrency`: actors (an int, or (min, max) to autoscale); `num_gpus` / `num_cpus`: reserved per actor.
    Without `threads`, a CPU actor's onnxruntime uses int(num_cpus) threads, or 1 when several actors may run
    (each reserves one CPU by default), or every core for a single actor. The options are checked
    by building one ExplainImages here first, so that a bad layer or preset fails now, in one line, and not in
    every actor. Returns the lazy mapped Dataset."""
    _ray()
    _check_options("explain_dataset", options)
    if options.get("threads") is None and not num_gpus:
        # onnxruntime sizes its pool to every core of the node; several actors on one node would then fight
        # over the cores. An actor's threads follow its CPU reservation (map_batches' default is one CPU).
        if num_cpus is not None:
            options["threads"] = max(1, int(num_cpus))
        elif (_max_actors(concurrency) or 1) > 1:
            options["threads"] = 1
    if num_gpus and options.get("device") is None and options.get("providers") is None:
        options["device"] = "cuda"  # an actor that reserved a GPU and then ran on the CPU would waste it
    # On the CPU: the driver may have no GPU even where every actor has one.
    ExplainImages(model, batch_size=batch_size, **{**options, "device": None, "providers": None})
    resources = {k: v for k, v in (("num_gpus", num_gpus), ("num_cpus", num_cpus)) if v is not None}
    return ds.map_batches(ExplainImages, fn_constructor_args=(model,),
                          fn_constructor_kwargs={"batch_size": batch_size, **options}, batch_size=batch_size,
                          batch_format="numpy", concurrency=concurrency, **resources)


def explain_folder(model, paths: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   address: str | None = None, concurrency: int | tuple[int, int] | None = None,
                   num_gpus: float | None = None, num_cpus: float | None = None, batch_size: int = 32,
                   **options) -> dict:
    """Image files (files or folders, local or on storage every node reads: s3://, gs://, a shared mount)
    -> one parquet row per image under `out_dir`. Connects to the Ray cluster at `address` ("auto", or
    "ray://host:10001"), or starts a local one, unless this process is connected already; disconnects after
    if it connected. The files are read as bytes and decoded in the actors with the CLI's decoder: a corrupt
    file becomes a row with its message in `error`, where read_images would fail the whole dataset.
    `concurrency`: actors (default: one per GPU with num_gpus, else one per CPU the cluster has, less one for
    reading). Returns {"rows", "errors", "seconds", "images_per_second", "out_dir"}."""
    ray = _ray()
    _check_options("explain_folder", options)
    sources = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not sources:
        raise OnnxcamError("no images given")
    sources = [_local(p, "image path", must_exist=True) for p in sources]
    local = [p for p in sources if "://" not in p]
    if local and len(local) == len(sources) and not any(_has_image(p) for p in local):
        # Said before a cluster starts; Ray's own message comes only after it has started one.
        raise OnnxcamError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(local)}")
    out = _local(out_dir, "output folder")
    if "://" not in out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise OnnxcamError(f"output folder {out} exists and is not empty; parquet files of an earlier run would "
                           f"be read as part of this one")
    if isinstance(model, (str, os.PathLike)):
        model = _local(model, "model", must_exist=True)
    connected = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False if address is None else None)
        except Exception as exc:  # ConnectionError, or a RuntimeError for a bad address
            where = f" at {address}" if address else ""
            raise OnnxcamError(f"cannot start or reach a Ray cluster{where}: {first_line(exc)}") from None
        connected = True
    try:
        resources = ray.cluster_resources()
        if concurrency is None:
            concurrency = _default_concurrency(resources, num_gpus, num_cpus)
        _check_room(resources, concurrency, num_cpus)
        start = time.perf_counter()
        try:
            ds = ray.data.read_binary_files(sources, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))
            mapped = explain_dataset(ds, model, concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus,
                                     batch_size=batch_size, **options)
            mapped.write_parquet(out)
        except OnnxcamError:
            raise
        except Exception as exc:
            raise OnnxcamError(_ray_failure(exc)) from None
        seconds = time.perf_counter() - start
        rows, errors = _written(out)
    finally:
        if connected:
            ray.shutdown()
    return {"rows": rows, "errors": errors, "seconds": seconds,
            "images_per_second": rows / seconds if seconds > 0 else float("nan"), "out_dir": out}


def _local(path, what: str, must_exist: bool = False) -> str:
    """URIs as given; local paths absolute, because Ray's workers need not share the driver's directory."""
    text = os.fspath(path)
    if "://" in text:
        return text
    if must_exist and not os.path.exists(text):
        raise OnnxcamError(f"{what} not found: {text}")
    return os.path.abspath(text)


def _has_image(path: str) -> bool:
    """A file read_binary_files would read under `path` (it skips names that start with '.' or '_')."""
    def wanted(name: str) -> bool:
        return not name.startswith((".", "_")) and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS

    if not os.path.isdir(path):
        return wanted(os.path.basename(path))
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        if any(wanted(f) for f in files):
            return True
    return False


def _default_concurrency(resources: Mapping[str, float], num_gpus, num_cpus) -> int:
    if num_gpus:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    # Actors hold their CPUs for the whole job: with every CPU taken, the read tasks could not start.
    spare = resources.get("CPU", 1) - 1
    return max(1, int(spare // (num_cpus or 1)))


_REMOTE_ONNXCAM_ERROR = re.compile(r"^(?:onnxcam\.errors\.)?(?:OnnxcamError|UnsupportedOpError): (.+)$", re.M)


def _max_actors(concurrency) -> int | None:
    """The most actors map_batches may start: an int, or the max of (min, max[, initial])."""
    if isinstance(concurrency, (tuple, list)):
        return int(concurrency[1]) if len(concurrency) > 1 else int(concurrency[0])
    return None if concurrency is None else int(concurrency)


def _check_room(resources: Mapping[str, float], concurrency, num_cpus) -> None:
    """Actors keep their CPUs for the whole job; if they take them all, the read tasks never start and the job
    waits forever (seen: 2 actors of 1 CPU on a 2-CPU cluster, still waiting after 13 minutes)."""
    actors = _max_actors(concurrency) or 1
    per_actor = 1 if num_cpus is None else num_cpus  # map_batches' default reservation for an actor
    total = resources.get("CPU", 0)
    if actors * per_actor > total - min(1, total / 2):
        raise OnnxcamError(f"{actors} actor(s) of {per_actor:g} CPU leave no CPU to read the files on a cluster of "
                           f"{total:g} CPUs; use fewer actors or a fraction of a CPU each (num_cpus=0.5)")


def _ray_failure(exc: BaseException) -> str:
    """One line for a failed Ray job: the OnnxcamError an actor raised, else Ray's own first line."""
    seen, innermost = set(), exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OnnxcamError):
            return first_line(exc)
        # Ray Data hands back the actor's error as a UserCodeException; only the remote traceback in its text
        # still names the OnnxcamError.
        raised = _REMOTE_ONNXCAM_ERROR.findall(str(exc))
        if raised:
            return raised[-1].strip()
        innermost = exc
        cause = getattr(exc, "cause", None)  # RayTaskError keeps the task's exception here
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    # A RayTaskError's own first line names the task and its pid; the exception it wraps says what went wrong.
    return f"the Ray job failed: {type(innermost).__name__}: {first_line(innermost)}"


def _written(out: str) -> tuple[int, int]:
    """(rows, rows with an error) in the parquet files under `out`, from the files themselves."""
    import pyarrow.dataset as pads  # comes with ray[data]

    try:
        table = pads.dataset(out, format="parquet").to_table(columns=["error"])
    except Exception as exc:
        raise OnnxcamError(f"cannot read back the parquet files in {out}: {first_line(exc)}") from None
    errors = table.column("error").to_numpy(zero_copy_only=False)
    return table.num_rows, int(sum(1 for e in errors if e))
