"""The Python API: `Explainer(model).explain(inputs, targets)`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from . import build, preprocess, rewrite
from .errors import OnnxcamError
from .graph import ModelLike, ModelView, infer_shapes, load_model
from .runtime import first_line, make_session


@dataclass
class Explanation:
    maps: np.ndarray  # (N, h, w) raw CAM at layer resolution, after the ReLU
    heatmaps: np.ndarray  # (N, H, W) in [0, 1] at input resolution
    scores: np.ndarray  # (N, K) the score tensor (pre-softmax logits where the model has a softmax)
    targets: np.ndarray  # (N,) the class explained per sample
    layer: str = ""
    method: str = "gradcam"
    counterfactual: bool = False
    extras: dict = field(default_factory=dict)


class Explainer:
    """Grad-CAM for an ONNX model: one fused onnxruntime session, built once, safe to share across threads."""

    def __init__(self, model: ModelLike, layer: str | None = None, method: str = "gradcam",
                 providers: Sequence | None = None, output: str | None = None, layout: str | None = None):
        source = load_model(model)
        self.source_model = source
        inferred = infer_shapes(source)
        view = ModelView(inferred)
        self.input_names = list(view.graph_inputs)
        self.image_input = rewrite.image_input(view)
        self.score = rewrite.find_score(view, output)
        if layer is None:
            layer = rewrite.default_layer(view, self.image_input, self.score)
        else:
            rewrite.check_layer(view, layer, self.image_input, self.score)
        self.layer = layer
        self.method = method
        self.input_shapes = {n: view.shape(n) for n in self.input_names}
        self.input_dtypes = {n: view.np_dtype(n) for n in self.input_names}
        self.layout = layout or _guess_layout(self.input_shapes[self.image_input])
        spec = build.Spec(image=self.image_input, layer=layer, score=self.score, method=method, layout=self.layout)
        self.model = build.build_explain_graph(inferred, spec)
        self.session = make_session(self.model, providers)
        self.num_classes = _static_classes(view, self.score)
        self.metadata = preprocess.model_metadata(source)
        self.labels: list[str] | None = self.metadata.get("labels")

    def preprocessing(self, **overrides) -> preprocess.Preprocess:
        """How images become this model's input: overrides (preset, mean, std, size, layout) > model
        metadata > the input's static shape > ImageNet defaults."""
        return preprocess.resolve_preprocess(self.input_shapes[self.image_input], metadata=self.metadata,
                                             **{k: v for k, v in overrides.items() if v is not None})

    def explain_image(self, image, targets=None, counterfactual: bool = False,
                      pp: preprocess.Preprocess | None = None, **overrides) -> Explanation:
        """Loads (path or PIL image) and preprocesses one image, then explains it; `.extras["image"]`
        holds the decoded RGB image for overlays."""
        pil = preprocess.load_image(image)
        pp = pp or self.preprocessing(**overrides)
        result = self.explain(preprocess.to_tensor(pil, pp), targets, counterfactual=counterfactual)
        result.extras["image"] = pil
        return result

    def explain(self, inputs: np.ndarray | Mapping[str, np.ndarray], targets=None,
                counterfactual: bool = False) -> Explanation:
        feeds = self._feeds(inputs)
        n = feeds[self.image_input].shape[0]
        feeds[build.TARGET] = self._targets(targets, n)
        feeds[build.SIGN] = np.array([-1.0 if counterfactual else 1.0], np.float32)
        try:
            scores, chosen, maps, heat = self.session.run(
                [build.SCORES, build.TARGETS, build.MAPS, build.HEATMAPS], feeds)
        except Exception as exc:
            raise OnnxcamError(f"onnxruntime failed: {first_line(exc)}") from None
        if self.num_classes is None and targets is not None:
            bad = (chosen < 0) | (chosen >= scores.shape[1])
            if bad.any():
                raise OnnxcamError(f"target {int(chosen[bad][0])} is out of range for {scores.shape[1]} classes")
        return Explanation(maps=maps, heatmaps=heat, scores=scores, targets=chosen, layer=self.layer,
                           method=self.method, counterfactual=counterfactual)

    # -- input checking ---------------------------------------------------------------------
    def _feeds(self, inputs) -> dict[str, np.ndarray]:
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
            arr = np.asarray(value)
            want = self.input_shapes[name]
            if want is not None and arr.ndim != len(want):
                raise OnnxcamError(f"input '{name}' has shape {arr.shape}; the model expects rank {len(want)} "
                                   f"{_fmt_shape(want)}")
            if want is not None:
                for axis, (got, exp) in enumerate(zip(arr.shape, want)):
                    if isinstance(exp, int) and got != exp:
                        raise OnnxcamError(f"input '{name}' has shape {arr.shape}; the model expects "
                                           f"{_fmt_shape(want)}")
            dtype = self.input_dtypes[name]
            if arr.dtype != dtype:
                if arr.dtype.kind in "fiub" and dtype.kind in "fiub":
                    arr = arr.astype(dtype)
                else:
                    raise OnnxcamError(f"input '{name}' has dtype {arr.dtype}; the model expects {dtype}")
            out[name] = np.ascontiguousarray(arr)
        if out[self.image_input].ndim == 0 or out[self.image_input].shape[0] == 0:
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


def _guess_layout(shape) -> str:
    if shape is not None and len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"
