"""`onnxcam evaluate`: how good are a model's explanations? Localization against boxes, the pointing game
against masks, and perturbation faithfulness (deletion/insertion, Average Drop / Increase in Confidence,
ROAD, agreement with occlusion), per image and per method. Metric definitions: onnxcam/metrics.py and
docs/evaluation.md.

Data: a folder of images with, optionally, one of
  * `annotations.json`: {"img.png": {"label": 285 | "class name", "boxes": [[x0, y0, x1, y1], ...],
                                      "mask": "img_mask.png"}, ...} (every key optional but the image's);
  * one `*.csv` file: rows `image,label,x0,y0,x1,y1` (header optional; label and box may be empty;
    several rows per image add boxes; a different label makes another sample);
  * Pascal VOC `*.xml` files, one per image (<filename>, <object><name>, <bndbox>); names are mapped to
    class indices through the model's labels, and each class of an image is one sample.
Without any of them every image in the folder is a sample (perturbation metrics only). Boxes are in the
original image's pixels with exclusive x1/y1 (VOC's inclusive 1-based boxes are converted); masks are
PNGs of the image's size, nonzero = object. The explained class is the sample's label, else the model's
top class.

Every model run goes through onnxruntime: the explanations through each method's Explainer, the masked
and perturbed images through ONE plain session of the model's score tensor, in batches of `batch_size`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from . import metrics as M
from . import sanity as sanity_mod
from .cam import methods as methods_mod
from .errors import OnnxcamError
from .images import preprocess, render
from .model import select
from .model.graph import ModelView, infer_shapes, load_model, prune, value_info
from .model.safeio import regular_file
from .run.explainer import Explainer
from .run.runtime import first_line, make_session

METRICS = ("localization", "pointing", "deletion", "insertion", "drop", "road", "occlusion")
PSEUDO_METHODS = ("random", "center")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
POINTING_TOLERANCE = 15.0
LOC_THRESHOLD = 0.15
IOU_THRESHOLD = 0.5
OCCLUSION_GREY = 128  # the occluder: mid-grey pixels, normalised like the image

Box = tuple  # (x0, y0, x1, y1)


@dataclass
class Sample:
    image: Path
    label: int | None = None
    boxes: list = field(default_factory=list)
    mask: Path | None = None
    name: str = ""

    @property
    def annotated(self) -> bool:
        return bool(self.boxes) or self.mask is not None


# ----------------------------------------------------------------------------- data


def load_dataset(data: str | os.PathLike, labels: Sequence[str] | None = None) -> list[Sample]:
    """The samples of DATA: a folder (with annotations.json, one CSV, VOC XMLs or nothing) or an
    annotations .json / .csv file whose images are relative to its folder."""
    path = Path(data)
    if not path.exists():
        raise OnnxcamError(f"data not found: {path}")
    if not path.is_file() and not path.is_dir():
        raise OnnxcamError(f"data {path} is not a regular file or a folder (a pipe, socket or device cannot be read)")
    if path.is_file():
        folder = path.parent
        if path.suffix.lower() == ".json":
            samples = _from_json(path, folder, labels)
        elif path.suffix.lower() == ".csv":
            samples = _from_csv(path, folder, labels)
        else:
            raise OnnxcamError(f"data {path} must be a folder, an annotations .json or a .csv file")
    else:
        folder = path
        ann = path / "annotations.json"
        csvs = sorted(path.glob("*.csv"))
        xmls = sorted(path.glob("*.xml"))
        if ann.exists():
            samples = _from_json(ann, folder, labels)
        elif len(csvs) > 1:
            raise OnnxcamError(f"{path} has several CSV files ({', '.join(p.name for p in csvs[:3])}); "
                               "pass the one to use as DATA")
        elif csvs:
            samples = _from_csv(csvs[0], folder, labels)
        elif xmls:
            samples = _from_voc(xmls, folder, labels)
        else:
            samples = [Sample(p, name=p.name) for p in sorted(path.iterdir())
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith("_mask")]
    if not samples:
        raise OnnxcamError(f"no images found in {path}")
    for s in samples:
        if not s.image.is_file():
            raise OnnxcamError(f"image not found: {s.image}")
        if s.mask is not None and not s.mask.is_file():
            raise OnnxcamError(f"mask not found: {s.mask}")
    return samples


def _label(value, labels: Sequence[str] | None, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise OnnxcamError(f"{where}: label must be a class index or name, got {value!r}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            v = int(text)
        else:
            if not labels:
                raise OnnxcamError(f"{where}: label '{text}' is a name, but the model has no labels")
            key = text.lower().replace("_", " ")
            matches = [i for i, n in enumerate(labels) if n.lower().replace("_", " ") == key]
            if not matches:
                raise OnnxcamError(f"{where}: label '{text}' is not one of the model's labels")
            v = matches[0]
    else:
        raise OnnxcamError(f"{where}: label must be a class index or name, got {value!r}")
    if v < 0:
        raise OnnxcamError(f"{where}: label {v} is negative")
    return v


def _box(values, where: str) -> Box:
    try:
        b = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OnnxcamError(f"{where}: a box must be four numbers x0, y0, x1, y1; got {values!r}") from None
    if len(b) != 4 or not all(math.isfinite(v) for v in b):
        raise OnnxcamError(f"{where}: a box must be four numbers x0, y0, x1, y1; got {values!r}")
    if b[2] <= b[0] or b[3] <= b[1]:
        raise OnnxcamError(f"{where}: box {list(values)} is empty (needs x1 > x0 and y1 > y0)")
    return b


MAX_ANNOTATION_BYTES = 256 * 2 ** 20


def _read_text(path: Path) -> str:
    regular_file(path, "annotation file", MAX_ANNOTATION_BYTES)  # a FIFO would block, /dev/zero never end
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxcamError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _from_json(path: Path, folder: Path, labels) -> list[Sample]:
    try:
        data = json.loads(_read_text(path))
    except RecursionError:
        raise OnnxcamError(f"{path} is nested too deeply") from None
    except ValueError as exc:
        raise OnnxcamError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OnnxcamError(f"{path} must be a JSON object {{\"image.png\": {{\"label\": ..., \"boxes\": ...}}}}")
    samples = []
    for name, entry in data.items():
        where = f"{path.name} entry '{name}'"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise OnnxcamError(f"{where} must be an object with label / boxes / mask")
        unknown = set(entry) - {"label", "boxes", "mask"}
        if unknown:
            raise OnnxcamError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}; use label, boxes, mask")
        boxes = entry.get("boxes") or []
        if not isinstance(boxes, list) or (boxes and not isinstance(boxes[0], (list, tuple))):
            raise OnnxcamError(f"{where}: boxes must be a list of [x0, y0, x1, y1]")
        mask = entry.get("mask")
        if mask is not None and not isinstance(mask, str):
            raise OnnxcamError(f"{where}: mask must be a file name")
        samples.append(Sample(folder / name, _label(entry.get("label"), labels, where),
                              [_box(b, where) for b in boxes], folder / mask if mask else None, name))
    return samples


def _from_csv(path: Path, folder: Path, labels) -> list[Sample]:
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip().lower() in ("image", "file", "filename"):
        rows = rows[1:]
    groups: dict = {}
    for n, row in enumerate(rows, 1):
        where = f"{path.name} row {n}"
        cells = [c.strip() for c in row] + [""] * (6 - len(row))
        if len(row) > 6 or not cells[0]:
            raise OnnxcamError(f"{where}: expected image,label,x0,y0,x1,y1; got {','.join(row)}")
        label = _label(cells[1], labels, where)
        key = (cells[0], label)
        sample = groups.setdefault(key, Sample(folder / cells[0], label, [], None, cells[0]))
        coords = cells[2:6]
        if any(coords):
            sample.boxes.append(_box(coords, where))
    return list(groups.values())


def _from_voc(xmls: list[Path], folder: Path, labels) -> list[Sample]:
    samples = []
    for xml in xmls:
        try:
            root = ET.fromstring(_read_text(xml))
        except ET.ParseError as exc:
            raise OnnxcamError(f"cannot parse {xml}: {exc}") from None
        fname = (root.findtext("filename") or "").strip()
        image = folder / fname if fname else None
        if image is None or not image.is_file():
            found = [folder / (xml.stem + ext) for ext in IMAGE_EXTENSIONS if (folder / (xml.stem + ext)).is_file()]
            image = found[0] if found else (image or folder / (xml.stem + ".jpg"))
        per_class: dict = {}
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            where = f"{xml.name} object '{name}'"
            bb = obj.find("bndbox")
            if not name or bb is None:
                raise OnnxcamError(f"{xml.name}: every <object> needs <name> and <bndbox>")
            vals = [bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
            x0, y0, x1, y1 = _box(vals, where) if None not in vals else _box([None] * 4, where)
            # VOC: 1-based, inclusive -> pixel edges, exclusive
            per_class.setdefault(_label(name, labels, where), []).append((x0 - 1, y0 - 1, x1, y1))
        for label, boxes in per_class.items():
            samples.append(Sample(image, label, boxes, None, image.name))
    return samples


# ----------------------------------------------------------------------------- evaluation


def _finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class Evaluator:
    """Runs explanation methods on samples and scores them. `predict` is the plain score session."""

    def __init__(self, model, methods: Sequence[str] = ("gradcam",), layer=None,
                 metrics: Sequence[str] | None = None, batch_size: int = 32, steps: int = 20, seed: int = 0,
                 road_percentiles: Sequence[float] = M.ROAD_PERCENTILES, occlusion_patch: int | None = None,
                 occlusion_stride: int | None = None, loc_threshold: float = LOC_THRESHOLD, providers=None,
                 strict_device: bool = False, rise=None, **pp_overrides):
        self.methods = list(methods)
        if not self.methods:
            raise OnnxcamError("no method given")
        for m in self.methods:
            if m not in PSEUDO_METHODS:
                methods_mod.get_method(m)  # raises for unknown names
        self.metrics = list(METRICS if metrics is None else metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise OnnxcamError(f"unknown metric '{unknown[0]}'; available: {', '.join(METRICS)}")
        if batch_size < 1 or steps < 1:
            raise OnnxcamError("batch size and steps must be positive")
        if not 0 < loc_threshold < 1:
            raise OnnxcamError(f"the localization threshold must lie between 0 and 1, got {loc_threshold}")
        self.batch_size, self.steps, self.seed, self.loc_threshold = batch_size, steps, seed, loc_threshold
        self.road_percentiles = tuple(road_percentiles)
        self.occlusion_patch, self.occlusion_stride = occlusion_patch, occlusion_stride
        source = load_model(model)
        inferred = infer_shapes(source)
        view = ModelView(inferred)
        if len(view.graph_inputs) != 1:
            raise OnnxcamError(f"evaluate needs a model with one input (the image); this one has "
                               f"{len(view.graph_inputs)}: {', '.join(view.graph_inputs)}")
        self.image_input = select.image_input(view)
        self.score = select.find_score(view)
        meta = preprocess.model_metadata(source)
        self.labels = meta.get("labels")
        self.pp = preprocess.resolve_preprocess(view.shape(self.image_input), metadata=meta,
                                                **{k: v for k, v in pp_overrides.items() if v is not None})
        self.layout = self.pp.layout
        self.fixed_batch = isinstance(view.shape(self.image_input)[0], int)
        scorer = onnx_copy(inferred)
        del scorer.graph.output[:]
        scorer.graph.output.append(value_info(self.score, view.elem_type(self.score), view.shape(self.score)))
        prune(scorer, [self.score])
        self.session = make_session(scorer, providers, strict=strict_device)  # strict: no silent CPU fallback
        self.num_classes = None
        self.explainers = {}
        layers = list(layer) if isinstance(layer, (list, tuple)) else layer
        for m in self.methods:
            if m not in PSEUDO_METHODS:
                self.explainers[m] = Explainer(source, layer=None if m == "rise" else layers or None, method=m,
                                               providers=providers, batch_size=batch_size,
                                               rise=rise if m == "rise" else None)
        grey = (OCCLUSION_GREY * self.pp.scale - np.asarray(self.pp.mean)) / np.asarray(self.pp.std)
        self.grey = grey.astype(np.float32)

    # -- model access ---------------------------------------------------------------------
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, K) scores, through the plain session in bounded batches."""
        x = np.ascontiguousarray(batch.transpose(0, 2, 3, 1) if self.layout == "NHWC" else batch, np.float32)
        step = 1 if self.fixed_batch else self.batch_size
        outs = []
        for i in range(0, x.shape[0], step):
            try:
                out = self.session.run([self.score], {self.image_input: x[i:i + step]})[0]
            except Exception as exc:
                raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None
            outs.append(np.asarray(out, np.float32).reshape(out.shape[0], -1))
        return np.concatenate(outs)

    def load(self, sample: Sample):
        """(PIL image, (C, H, W) input)."""
        pil = preprocess.load_image(sample.image)
        x = preprocess.to_tensor(pil, self.pp)[0]
        return pil, (x.transpose(2, 0, 1) if self.layout == "NHWC" else x)

    def maps(self, method: str, xs: np.ndarray, targets: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """(N, H, W) maps in [0, 1] at input resolution for a (N, C, H, W) batch."""
        h, w = xs.shape[2:]
        if method == "random":
            return np.stack([M.random_map((h, w), np.random.default_rng([self.seed, int(i)])) for i in indices])
        if method == "center":
            return np.stack([M.center_map((h, w))] * len(xs))
        ex = self.explainers[method]
        feed = xs.transpose(0, 2, 3, 1) if self.layout == "NHWC" else xs
        parts = [slice(i, i + 1) for i in range(len(xs))] if self.fixed_batch else [slice(0, len(xs))]
        out = []
        for part in parts:
            r = ex.explain(np.ascontiguousarray(feed[part]), targets[part])
            if ex.method_info.kind == "pixel":  # pixel gradients: max |g| over channels, min-max scaled
                g = np.abs(r.guided).max(axis=-1 if self.layout == "NHWC" else 1).astype(np.float64)
                lo = g.min(axis=(1, 2), keepdims=True)
                hi = g.max(axis=(1, 2), keepdims=True)
                out.append(((g - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32))
            else:
                out.append(np.asarray(r.heatmaps, np.float32))
        return np.concatenate(out)

    # -- the run ---------------------------------------------------------------------------
    def run(self, samples: Sequence[Sample], progress: Callable[[int], None] | None = None,
            log="auto") -> "Evaluation":
        """Scores every method on every sample. `progress(1)` is called per image and method. `log`: a text
        stream for `ProgressLines` (None: no lines); "auto" writes them to stderr when a `progress`
        callback is given and stderr is not a terminal, where a progress bar shows nothing."""
        if log == "auto":
            log = sys.stderr if progress is not None and not _isatty(sys.stderr) else None
        if log is not None:
            lines = ProgressLines(len(samples) * len(self.methods), log,
                                  "images" if len(self.methods) == 1 else "(image, method) pairs")
            progress = _both(progress, lines)
        records: dict = {m: [] for m in self.methods}
        correct1, correct5, labelled = 0, 0, 0
        for start in range(0, len(samples), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(samples))))
            loaded = [self.load(samples[i]) for i in chunk]
            xs = np.stack([x for _, x in loaded])
            scores = self.predict(xs)
            k = scores.shape[1]
            targets = []
            for i, row in zip(chunk, scores):
                label = samples[i].label
                if label is not None and label >= k:
                    raise OnnxcamError(f"{samples[i].name}: label {label} is out of range for {k} classes")
                targets.append(int(np.argmax(row)) if label is None else label)
                if label is not None:
                    labelled += 1
                    top = np.argsort(-row, kind="stable")
                    correct1 += int(top[0] == label)
                    correct5 += int(label in top[:5].tolist())
            targets = np.asarray(targets, np.int64)
            gt = [self._ground_truth(samples[i], pil) for i, (pil, _) in zip(chunk, loaded)]
            occlusion: dict = {}
            for method in self.methods:
                heat = self.maps(method, xs, targets, chunk)
                for j, i in enumerate(chunk):
                    rec = self._score_one(method, samples[i], i, xs[j], heat[j], scores[j], int(targets[j]),
                                          gt[j], loaded[j][0].size, occlusion, j)
                    records[method].append(rec)
                    if progress is not None:
                        progress(1)
        flat = [r for m in self.methods for r in records[m]]
        acc = {"top1": 100 * correct1 / labelled, "top5": 100 * correct5 / labelled} if labelled else {}
        return Evaluation(flat, summarize(flat, self.methods), acc, self.metrics)

    def _ground_truth(self, sample: Sample, pil: Image.Image):
        if sample.mask is None:
            return None
        try:
            with Image.open(sample.mask) as im:
                mask = np.asarray(im.convert("L")) > 0
        except Exception:
            raise OnnxcamError(f"cannot read mask {sample.mask}: not a supported image") from None
        if mask.shape != (pil.size[1], pil.size[0]):
            raise OnnxcamError(f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                               f"{pil.size[0]}x{pil.size[1]}")
        return mask

    def _score_one(self, method, sample, index, x, cam, scores, target, mask, size, occlusion, j) -> dict:
        w0, h0 = size
        rec = {"image": sample.name, "method": method, "label": sample.label,
               "label_name": self._name(sample.label), "target": target,
               "predicted": int(np.argmax(scores)), "score": float(scores[target])}
        want = set(self.metrics)
        if {"localization", "pointing"} & want and sample.annotated:
            cam_o = M.resize(cam, (h0, w0))
            boxes = sample.boxes
            if not boxes and mask is not None and mask.any():
                rows, cols = np.nonzero(mask)
                boxes = [(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)]
            if "localization" in want and boxes:
                iou, box = M.localization(cam_o, boxes, self.loc_threshold)
                rec["iou"] = iou
                rec["box"] = None if box is None else " ".join(str(v) for v in box)
                rec["loc_correct"] = float(iou >= IOU_THRESHOLD)
                if sample.label is not None:
                    rec["top1_loc_error"] = M.topk_localization_error(scores, sample.label, iou, 1, IOU_THRESHOLD)
                    rec["top5_loc_error"] = M.topk_localization_error(scores, sample.label, iou, 5, IOU_THRESHOLD)
            if "pointing" in want:
                obj = mask if mask is not None else M.boxes_to_mask(boxes, (h0, w0))
                if obj.any():
                    rec["pointing_hit"] = float(M.pointing_game(cam_o, obj, POINTING_TOLERANCE))
        kw = dict(score="probability", batch_size=self.batch_size)
        if "deletion" in want:
            rec["deletion_auc"] = M.deletion(x, cam, target, self.predict, steps=self.steps, **kw)[0]
        if "insertion" in want:
            rec["insertion_auc"] = M.insertion(x, cam, target, self.predict, steps=self.steps, **kw)[0]
        if "drop" in want:
            y, o = M.confidence_change(x, cam, target, self.predict, **kw)
            rec["drop"] = M.average_drop([y], [o])
            rec["increase"] = float(o > y)
        if "road" in want:
            rng = np.random.default_rng([self.seed, index, self.methods.index(method)])
            r = M.road(x, cam, target, self.predict, self.road_percentiles, rng=rng, **kw)
            rec.update(road=r["road"], road_morf=r["morf"], road_lerf=r["lerf"])
        if "occlusion" in want:
            if j not in occlusion:
                occlusion[j] = M.occlusion_sensitivity(x, target, self.predict, self.occlusion_patch,
                                                       self.occlusion_stride, fill=self.grey, score="logit",
                                                       batch_size=self.batch_size)
            rec["faithfulness"] = M.faithfulness(cam, *occlusion[j])
        return {k: (_finite(v) if isinstance(v, (float, np.floating)) else v) for k, v in rec.items()}

    def _name(self, label):
        if label is None:
            return None
        return self.labels[label] if self.labels and label < len(self.labels) else str(label)


def sanity_plan(model, mode: str, steps: int | None, methods: Sequence[str]) -> int:
    """Checks the methods and the model before a sanity run starts; returns its number of progress ticks."""
    if mode not in sanity_mod.MODES:
        raise OnnxcamError(f"unknown sanity check '{mode}'; use {', '.join(sanity_mod.MODES)}")
    return len(sanity_mod.check_methods(methods)) * sanity_mod.step_count(model, mode, steps)


def sanity_check(model, data, methods: Sequence[str] = ("gradcam",), mode: str = "cascading", seed: int = 0,
                 steps: int | None = None, limit: int | None = None, layer=None, providers=None, progress=None,
                 **pp_overrides) -> "sanity_mod.SanityResult":
    """`onnxcam evaluate --sanity MODE`: onnxcam.sanity's checks on the first `limit` samples of DATA, each
    explained for its label (else the trained model's top class). `progress(1)` per method and step."""
    if mode not in sanity_mod.MODES:
        raise OnnxcamError(f"unknown sanity check '{mode}'; use {', '.join(sanity_mod.MODES)}")
    source = load_model(model)
    samples = load_dataset(data, preprocess.model_metadata(source).get("labels"))[:limit]
    images = [s.image for s in samples]
    targets = [s.label for s in samples]
    pp = {k: v for k, v in pp_overrides.items() if v is not None}
    if mode == "logit":
        return sanity_mod.random_logit(source, images, methods, seed=seed, targets=targets, layer=layer,
                                       preprocessing=pp, providers=providers, progress=progress)
    return sanity_mod.parameter_randomization(source, images, methods, mode=mode, seed=seed, steps=steps,
                                              targets=targets, layer=layer, preprocessing=pp, providers=providers,
                                              progress=progress)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _both(first, second):
    if first is None:
        return second

    def update(n: int) -> None:
        first(n)
        second(n)
    return update


class ProgressLines:
    """Progress as whole lines, `onnxcam: evaluate: 40/100 images (12.3 s, ETA 18 s)`, for a stream that
    is not a terminal (a log file, CI): a progress bar redraws one line with carriage returns, which such
    a stream cannot show, so click prints only its label there and a long run looked hung. A line is
    written at every further 10% of `total`, at the first count `every` seconds or more after the last
    line, and at the end."""

    def __init__(self, total: int, stream, unit: str = "images", every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.stream, self.unit, self.every, self.clock = total, stream, unit, every, clock
        self.done = 0
        self.start = self.last = clock()
        self.next_step = 1

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        step = self.done * 10 // max(self.total, 1)
        if self.done < self.total and step < self.next_step and now - self.last < self.every:
            return
        self.next_step = step + 1
        self.last = now
        elapsed = now - self.start
        text = f"onnxcam: evaluate: {self.done}/{self.total} {self.unit} ({elapsed:.1f} s"
        if self.done < self.total:
            text += f", ETA {elapsed / self.done * (self.total - self.done):.0f} s"
        print(text + ")", file=self.stream, flush=True)


def onnx_copy(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


# ----------------------------------------------------------------------------- results

# (record key, summary key, column title, scale, format); summary values are means over the images that
# have the metric.
COLUMNS = (
    ("pointing_hit", "pointing", "point%", 100, "{:.1f}"),
    ("top1_loc_error", "top1_loc_error", "locerr1%", 100, "{:.1f}"),
    ("top5_loc_error", "top5_loc_error", "locerr5%", 100, "{:.1f}"),
    ("loc_correct", "gt_known_loc", "gtloc%", 100, "{:.1f}"),
    ("iou", "iou", "IoU", 1, "{:.3f}"),
    ("deletion_auc", "deletion_auc", "del", 1, "{:.3f}"),
    ("insertion_auc", "insertion_auc", "ins", 1, "{:.3f}"),
    ("drop", "average_drop", "drop%", 1, "{:.1f}"),
    ("increase", "increase_in_confidence", "incr%", 100, "{:.1f}"),
    ("road", "road", "ROAD", 1, "{:.3f}"),
    ("faithfulness", "faithfulness", "faith", 1, "{:.3f}"),
)
LOWER_IS_BETTER = ("locerr1%", "locerr5%", "del", "drop%")


def summarize(records: list[dict], methods: Sequence[str]) -> dict:
    """Per method: image count and the mean of every metric over the images that have it."""
    out = {}
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        s: dict = {"images": len(rows)}
        for key, name, _, scale, _ in COLUMNS + (("road_morf", "road_morf", "", 1, ""),
                                                 ("road_lerf", "road_lerf", "", 1, "")):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                s[name] = float(np.mean(vals)) * scale
                s[name + "_n"] = len(vals)
        out[m] = s
    return out


# The metric a verdict line quotes: the first of these that was measured (localisation first, where the data
# has annotations: the question most readers ask of a map).
HEADLINE = ("point%", "gtloc%", "ins", "del", "faith", "ROAD", "drop%", "IoU", "locerr1%", "locerr5%", "incr%")


def verdicts(summary: dict) -> list[str]:
    """One line per method against the controls that were run ('random', 'center'): the method *beats* a
    control on a metric when its mean is strictly better (higher, or lower for LOWER_IS_BETTER) than the
    control's; a tie is not a win. Counted over the summary columns measured for the method and every control
    run. Means over the same images, with no significance test (docs/evaluation.md)."""
    controls = [c for c in PSEUDO_METHODS if c in summary]
    methods = [m for m in summary if m not in PSEUDO_METHODS]
    if not methods:
        return []
    if not controls:
        return ["verdict: no control was run, so no verdict (add --controls, or --method random --method center)"]
    missing = [c for c in PSEUDO_METHODS if c not in controls]
    who = "both controls" if not missing else f"the {controls[0]} control ({missing[0]} not run)"
    lines = []
    for m in methods:
        s = summary[m]
        measured = [c for c in COLUMNS if c[1] in s and all(c[1] in summary[k] for k in controls)]
        if not measured:
            lines.append(f"{m}: no metric measured for it and the controls, so no verdict")
            continue

        def better(c, k):
            a, b = s[c[1]], summary[k][c[1]]
            return a < b if c[2] in LOWER_IS_BETTER else a > b

        def quote(c):
            return (f"{c[2]} {c[4].format(s[c[1]])} vs "
                    + " / ".join(f"{k} {c[4].format(summary[k][c[1]])}" for k in controls))

        wins = [c for c in measured if all(better(c, k) for k in controls)]
        head = next(c for name in HEADLINE for c in measured if c[2] == name)
        text = f"{m}: beats {who} on {len(wins)} of {len(measured)} metrics ({quote(head)})"
        losses = [c for c in measured if c not in wins]
        if losses:
            text += "; not on " + ", ".join(f"{quote(c)}" for c in losses)
        lines.append(text)
    return lines


@dataclass
class Evaluation:
    records: list
    summary: dict
    accuracy: dict
    metrics: list

    def table(self) -> str:
        """The per-method summary as a fixed-width text table."""
        cols = [c for c in COLUMNS if any(c[1] in s for s in self.summary.values())]
        width = max([6] + [len(m) for m in self.summary])
        head = f"{'method':<{width}}  {'n':>4}" + "".join(f"  {c[2]:>8}" for c in cols)
        lines = [head, "-" * len(head)]
        for m, s in self.summary.items():
            cells = "".join(f"  {(c[4].format(s[c[1]]) if c[1] in s else '-'):>8}" for c in cols)
            lines.append(f"{m:<{width}}  {s['images']:>4}{cells}")
        notes = []
        if self.accuracy:
            notes.append(f"classification: top-1 {self.accuracy['top1']:.1f}%, top-5 {self.accuracy['top5']:.1f}%")
        low = [c[2] for c in cols if c[2] in LOWER_IS_BETTER]
        if low:
            notes.append(f"lower is better: {', '.join(low)}; higher is better: the rest")
        return "\n".join(lines + notes)

    def verdicts(self) -> list[str]:
        """`verdicts(self.summary)`: a line per method against the controls."""
        return verdicts(self.summary)

    def write(self, path: str | os.PathLike, info: dict | None = None) -> None:
        p = Path(path)
        if p.suffix.lower() == ".json":
            doc = dict(info or {}, accuracy=self.accuracy, summary=self.summary, verdicts=self.verdicts(),
                       results=self.records)
            text = json.dumps(doc, indent=1) + "\n"
        else:
            keys: list = []
            for r in self.records:
                keys += [k for k in r if k not in keys]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            for r in self.records:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
            text = buf.getvalue()
        # Written to a new file then renamed: a hard link to an input is left as it was.
        render.atomic_write(p, lambda fh: fh.write(text.encode()))


def check_output(path: str | os.PathLike, protect: Sequence[str | os.PathLike] = ()) -> None:
    """Fails early (before the long run) when the results file cannot be written."""
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".json"):
        raise OnnxcamError(f"output {p} must end in .csv or .json")
    if p.is_dir():
        raise OnnxcamError(f"output {p} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxcamError(f"cannot write {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OnnxcamError(f"cannot write {p}: permission denied")
    real = os.path.realpath(p)
    for q in protect:
        same = os.path.realpath(q) == real
        if not same and p.exists() and os.path.exists(q):
            try:
                same = os.path.samefile(p, q)  # a hard link to an input is that input
            except OSError:
                same = False
        if same:
            raise OnnxcamError(f"output {p} would overwrite an input ({q})")


def input_files(data: str | os.PathLike) -> list[Path]:
    """Files `load_dataset(data)` may read: DATA itself when it is a file, else the folder's annotations,
    CSV and XML files and its images (all files directly in it)."""
    path = Path(data)
    if path.is_dir():
        try:
            return [q for q in path.iterdir() if q.is_file()]
        except OSError:
            return []
    return [path]
