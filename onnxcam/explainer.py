"""The Python API: `Explainer(model).explain(inputs, targets)`."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from .runtime import ort  # first: says what to install when onnxruntime is missing
from . import build, layouts, methods, perturb, preprocess, rewrite
from . import targets as target_kinds
from .errors import OnnxcamError
from .graph import ModelLike, ModelView, infer_shapes, load_model
from .runtime import explicit_gpu, first_line, make_session, ortvalue_dtype, resolve_device, session_device


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


# pytorch-grad-cam's default test-time augmentation (ttach): horizontal flip x intensity factor.
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


class Explainer:
    """CAM explanations for an ONNX model: one fused onnxruntime session, built once, safe to share
    across threads. `layer` may be one tensor name or several (their maps are averaged)."""

    def __init__(self, model: ModelLike, layer: str | Sequence[str] | None = None, method: str = "gradcam",
                 providers: Sequence | None = None, output: str | None = None, layout: str | None = None,
                 batch_size: int = 32, guided_ops: Sequence[str] = build.DEFAULT_GUIDED_OPS,
                 session_options=None, device: str | None = None):
        self.method_info = methods.get_method(method)
        strict = providers is None and explicit_gpu(device)  # no silent CPU fallback for a named GPU
        if providers is None and device is not None:  # `providers` wins over `device`; neither: the CPU
            providers = resolve_device(device)
        source = load_model(model)
        self.source_model = source
        inferred = infer_shapes(source)
        view = ModelView(inferred)
        self.input_names = list(view.graph_inputs)
        self.image_input, self.score, self.layers = rewrite.resolve(view, layer, output)
        self.layer = self.layers[0]
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
        if method == "ablationcam" and any(lay.kind == layouts.TOKENS for lay in self.layer_layouts):
            # Ablating a channel of the patch grid would leave it intact in the class token, which is what the
            # head reads: not the method's question.
            raise OnnxcamError(f"Ablation-CAM needs a feature-map layer; '{self.layer}' holds tokens "
                               f"(use gradcam, scorecam or another method)")
        spec = build.Spec(image=self.image_input, layers=self.layers, score=self.score, method=method,
                          layout=self.layout, guided_ops=tuple(guided_ops), layer_layouts=self.layer_layouts)
        self._spec = spec  # kept for the weighted-target graph (onnxcam.targets), built on first use
        self.model = build.build_explain_graph(inferred, spec)
        self.providers = providers
        self.session_options = session_options
        self.session = make_session(self.model, providers, session_options, strict=strict)
        self.num_classes = _static_classes(view, self.score)
        self.metadata = preprocess.model_metadata(source)
        self.labels: list[str] | None = self.metadata.get("labels")
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
        """How images become this model's input: overrides (preset, mean, std, size, layout) > model
        metadata > the input's static shape > ImageNet defaults."""
        return preprocess.resolve_preprocess(self.input_shapes[self.image_input], metadata=self.metadata,
                                             **{k: v for k, v in overrides.items() if v is not None})

    def explain_image(self, image, targets=None, counterfactual: bool = False,
                      pp: preprocess.Preprocess | None = None, **kwargs) -> Explanation:
        """Loads (path or PIL image) and preprocesses one image, then explains it; `.extras["image"]`
        holds the decoded RGB image for overlays. kwargs: explain()'s options or preprocessing overrides."""
        explain_opts = {k: kwargs.pop(k) for k in ("aug_smooth", "eigen_smooth", "channels", "progress")
                        if k in kwargs}
        pil = preprocess.load_image(image)
        pp = pp or self.preprocessing(**kwargs)
        result = self.explain(preprocess.to_tensor(pil, pp), targets, counterfactual=counterfactual,
                              **explain_opts)
        result.extras["image"] = pil
        return result

    def explain(self, inputs: np.ndarray | Mapping[str, np.ndarray], targets=None,
                counterfactual: bool = False, aug_smooth: bool = False, eigen_smooth: bool = False,
                channels: Sequence[int] | None = None, progress=None) -> Explanation:
        """Explains a batch. `targets`: None (argmax), one int, or one int per sample; or target objects of
        onnxcam.targets (IndexTarget, RegionTarget, DetectionTarget: one, or one per sample). `counterfactual`
        negates the gradients (gradient methods). `aug_smooth`: average over flips x intensity factors
        (pytorch-grad-cam's test-time augmentation); `eigen_smooth`: first principal component of the
        weighted activations instead of their channel sum. `channels`: for Score-CAM / Ablation-CAM, the
        channels to perturb (default all); `progress(n)` is called as perturbed batches finish."""
        feeds = self._feeds(inputs)
        n = feeds[self.image_input].shape[0]
        if target_kinds.is_target_request(targets):  # index tuples, regions, boxes: onnxcam/targets.py
            if aug_smooth:
                raise OnnxcamError("aug_smooth flips the image, which moves regions and boxes; use it with class "
                                   "targets")
            return target_kinds.explain(self, feeds, targets, counterfactual, eigen_smooth, channels, progress)
        target_vec = self._targets(targets, n)
        if counterfactual and self.method_info.kind == "perturbation":
            raise OnnxcamError(f"counterfactual maps need gradients; method '{self.method}' uses none")
        if aug_smooth:
            return self._aug_smooth(feeds, target_vec, counterfactual, eigen_smooth, channels, progress)
        return self._explain(feeds, target_vec, counterfactual, eigen_smooth, channels, progress)

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
            target = self._targets(targets, n)
        sign = np.array([-1.0 if counterfactual else 1.0], np.float32)
        binding = self.session.io_binding()
        keep = []  # the OrtValues made here must outlive the run
        inputs_of_session = {i.name for i in self.session.get_inputs()}
        for name, value in [*checked.items(), (build.TARGET, target), (build.SIGN, sign)]:
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

    def _explain(self, feeds, target_vec, counterfactual, eigen_smooth, channels, progress) -> Explanation:
        feeds[build.TARGET] = target_vec
        feeds[build.SIGN] = np.array([-1.0 if counterfactual else 1.0], np.float32)
        try:
            outs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
        except Exception as exc:
            raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None
        scores, chosen = outs[build.SCORES], outs[build.TARGETS]
        if self.num_classes is None and (target_vec >= 0).any():
            bad = (chosen < 0) | (chosen >= scores.shape[1])
            if bad.any():
                raise OnnxcamError(f"target {int(chosen[bad][0])} is out of range for {scores.shape[1]} classes")
        kind = self.method_info.kind
        if kind in ("gradient", "pixel") and not eigen_smooth:
            maps = [outs[build.maps_name(i)] for i in range(len(self.layers))]
            heat = outs[build.HEATMAPS]
        else:
            if kind == "perturbation":
                maps = [self._perturbation_maps(i, feeds, outs, scores, chosen, channels, progress)
                        for i in range(len(self.layers))]
            else:
                maps = [np.maximum(methods.first_component(outs[build.weighted_name(i)]), 0)
                        for i in range(len(self.layers))]
            heat = self._heatmaps(maps, feeds[self.image_input])
        guided, extras = None, {}
        if kind == "pixel":
            guided = outs[build.GUIDED_GRADCAM if self.method == "guided-gradcam" else build.GUIDED]
            extras["guided_backprop"] = outs[build.GUIDED]
        return Explanation(maps=maps[0], heatmaps=heat, scores=scores, targets=chosen, layer=self.layer,
                           method=self.method, counterfactual=counterfactual, guided=guided,
                           maps_per_layer=maps, extras=extras)

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
        if self.method not in ("scorecam", "ablationcam"):
            return None
        key = ("perturb", i)
        with self._aux_lock:
            if key not in self._aux:
                if self.method == "scorecam":
                    g = perturb.scorecam_graph(self._inferred, self.image_input, self.score, self.layout)
                else:
                    g = perturb.ablation_graph(self._inferred, self.layers[i], self.score,
                                               channels_last=self.layer_layouts[i].kind == layouts.CHANNELS_LAST)
                self._aux[key] = make_session(g, self.providers, self.session_options)
            return self._aux[key]

    def _perturbation_maps(self, i, feeds, outs, scores, chosen, channels, progress) -> np.ndarray:
        acts = outs[build.activations_name(i)]
        n, c = acts.shape[:2]
        chans = np.arange(c) if channels is None else np.asarray(channels, np.int64)
        if chans.size == 0 or chans.min() < 0 or chans.max() >= c:
            raise OnnxcamError(f"channels must be indices in 0..{c - 1}")
        session = self._perturbation_session(i)
        needed = {x.name for x in session.get_inputs()}
        maps = []
        for s in range(n):
            extra = {k: v[s:s + 1] for k, v in feeds.items() if k in needed and k != self.image_input}
            target = int(chosen[s])
            if self.method == "scorecam":
                w = perturb.scorecam_weights(session, feeds[self.image_input][s:s + 1], acts[s], target, chans,
                                             self.batch_size, extra, progress)
            else:
                if self.image_input in needed:
                    extra[self.image_input] = feeds[self.image_input][s:s + 1]
                w = perturb.ablation_weights(session, acts[s], float(scores[s, target]), target, chans,
                                             self.batch_size, extra, progress)
            weighted = w.reshape((c,) + (1,) * (acts.ndim - 2)) * acts[s]
            maps.append(np.maximum(weighted.sum(axis=0), 0))
        return np.float32(maps)

    def perturbation_count(self, n: int, channels: Sequence[int] | None = None) -> int:
        """How many perturbed forward passes explain() will run for a batch of n (for progress bars)."""
        if self.method_info.kind != "perturbation":
            return 0
        per = [len(channels) if channels is not None else None] * len(self.layers)
        sizes = [p if p is not None else self._channels(i) for i, p in enumerate(per)]
        return n * sum(sizes)

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
        r = self._explain(batch, np.concatenate([targets] * len(AUGMENTATIONS)), counterfactual, eigen_smooth,
                          channels, progress)

        def deaugment(a: np.ndarray) -> np.ndarray:
            parts = [np.flip(p, p.ndim - 1) if flip else p
                     for p, (flip, _) in zip(np.split(a, len(AUGMENTATIONS)), AUGMENTATIONS)]
            return np.mean(np.float32(parts), axis=0)

        plain = AUGMENTATIONS.index((False, 1.0))
        part = slice(plain * n, (plain + 1) * n)
        maps = [deaugment(m) for m in r.maps_per_layer]
        return Explanation(maps=maps[0], heatmaps=deaugment(r.heatmaps), scores=r.scores[part],
                           targets=r.targets[part], layer=self.layer, method=self.method,
                           counterfactual=counterfactual, guided=None if r.guided is None else r.guided[part],
                           maps_per_layer=maps)

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
                    if isinstance(exp, int) and got != exp:
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
        image = out[self.image_input]
        image_shape = tuple(image.shape()) if isinstance(image, ort.OrtValue) else image.shape
        if len(image_shape) == 0 or image_shape[0] == 0:
            raise OnnxcamError("empty batch")
        return out

    def _targets(self, targets, n: int) -> np.ndarray:
        if targets is None:
            return np.full((n,), -1, np.int64)
        t = np.asarray(targets)
        if t.dtype.kind not in "iu":
            if t.dtype.kind == "f" and np.all(np.mod(t, 1) == 0):
                t = t.astype(np.int64)
            else:
                raise OnnxcamError(f"targets must be integers, got {t.dtype}")
        t = t.astype(np.int64).reshape(-1)
        if t.size == 1:
            t = np.repeat(t, n)
        if t.size != n:
            raise OnnxcamError(f"got {t.size} targets for a batch of {n}")
        k = self.num_classes
        if k is not None and ((t < 0) | (t >= k)).any():
            bad = int(t[(t < 0) | (t >= k)][0])
            raise OnnxcamError(f"target {bad} is out of range: the score has {k} classes (0..{k - 1})")
        if k is None and (t < 0).any():
            raise OnnxcamError(f"target {int(t[t < 0][0])} is out of range")
        return t


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
