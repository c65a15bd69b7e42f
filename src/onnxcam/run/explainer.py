"""The Python API: `Explainer(model).explain(inputs, targets)`."""
from __future__ import annotations

import difflib
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import onnx

from .runtime import ort  # first: says what to install when onnxruntime is missing
from ..autodiff import curvature
from ..cam import build, methods, perturb
from ..cam import targets as target_kinds
from ..errors import OnnxcamError
from ..images import preprocess, render
from ..images.labels import match_label
from ..model import layouts, select
from ..model.graph import ModelLike, ModelView, ensure_opset, infer_shapes, load_model, opset_version, prune
from . import precision as precisions
from .runtime import (explicit_gpu, first_line, make_session, ortvalue_dtype, require_finite, resolve_device,
                      session_device)


@dataclass
class Explanation:
    maps: np.ndarray  # (N, h, w) raw CAM at the (first) layer's resolution, after the ReLU
    heatmaps: np.ndarray  # (N, H, W) in [0, 1] at input resolution
    scores: np.ndarray  # (N, K) the score tensor (pre-softmax logits where the model has a softmax)
    targets: np.ndarray  # (N,) the class explained per sample
    layer: str = ""
    method: str = "gradcam"
    counterfactual: bool = False
    # Pixel-space methods: (N, *input dims) in the input's layout -- Guided Backprop / deconvnet
    # gradients, or Guided Grad-CAM for method="guided-gradcam".
    guided: np.ndarray | None = None
    maps_per_layer: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    # Target objects (onnxcam.targets): (N,) the differentiated scalar y = <W, score> per sample; `targets` then
    # holds the target objects and `scores` the score in the output's own shape.
    target_scores: np.ndarray | None = None
    # (N,) True where the explained score does not depend on the layer at all (its gradient is exactly zero):
    # the map is empty because the question has no answer at this layer, not because nothing matters.
    zero_gradient: np.ndarray | None = None
    # (N,) True where the map is all zero (zero gradient, or every position's weighted sum negative).
    empty: np.ndarray | None = None
    # One line per problem a user must see next to the map (the CLI prints them as warnings).
    warnings: list = field(default_factory=list)
    # Set by Explainer.explain so that the result can draw itself: the input's layout and the class names.
    layout: str = "NCHW"
    labels: list | None = field(default=None, repr=False)
    # Several targets per sample (explain(x, targets=[[3, 7, 9], ...]) or top_classes(k)): K, and `maps`,
    # `heatmaps`, `targets`, `zero_gradient`, `empty` (and each of `maps_per_layer`) are (N, K, ...); `scores`
    # stays (N, classes). None: one target per sample. `per_target(k)` is the k-th target's usual Explanation.
    targets_per_sample: int | None = None

    def per_target(self, k: int) -> "Explanation":
        """The explanation of each sample's k-th target, shaped as for one target per sample."""
        if self.targets_per_sample is None:
            if k != 0:
                raise OnnxcamError("this explanation has one target per sample (k = 0)")
            return self
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.targets_per_sample:
            raise OnnxcamError(f"target {k!r} is out of range: each sample has {self.targets_per_sample} targets")
        pick = (lambda a: None if a is None else np.asarray(a)[:, k])
        out = Explanation(maps=pick(self.maps), heatmaps=pick(self.heatmaps), scores=self.scores,
                          targets=pick(self.targets), layer=self.layer, method=self.method,
                          counterfactual=self.counterfactual, maps_per_layer=[pick(m) for m in self.maps_per_layer],
                          guided=pick(self.guided), zero_gradient=pick(self.zero_gradient), empty=pick(self.empty),
                          layout=self.layout, labels=self.labels)
        # per-target arrays have K on axis 1; the input and the decoded picture are the samples' own
        out.extras = {key: value[:, k] if key not in _SAMPLE_EXTRAS and isinstance(value, np.ndarray) else value
                      for key, value in self.extras.items()}
        marks = {f"sample {s} (target {t})" for s, t in enumerate(out.targets)}
        out.warnings = [w for w in self.warnings if w.split(":")[0] in marks]
        return out

    def overlay(self, i: int = 0, alpha: float = 0.5, max_side: int | None = None, k: int | None = None):
        """Sample i's heatmap in jet colours over its picture, as a PIL RGB image: the decoded photo for
        Explainer.explain_image, else the input tensor min-max scaled (onnxcam.render.tensor_image). `alpha`:
        weight of the colours (0: the picture, 1: the colours); `max_side` shrinks large pictures. `k`: which of
        the sample's targets, where it has several."""
        if self.targets_per_sample is not None:
            if k is None:
                raise OnnxcamError(f"each sample has {self.targets_per_sample} targets: pass k= to choose one")
            return self.per_target(k).overlay(i, alpha, max_side)
        n = len(self.heatmaps)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise OnnxcamError(f"sample {i!r} is out of range: the explanation has {n} sample(s)")
        i = int(i) % n
        heat = np.asarray(self.heatmaps[i])
        if heat.ndim != 2:
            raise OnnxcamError(f"overlay draws 2-D maps; this one has shape {heat.shape} (onnxcam.render.curve "
                               f"and render.slices draw 1-D and 3-D maps)")
        image = self.extras.get("image")
        if image is None or n != 1:
            x = self.extras.get("input")
            if x is None:
                raise OnnxcamError("this explanation holds no image to draw on (it was not made by "
                                   "Explainer.explain or explain_image)")
            image = render.tensor_image(np.asarray(x[i]), self.layout)
        return render.overlay(image, heat, alpha=alpha, max_side=max_side)

    def save(self, path, i: int = 0, alpha: float = 0.5, k: int | None = None):
        """Writes `overlay(i, alpha, k=k)` to `path` (PNG, or JPEG for .jpg/.jpeg) and returns the path."""
        render.save_png(self.overlay(i, alpha, k=k), path)
        return path

    def title(self, i: int = 0, k: int | None = None) -> str:
        """What sample i explains (its k-th target where it has several), e.g. 'coffee mug (504) - gradcam'."""
        if self.targets_per_sample is not None:
            return self.per_target(0 if k is None else k).title(i)
        t = self.targets[i]
        if isinstance(t, (int, np.integer)):
            k = int(t)
            name = self.labels[k] if self.labels is not None and 0 <= k < len(self.labels) else None
            text = f"{name} ({k})" if name else f"class {k}"
        else:
            text = target_kinds.describe(t)
        return f"{text} - {self.method}" + (" (counterfactual)" if self.counterfactual else "")

    def _repr_png_(self):
        # Jupyter's rich display: the overlay with its title, a grid for a batch. None (a map that is not 2-D,
        # no picture) lets Jupyter fall back to the text repr.
        views = [self] if self.targets_per_sample is None else \
            [self.per_target(k) for k in range(self.targets_per_sample)]
        pairs = [(v, i) for i in range(len(self.heatmaps)) for v in views][:_DISPLAY_MAX]
        shown = len(pairs)
        try:
            tiles = [render.panel([v.overlay(i, max_side=_DISPLAY_SIDE)], [v.title(i)]) for v, i in pairs]
        except OnnxcamError:
            return None
        rows = [tiles[r:r + _DISPLAY_COLS] for r in range(0, shown, _DISPLAY_COLS)]
        gap = 6
        width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in rows)
        heights = [max(t.height for t in row) for row in rows]
        from PIL import Image

        grid = Image.new("RGB", (width, sum(heights) + gap * (len(rows) - 1)), "white")
        y = 0
        for row, h in zip(rows, heights):
            x = 0
            for t in row:
                grid.paste(t, (x, y))
                x += t.width + gap
            y += h + gap
        import io

        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        return buf.getvalue()


_SAMPLE_EXTRAS = ("input", "image")  # Explanation.extras that hold the samples, not one entry per target

# A notebook shows at most this many samples of a batch, this many per row, each at most this many pixels wide.
_DISPLAY_MAX, _DISPLAY_COLS, _DISPLAY_SIDE = 16, 4, 512


# explain_image's keywords: what goes to explain(), and the preprocessing overrides (resolve_preprocess).
_EXPLAIN_OPTIONS = ("aug_smooth", "eigen_smooth", "channels", "progress")
_PREPROCESS_OVERRIDES = ("preset", "mean", "std", "size", "layout")
_EXPLAIN_IMAGE_KEYWORDS = ("targets", "counterfactual", "pp") + _EXPLAIN_OPTIONS + _PREPROCESS_OVERRIDES


def _unknown_keywords(function: str, unknown, accepted) -> str:
    guesses = [g for k in unknown for g in difflib.get_close_matches(k, accepted, n=1)]
    hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
    return (f"{function}() got unknown keyword(s) {', '.join(repr(k) for k in unknown)}{hint}; it accepts "
            f"{', '.join(accepted)}")


# pytorch-grad-cam's default test-time augmentation (ttach): horizontal flip x intensity factor.
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


class Explainer:
    """CAM explanations for an ONNX model: one fused onnxruntime session, built once, safe to share
    across threads. `layer` may be one tensor name or several (their maps are averaged)."""

    def __init__(self, model: ModelLike, layer: str | Sequence[str] | None = None, method: str = "gradcam",
                 providers: Sequence | None = None, output: str | None = None, layout: str | None = None,
                 batch_size: int = 32, guided_ops: Sequence[str] = build.DEFAULT_GUIDED_OPS,
                 session_options=None, device: str | None = None, base_dir=None,
                 batch_axis: int | None = None, precision: str | None = None, calibration=None,
                 rise: perturb.RiseOptions | dict | None = None):
        self.method_info = methods.get_method(method)
        method = self.method_info.name  # "GradCAM" and "gradcam" are one method
        if rise is not None and method != "rise":
            raise OnnxcamError(f"RISE options given for method '{method}'")
        self.rise = rise if isinstance(rise, perturb.RiseOptions) else perturb.RiseOptions(**(rise or {}))
        strict = providers is None and explicit_gpu(device)  # no silent CPU fallback for a named GPU
        if providers is None and device is not None:  # `providers` wins over `device`; neither: the CPU
            providers = resolve_device(device)
        # onnxcam.run.precision; it applies to the fused session only (the auxiliary ones stay fp32 onnxruntime).
        self.precision = precisions.choose(precision, providers, calibrated=calibration is not None)
        source = load_model(model, base_dir)  # base_dir: where bytes/ModelProto may read external data
        self.source_model = source
        # Every graph onnxcam derives (fused, Score-CAM, Ablation-CAM) uses opset-11 op forms; an older model is
        # upgraded once here so that none of them mixes forms (a 3-input Slice in an opset-9 graph is invalid).
        working = ensure_opset(source, 11) if opset_version(source) < 11 else source
        inferred = infer_shapes(working)
        view = ModelView(inferred)
        self.input_names = list(view.graph_inputs)
        if method == "rise":  # masks the input: no layer, so any model (an MLP, an op without a gradient rule)
            self.image_input, self.score = select.image_input(view), select.find_score(view, output)
            if layer is not None and ([layer] if isinstance(layer, str) else list(layer)) != [self.image_input]:
                raise OnnxcamError("RISE masks the input and takes no layer")
            self.layers = (self.image_input,)
        else:
            self.image_input, self.score, self.layers = select.resolve(view, layer, output)
        self.output_name = self.score
        self.score_is_probability = select.after_sigmoid(view, self.score)
        self.batching = select.batching(inferred, view, self.image_input, self.score, batch_axis)
        if self.batching.axis != 0 or self.batching.rank is not None:  # (T, N, K) CTC logits: read as (N, T, K)
            self.score = select.batch_first(inferred, self.score, self.batching.axis, self.batching.rank)
            view = ModelView(inferred)
        self.layer = self.layers[0]
        # A detection head: the default layers are the maps its branches fork from, and the score is a table of
        # boxes x fields. With no target given, the CLI explains its top detection.
        score_shape = view.shape(self.score)
        self.is_detector = (layer is None and len(self.layers) > 1 and score_shape is not None
                            and len(score_shape) == 3)
        self.method = method
        if batch_size < 1:
            raise OnnxcamError(f"batch size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.input_shapes = {n: view.shape(n) for n in self.input_names}
        self.input_dtypes = {n: view.np_dtype(n) for n in self.input_names}
        self.layout = layout or layouts.guess_image_layout(self.input_shapes[self.image_input])
        self.layer_layouts = tuple(layouts.layer_layout(view, name, self.image_input, self.layout)
                                   for name in self.layers)
        self.layer_ranks = [layouts.effective_rank(lay, view.rank(name))
                            for lay, name in zip(self.layer_layouts, self.layers)]
        self.image_rank = view.rank(self.image_input)
        if method in ("ablationcam", "reciprocam") and any(lay.kind == layouts.TOKENS for lay in self.layer_layouts):
            # Ablating a channel (or keeping one position) of the patch grid would leave it intact in the class
            # token, which is what the head reads: not the method's question.
            raise OnnxcamError(f"{'Ablation-CAM' if method == 'ablationcam' else 'ReciproCAM'} needs a feature-map "
                               f"layer; '{self.layer}' holds tokens (use gradcam, scorecam or another method)")
        self._head_kinked = False
        if self.method_info.second_order:
            if len(self.layers) > 1:
                raise OnnxcamError("ShapleyCAM explains one layer at a time")
            head = curvature.head_curvature(view, self.layer, self.score)
            if head.curved is not None:
                raise OnnxcamError(f"ShapleyCAM needs the score's second derivative at the layer; {head.curved} "
                                   f"after '{self.layer}' is curved and onnxcam builds first-order gradients only "
                                   f"(choose a layer after it, or use gradcam)")
            self._head_kinked = head.kinked
        self.guided_ops = tuple(guided_ops)
        self.multi_target_note: str | None = None  # why several targets per sample run one after the other
        spec = build.Spec(image=self.image_input, layers=self.layers, score=self.score, method=method,
                          layout=self.layout, guided_ops=self.guided_ops, layer_layouts=self.layer_layouts)
        self.model = build.build_explain_graph(inferred, spec)
        self.providers = providers
        self.session_options = session_options
        if self.precision.precision == "fp32":
            self.session = make_session(self.model, providers, session_options, strict=strict)
        else:
            self.session, self.precision = precisions.open_session(
                self.model, self.precision, session_options, self.image_input, self.layers, calibration,
                self.input_shapes[self.image_input], preprocess.model_metadata(source), source=inferred, spec=spec)
        self.num_classes = _static_classes(view, self.score)
        score_dims = view.shape(self.score)
        self.score_rank = None if score_dims is None else len(score_dims)
        # The score's per-sample shape where the model fixes it (targets are checked and placed with it).
        self.sample_shape = tuple(score_dims[1:]) if score_dims is not None and all(
            isinstance(d, int) for d in score_dims[1:]) else None
        self._has_sign = build.SIGN in {i.name for i in self.session.get_inputs()}
        self.metadata = preprocess.model_metadata(source)
        self.labels: list[str] | None = self.metadata.get("labels")
        self._preprocess_defaults: dict = {}
        self._inferred = inferred
        self._aux: dict = {}
        self._aux_lock = threading.Lock()
        if self.method_info.kind in ("eigen", "perturbation"):
            self._postprocess()
            for i in range(len(self.layers)):
                self._perturbation_session(i)

    @property
    def provider(self) -> str:
        """The execution provider that runs the fused session (its first; later ones are fallbacks)."""
        return self.session.get_providers()[0]

    @classmethod
    def from_session(cls, session, **kwargs) -> "Explainer":
        """An Explainer for the model an existing onnxruntime InferenceSession serves, on the same
        execution providers and session options (the explain graph is a different graph, so it gets a
        session of its own)."""
        model = getattr(session, "_model_bytes", None) or getattr(session, "_model_path", None)
        if model is None:
            raise OnnxcamError("cannot recover the model from this InferenceSession; pass the model instead")
        kwargs.setdefault("providers", [p for p in session.get_providers()])
        kwargs.setdefault("session_options", session.get_session_options())
        return cls(model, **kwargs)

    def preprocessing(self, **overrides) -> preprocess.Preprocess:
        """How images become this model's input: overrides (preset, mean, std, size, layout) > `use_defaults`
        > model metadata > the input's static shape > ImageNet defaults."""
        given = {**self._preprocess_defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return preprocess.resolve_preprocess(self.input_shapes[self.image_input], metadata=self.metadata, **given)

    def use_defaults(self, labels: Sequence[str] | None = None, **preprocessing) -> None:
        """Labels and preprocessing (preset, mean, std, size, layout) that stand in for the model's metadata
        from now on: what `onnxcam serve --labels/--preset/...` gives a model that carries none."""
        if labels is not None:
            labels = [str(name) for name in labels]
            if self.num_classes is not None and len(labels) != self.num_classes:
                raise OnnxcamError(f"{len(labels)} labels given for a score with {self.num_classes} classes")
        given = {k: v for k, v in preprocessing.items() if v is not None}
        previous = self._preprocess_defaults
        self._preprocess_defaults = given
        try:
            self.preprocessing()  # refuse a bad combination now, not at the first request
        except OnnxcamError:
            self._preprocess_defaults = previous
            raise
        if labels is not None:
            self.labels = labels

    def explain_image(self, image, targets=None, counterfactual: bool = False,
                      pp: preprocess.Preprocess | None = None, **kwargs) -> Explanation:
        """Loads (path or PIL image) and preprocesses one image, then explains it; `.extras["image"]`
        holds the decoded RGB image for overlays. kwargs: explain()'s options or preprocessing overrides."""
        explain_opts = {k: kwargs.pop(k) for k in _EXPLAIN_OPTIONS if k in kwargs}
        unknown = [k for k in kwargs if k not in _PREPROCESS_OVERRIDES]
        if unknown:  # else resolve_preprocess would fail with a TypeError about its own arguments
            raise OnnxcamError(_unknown_keywords("explain_image", unknown, _EXPLAIN_IMAGE_KEYWORDS))
        pil = preprocess.load_image(image)
        pp = pp or self.preprocessing(**kwargs)
        result = self.explain(preprocess.to_tensor(pil, pp), targets, counterfactual=counterfactual,
                              **explain_opts)
        result.extras["image"] = pil
        return result

    def explain(self, inputs: np.ndarray | Mapping[str, np.ndarray], targets=None,
                counterfactual: bool = False, aug_smooth: bool = False, eigen_smooth: bool = False,
                channels: Sequence[int] | None = None, progress=None) -> Explanation:
        """Explains a batch. `targets`: None (argmax), one int or label, or one per sample; or target objects of
        onnxcam.cam.targets (IndexTarget, RegionTarget, DetectionTarget: one, or one per sample). Every target is
        a weighting W of the score, y = <W, score>, and runs the same way. `counterfactual` negates the
        gradients (gradient methods). `aug_smooth`: average over flips x intensity factors (pytorch-grad-cam's
        test-time augmentation); `eigen_smooth`: first principal component of the weighted activations instead
        of their channel sum. `channels`: for Score-CAM / Ablation-CAM, the channels to perturb (default all);
        `progress(n)` is called as perturbed batches finish. A class may also be given by its label ('coffee
        mug'), see `class_index`. Several classes per sample: a list per sample (`[[3, 7, 9], [1, 2, 4]]`, the
        same number each; one list for all) or `onnxcam.top_classes(k)`; the result's arrays are then (N, K, ...)
        (`Explanation.per_target(k)`), computed in one run where the part of the model after the layer can be
        repeated per target (`multi_target_session`)."""
        feeds = self._feeds(inputs)
        targets = self.class_targets(targets)
        n = feeds[self.image_input].shape[0]
        lists = target_kinds.per_sample_lists(targets, n)
        one_each = lists is None
        if one_each:
            single = target_kinds.per_sample(targets, n)
            if target_kinds.ranked(single):  # a class below the top one: found by the ranked graph
                lists = [[t] for t in single]
        if lists is not None:
            result = self._explain_multi(feeds, lists, counterfactual, aug_smooth, eigen_smooth, channels,
                                         progress)
            if one_each:
                result = result.per_target(0)
        else:
            result = self._explain_batch(feeds, targets, counterfactual, aug_smooth, eigen_smooth, channels,
                                         progress)
        # Kept so that the result can draw itself (Explanation.overlay, its display in a notebook).
        result.extras.setdefault("input", feeds[self.image_input])
        result.layout, result.labels = self.layout, self.labels
        return result

    def class_targets(self, targets):
        """`targets` with every class label (str) replaced by its index (`class_index`); the rest as given."""
        if isinstance(targets, str):
            return self.class_index(targets)
        if isinstance(targets, np.ndarray) and targets.dtype.kind in "US":
            return [self.class_index(str(t)) for t in targets.ravel()]
        if isinstance(targets, (list, tuple)) and any(target_kinds.is_list(t) for t in targets):
            return [self.class_targets(list(t)) if target_kinds.is_list(t) else self.class_targets(t)
                    for t in targets]
        if isinstance(targets, (list, tuple)) and any(isinstance(t, str) for t in targets):
            return [self.class_index(t) if isinstance(t, str) else t for t in targets]
        return targets

    def class_index(self, label: str) -> int:
        """The class a label names, from the model's labels (onnxcam.images.labels.match_label): an exact
        match first, then ignoring case, then the one label it is a word of ('mug' -> 'coffee mug'). A label
        that names several classes or none is an OnnxcamError; none says which labels come close."""
        if not self.labels:
            raise OnnxcamError(f"target '{label}' is a label, but the model has no class labels (metadata "
                               f"'{preprocess.LABELS_KEY}'); pass a class index")
        return match_label(label, self.labels)

    def _explain_batch(self, feeds, targets, counterfactual, aug_smooth, eigen_smooth, channels,
                       progress) -> Explanation:
        n = feeds[self.image_input].shape[0]
        if self.batching.fixed and n > 1:  # the graph computes one sample per run
            return self._sample_by_sample(feeds, n, targets, counterfactual=counterfactual, aug_smooth=aug_smooth,
                                          eigen_smooth=eigen_smooth, channels=channels, progress=progress)
        items = target_kinds.per_sample(targets, n)
        if counterfactual and not self.method_info.uses_gradients:
            raise OnnxcamError(f"counterfactual maps need gradients; method '{self.method}' uses none")
        if aug_smooth:
            if not target_kinds.classic(items):
                raise OnnxcamError("aug_smooth flips the image, which moves regions and boxes; use it with class "
                                   "targets")
            return self._aug_smooth(feeds, items, counterfactual, eigen_smooth, channels, progress)
        return self._run(feeds, items, counterfactual, eigen_smooth, channels, progress)

    def _explain_multi(self, feeds, lists, counterfactual, aug_smooth, eigen_smooth, channels,
                       progress) -> Explanation:
        """K targets per sample. Where the head can be repeated (build.repeat_layers), one run: the trunk once,
        the head and its backward on N*K rows. Elsewhere (pixel and perturbation methods, aug_smooth, one-sample
        graphs, heads that repeat_layers refuses) the targets run one after the other: the same maps, K runs."""
        n, k = len(lists), len(lists[0])
        if counterfactual and not self.method_info.uses_gradients:
            raise OnnxcamError(f"counterfactual maps need gradients; method '{self.method}' uses none")
        session = None if aug_smooth else self.multi_target_session()
        if session is not None:
            flat = [t for row in lists for t in row]
            r = self._run(feeds, flat, counterfactual, eigen_smooth, channels, progress, session=session)
            return by_target(r, n, k)
        if any(target_kinds.ranked(row) for row in lists):  # ranks from one forward, then class indices
            scores = np.asarray(self._score_values(feeds)).reshape(n, -1)
            order = np.argsort(-scores, axis=1, kind="stable")
            size = scores.shape[1]
            for row in lists:
                for t in row:
                    if isinstance(t, target_kinds.TopClass) and t.rank >= size:
                        raise OnnxcamError(f"top class rank {t.rank} is out of range: the score has {size} classes")
            lists = [[target_kinds.ClassTarget(int(order[s, t.rank])) if isinstance(t, target_kinds.TopClass)
                      else t for t in row] for s, row in enumerate(lists)]
        parts = [self._explain_batch(feeds, [row[j] for row in lists], counterfactual, aug_smooth, eigen_smooth,
                                     channels, progress) for j in range(k)]
        return stack_targets(parts)

    def multi_target_session(self):
        """The session that explains K targets per sample in one run (None where the targets must run one after
        the other; `multi_target_note` then says why)."""
        with self._aux_lock:
            if "multi" not in self._aux:
                self._aux["multi"] = None
                if self.batching.fixed:
                    self.multi_target_note = "the graph computes one sample per run"
                elif self.batching.axis != 0 or self.batching.rank is not None:
                    self.multi_target_note = "the score does not hold the samples on its first axis"
                elif self.method_info.kind not in ("gradient", "eigen") or self.method_info.second_order:
                    self.multi_target_note = f"method '{self.method}' is not computed from the layer's gradient alone"
                else:
                    try:
                        model, names = build.repeat_layers(self._inferred, self.layers, self.score,
                                                           self.image_input)
                        spec = build.Spec(image=self.image_input, layers=names, score=self.score,
                                          method=self.method, layout=self.layout, guided_ops=self.guided_ops,
                                          layer_layouts=self.layer_layouts)
                        graph = build.build_explain_graph(infer_shapes(model), spec, ranked=True)
                        self._aux["multi"] = make_session(graph, self.providers, self.session_options)
                    except OnnxcamError as exc:
                        self.multi_target_note = first_line(exc)
            return self._aux["multi"]

    def _sample_by_sample(self, feeds, n: int, targets, **options) -> Explanation:
        if isinstance(targets, (list, tuple, np.ndarray)) and len(targets) == n:
            per = list(targets)
        else:
            per = [targets] * n
        parts = [self._explain_batch({k: v[s:s + 1] for k, v in feeds.items()}, per[s], **options)
                 for s in range(n)]
        return concatenate(parts)

    def _run(self, feeds, items, counterfactual, eigen_smooth, channels, progress, session=None) -> Explanation:
        """The one explain loop: targets -> the weights W of y = <W, score> -> one run of the fused session ->
        maps (in the graph, or from its outputs for the eigen and perturbation methods). `session`: the
        multi-target one, where `items` holds K targets per sample (sample-major) and every output K rows each."""
        n = len(items)
        classic = target_kinds.classic(items)
        shape = self.sample_shape if classic else self._sample_shape(feeds)
        if not classic:
            if shape is not None and len(shape) == 2:  # name the field a detection target left to the layout
                items = [replace(t, field=t.field_for(shape)) if isinstance(t, target_kinds.DetectionTarget)
                         and t.field is None else t for t in items]
            if target_kinds.needs_scores(items, shape):
                items = target_kinds.resolve_data_dependent(items, self._score_values(feeds),
                                                            self.score_is_probability)
        plan = target_kinds.plan(items, shape)
        outs = self._run_session(feeds, plan, counterfactual, session)
        if self.method_info.second_order and not classic:
            outs = self._second_order(feeds, items, shape, outs, counterfactual)
        scores, chosen = outs[build.SCORES], outs[build.TARGETS]
        check_samples(scores, n, self.output_name)
        require_finite(scores, f"the model's output '{self.output_name}'")
        if classic and shape is None:
            bad = (chosen < 0) | (chosen >= scores.shape[1])
            if bad.any():
                raise OnnxcamError(f"target {int(chosen[bad][0])} is out of range for {scores.shape[1]} classes")
        kind = self.method_info.kind
        if kind in ("gradient", "pixel") and not eigen_smooth:
            maps = [outs[build.maps_name(i)] for i in range(len(self.layers))]
            heat = outs[build.HEATMAPS]
        else:
            if kind == "perturbation":
                weights = outs[build.WEIGHTS_USED].reshape(n, -1)
                maps = [self._perturbation_maps(i, feeds, outs, weights, channels, progress)
                        for i in range(len(self.layers))]
            else:
                maps = [np.maximum(methods.first_component(outs[build.weighted_name(i)]), 0)
                        for i in range(len(self.layers))]
            heat = self._heatmaps(maps, feeds[self.image_input])
        for m in maps:
            require_finite(m, "the class activation map (the model's activations or gradients)")
        require_finite(heat, "the heatmap")
        guided, extras = None, {}
        if kind == "pixel":
            guided = outs[build.GUIDED_GRADCAM if self.method == "guided-gradcam" else build.GUIDED]
            extras["guided_backprop"] = outs[build.GUIDED]
        r = Explanation(maps=maps[0], heatmaps=heat, scores=scores, targets=chosen, layer=self.layer,
                        method=self.method, counterfactual=counterfactual, guided=guided,
                        maps_per_layer=maps, extras=extras)
        quiet = set()
        if not classic:  # the score in its own shape, the targets as given (resolved), y per sample
            r.scores = scores.reshape((n, *shape))
            r.targets = np.empty(n, object)
            r.targets[:] = items
            r.target_scores = outs[build.TARGET_SCORES]
            # A predicted region its class owns nowhere selects nothing: y is 0 by definition, not a layer that
            # does not matter (the CLI says so in a note).
            quiet = {s for s, t in enumerate(items) if isinstance(t, target_kinds.RegionTarget) and t.mask is None
                     and not (r.scores[s].argmax(0) == t.cls).any()}
        flag_empty(r, outs, self.layers, quiet=quiet)
        return r

    def _second_order(self, feeds, items, shape, outs, counterfactual) -> dict:
        """ShapleyCAM's weights mean(dy/dA - H A / 2). The head after the layer is piecewise linear (checked at
        construction), so H A = J^T H_y (J A): y's own curvature in the score, one more VJP. Linear targets have
        H_y = 0 (the first run stands: Grad-CAM); for the others the fused graph runs again with the seed
        W - H_y (J A) / 2. J A, the head's derivative along A, is a central difference through the head session:
        exact for an affine head (step 1/2), and for a kinked one wherever no kink lies within 0.1% of A."""
        z = outs[build.SCORES]
        curved = [target_kinds.hessian_vector(t, z[s], z[s]) is not None for s, t in enumerate(items)]
        if not any(curved):
            return outs
        acts = outs[build.activations_name(0)]
        n = len(items)
        step = 1e-3 if self._head_kinked else 0.5
        session = self._head_session(0)
        needed = {x.name for x in session.get_inputs()}
        extra = {k: np.concatenate([v, v]) for k, v in feeds.items() if k in needed}
        feed = {perturb.LAYER_IN: np.concatenate([acts * np.float32(1 + step), acts * np.float32(1 - step)]),
                **extra}
        if self.batching.fixed:
            rows = [session.run([perturb.SCORE], {k: v[r:r + 1] for k, v in feed.items()})[0] for r in range(2 * n)]
            moved = np.concatenate(rows)
        else:
            moved = session.run([perturb.SCORE], feed)[0]
        moved = np.asarray(moved, np.float64).reshape(2, n, -1)
        jva = (moved[0] - moved[1]) / (2 * step)
        w = np.asarray(outs[build.WEIGHTS_USED], np.float64).reshape(n, -1)
        fixed = []
        for s, t in enumerate(items):
            hv = target_kinds.hessian_vector(t, z[s], jva[s]) if curved[s] else None
            ws = w[s] if hv is None else w[s] - 0.5 * np.asarray(hv, np.float64).reshape(-1)
            fixed.append(target_kinds.ScoreWeights(ws.reshape(shape), source=t))
        again = self._run_session(feeds, target_kinds.plan(fixed, shape), counterfactual)
        # y and the element explained are the target's, not the corrected seed's
        again.update({k: outs[k] for k in (build.TARGETS, build.TARGET_SCORES, build.WEIGHTS_USED)})
        return again

    def _target_feeds(self, plan: target_kinds.Plan) -> dict:
        """The fused graph's target inputs for a plan; absent parts are all-zero arrays that broadcast."""
        ones = (1,) * (self.score_rank or 1)
        return {build.TARGET: plan.index,
                build.WEIGHTS: plan.weights if plan.weights is not None else np.zeros(ones, np.float32),
                build.SELECT: plan.select if plan.select is not None else np.zeros(ones, bool),
                build.GROUP: plan.group if plan.group is not None else np.zeros(ones, bool)}

    def _run_session(self, feeds, plan: target_kinds.Plan, counterfactual: bool, session=None) -> dict:
        run_feeds = dict(feeds)
        run_feeds.update(self._target_feeds(plan))
        if self._has_sign:
            run_feeds[build.SIGN] = np.array([-1.0 if counterfactual else 1.0], np.float32)
        if session is not None:
            run_feeds[build.RANK] = plan.rank if plan.rank is not None else np.zeros(len(plan.index), np.int64)
        elif plan.rank is not None:
            raise OnnxcamError("a class below the top one needs the ranked graph")  # explain() routes them there
        session = session or self.session
        try:
            return dict(zip([o.name for o in session.get_outputs()], session.run(None, run_feeds)))
        except Exception as exc:
            self._check_batch_rows(feeds)  # a misread batch axis fails in the seed: say that, not where it broke
            # precision's sessions name the engine that failed (OpenVINO or onnxruntime) in their message.
            engine = "" if isinstance(exc, precisions.EngineError) else "onnxruntime failed: "
            raise OnnxcamError(f"{engine}{first_line(exc)}") from None

    def _check_batch_rows(self, feeds) -> None:
        try:
            scores = self._score_values(feeds)
        except Exception:
            return
        check_samples(scores, feeds[self.image_input].shape[0], self.output_name)

    def _sample_shape(self, feeds) -> tuple:
        """The score's per-sample shape: static from the model, else from one forward run."""
        return self.sample_shape if self.sample_shape is not None else tuple(self._score_values(feeds).shape[1:])

    def _probe_session(self):
        """The model alone, its inputs -> the score (batch first): targets that depend on the score, RISE."""
        with self._aux_lock:
            if "probe" not in self._aux:
                m = load_model(self._inferred)  # a private copy
                del m.graph.output[:]
                m.graph.output.append(onnx.helper.make_tensor_value_info(
                    self.score, ModelView(m).elem_type(self.score), None))
                prune(m, [self.score])
                self._aux["probe"] = make_session(m, self.providers, self.session_options)
            return self._aux["probe"]

    def _score_values(self, feeds) -> np.ndarray:
        """The score (N, ...) from a forward run of the model alone (targets that depend on it)."""
        probe = self._probe_session()
        needed = {i.name for i in probe.get_inputs()}
        try:
            return probe.run(None, {k: v for k, v in feeds.items() if k in needed})[0]
        except Exception as exc:
            raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None

    def explain_bound(self, inputs, targets=None, counterfactual: bool = False, to_numpy: bool = True):
        """`explain` through `session.io_binding()`: inputs (numpy arrays, or `onnxruntime.OrtValue`s already on
        the session's device), the target vector (None/int/ints, or an int64 (N,) OrtValue) and the outputs are
        bound to the session's device, so they can stay there between calls. Gradient and pixel methods only
        (their whole map is computed in the fused graph). `to_numpy=True`: an Explanation, as `explain` returns;
        False: {fused output name: OrtValue on the device} (`onnxcam_heatmaps`, `onnxcam_maps`,
        `onnxcam_scores`, `onnxcam_targets`, ...; see onnxcam.build). OrtValue targets are not range-checked."""
        if self.method_info.kind not in ("gradient", "pixel"):
            raise OnnxcamError(f"explain_bound runs the fused graph only; method '{self.method}' is not computed "
                               f"there (use explain)")
        device, device_id = session_device(self.session)
        checked = self._feeds(inputs, ortvalues=True)
        image = checked[self.image_input]
        n = image.shape()[0] if isinstance(image, ort.OrtValue) else image.shape[0]
        if isinstance(targets, ort.OrtValue):
            if ortvalue_dtype(targets) != np.int64 or targets.shape() != [n]:
                raise OnnxcamError(f"targets must be an int64 OrtValue of shape ({n},)")
            target = targets
        else:
            items = target_kinds.per_sample(self.class_targets(targets), n)
            if not target_kinds.classic(items):
                raise OnnxcamError("explain_bound takes class targets (None, ints or labels); use explain for "
                                   "target objects")
            target = target_kinds.plan(items, self.sample_shape).index
        sign = np.array([-1.0 if counterfactual else 1.0], np.float32)
        binding = self.session.io_binding()
        keep = []  # the OrtValues made here must outlive the run
        inputs_of_session = {i.name for i in self.session.get_inputs()}
        plan_feeds = self._target_feeds(target_kinds.Plan(index=np.zeros(0, np.int64)))
        plan_feeds[build.TARGET] = target
        for name, value in [*checked.items(), *plan_feeds.items(), (build.SIGN, sign)]:
            if name not in inputs_of_session:  # the sign input exists for gradient methods only
                continue
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(value, device, device_id)
                keep.append(value)
            binding.bind_ortvalue_input(name, value)
        names = [o.name for o in self.session.get_outputs()]
        for name in names:
            binding.bind_output(name, device, device_id)
        try:
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        except Exception as exc:
            raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None
        if not to_numpy:
            return dict(zip(names, binding.get_outputs()))
        outs = dict(zip(names, binding.copy_outputs_to_cpu()))
        scores, chosen = outs[build.SCORES], outs[build.TARGETS]
        check_samples(scores, n, self.output_name)
        require_finite(scores, f"the model's output '{self.output_name}'")
        require_finite(outs[build.HEATMAPS], "the heatmap")
        if self.num_classes is None and ((chosen < 0) | (chosen >= scores.shape[1])).any():
            bad = chosen[(chosen < 0) | (chosen >= scores.shape[1])]
            raise OnnxcamError(f"target {int(bad[0])} is out of range for {scores.shape[1]} classes")
        maps = [outs[build.maps_name(i)] for i in range(len(self.layers))]
        guided, extras = None, {}
        if self.method_info.kind == "pixel":
            guided = outs[build.GUIDED_GRADCAM if self.method == "guided-gradcam" else build.GUIDED]
            extras["guided_backprop"] = outs[build.GUIDED]
        return Explanation(maps=maps[0], heatmaps=outs[build.HEATMAPS], scores=scores, targets=chosen, layer=self.layer, method=self.method,
                           counterfactual=counterfactual, guided=guided, maps_per_layer=maps, extras=extras)

    # -- methods outside the fused graph ----------------------------------------------------
    def _postprocess(self):
        with self._aux_lock:
            if "post" not in self._aux:
                g = build.build_postprocess_graph(self.layer_ranks, self.image_rank)
                self._aux["post"] = make_session(g, self.providers, self.session_options)
            return self._aux["post"]

    def _heatmaps(self, maps: list, image: np.ndarray) -> np.ndarray:
        spatial = image.shape[1:-1] if self.layout == "NHWC" else image.shape[2:]
        feeds = {f"map_{i}": np.ascontiguousarray(m, np.float32) for i, m in enumerate(maps)}
        feeds["size"] = np.asarray(spatial, np.int64)
        return self._postprocess().run([build.HEATMAPS], feeds)[0]

    def _perturbation_session(self, i: int):
        if self.method_info.kind != "perturbation":
            return None
        if self.method == "rise":
            return self._probe_session()
        if self.method != "scorecam":  # Ablation-CAM and ReciproCAM: the model after the layer
            return self._head_session(i)
        with self._aux_lock:
            if "scorecam" not in self._aux:
                g = perturb.scorecam_graph(self._inferred, self.image_input, self.score, self.layout)
                self._aux["scorecam"] = make_session(g, self.providers, self.session_options)
            return self._aux["scorecam"]

    def _verdict(self, session) -> dict:
        """Whether this auxiliary session batches perturbed inputs faithfully, once found (perturb checks it)."""
        with self._aux_lock:
            return self._aux.setdefault(("verdict", id(session)), {})

    def _head_session(self, i: int):
        """The model after layer i, the layer an input (fed channels-first float32): perturb.ablation_graph."""
        key = ("head", i)
        with self._aux_lock:
            if key not in self._aux:
                g = perturb.ablation_graph(self._inferred, self.layers[i], self.score,
                                           channels_last=self.layer_layouts[i].kind == layouts.CHANNELS_LAST)
                self._aux[key] = make_session(g, self.providers, self.session_options)
            return self._aux[key]

    def _perturbation_maps(self, i, feeds, outs, weights, channels, progress) -> np.ndarray:
        """Score-CAM / Ablation-CAM maps of layer i; `weights` (N, K): each sample's W over the flattened score,
        so that a perturbed input is scored as y = <W, score> whatever the target."""
        acts = outs[build.activations_name(i)]
        n, c = acts.shape[:2]
        if self.method in ("reciprocam", "rise"):
            if channels is not None:
                raise OnnxcamError(f"channels apply to Score-CAM and Ablation-CAM, not to '{self.method}'")
            return self._probability_maps(i, feeds, acts, weights, progress)
        chans = np.arange(c) if channels is None else np.asarray(channels, np.int64)
        if chans.size == 0 or chans.min() < 0 or chans.max() >= c:
            raise OnnxcamError(f"channels must be indices in 0..{c - 1}")
        session = self._perturbation_session(i)
        needed = {x.name for x in session.get_inputs()}
        batch = 1 if self.batching.fixed else self.batch_size  # a batch-1 graph would mix the perturbations
        maps = []
        for s in range(n):
            extra = {k: v[s:s + 1] for k, v in feeds.items() if k in needed and k != self.image_input}
            target = weights[s]
            if self.method == "scorecam":
                w = perturb.scorecam_weights(session, feeds[self.image_input][s:s + 1], acts[s], target, chans,
                                             batch, extra, progress, self._verdict(session))
            else:
                if self.image_input in needed:
                    extra[self.image_input] = feeds[self.image_input][s:s + 1]
                w = perturb.ablation_weights(session, acts[s], float(outs[build.TARGET_SCORES][s]), target, chans,
                                             batch, extra, progress, self._verdict(session))
            weighted = w.reshape((c,) + (1,) * (acts.ndim - 2)) * acts[s]
            maps.append(np.maximum(weighted.sum(axis=0), 0))
        return np.float32(maps)

    def _probability_maps(self, i, feeds, acts, weights, progress) -> np.ndarray:
        """ReciproCAM and RISE: maps of the target's probability over the perturbed runs, sample by sample."""
        session = self._perturbation_session(i)
        needed = {x.name for x in session.get_inputs()}
        softmax = self.score_rank == 2 and not self.score_is_probability
        rows = 1 if self.batching.fixed else self.batch_size
        if self.method == "reciprocam" and not self.batching.fixed:  # all positions in one run below 64 MB
            rows = max(rows, min(int(np.prod(acts.shape[2:])), (64 << 20) // max(1, 4 * acts[0].size)))
        maps = []
        for s in range(acts.shape[0]):
            extra = {k: v[s:s + 1] for k, v in feeds.items() if k in needed and k != self.image_input}
            if self.method == "rise":
                maps.append(perturb.rise_map(session, feeds[self.image_input][s:s + 1], self.image_input,
                                             self.score, self.layout, weights[s], softmax, self.rise, rows,
                                             extra, progress))
                continue
            if self.image_input in needed:
                extra[self.image_input] = feeds[self.image_input][s:s + 1]
            maps.append(perturb.reciprocam_map(session, acts[s], weights[s], softmax, rows, extra, progress,
                                               self._verdict(session)))
        return np.float32(maps)

    def perturbation_count(self, n: int, channels: Sequence[int] | None = None) -> int:
        """How many perturbed forward passes explain() will run for a batch of n (for progress bars)."""
        if self.method_info.kind != "perturbation":
            return 0
        if self.method == "rise":
            return n * self.rise.masks
        if self.method == "reciprocam":
            return n * sum(self._positions(i) for i in range(len(self.layers)))
        per = [len(channels) if channels is not None else None] * len(self.layers)
        sizes = [p if p is not None else self._channels(i) for i, p in enumerate(per)]
        return n * sum(sizes)

    def _positions(self, i: int) -> int:
        """Layer i's spatial positions where the model fixes them (0: unknown until it runs)."""
        shape = ModelView(self._inferred).shape(self.layers[i])
        dims = layouts.spatial_dims(self.layer_layouts[i], shape) if shape is not None else [None]
        return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else 0

    def _channels(self, i: int) -> int:
        shape = ModelView(self._inferred).shape(self.layers[i])
        axis = 1 if self.layer_layouts[i].kind == layouts.CHANNELS_FIRST else -1
        return shape[axis] if shape is not None and isinstance(shape[axis], int) else 0

    def _aug_smooth(self, feeds, targets, counterfactual, eigen_smooth, channels, progress) -> Explanation:
        x = feeds[self.image_input]
        n = x.shape[0]
        w_axis = x.ndim - 2 if self.layout == "NHWC" else x.ndim - 1
        batch = {k: np.concatenate([v] * len(AUGMENTATIONS)) for k, v in feeds.items() if k != self.image_input}
        batch[self.image_input] = np.concatenate(
            [(np.flip(x, w_axis) if flip else x) * np.float32(f) for flip, f in AUGMENTATIONS]).astype(x.dtype)
        r = self._run(batch, list(targets) * len(AUGMENTATIONS), counterfactual, eigen_smooth, channels, progress)

        def deaugment(a: np.ndarray) -> np.ndarray:
            parts = [np.flip(p, p.ndim - 1) if flip else p
                     for p, (flip, _) in zip(np.split(a, len(AUGMENTATIONS)), AUGMENTATIONS)]
            return np.mean(np.float32(parts), axis=0)

        plain = AUGMENTATIONS.index((False, 1.0))
        part = slice(plain * n, (plain + 1) * n)
        maps = [deaugment(m) for m in r.maps_per_layer]
        out = Explanation(maps=maps[0], heatmaps=deaugment(r.heatmaps), scores=r.scores[part],
                          targets=r.targets[part], layer=self.layer, method=self.method,
                          counterfactual=counterfactual, guided=None if r.guided is None else r.guided[part],
                          maps_per_layer=maps)
        # Zero gradient for every augmented copy of a sample: the same answer as without augmentation.
        peaks = {build.grad_peak_name(i): np.stack(np.split(np.asarray(r.zero_gradient, np.float32) == 0,
                                                             len(AUGMENTATIONS))).any(0).astype(np.float32)
                 for i in range(len(self.layers))} if r.zero_gradient is not None else {}
        flag_empty(out, peaks, self.layers)
        return out

    # -- input checking ---------------------------------------------------------------------
    def _feeds(self, inputs, ortvalues: bool = False) -> dict[str, np.ndarray]:
        """Checked, contiguous inputs of the model's dtypes; with `ortvalues`, OrtValues pass through (checked)."""
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            others = [n for n in self.input_names if n != self.image_input]
            if others:
                raise OnnxcamError(f"model has several inputs ({', '.join(self.input_names)}); pass a dict")
            feeds = {self.image_input: inputs}
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise OnnxcamError(f"unknown input(s) {', '.join(sorted(unknown))}; model inputs: "
                               f"{', '.join(self.input_names)}")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxcamError(f"missing input(s): {', '.join(missing)}")
        out = {}
        for name, value in feeds.items():
            bound = ortvalues and isinstance(value, ort.OrtValue)
            arr = value if bound else np.asarray(value)
            shape = tuple(value.shape()) if bound else arr.shape
            want = self.input_shapes[name]
            if want is not None and len(shape) != len(want):
                raise OnnxcamError(f"input '{name}' has shape {shape}; the model expects rank {len(want)} "
                                   f"{_fmt_shape(want)}")
            if want is not None:
                for axis, (got, exp) in enumerate(zip(shape, want)):
                    # A one-sample graph takes a batch: explain() runs it sample by sample.
                    if isinstance(exp, int) and got != exp and not (axis == 0 and exp == 1 and self.batching.fixed):
                        raise OnnxcamError(f"input '{name}' has shape {shape}; the model expects "
                                           f"{_fmt_shape(want)}")
            dtype = self.input_dtypes[name]
            got_dtype = ortvalue_dtype(value) if bound else arr.dtype
            if got_dtype != dtype:
                if not bound and arr.dtype.kind in "fiub" and dtype.kind in "fiub":
                    arr = arr.astype(dtype)
                else:
                    raise OnnxcamError(f"input '{name}' has dtype {got_dtype}; the model expects {dtype}")
            out[name] = arr if bound else np.ascontiguousarray(arr)
            if not bound:  # after the cast: 1e39 is finite in float64 but inf in float32
                require_finite(out[name], f"input '{name}'")
        image = out[self.image_input]
        image_shape = tuple(image.shape()) if isinstance(image, ort.OrtValue) else image.shape
        if len(image_shape) == 0 or image_shape[0] == 0:
            raise OnnxcamError("empty batch")
        return out


def check_samples(scores: np.ndarray, n: int, output: str) -> None:
    """The score must come out with one row per sample; anything else means the batch axis was misread, and
    every map would explain the wrong scalar."""
    if scores.shape[0] != n:
        raise OnnxcamError(f"output '{output}' came out with {scores.shape[0]} rows for {n} sample(s): its batch "
                           f"axis is not where onnxcam looked; pass batch_axis= (API) or --batch-axis (CLI)")


def flag_empty(r: Explanation, outs: dict, layers: Sequence[str], quiet=()) -> None:
    """Fills r.zero_gradient / r.empty / r.warnings from the fused outputs, so that a blank map never passes
    for an answer. `quiet`: samples whose emptiness the caller explains itself."""
    peaks = [outs.get(build.grad_peak_name(i)) for i in range(len(layers))]
    n = r.maps.shape[0]
    r.empty = np.asarray(r.maps).reshape(n, -1).max(axis=1) <= 0 if r.maps.size else np.ones(n, bool)
    if all(p is not None for p in peaks):
        r.zero_gradient = np.asarray(peaks[0]) == 0
        for p in peaks[1:]:
            r.zero_gradient &= np.asarray(p) == 0
    for s in range(n):
        if s in quiet:
            continue
        what = f"sample {s}" + (f" (target {r.targets[s]})" if r.targets is not None else "")
        if r.zero_gradient is not None and r.zero_gradient[s]:
            r.warnings.append(f"{what}: the explained score does not depend on layer(s) {', '.join(layers)} "
                              f"(gradient exactly zero), so the map is empty; choose another layer or target")
        elif r.empty[s] and r.counterfactual:
            r.warnings.append(f"{what}: the counterfactual map is empty: nothing at this layer argues against "
                              f"the target")
        elif r.empty[s]:
            r.warnings.append(f"{what}: the map is empty: every position's weighted sum is negative or zero")


def by_target(r: Explanation, n: int, k: int) -> Explanation:
    """A run over N*K sample-major rows (K targets per sample) as an Explanation with (N, K, ...) arrays."""
    split = (lambda a: None if a is None else np.asarray(a).reshape(n, k, *np.asarray(a).shape[1:]))
    out = Explanation(maps=split(r.maps), heatmaps=split(r.heatmaps), scores=r.scores[::k], targets=split(r.targets),
                      layer=r.layer, method=r.method, counterfactual=r.counterfactual,
                      maps_per_layer=[split(m) for m in r.maps_per_layer], extras=dict(r.extras),
                      zero_gradient=split(r.zero_gradient), empty=split(r.empty), targets_per_sample=k)
    out.warnings = [re.sub(r"^sample (\d+)", lambda m: f"sample {int(m.group(1)) // k}", w) for w in r.warnings]
    return out


def stack_targets(parts: Sequence[Explanation]) -> Explanation:
    """K explanations of the same samples (the k-th target each) as one with (N, K, ...) arrays."""
    r = parts[0]
    stack = (lambda name: None if getattr(r, name) is None else np.stack([getattr(p, name) for p in parts], axis=1))
    out = Explanation(maps=stack("maps"), heatmaps=stack("heatmaps"), scores=r.scores, targets=stack("targets"),
                      layer=r.layer, method=r.method, counterfactual=r.counterfactual,
                      maps_per_layer=[np.stack([p.maps_per_layer[i] for p in parts], axis=1)
                                      for i in range(len(r.maps_per_layer))],
                      extras={key: np.stack([p.extras[key] for p in parts], axis=1)
                              if isinstance(value, np.ndarray) and key not in _SAMPLE_EXTRAS else value
                              for key, value in r.extras.items()},
                      guided=stack("guided"), zero_gradient=stack("zero_gradient"), empty=stack("empty"),
                      targets_per_sample=len(parts))
    out.warnings = [w for p in parts for w in p.warnings]
    return out


def concatenate(parts: Sequence[Explanation]) -> Explanation:
    """Explanations of consecutive slices of one batch, as one."""
    r = parts[0]
    if len(parts) == 1:
        return r
    out = Explanation(maps=r.maps, heatmaps=r.heatmaps, scores=r.scores, targets=r.targets, layer=r.layer,
                      method=r.method, counterfactual=r.counterfactual)
    for name in ("maps", "heatmaps", "scores", "targets", "guided", "target_scores", "zero_gradient", "empty"):
        if getattr(r, name) is not None:
            setattr(out, name, np.concatenate([getattr(p, name) for p in parts]))
    out.maps_per_layer = [np.concatenate([p.maps_per_layer[i] for p in parts]) for i in range(len(r.maps_per_layer))]
    out.extras = {k: np.concatenate([p.extras[k] for p in parts]) if isinstance(v, np.ndarray) else v
                  for k, v in r.extras.items()}
    offset = 0
    for p in parts:  # sample numbers in the warnings count over the whole batch
        out.warnings.extend(w.replace("sample 0", f"sample {offset}", 1) for w in p.warnings)
        offset += len(p.maps)
    return out


def _static_classes(view: ModelView, score: str) -> int | None:
    shape = view.shape(score)
    if shape is None:
        return None
    dims = shape[1:]
    if all(isinstance(d, int) for d in dims):
        return int(np.prod(dims)) if dims else 1
    return None


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"
