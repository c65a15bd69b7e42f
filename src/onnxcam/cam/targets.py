"""What a target is, and how it becomes the weights W of the explained scalar y = <W, score> per sample.

Every target is a weighting of the (pre-softmax) score; the fused graph (onnxcam/cam/build.py) seeds its
backward pass with W and nothing else:

* `ClassTarget(c)` / a plain int / a label: W one-hot at element c of the flattened score; None: at its argmax.
* `IndexTarget((i, j, ...))`: W one-hot at one element of a sample's output, e.g. `(time step, class)`.
* `RegionTarget(c, mask)`: W = mask on class c's channel (segmentation (N, K, *spatial) outputs, class
  axis 1): the sum of class c's logits over the mask. `mask=None`: over the *predicted* mask, the
  positions whose argmax over the classes is c (a single-channel output: whose value is above 0.5, or 0
  for logits).
* `DetectionTarget(box, field)`: the objectness or a class score of a box of a YOLOv5 (N, boxes, 5 + C) or
  ultralytics (N, 4 + C, boxes) output; `box=None`: the top detection; `cls=None`: the box's best class.

`plan` turns a batch of targets into the graph's target inputs: a flat index per sample (the one-hot is
built in the graph; -1 its argmax), fixed weights (masks), and `select`/`group` for weights that depend on
the scores of the same run (`select & (score == max over axis 1 of score where group)`: a predicted mask,
an ultralytics box's best class), so one run still does forward, backward and CAM; such a mask is a
constant of the backward pass (argmax has no gradient), as in pytorch-grad-cam's SemanticSegmentationTarget.
What needs the scores before the run (the top detection, a YOLOv5 box's best class, a single-channel
mask) is made fixed from them by `resolve_data_dependent`.

The score is the output as the model computes it, moved before a trailing Softmax (select.find_score).
A Sigmoid on detection fields is *not* stripped: for one box field it scales the gradient by the positive
per-sample constant sigmoid'(z), which leaves the (min-max normalised) heatmap unchanged, and YOLO heads
usually apply it before slicing and decoding, so there is no single logit tensor to move to. Where the
probability saturates (float32 sigmoid is exactly 1 for z > ~17, giving zero gradient) or raw map values
matter, pass the pre-sigmoid tensor as `output=` (`--output-name`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import OnnxcamError

# A flat index that selects nothing: the weights alone make W.
NO_INDEX = -2

FIELDS = ("objectness", "class")


@dataclass(frozen=True)
class ClassTarget:
    """Class `cls` of a classifier's (N, K) score: the same as passing the int."""

    cls: int


@dataclass(frozen=True)
class TopClass:
    """The class ranked `rank` by score (0: the top class, the same as None), found in the graph from the same
    run's scores: `top_classes(k)` lists the k highest for `explain(x, targets=[top_classes(5)])`."""

    rank: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 0:
            raise OnnxcamError(f"TopClass rank must be a non-negative integer, got {self.rank!r}")


def top_classes(k: int) -> list:
    """The k highest-scoring classes of each sample, as targets of one explain call."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise OnnxcamError(f"the number of top classes must be a positive integer, got {k!r}")
    return [TopClass(r) for r in range(int(k))]


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


@dataclass(frozen=True, eq=False)
class ScoreWeights:
    """W itself: an array shaped like one sample's score, y = <W, score>. `source`: the target it was made from
    (a FinerTarget with its class filled in), for describing it."""

    weights: np.ndarray
    source: object = None


@dataclass(frozen=True)
class FinerTarget:
    """Finer-CAM (Zhang et al., arXiv 2501.11309): class `cls` (None: the top class) against the `comparisons`
    classes whose logits are closest to it, y = sum_j p_j (z_c - alpha z_j) / (sum_j p_j + 1e-9) with p the
    softmax, as pytorch-grad-cam's FinerWeightedTarget. y is not linear in the logits, so W = dy/dz is taken at
    the sample's own logits (from a forward first): one backward, and the map explains what sets c apart from
    the classes it is most easily confused with."""

    cls: int | None = None
    comparisons: int = 3
    alpha: float = 1.0

    def __post_init__(self):
        if isinstance(self.comparisons, bool) or not isinstance(self.comparisons, (int, np.integer)) \
                or self.comparisons < 1:
            raise OnnxcamError(f"Finer-CAM compares with a positive number of classes, got {self.comparisons!r}")


def finer_weights(z: np.ndarray, t: FinerTarget) -> np.ndarray:
    """dy/dz of Finer-CAM's score at the logits z (K,), in float64 (see FinerTarget)."""
    z = np.asarray(z, np.float64).reshape(-1)
    k = z.size
    c = int(np.argmax(z)) if t.cls is None else t.cls
    if not 0 <= c < k:
        raise OnnxcamError(f"target {c} is out of range: the score has {k} classes (0..{k - 1})")
    if k < 2:
        raise OnnxcamError("Finer-CAM compares the target with other classes; the score has one")
    order = np.argsort(np.abs(z - z[c]), kind="stable")
    others = [int(j) for j in order if j != c][:t.comparisons]
    p = np.exp(z - z.max())
    p /= p.sum()
    dp = np.diag(p) - np.outer(p, p)  # dp_j/dz_k
    diff = np.array([z[c] - t.alpha * z[j] for j in others])
    numerator = float(np.dot(p[others], diff))
    denominator = float(p[others].sum()) + 1e-9
    d_num = dp[others].T @ diff  # through the weights p_j
    d_num[c] += p[others].sum()
    for j in others:
        d_num[j] -= t.alpha * p[j]
    d_den = dp[others].sum(axis=0)
    return (d_num * denominator - numerator * d_den) / denominator ** 2


@dataclass(frozen=True)
class ReSTTarget:
    """ReST (Cai et al., arXiv 2501.06261, ShapleyCAM's target): y = z_c - CE(z, c) = z_c + log p_c, the logit
    and the log-probability of class `cls` (None: the top class), as pytorch-grad-cam's ClassifierOutputReST.
    Like FinerTarget, W = dy/dz = 2 e_c - p is taken at the sample's own logits."""

    cls: int | None = None


def _softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max())
    return p / p.sum()


def rest_weights(z: np.ndarray, t: ReSTTarget) -> np.ndarray:
    """dy/dz of the ReST score at the logits z (K,), float64."""
    z = np.asarray(z, np.float64).reshape(-1)
    c = int(np.argmax(z)) if t.cls is None else t.cls
    if not 0 <= c < z.size:
        raise OnnxcamError(f"target {c} is out of range: the score has {z.size} classes (0..{z.size - 1})")
    w = -_softmax(z)
    w[c] += 2.0
    return w


def hessian_vector(t, z: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """(d^2 y / dz^2) v for a resolved target at the score z (both shaped like one sample's score); None where y
    is linear in the score (class, index, region, box and given-weights targets: their second derivative is 0)."""
    source = t.source if isinstance(t, ScoreWeights) else t
    z64, v64 = np.asarray(z, np.float64).reshape(-1), np.asarray(v, np.float64).reshape(-1)
    if isinstance(source, ReSTTarget):  # y = 2 z_c - logsumexp(z): H = -(diag p - p p^T)
        p = _softmax(z64)
        return (-(p * v64) + p * np.dot(p, v64)).reshape(np.shape(z))
    if isinstance(source, FinerTarget):  # central differences of the exact gradient, in float64
        eps = 1e-5 / max(float(np.abs(v64).max()), 1e-12)
        return ((finer_weights(z64 + eps * v64, source) - finer_weights(z64 - eps * v64, source))
                / (2 * eps)).reshape(np.shape(z))
    return None


Target = (ClassTarget, TopClass, IndexTarget, RegionTarget, DetectionTarget, FinerTarget, ReSTTarget, ScoreWeights)
ARGMAX = -1  # the flat index that means the score's largest element


def classic(items: Sequence) -> bool:
    """Class indices only (None: the argmax): the Explanation keeps the classifier's form ((N, K) scores, int
    targets)."""
    return all(t is None or type(t) in (ClassTarget, TopClass) for t in items)


def ranked(items: Sequence) -> bool:
    """Whether some target is a class below the top one, which only the ranked graph finds."""
    return any(isinstance(t, TopClass) and t.rank > 0 for t in items)


def is_list(t) -> bool:
    return isinstance(t, (list, tuple)) or (isinstance(t, np.ndarray) and t.ndim >= 1)


def per_sample_lists(targets, n: int) -> list[list] | None:
    """Several targets per sample (`[[3, 7, 9], [1, 2, 4]]`, one list for the whole batch, or
    `top_classes(k)`): n lists of the same length; None when `targets` gives one target per sample."""
    if isinstance(targets, np.ndarray) and targets.ndim == 2:
        lists = [list(row) for row in targets]
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, TopClass) for t in targets) \
            and len(targets) > 1:
        lists = [list(targets)]  # top_classes(k): the same k ranks for every sample
    elif isinstance(targets, (list, tuple)) and targets and any(is_list(t) for t in targets):
        if not all(is_list(t) for t in targets):
            raise OnnxcamError("targets mix single targets and lists; give every sample a list (or none a list)")
        lists = [list(t) for t in targets]
    else:
        return None
    if len(lists) == 1:
        lists = lists * n
    if len(lists) != n:
        raise OnnxcamError(f"got {len(lists)} target lists for a batch of {n}")
    sizes = {len(row) for row in lists}
    if 0 in sizes:
        raise OnnxcamError("a sample's target list is empty")
    if len(sizes) > 1:
        raise OnnxcamError(f"every sample needs the same number of targets; got lists of {sorted(sizes)}")
    out = [per_sample(row, len(row)) for row in lists]
    if not all(classic(row) for row in out):
        raise OnnxcamError("several targets per sample take class indices, labels or TopClass; explain region, "
                           "box and index targets one per call")
    return out


def per_sample(targets, n: int) -> list:
    """One target per sample: None (the argmax), a ClassTarget for every integer, or a target object; a single
    target is repeated for the batch."""
    if targets is None or isinstance(targets, (*Target, int, np.integer, float, np.floating)):
        items = [targets]
    elif isinstance(targets, np.ndarray):
        items = list(targets.reshape(-1))
    else:
        items = list(targets)
    out = []
    for t in items:
        if isinstance(t, (float, np.floating)):
            if not float(t).is_integer():
                raise OnnxcamError(f"targets must be integers, got {t!r}")
            t = int(t)
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            t = ClassTarget(int(t))
        if t is not None and not isinstance(t, Target):
            raise OnnxcamError(f"unsupported target {t!r}: use an int, a class label, ClassTarget, IndexTarget, "
                               f"RegionTarget or DetectionTarget")
        out.append(t)
    if len(out) == 1:
        out = out * n
    if len(out) != n:
        raise OnnxcamError(f"got {len(out)} targets for a batch of {n}")
    return out


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
        elif isinstance(t, DetectionTarget) and t.cls is None and t.field_for(sc.shape) == "class" \
                and t.fields(sc.shape)[0] == "yolov5":  # the box's best class: fields are its last axis
            layout, _, first = t.fields(sc.shape)
            if 0 <= t.box < sc.shape[0]:
                t = DetectionTarget(t.box, "class", int(np.argmax(sc[t.box, first:])), t.objectness,
                                    t.first_class, layout)
        elif isinstance(t, FinerTarget):
            cls = int(np.argmax(sc)) if t.cls is None else t.cls
            t = ScoreWeights(finer_weights(sc, t).reshape(sc.shape), FinerTarget(cls, t.comparisons, t.alpha))
        elif isinstance(t, ReSTTarget):
            cls = int(np.argmax(sc)) if t.cls is None else t.cls
            t = ScoreWeights(rest_weights(sc, t).reshape(sc.shape), ReSTTarget(cls))
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
    return any((isinstance(t, DetectionTarget) and (t.box is None or (
                   t.cls is None and len(shape) == 2 and t.field_for(shape) == "class"
                   and t.fields(shape)[0] == "yolov5")))
               or (isinstance(t, RegionTarget) and t.mask is None and len(shape) >= 2 and shape[0] == 1)
               or isinstance(t, (FinerTarget, ReSTTarget))
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


@dataclass
class Plan:
    """A batch of targets as the fused graph's target inputs (onnxcam/cam/build.py): `index` (N,) int64, the
    flat element whose one-hot is W (ARGMAX: the score's largest, NO_INDEX: none); `weights` (N, *S) float added to it;
    `select`/`group` (N, *S) bool for weights made from the same run's scores. None: all zero. `rank` (N,)
    int64: which class ARGMAX stands for, by score (0: the top one; the ranked graph only)."""

    index: np.ndarray
    weights: np.ndarray | None = None
    select: np.ndarray | None = None
    group: np.ndarray | None = None
    rank: np.ndarray | None = None


def plan(items: Sequence, shape: tuple | None) -> Plan:
    """Graph inputs for per-sample targets over a score of per-sample shape `shape` (None: not known, possible
    when every target is a class index; the range is then checked on the scores after the run)."""
    n = len(items)
    shape = None if shape is None else tuple(int(d) for d in shape)
    size = None if shape is None else (int(np.prod(shape)) if shape else 1)
    index = np.full(n, NO_INDEX, np.int64)
    weights = select = group = rank = None
    for s, t in enumerate(items):
        at = None
        if t is None:
            index[s] = ARGMAX
            continue
        if isinstance(t, TopClass):
            if size is not None and t.rank >= size:
                raise OnnxcamError(f"top class rank {t.rank} is out of range: the score has {size} classes")
            index[s] = ARGMAX
            if t.rank:
                rank = np.zeros(n, np.int64) if rank is None else rank
                rank[s] = t.rank
            continue
        if isinstance(t, ClassTarget):
            if t.cls < 0 or (size is not None and t.cls >= size):
                raise OnnxcamError(f"target {t.cls} is out of range: the score has {size} classes (0..{size - 1})"
                                   if size is not None else f"target {t.cls} is out of range")
            index[s] = t.cls
            continue
        if shape is None:
            raise OnnxcamError("the score's shape is needed for this target")  # the Explainer always gives it
        if isinstance(t, IndexTarget):
            at = _flat(t.index, shape, "index")
        elif isinstance(t, DetectionTarget):
            fixed = _detection_index(t, shape)
            if fixed is not None:
                at = _flat(fixed, shape, "box field")
            else:  # the box's best class, in the graph: an argmax over axis 1, the ultralytics fields axis
                layout, _, first = t.fields(shape)
                if layout != "ultralytics":
                    raise OnnxcamError("a YOLOv5 box's best class is found from the scores first "
                                       "(resolve_data_dependent)")
                select = np.zeros((n, *shape), bool) if select is None else select
                group = np.zeros((n, *shape), bool) if group is None else group
                select[s, first:, t.box] = group[s, first:, t.box] = True
        elif isinstance(t, ScoreWeights):
            w = np.asarray(t.weights, np.float32)
            if w.size != size:
                raise OnnxcamError(f"score weights have {w.size} elements; one sample's score has {size}")
            weights = np.zeros((n, *shape), np.float32) if weights is None else weights
            weights[s] = w.reshape(shape)
        elif isinstance(t, (FinerTarget, ReSTTarget)):
            raise OnnxcamError("a Finer-CAM or ReST target is weighted from the scores first "
                               "(resolve_data_dependent)")
        elif isinstance(t, RegionTarget):
            if len(shape) < 2:
                raise OnnxcamError(f"a region target needs an (N, classes, *spatial) output; this one is "
                                   f"(N, {', '.join(map(str, shape))})")
            if not 0 <= t.cls < shape[0]:
                raise OnnxcamError(f"region class {t.cls} is out of range: the output has {shape[0]} classes "
                                   f"(0..{shape[0] - 1})")
            if t.mask is None:  # the predicted mask: argmax over the class axis, in the graph
                select = np.zeros((n, *shape), bool) if select is None else select
                group = np.zeros((n, *shape), bool) if group is None else group
                select[s, t.cls] = True
                group[s] = True
            else:
                weights = np.zeros((n, *shape), np.float32) if weights is None else weights
                weights[s, t.cls] = resize_mask(t.mask, shape[1:])
        if at is not None:
            index[s] = at
    return Plan(index=index, weights=weights, select=select, group=group, rank=rank)


def describe(t) -> str:
    """A short label for a target (CLI output)."""
    if isinstance(t, ClassTarget):
        return f"class {t.cls}"
    if isinstance(t, TopClass):
        return "top class" if t.rank == 0 else f"class ranked {t.rank + 1}"
    if isinstance(t, IndexTarget):
        return "index (" + ",".join(map(str, t.index)) + ")"
    if isinstance(t, FinerTarget):
        return (f"{'top class' if t.cls is None else f'class {t.cls}'} vs its {t.comparisons} closest classes "
                f"(Finer-CAM)")
    if isinstance(t, ReSTTarget):
        return f"{'top class' if t.cls is None else f'class {t.cls}'} logit + log-probability (ReST)"
    if isinstance(t, ScoreWeights):
        return describe(t.source) if t.source is not None else "weighted score"
    if isinstance(t, RegionTarget):
        return f"region of class {t.cls} ({'predicted mask' if t.mask is None else 'mask'})"
    if isinstance(t, DetectionTarget):
        what = t.field or "box score" if t.field != "class" else ("top class" if t.cls is None else f"class {t.cls}")
        return f"{'top box' if t.box is None else f'box {t.box}'} {what}"
    return str(t)


__all__ = ["ClassTarget", "TopClass", "top_classes", "FinerTarget", "ReSTTarget", "ScoreWeights", "finer_weights",
           "rest_weights", "hessian_vector", "IndexTarget", "RegionTarget", "DetectionTarget", "Plan", "plan", "resize_mask",
           "describe"]
