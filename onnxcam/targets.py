"""Targets beyond a class logit: what scalar y the gradient starts from.

Every target here is a per-sample weight tensor W shaped like the (pre-softmax) score, y = <W, score>:

* `ClassTarget(c)` / a plain int: W one-hot at class c of the flattened score (the classic path).
* `IndexTarget((i, j, ...))`: W one-hot at one element of a sample's output, e.g. `(box, field)`.
* `RegionTarget(c, mask)`: W = mask on class c's channel (segmentation (N, K, *spatial) outputs, class
  axis 1): the sum of class c's logits over the mask. `mask=None`: over the *predicted* mask, the
  positions whose argmax over the classes is c.
* `DetectionTarget(box, field)`: the objectness (`field="objectness"`) or a class score
  (`field="class"`, `cls=c`; `cls=None`: the box's top-scoring class) of box `box` of a YOLO-style
  (N, boxes, 5 + classes) output [x, y, w, h, objectness, class scores...].

Targets that are one fixed element (class, index tuple, a detection field with a given class) become a
flat index into the score and run through the Explainer's own fused session, exactly the class path.
The others are fed as a weight tensor to a second fused graph (built on first use and cached) whose seed
is `onnxcam_weights` instead of the one-hot. Data-dependent weights (the predicted mask, a box's top
class) are computed *inside* that graph, `select & (score == max over axis of score where group)`, so
one run still does forward, backward and CAM; the mask is a constant of the backward pass (argmax has
no gradient), as in pytorch-grad-cam's SemanticSegmentationTarget, which takes it from a forward pass.

The score is the output as the model computes it, moved before a trailing Softmax (rewrite.find_score).
A Sigmoid on detection fields is *not* stripped: for one box field it scales the gradient by the positive
per-sample constant sigmoid'(z), which leaves the (min-max normalised) heatmap unchanged, and YOLO heads
usually apply it before slicing and decoding, so there is no single logit tensor to move to. Where the
probability saturates (float32 sigmoid is exactly 1 for z > ~17, giving zero gradient) or raw map values
matter, pass the pre-sigmoid tensor as `output=` (`--output-name`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from onnx import TensorProto, helper

from .errors import OnnxcamError
from .labels import match_label
from .safeio import regular_file

WEIGHTS = "onnxcam_weights"  # float (N, *score dims): fixed part of W
SELECT = "onnxcam_select"  # bool (N, *score dims): where the data-dependent part may be 1
GROUP = "onnxcam_group"  # bool (N, *score dims): the elements the in-graph argmax compares
TARGET_SCORES = "onnxcam_target_scores"  # float (N,): y = <W, score> per sample

FIELDS = ("objectness", "class")


@dataclass(frozen=True)
class ClassTarget:
    """Class `cls` of a classifier's (N, K) score: the same as passing the int."""

    cls: int


@dataclass(frozen=True)
class IndexTarget:
    """One element of a sample's output, indexed without the batch axis (negative indices count back)."""

    index: tuple

    def __post_init__(self):
        object.__setattr__(self, "index", tuple(int(i) for i in np.atleast_1d(self.index)))


@dataclass(frozen=True, eq=False)
class RegionTarget:
    """Sum of class `cls`'s logits over `mask` (any 2-D array, resized nearest-neighbour to the output grid;
    nonzero = inside) or, with `mask=None`, over the predicted mask (argmax over the class axis 1 == cls)."""

    cls: int
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class DetectionTarget:
    """Objectness or a class score of box `box` of a detection output: YOLOv5's (N, boxes, 5 + classes)
    [x, y, w, h, objectness, classes...] or ultralytics' (YOLOv8/11) (N, 4 + classes, boxes) [x, y, w, h,
    classes...], told apart by which axis is shorter (`layout` "auto"), or named ("yolov5", "ultralytics").
    `box=None` is the top detection (highest objectness x class score; ultralytics: highest class score).
    `objectness` / `first_class` override the field indices of the objectness score and of class 0."""

    box: int | None = None
    field: str | None = None  # None: "objectness" where the layout has one, else "class"
    cls: int | None = None  # field="class": None = the box's top-scoring class
    objectness: int | None = None
    first_class: int | None = None
    layout: str = "auto"

    def field_for(self, shape: tuple) -> str:
        return self.field or ("objectness" if self.fields(shape)[1] is not None else "class")

    def fields(self, shape: tuple) -> tuple[str, int | None, int]:
        """(layout, objectness field or None, first class field) for an output of per-sample shape (a, b)."""
        layout = self.layout
        if layout == "auto":
            layout = "ultralytics" if shape[0] < shape[1] else "yolov5"
        if layout not in LAYOUTS:
            raise OnnxcamError(f"detection layout must be one of auto, {', '.join(LAYOUTS)}, got '{self.layout}'")
        objectness = self.objectness if self.objectness is not None else (4 if layout == "yolov5" else None)
        first = self.first_class if self.first_class is not None else (5 if layout == "yolov5" else 4)
        return layout, objectness, first


LAYOUTS = ("yolov5", "ultralytics")


Target = (ClassTarget, IndexTarget, RegionTarget, DetectionTarget)


def is_target_request(targets) -> bool:
    """True when `targets` holds Target objects (else it is the classic None / int / ints)."""
    if isinstance(targets, Target):
        return True
    return isinstance(targets, (list, tuple)) and any(isinstance(t, Target) for t in targets)


def per_sample(targets, n: int) -> list:
    """One target per sample: a single target is repeated; ints become ClassTargets."""
    items = [targets] if isinstance(targets, Target) else list(targets)
    items = [ClassTarget(int(t)) if isinstance(t, (int, np.integer)) else t for t in items]
    for t in items:
        if not isinstance(t, Target):
            raise OnnxcamError(f"unsupported target {t!r}: use an int, ClassTarget, IndexTarget, RegionTarget "
                               f"or DetectionTarget")
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise OnnxcamError(f"got {len(items)} targets for a batch of {n}")
    return items


def _flat(index: Sequence[int], shape: tuple, what: str) -> int:
    if len(index) != len(shape):
        raise OnnxcamError(f"{what} {tuple(index)} has {len(index)} indices; the output has shape "
                           f"(N, {', '.join(map(str, shape))}): give {len(shape)}")
    for i, d in zip(index, shape):
        if not -d <= i < d:
            raise OnnxcamError(f"{what} {tuple(index)} is out of range for the output shape "
                               f"(N, {', '.join(map(str, shape))})")
    return int(np.ravel_multi_index(tuple(i % d for i, d in zip(index, shape)), shape))


def _detection_index(t: DetectionTarget, shape: tuple) -> tuple[int, int] | None:
    """The (per-sample) index of a fixed detection element; None when the class is the box's top class."""
    if len(shape) != 2:
        raise OnnxcamError(f"a box target needs an (N, boxes, fields) output (or ultralytics' (N, fields, "
                           f"boxes)); this one is (N, {', '.join(map(str, shape))})")
    layout, objectness, first = t.fields(shape)
    boxes, fields = shape if layout == "yolov5" else shape[::-1]
    if t.box is None:
        raise OnnxcamError("the top detection is found from the scores; resolve it first (resolve_top_boxes)")
    if not 0 <= t.box < boxes:
        raise OnnxcamError(f"box {t.box} is out of range: the output has {boxes} boxes (0..{boxes - 1})")
    field = t.field_for(shape)
    if field not in FIELDS:
        raise OnnxcamError(f"box field must be one of {', '.join(FIELDS)}, got '{t.field}'")
    at = (lambda f: (t.box, f)) if layout == "yolov5" else (lambda f: (f, t.box))
    if field == "objectness":
        if objectness is None:
            raise OnnxcamError(f"this {layout} output (N, {', '.join(map(str, shape))}) has no objectness field; "
                               f"use the class field")
        if not 0 <= objectness < fields:
            raise OnnxcamError(f"objectness field {objectness} is out of range for {fields} fields")
        return at(objectness)
    classes = fields - first
    if classes <= 0:
        raise OnnxcamError(f"the output has {fields} fields per box: no class scores after field {first}")
    if t.cls is None:
        return None
    if not 0 <= t.cls < classes:
        raise OnnxcamError(f"class {t.cls} is out of range: boxes have {classes} class scores (0..{classes - 1})")
    return at(first + t.cls)


def resolve_data_dependent(items: list, scores: np.ndarray, probability: bool) -> list:
    """Targets whose element depends on the model's answer, made fixed from the scores (N, *per-sample shape):
    a detection target with box=None becomes the top detection (its class too, for field="class"); a predicted
    region of a single-channel output (binary segmentation, where an argmax over one channel would select the
    whole image) becomes the mask of positions above 0.5 (probabilities) or 0 (logits)."""
    out = []
    for s, t in enumerate(items):
        sc = np.asarray(scores[s], np.float64)
        if isinstance(t, DetectionTarget) and t.box is None:
            if sc.ndim != 2:
                raise OnnxcamError(f"a box target needs an (N, boxes, fields) output (or ultralytics' (N, "
                                   f"fields, boxes)); this one is (N, {', '.join(map(str, sc.shape))})")
            layout, objectness, first = t.fields(sc.shape)
            per_box = sc if layout == "yolov5" else sc.T
            classes = per_box[:, first:]
            if classes.shape[1] == 0:
                raise OnnxcamError(f"the output has {per_box.shape[1]} fields per box: no class scores")
            conf = classes.max(1) * (per_box[:, objectness] if objectness is not None else 1.0)
            box = int(np.argmax(conf))
            field = t.field_for(sc.shape)
            cls = t.cls if t.cls is not None or field != "class" else int(np.argmax(classes[box]))
            t = DetectionTarget(box, field, cls, t.objectness, t.first_class, layout)
        elif isinstance(t, RegionTarget) and t.mask is None and sc.ndim >= 2 and sc.shape[0] == 1:
            if t.cls != 0:
                raise OnnxcamError(f"region class {t.cls} is out of range: the output has 1 channel (class 0)")
            fg = sc[0] > (0.5 if probability else 0.0)
            if not fg.any():
                raise OnnxcamError(f"no position of the single-channel output is above "
                                   f"{0.5 if probability else 0} (the predicted foreground is empty); give a mask")
            t = RegionTarget(0, fg)
        out.append(t)
    return out


def needs_scores(items: list, shape: tuple) -> bool:
    """Whether resolve_data_dependent has work to do (the other data-dependent targets run in the graph)."""
    return any((isinstance(t, DetectionTarget) and t.box is None)
               or (isinstance(t, RegionTarget) and t.mask is None and len(shape) >= 2 and shape[0] == 1)
               for t in items)


def resize_mask(mask, spatial: tuple) -> np.ndarray:
    """A mask (nonzero = inside) at the output grid: as is when it fits, nearest-neighbour resized if 2-D."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (3, 4):  # an RGB(A) image array: any channel nonzero
        m = m[..., :3].any(axis=-1)
    if not m.any():
        raise OnnxcamError("region mask is empty (no nonzero pixel)")
    if m.shape == tuple(spatial):
        return m != 0
    if m.ndim != 2 or len(spatial) != 2:
        raise OnnxcamError(f"region mask has shape {m.shape}; the output grid is {tuple(spatial)}")
    from PIL import Image

    img = Image.fromarray(np.uint8(m != 0) * 255)
    out = np.asarray(img.resize((spatial[1], spatial[0]), Image.NEAREST)) > 0
    if not out.any():  # a few pixels can fall between the nearest-neighbour samples of a coarser grid
        raise OnnxcamError(f"region mask {m.shape[0]}x{m.shape[1]} has no pixel left on the output grid "
                           f"{spatial[0]}x{spatial[1]}; draw a larger region")
    return out


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


@dataclass
class Plan:
    """How a batch of targets is fed: `flat` (N,) indices for the class path, or the weighted inputs."""

    flat: np.ndarray | None = None
    weights: np.ndarray | None = None
    select: np.ndarray | None = None
    group: np.ndarray | None = None
    axis: int = 1  # (full score rank) axis of the in-graph argmax


def plan(items: Sequence, shape: tuple) -> Plan:
    """Feeds for per-sample targets over a score of per-sample shape `shape`."""
    shape = tuple(int(d) for d in shape)
    n = len(items)
    fixed: list[int | None] = []
    for t in items:
        if isinstance(t, ClassTarget):
            size = int(np.prod(shape)) if shape else 1
            if not 0 <= t.cls < size:
                raise OnnxcamError(f"target {t.cls} is out of range: the score has {size} classes (0..{size - 1})")
            fixed.append(t.cls)
        elif isinstance(t, IndexTarget):
            fixed.append(_flat(t.index, shape, "index"))
        elif isinstance(t, DetectionTarget):
            at = _detection_index(t, shape)
            fixed.append(None if at is None else _flat(at, shape, "box field"))
        else:
            fixed.append(None)
    if all(f is not None for f in fixed):
        return Plan(flat=np.asarray(fixed, np.int64))

    axes = set()
    weights = np.zeros((n, *shape), np.float32)
    select = np.zeros((n, *shape), bool)
    group = np.zeros((n, *shape), bool)
    for s, (t, f) in enumerate(zip(items, fixed)):
        if f is not None:
            weights[s].reshape(-1)[f] = 1.0
            continue
        if isinstance(t, RegionTarget):
            if len(shape) < 2:
                raise OnnxcamError(f"a region target needs an (N, classes, *spatial) output; this one is "
                                   f"(N, {', '.join(map(str, shape))})")
            if not 0 <= t.cls < shape[0]:
                raise OnnxcamError(f"region class {t.cls} is out of range: the output has {shape[0]} classes "
                                   f"(0..{shape[0] - 1})")
            if t.mask is None:
                select[s, t.cls] = True
                group[s] = True
                axes.add(1)
            else:
                weights[s, t.cls] = resize_mask(t.mask, shape[1:])
        else:  # a detection target whose class is the box's best
            layout, _, first = t.fields(shape)
            at = (s, t.box, slice(first, None)) if layout == "yolov5" else (s, slice(first, None), t.box)
            select[at] = True
            group[at] = True
            axes.add(len(shape) if layout == "yolov5" else 1)
    if len(axes) > 1:
        raise OnnxcamError("predicted-mask regions and top-class box targets cannot share one batch")
    return Plan(weights=weights, select=select, group=group, axis=axes.pop() if axes else 1)


# -- the weighted seed, inside the fused graph (called by build.build_explain_graph) -------------------------
def weighted_seed(emit, view, score: str, axis: int, sign_input: bool):
    """(seed, outputs [(tensor, name, elem type, shape)], extra graph inputs) for y = <W, score> with
    W = weights + [select & score == max over `axis` of score where group]."""
    from .build import SCORES, SIGN

    st = view.elem_type(score)
    shape = view.shape(score) or []
    dims = ["N", *[d if isinstance(d, int) else f"S{i}" for i, d in enumerate(shape[1:])]]
    np_t = helper.tensor_dtype_to_np_dtype(st)
    neg_inf = emit.const(np.array(-np.inf, np_t), hint="neg_inf")
    masked = emit.op("Where", [GROUP, score, neg_inf], hint="group_scores")
    top = emit.reduce("ReduceMax", masked, [axis], keepdims=1)
    hit = emit.op("And", [SELECT, emit.op("Equal", [score, top])], hint="argmax_hit")
    w = WEIGHTS if st == TensorProto.FLOAT else emit.op("Cast", [WEIGHTS], to=st)
    weights = emit.op("Add", [w, emit.op("Cast", [hit], to=st)], hint="weights")
    seed = weights
    if sign_input:
        sign = emit.op("Cast", [SIGN], to=st) if st != TensorProto.FLOAT else SIGN
        seed = emit.op("Mul", [weights, sign], hint="signed_weights")
    as_f = (lambda t: t) if st == TensorProto.FLOAT else (lambda t: emit.op("Cast", [t], to=TensorProto.FLOAT))
    score_f = as_f(score)
    y = emit.reduce("ReduceSum", emit.op("Reshape", [emit.op("Mul", [as_f(weights), score_f]), emit.ints([0, -1])]),
                    [1], keepdims=0)
    outputs = [(score_f, SCORES, TensorProto.FLOAT, dims), (y, TARGET_SCORES, TensorProto.FLOAT, ["N"])]
    inputs = [helper.make_tensor_value_info(WEIGHTS, TensorProto.FLOAT, dims),
              helper.make_tensor_value_info(SELECT, TensorProto.BOOL, dims),
              helper.make_tensor_value_info(GROUP, TensorProto.BOOL, dims)]
    return seed, outputs, inputs


# -- running (called by Explainer.explain for Target objects) ------------------------------------------------
def _weighted_session(ex, axis: int):
    from . import build
    from .runtime import make_session

    key = ("weights", axis)
    with ex._aux_lock:
        if key not in ex._aux:
            model = build.build_explain_graph(ex._inferred, ex._spec, weights_axis=axis)
            ex._aux[key] = make_session(model, ex.providers, ex.session_options)
        return ex._aux[key]


def score_shape(ex, feeds) -> tuple:
    """The score's per-sample shape: static from the model, else from one forward run."""
    from .graph import ModelView

    shape = ModelView(ex._inferred).shape(ex.score)
    if shape is not None and len(shape) >= 1 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    return tuple(score_values(ex, feeds).shape[1:])


def score_values(ex, feeds) -> np.ndarray:
    """The score (N, ...) from a forward run of the model alone."""
    from .graph import ModelView, load_model, prune
    from .runtime import make_session

    with ex._aux_lock:
        if "probe" not in ex._aux:
            m = load_model(ex._inferred)  # a private copy
            del m.graph.output[:]
            m.graph.output.append(helper.make_tensor_value_info(ex.score, ModelView(m).elem_type(ex.score), None))
            prune(m, [ex.score])
            ex._aux["probe"] = make_session(m, ex.providers, ex.session_options)
        probe = ex._aux["probe"]
    needed = {i.name for i in probe.get_inputs()}
    return probe.run(None, {k: v for k, v in feeds.items() if k in needed})[0]


def explain(ex, feeds: dict, targets, counterfactual: bool, eigen_smooth: bool, channels, progress):
    """Explainer.explain for Target objects: `r.targets` holds the targets (dtype object), `r.scores` the
    score in the output's own shape (N, ...), `r.target_scores` (N,) the differentiated scalar y."""
    from . import build, methods
    from .explainer import Explanation, check_samples, flag_empty
    from .runtime import first_line, require_finite

    image = feeds[ex.image_input]
    n = image.shape[0]
    items = per_sample(targets, n)
    shape = score_shape(ex, feeds)
    if len(shape) == 2:  # name the field a detection target left to the layout
        items = [replace(t, field=t.field_for(shape)) if isinstance(t, DetectionTarget) and t.field is None else t
                 for t in items]
    if needs_scores(items, shape):
        items = resolve_data_dependent(items, score_values(ex, feeds), ex.score_is_probability)
    p = plan(items, shape)
    objs = np.empty(n, object)
    objs[:] = items
    if p.flat is not None:  # one fixed element per sample: the Explainer's own (class) session
        r = ex._explain(feeds, p.flat, counterfactual, eigen_smooth, channels, progress)
        r.target_scores = r.scores[np.arange(n), p.flat].astype(np.float32)
        r.scores = r.scores.reshape((n, *shape))
        r.targets = objs
        return r
    kind = ex.method_info.kind
    if kind == "perturbation":
        raise OnnxcamError(f"method '{ex.method}' perturbs for one class index; region and top-class box targets "
                           f"need a gradient method")
    session = _weighted_session(ex, p.axis)
    run_feeds = dict(feeds)
    run_feeds.update({WEIGHTS: p.weights, SELECT: p.select, GROUP: p.group})
    if build.SIGN in {i.name for i in session.get_inputs()}:
        run_feeds[build.SIGN] = np.array([-1.0 if counterfactual else 1.0], np.float32)
    try:
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, run_feeds)))
    except Exception as exc:
        raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None
    check_samples(outs[build.SCORES], n, ex.output_name)
    require_finite(outs[build.SCORES], f"the model's output '{ex.output_name}'")
    if kind in ("gradient", "pixel") and not eigen_smooth:
        maps = [outs[build.maps_name(i)] for i in range(len(ex.layers))]
        heat = outs[build.HEATMAPS]
    else:
        maps = [np.maximum(methods.first_component(outs[build.weighted_name(i)]), 0) for i in range(len(ex.layers))]
        heat = ex._heatmaps(maps, image)
    require_finite(heat, "the heatmap")
    guided, extras = None, {}
    if kind == "pixel":
        guided = outs[build.GUIDED_GRADCAM if ex.method == "guided-gradcam" else build.GUIDED]
        extras["guided_backprop"] = outs[build.GUIDED]
    r = Explanation(maps=maps[0], heatmaps=heat, scores=outs[build.SCORES], targets=objs, layer=ex.layer,
                    method=ex.method, counterfactual=counterfactual, guided=guided, maps_per_layer=maps,
                    extras=extras, target_scores=outs[TARGET_SCORES])
    # A predicted region its class owns nowhere selects nothing: y is 0 by definition, not independent of the layer.
    unowned = {s for s, t in enumerate(items) if isinstance(t, RegionTarget) and t.mask is None
               and not (np.asarray(r.scores[s]).argmax(0) == t.cls).any()}
    flag_empty(r, outs, ex.layers, quiet=unowned)
    return r


def describe(t) -> str:
    """A short label for a target (CLI output)."""
    if isinstance(t, ClassTarget):
        return f"class {t.cls}"
    if isinstance(t, IndexTarget):
        return "index (" + ",".join(map(str, t.index)) + ")"
    if isinstance(t, RegionTarget):
        return f"region of class {t.cls} ({'predicted mask' if t.mask is None else 'mask'})"
    if isinstance(t, DetectionTarget):
        what = t.field or "box score" if t.field != "class" else ("top class" if t.cls is None else f"class {t.cls}")
        return f"{'top box' if t.box is None else f'box {t.box}'} {what}"
    return str(t)


# -- command-line syntax (onnxcam/cli.py) ---------------------------------------------------------------------
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


__all__ = ["ClassTarget", "IndexTarget", "RegionTarget", "DetectionTarget", "plan", "load_mask", "resize_mask"]
