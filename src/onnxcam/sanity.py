"""Sanity checks for saliency maps (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018), on any
ONNX model: does a method's map change when the model's weights are replaced by random ones, and when another
class is explained?

* `parameter_randomization(model, images, methods, mode="cascading")`: the weight-bearing nodes on the path to
  the score are randomised from the score backwards, cumulatively (after step k the top k nodes are random);
  `mode="independent"` randomises one node at a time, the rest trained.
* `random_logit(model, images, methods)`: the map of the explained class against that of a random other class.

Because onnxcam owns the graph, randomising is a graph edit: a copy of the ModelProto with some initializers
replaced, and a new Explainer on it. A map that stays similar to the trained model's while the weights it is
supposed to explain are noise is not explaining the model (edge detectors pass the input through).

Similarity of the trained model's map `a` and the randomised model's `b`, per image (docs/evaluation.md):
Spearman rank correlation of the signed maps and of their absolute values, SSIM (skimage) and the Pearson
correlation of HOG descriptors (skimage), the latter two on |map| min-max scaled to [0, 1]. CAM methods give
non-negative heatmaps (signed = absolute); pixel methods (guided backprop, deconvnet, guided Grad-CAM) give
the input gradient, summed over channels (signed) or its absolute value summed over channels.

scipy and scikit-image are needed here only (imported when a check runs), not by the rest of onnxcam.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .cam import methods as methods_mod
from .errors import OnnxcamError
from .images import preprocess, render
from .model import select
from .model.graph import ModelView, ancestors, load_model
from .run.explainer import Explainer

MODES = ("cascading", "independent", "logit")
METRICS = ("spearman", "spearman_abs", "ssim", "hog")
METRIC_TITLES = {"spearman": "Spearman", "spearman_abs": "Spearman |map|", "ssim": "SSIM",
                 "hog": "HOG Pearson"}
# Input positions that hold learnt parameters, per op. Not randomised: BatchNormalization's running mean and
# variance (statistics of the data, not parameters the paper re-initialises), Clip bounds, Pad amounts,
# Reshape shapes and other constants that define the architecture rather than what it learnt.
WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,),
}
# A MatMul's bias is a separate Add (torch exports Linear on 3-D inputs so); it belongs to the MatMul's step.
BIAS_OPS = ("Add",)
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Step:
    """One weight-bearing node: its name (or its first output when unnamed), op and the initializers randomised
    with it."""
    node: str
    op: str
    initializers: tuple

    def label(self) -> str:
        return f"{self.node} ({self.op})"


# ----------------------------------------------------------------------------- the graph edit


def weight_steps(model) -> list[Step]:
    """The weight-bearing nodes that feed the model's score, from the score backwards (reverse topological
    order: the first randomised in a cascade is the last layer). An initializer shared by several nodes belongs
    to the first of them in this order."""
    m = load_model(model)
    view = ModelView(m)
    score = select.find_score(view)
    needed = ancestors(view, [score])
    floats = {t.name for t in m.graph.initializer if t.data_type in FLOAT_TYPES}
    steps, taken = [], set()
    for node in reversed(list(m.graph.node)):
        if node.op_type not in WEIGHT_INPUTS or not any(o in needed for o in node.output):
            continue
        names = [node.input[i] for i in WEIGHT_INPUTS[node.op_type] if i < len(node.input)]
        if node.op_type == "MatMul" and len(node.output) == 1:
            for consumer in view.consumers.get(node.output[0], []):
                if consumer.op_type in BIAS_OPS:
                    names += [i for i in consumer.input if i in floats]
        names = [n for n in dict.fromkeys(names) if n in floats and n not in taken]
        if names:
            taken.update(names)
            steps.append(Step(node.name or node.output[0], node.op_type, tuple(names)))
    if not steps:
        raise OnnxcamError("the model has no weight-bearing node (Conv, ConvTranspose, Gemm, MatMul, "
                           "normalisation) with its weights in initializers; nothing to randomise")
    return steps


def random_like(tensor: onnx.TensorProto, rng: np.random.Generator) -> onnx.TensorProto:
    """A tensor of the same name, shape and dtype drawn from N(0, s^2), s = the original's standard deviation
    (its root mean square when it is constant, e.g. a normalisation scale of ones; all zeros stay zeros)."""
    try:
        a = numpy_helper.to_array(tensor)
    except Exception:
        raise OnnxcamError(f"cannot read initializer '{tensor.name}' (external data?); sanity checks need the "
                           f"weights in memory") from None
    values = a.astype(np.float64)
    s = float(values.std()) if values.size else 0.0
    if not s > 0:
        s = float(np.sqrt(np.mean(values ** 2))) if values.size else 0.0
    new = rng.normal(0.0, s, a.shape) if s > 0 else np.zeros(a.shape)
    if tensor.data_type == onnx.TensorProto.BFLOAT16:  # numpy has no bfloat16: built through float32
        out = numpy_helper.from_array(new.astype(np.float32), tensor.name)
        return onnx.helper.make_tensor(tensor.name, onnx.TensorProto.BFLOAT16, a.shape,
                                       numpy_helper.to_array(out).ravel().tolist())
    return numpy_helper.from_array(new.astype(a.dtype), tensor.name)


def randomize(model, steps: Sequence[Step], seed: int = 0, order: Sequence[Step] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose initializers of `steps` are random (`random_like`); the given model is left as it
    was. Each initializer's draw depends only on `seed` and its node's place in `order` (default: `steps`), so
    a node gets the same random weights whichever other nodes are randomised with it."""
    m = load_model(model)
    order = list(order if order is not None else steps)
    index = {s.node: i for i, s in enumerate(order)}
    replace = {}
    for s in steps:
        if s.node not in index:
            raise OnnxcamError(f"node '{s.node}' is not one of the model's weight-bearing nodes")
        for j, name in enumerate(s.initializers):
            replace[name] = (index[s.node], j)
    for i, t in enumerate(m.graph.initializer):
        if t.name in replace:
            rng = np.random.default_rng([seed, *replace[t.name]])
            m.graph.initializer[i].CopyFrom(random_like(t, rng))
    return m


# ----------------------------------------------------------------------------- similarity


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _defined(a, b) -> bool:
    return bool(np.ptp(a) > 0 and np.ptp(b) > 0)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps (scipy.stats.spearmanr); 0 when one is constant: a map with no ranking
    shares none with the other."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    return float(spearmanr(a, b).statistic) if _defined(a, b) else 0.0


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (skimage.metrics.structural_similarity) of two maps, each min-max scaled to [0, 1]."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_minmax(a), _minmax(b), data_range=1.0))


HOG_OPTIONS = dict(orientations=9, pixels_per_cell=(8, 8), cells_per_block=(3, 3))  # skimage's defaults


def hog_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the HOG descriptors (skimage.feature.hog) of two maps scaled to [0, 1]; 0 when a
    descriptor is constant (a flat map has no gradients), NaN for maps under 24 px (no HOG block fits)."""
    from skimage.feature import hog

    if min(np.shape(a)) < HOG_OPTIONS["pixels_per_cell"][0] * HOG_OPTIONS["cells_per_block"][0]:
        return math.nan
    ha, hb = hog(_minmax(a), **HOG_OPTIONS), hog(_minmax(b), **HOG_OPTIONS)
    return float(np.corrcoef(ha, hb)[0, 1]) if _defined(ha, hb) else 0.0


def similarity(signed_a, abs_a, signed_b, abs_b) -> dict:
    """The four similarities of one pair of maps (METRICS)."""
    return {"spearman": rank_correlation(signed_a, signed_b), "spearman_abs": rank_correlation(abs_a, abs_b),
            "ssim": ssim(abs_a, abs_b), "hog": hog_similarity(abs_a, abs_b)}


# ----------------------------------------------------------------------------- maps


def check_methods(methods: Sequence[str]) -> list[str]:
    """The canonical names of `methods`; the controls of onnxcam evaluate and unknown names fail."""
    if isinstance(methods, str):
        methods = [methods]
    names = []
    for m in methods:
        if m in ("random", "center"):
            raise OnnxcamError(f"'{m}' is a control of onnxcam evaluate, not a method of the model: it has no "
                               "weights to randomise")
        names.append(methods_mod.get_method(m).name)
    if not names:
        raise OnnxcamError("no method given")
    return list(dict.fromkeys(names))


def _inputs(ex: Explainer, images, preprocessing: dict) -> np.ndarray:
    """A batch in the model's layout: an array as given, or paths / PIL images preprocessed as `explain` does."""
    if isinstance(images, np.ndarray):
        x = np.asarray(images, np.float32)
        if x.ndim != len(ex.input_shapes[ex.image_input]):
            raise OnnxcamError(f"images must be a batch of rank {len(ex.input_shapes[ex.image_input])} in the "
                               f"model's layout, got shape {x.shape}")
        return x
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    images = list(images)
    if not images:
        raise OnnxcamError("no images given")
    pp = ex.preprocessing(**{k: v for k, v in preprocessing.items() if v is not None})
    return np.concatenate([preprocess.to_tensor(preprocess.load_image(im), pp) for im in images]).astype(np.float32)


def explain_maps(ex: Explainer, x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed, absolute, explained targets): (N, H, W) maps of a batch. CAM methods: the heatmap (both);
    pixel methods: the input gradient summed over channels, signed and absolute."""
    batch = ex.input_shapes[ex.image_input][0]
    parts = [slice(i, i + 1) for i in range(len(x))] if isinstance(batch, int) else [slice(0, len(x))]
    signed, absolute, done = [], [], []
    channel_axis = -1 if ex.layout == "NHWC" else 1
    for part in parts:
        r = ex.explain(np.ascontiguousarray(x[part]), None if targets is None else targets[part])
        if ex.method_info.kind == "pixel":
            g = np.asarray(r.guided, np.float64)
            signed.append(g.sum(axis=channel_axis))
            absolute.append(np.abs(g).sum(axis=channel_axis))
        else:
            h = np.asarray(r.heatmaps, np.float64)
            signed.append(h)
            absolute.append(h)
        done.append(np.asarray(r.targets, np.int64).reshape(-1))
    return np.concatenate(signed), np.concatenate(absolute), np.concatenate(done)


def _cascade_depths(n: int, steps: int | None) -> list[int]:
    """Cascade depths 1..n; `steps` of them spaced geometrically (the first layers change most), n always
    included."""
    if steps is None or steps >= n:
        return list(range(1, n + 1))
    if steps < 1:
        raise OnnxcamError(f"steps must be positive, got {steps}")
    if steps == 1:
        return [n]
    depths = sorted({int(round(v)) for v in np.geomspace(1, n, steps)})
    k = 2
    while len(depths) < steps:  # rounding merged neighbours: fill with the first depths not yet taken
        depths = sorted(set(depths) | {k})
        k += 1
    return depths


def _independent_nodes(n: int, steps: int | None) -> list[int]:
    if steps is None or steps >= n:
        return list(range(n))
    if steps < 1:
        raise OnnxcamError(f"steps must be positive, got {steps}")
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, steps)})


# ----------------------------------------------------------------------------- results


@dataclass
class SanityResult:
    """`values[metric]`: (methods, steps, images). For cascading, step k's label is the node randomised last
    (all above it are random too); for independent, the only node randomised; for logit, one step."""
    mode: str
    methods: list
    steps: list  # labels, one per step
    depths: list  # cascading: nodes randomised at each step; independent: the node's rank from the score
    total: int  # weight-bearing nodes of the model (0 for logit)
    values: dict
    targets: np.ndarray
    other_targets: np.ndarray | None = None  # logit: the random classes
    examples: dict = field(default_factory=dict, repr=False)  # method -> (1 + steps, H, W) |map| of image 0

    def mean(self, metric: str = "spearman_abs") -> np.ndarray:
        """(methods, steps): the mean over images (images whose value is NaN left out)."""
        v = self.values[metric]
        with np.errstate(invalid="ignore"):
            counts = np.sum(np.isfinite(v), axis=2)
            sums = np.nansum(v, axis=2)
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def _step_names(self) -> list[str]:
        if self.mode == "logit":
            return ["random class"]
        return [str(d) if self.mode == "cascading" else f"#{d}" for d in self.depths]

    def table(self, metrics: Sequence[str] = METRICS) -> str:
        """One block per metric: a row per method, a column per step (mean over images), then what each step
        randomised."""
        width = max([6] + [len(m) for m in self.methods])
        n = self.values[METRICS[0]].shape[2]
        if self.mode == "logit":
            head = f"{'method':<{width}}" + "".join(f"  {METRIC_TITLES[m]:>14}" for m in metrics)
            lines = [f"random-logit test on {n} image(s): similarity of the explained class's map to a random "
                     "other class's (lower is better)", head, "-" * len(head)]
            for i, method in enumerate(self.methods):
                lines.append(f"{method:<{width}}" + "".join(f"  {_fmt(self.mean(m)[i, 0]):>14}" for m in metrics))
            return "\n".join(lines)
        cols = self._step_names()
        what = ("after step k the k weight-bearing nodes nearest the score are random" if self.mode == "cascading"
                else "step #k randomises only the k-th weight-bearing node from the score")
        lines = [f"model parameter randomisation ({self.mode}, {self.total} weight-bearing nodes, {n} image(s)): "
                 f"similarity of each map to the trained model's ({what}; lower is better)"]
        for metric in metrics:
            head = f"{METRIC_TITLES[metric]:<{width}}" + "".join(f"  {c:>6}" for c in cols)
            lines += ["", head, "-" * len(head)]
            means = self.mean(metric)
            for i, method in enumerate(self.methods):
                lines.append(f"{method:<{width}}" + "".join(f"  {_fmt(v):>6}" for v in means[i]))
        lines += ["", "steps:"] + [f"  {c}: {label}" for c, label in zip(cols, self.steps)]
        return "\n".join(lines)

    def markdown(self, metric: str = "spearman_abs", columns: Sequence[int] | None = None) -> str:
        """A markdown table of `metric`: a row per method, a column per step (or the steps at `columns`)."""
        idx = list(range(len(self.steps))) if columns is None else list(columns)
        names = self._step_names()
        head = "| method | " + " | ".join(names[i] for i in idx) + " |"
        lines = [head, "|---|" + "---:|" * len(idx)]
        means = self.mean(metric)
        for i, method in enumerate(self.methods):
            lines.append(f"| `{method}` | " + " | ".join(_fmt(means[i, j]) for j in idx) + " |")
        return "\n".join(lines)

    def rows(self) -> list[dict]:
        """One record per method, step and image."""
        out = []
        for i, method in enumerate(self.methods):
            for j, label in enumerate(self.steps):
                for k in range(self.values[METRICS[0]].shape[2]):
                    row = {"mode": self.mode, "method": method, "step": j + 1, "randomised": label,
                           "depth": self.depths[j] if self.depths else None, "image": k,
                           "target": int(self.targets[k])}
                    if self.other_targets is not None:
                        row["other_target"] = int(self.other_targets[k])
                    for m in METRICS:
                        v = float(self.values[m][i, j, k])
                        row[m] = v if math.isfinite(v) else None
                    out.append(row)
        return out

    def write(self, path: str | os.PathLike) -> None:
        """The per-image records as .csv or .json."""
        p = Path(path)
        rows = self.rows()
        if p.suffix.lower() == ".json":
            text = json.dumps({"mode": self.mode, "methods": self.methods, "steps": self.steps,
                               "summary": {m: {method: [None if not math.isfinite(v) else float(v) for v in row]
                                               for method, row in zip(self.methods, self.mean(m))}
                                           for m in METRICS},
                               "results": rows}, indent=1) + "\n"
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
            text = buf.getvalue()
        # Written to a new file then renamed: a hard link to an input is left as it was.
        render.atomic_write(p, lambda fh: fh.write(text.encode()))

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """A PNG: one panel per similarity metric, mean over images against the step, a line per method
        (matplotlib when installed, else a plainer PIL drawing)."""
        p = Path(path)
        if p.suffix.lower() != ".png":
            raise OnnxcamError(f"plot {p} must be a .png file")
        try:
            import matplotlib
        except ImportError:
            matplotlib = None
        try:
            if matplotlib is not None:
                self._plot_matplotlib(p, title)
            else:
                self._plot_pil(p, title)
        except OSError as exc:
            raise OnnxcamError(f"cannot write {p}: {exc.strerror or exc}") from None

    def _plot_matplotlib(self, path: Path, title) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8), squeeze=False)
        x = np.arange(len(self.steps))
        for ax, metric in zip(axes[0], METRICS):
            means = self.mean(metric)
            for i, method in enumerate(self.methods):
                ax.plot(x, means[i], marker="o", ms=3, label=method,
                        ls="--" if methods_mod.get_method(method).kind == "pixel" else "-")
            ax.set_xticks(x, self._step_names(), rotation=90 if len(x) > 12 else 0, fontsize=7)
            ax.set_title(METRIC_TITLES[metric])
            ax.set_ylim(-0.5 if metric.startswith("spearman") or metric == "hog" else 0, 1.02)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel({"cascading": "nodes randomised (from the score)", "independent": "node randomised",
                           "logit": ""}[self.mode])
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(title or f"{self.mode} randomisation: similarity to the trained model's map")
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)

    def _plot_pil(self, path: Path, title) -> None:
        from PIL import Image, ImageDraw

        w, h, pad = 320, 260, 40
        img = Image.new("RGB", (w * len(METRICS) + 180, h + 40), "white")
        d = ImageDraw.Draw(img)
        d.text((10, 5), title or f"{self.mode} randomisation", fill="black")
        colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                   (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200),
                   (200, 90, 90)]
        n = max(len(self.steps) - 1, 1)
        for panel, metric in enumerate(METRICS):
            x0, y0 = panel * w + pad, 30
            d.rectangle([x0, y0, x0 + w - 2 * pad, y0 + h - pad], outline="black")
            d.text((x0, y0 + h - pad + 5), METRIC_TITLES[metric], fill="black")

            def xy(j, v):
                return (x0 + j / n * (w - 2 * pad), y0 + (1 - (v + 0.5) / 1.5) * (h - pad))
            for i, row in enumerate(self.mean(metric)):
                pts = [xy(j, v) for j, v in enumerate(row) if math.isfinite(v)]
                if len(pts) > 1:
                    d.line(pts, fill=colours[i % len(colours)], width=2)
        for i, method in enumerate(self.methods):
            d.text((len(METRICS) * w + 5, 30 + 14 * i), method, fill=colours[i % len(colours)])
        img.save(path)


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.2f}"


# ----------------------------------------------------------------------------- the checks


def _require_libraries() -> None:
    try:
        import scipy.stats  # noqa: F401
        import skimage.feature  # noqa: F401
        import skimage.metrics  # noqa: F401
    except ImportError as exc:
        raise OnnxcamError(f"sanity checks need scipy and scikit-image ({exc}); pip install scikit-image") from None


def step_count(model, mode: str = "cascading", steps: int | None = None) -> int:
    """How many randomised models `parameter_randomization` explains per method (1 for the logit test)."""
    if mode == "logit":
        return 1
    n = len(weight_steps(model))
    return len(_cascade_depths(n, steps) if mode == "cascading" else _independent_nodes(n, steps))


def _prepare(model, images, methods, targets, layer, preprocessing, providers, rise=None):
    _require_libraries()
    source = load_model(model)  # private copy: nothing below touches the caller's model
    names = check_methods(methods)
    first = _explainer(source, names[0], layer, providers, rise)
    x = _inputs(first, images, preprocessing or {})
    if targets is not None:
        t = np.asarray([-1 if v is None else v for v in np.atleast_1d(np.asarray(targets, object))], object)
        if len(t) != len(x):
            raise OnnxcamError(f"{len(t)} targets for {len(x)} images")
        if any(v == -1 for v in t):  # unlabelled images explain the model's top class
            top = np.argmax(_scorer(first, source).explain(x).scores.reshape(len(x), -1), axis=1)
            t = np.where(t == -1, top, t)
        targets = t.astype(np.int64)
    return source, names, first, x, targets


def _layers(first: Explainer, layer):
    """The layer(s) every method explains: the first method's choice (RISE has none: the user's, or automatic)."""
    return layer if first.method == "rise" else list(first.layers)


def _explainer(model, method: str, layers, providers, rise=None) -> Explainer:
    """`rise`: RISE's options (onnxcam.cam.perturb.RiseOptions or a dict), for method "rise" only."""
    if methods_mod.get_method(method).name == "rise":
        return Explainer(model, method=method, providers=providers, rise=rise)
    return Explainer(model, layer=layers, method=method, providers=providers)


def _scorer(first: Explainer, source) -> Explainer:
    """An Explainer whose explain() gives the scores cheaply: Score-CAM / Ablation-CAM would run their
    hundreds of perturbed forwards just to read them."""
    if first.method_info.kind != "perturbation":
        return first
    return Explainer(source, layer=_layers(first, None), method="eigencam", providers=first.providers)


def parameter_randomization(model, images, methods: Sequence[str] = ("gradcam",), mode: str = "cascading",
                            seed: int = 0, steps: int | None = None, targets=None, layer=None,
                            preprocessing: dict | None = None, providers=None, progress=None,
                            rise=None) -> SanityResult:
    """Adebayo et al.'s model-parameter randomisation test. `images`: an array in the model's layout or image
    paths / PIL images (preprocessed from the model's metadata, overridden by `preprocessing`). `targets`: the
    class per image (None: the trained model's top class), kept through every step. `steps`: None runs every
    weight-bearing node; K runs K cascade depths spaced geometrically from 1 to all (cascading) or K nodes
    spread evenly from the score to the input (independent). `layer`: the explained layer (default: the
    trained model's automatic choice, kept for every step; RISE has none). `progress(1)` is called per method and
    step. `rise`: RISE's options (masks, cells, p, seed), the same masks at every step."""
    if mode not in ("cascading", "independent"):
        raise OnnxcamError(f"unknown randomisation mode '{mode}'; use cascading or independent")
    source, names, first, x, targets = _prepare(model, images, methods, targets, layer, preprocessing, providers,
                                                rise)
    order = weight_steps(source)
    layers = _layers(first, layer)
    if mode == "cascading":
        depths = _cascade_depths(len(order), steps)
        plans = [order[:d] for d in depths]
        labels = [order[d - 1].label() for d in depths]
    else:
        idx = _independent_nodes(len(order), steps)
        depths = [i + 1 for i in idx]
        plans = [[order[i]] for i in idx]
        labels = [order[i].label() for i in idx]
    values = {m: np.full((len(names), len(plans), len(x)), np.nan) for m in METRICS}
    examples = {}
    for i, method in enumerate(names):
        ex = first if method == names[0] else _explainer(source, method, layers, providers, rise)
        sa, aa, done = explain_maps(ex, x, targets)
        if targets is None:
            targets = done
        shots = [aa[0]]
        for j, plan in enumerate(plans):
            rex = _explainer(randomize(source, plan, seed, order), method, layers, providers, rise)
            sb, ab, _ = explain_maps(rex, x, targets)
            for k in range(len(x)):
                for metric, v in similarity(sa[k], aa[k], sb[k], ab[k]).items():
                    values[metric][i, j, k] = v
            shots.append(ab[0])
            if progress is not None:
                progress(1)
        examples[method] = np.stack(shots)
    return SanityResult(mode, names, labels, depths, len(order), values, targets, examples=examples)


def random_logit(model, images, methods: Sequence[str] = ("gradcam",), seed: int = 0, targets=None, layer=None,
                 preprocessing: dict | None = None, providers=None, progress=None, rise=None) -> SanityResult:
    """Adebayo et al.'s data-randomisation companion on a trained model: each image's map for its class (label
    or top class) against the map for a random other class (uniform, from `seed`). A method whose two maps
    agree does not depend on the class it is asked about."""
    source, names, first, x, targets = _prepare(model, images, methods, targets, layer, preprocessing, providers,
                                                rise)
    layers = _layers(first, layer)
    values = {m: np.full((len(names), 1, len(x)), np.nan) for m in METRICS}
    others = None
    examples = {}
    for i, method in enumerate(names):
        ex = first if method == names[0] else _explainer(source, method, layers, providers, rise)
        if others is None:
            scores = _scorer(first, source).explain(x).scores.reshape(len(x), -1)
            if targets is None:
                targets = np.argmax(scores, axis=1).astype(np.int64)
            k = scores.shape[1]
            if k < 2:
                raise OnnxcamError("the random-logit test needs a score with two classes or more")
            rng = np.random.default_rng(seed)
            # t + 1 + U{0..k-2} mod k: uniform over the k - 1 other classes
            others = np.asarray([(int(t) + 1 + int(rng.integers(k - 1))) % k for t in targets], np.int64)
        sa, aa, _ = explain_maps(ex, x, targets)
        sb, ab, _ = explain_maps(ex, x, others)
        for k_ in range(len(x)):
            for metric, v in similarity(sa[k_], aa[k_], sb[k_], ab[k_]).items():
                values[metric][i, 0, k_] = v
        examples[method] = np.stack([aa[0], ab[0]])
        if progress is not None:
            progress(1)
    return SanityResult("logit", names, ["random other class"], [], 0, values, targets, others, examples)
