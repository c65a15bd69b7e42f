"""Methods that need many forward passes: Score-CAM and Ablation-CAM.

Each gets one auxiliary ONNX graph, run in bounded batches through one session:
  * Score-CAM: the model with a masking prefix: `image * minmax(upsample(A_k))` for a batch of channels k.
  * Ablation-CAM: only the part of the model after the layer (the layer becomes an input), fed with copies
    of the activations in which one channel each is ablated. Usually that is just the head (pool + FC),
    so ablating thousands of channels costs little.
Formulas follow pytorch-grad-cam's ScoreCAM and AblationCAM.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import methods
from ..errors import OnnxcamError
from ..model.graph import Emitter, ModelView, prune

IMAGE = "onnxcam_image"
MASKS = "onnxcam_masks"
LAYER_IN = "onnxcam_layer_in"
SCORE = "onnxcam_score"

Progress = Callable[[int], None]


def _score_output(model: onnx.ModelProto, emit: Emitter, score: str) -> None:
    """Output `onnxcam_score` (B, K), float32 whatever the model computes in (weights are made in numpy)."""
    flat = emit.op("Reshape", [score, emit.ints([0, -1])])
    if ModelView(model).elem_type(score) != TensorProto.FLOAT:
        flat = emit.op("Cast", [flat], to=TensorProto.FLOAT)
    emit.op("Identity", [flat], outputs=[SCORE])
    emit.commit(model)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["B", "K"]))


def scorecam_graph(model: onnx.ModelProto, image: str, score: str, layout: str) -> onnx.ModelProto:
    """Inputs: `onnxcam_image` (1, *image dims) and `onnxcam_masks` (B, *layer spatial): B channels of A.
    Output: `onnxcam_score` (B, K), the scores of the B masked images."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    view = ModelView(m)
    rank = view.rank(image)
    image_vi = next(i for i in m.graph.input if i.name == image)
    emit = Emitter.for_model(m)
    shape = emit.shape_of(IMAGE)
    size = emit.op("Slice", [shape, emit.ints([1 if layout == "NHWC" else 2]),
                             emit.ints([rank - 1 if layout == "NHWC" else rank])])
    up = methods.upsample(emit, MASKS, size, mode="align_corners")  # nn.UpsamplingBilinear2d
    axes = list(range(1, rank - 1))
    lo = emit.reduce("ReduceMin", up, axes, keepdims=1)
    hi = emit.reduce("ReduceMax", up, axes, keepdims=1)
    norm = emit.op("Div", [emit.op("Sub", [up, lo]),
                           emit.op("Add", [emit.op("Sub", [hi, lo]), emit.scalar(1e-8, np.float32)])])
    mask = emit.unsqueeze(norm, [rank - 1 if layout == "NHWC" else 1])
    if view.elem_type(image) != TensorProto.FLOAT:
        mask = emit.op("Cast", [mask], to=view.elem_type(image))
    emit.op("Mul", [IMAGE, mask], outputs=[image])  # the model now reads the masked images
    _score_output(m, emit, score)
    new_image = onnx.ValueInfoProto()
    new_image.CopyFrom(image_vi)
    new_image.name = IMAGE
    inputs = [i for i in m.graph.input if i.name != image] + [
        new_image, helper.make_tensor_value_info(MASKS, TensorProto.FLOAT, ["B", *[f"h{d}" for d in range(rank - 2)]])]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    prune(m, [SCORE])
    return m


def ablation_graph(model: onnx.ModelProto, layer: str, score: str, channels_last: bool = False) -> onnx.ModelProto:
    """The model after `layer`: input `onnxcam_layer_in` (B, C, ...) replaces the layer's output; any other
    input the rest still needs (e.g. a skip connection from before the layer) stays an input. A channels-last
    layer is still fed channels-first (the view the CAM arithmetic uses) and moved back inside the graph.
    Output: `onnxcam_score` (B, K)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    view = ModelView(m)
    dims = view.shape(layer)[1:]
    if channels_last:
        dims = [dims[-1], *dims[:-1]]
    layer_type = onnx.TypeProto()
    layer_type.tensor_type.elem_type = TensorProto.FLOAT  # as the fused graph hands activations out
    for d in ["B"] + [d if isinstance(d, int) else f"d{i}" for i, d in enumerate(dims)]:
        dim = layer_type.tensor_type.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = d
    fed, front = LAYER_IN, []
    if view.elem_type(layer) != TensorProto.FLOAT:
        front.append(helper.make_node("Cast", [fed], [LAYER_IN + "_cast"], to=view.elem_type(layer)))
        fed = LAYER_IN + "_cast"
    if channels_last:
        front.append(helper.make_node("Transpose", [fed], [LAYER_IN + "_channels_last"],
                                      perm=[0, *range(2, len(dims) + 1), 1]))
        fed = LAYER_IN + "_channels_last"
    for node in reversed(front):  # first in the node list: the graph stays topologically sorted
        m.graph.node.insert(0, node)
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == layer:
                node.input[i] = fed
    emit = Emitter.for_model(m)
    _score_output(m, emit, score if score != layer else fed)
    vi = m.graph.input.add()
    vi.name = LAYER_IN
    vi.type.CopyFrom(layer_type)
    prune(m, [SCORE])
    return m


def _run_batches(total: int, batch_size: int, run: Callable[[int, int], np.ndarray],
                 progress: Progress | None) -> np.ndarray:
    parts = []
    start = 0
    while start < total:
        stop = min(total, start + batch_size)
        if start == 0 and stop > 1:
            first = _batch_if_like_singles(run, stop)
            if first is None:  # the graph mixes samples (a batch of 1 hard-coded somewhere): one at a time
                batch_size = stop = 1
                first = run(0, 1)
            parts.append(first)
        else:
            parts.append(run(start, stop))
        if progress is not None:
            progress(stop - start)
        start = stop
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def _batch_if_like_singles(run: Callable[[int, int], np.ndarray], stop: int) -> np.ndarray | None:
    """run(0, stop) if the batched run gives each item the score it gets alone, else None. Graphs exported for
    one sample (a Reshape to [1, ...], static input dims) either refuse a batch or silently fold it into other
    axes; comparing the first two items with runs of their own costs two extra passes and catches both."""
    try:
        batched = run(0, stop)
    except Exception:
        return None
    if np.shape(batched)[:1] != (stop,):
        return None
    singles = np.concatenate([np.asarray(run(i, i + 1), np.float64) for i in range(2)])
    scale = max(float(np.abs(singles).max()), 1.0)
    return batched if bool(np.all(np.abs(np.asarray(batched[:2], np.float64) - singles) <= 1e-3 * scale)) else None


def _explained(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """y = <W, score> of each perturbed input; W is one sample's target weights over the flattened score (a
    one-hot for a class), so every target kind is scored the same way."""
    return np.asarray(scores, np.float64) @ np.asarray(target, np.float64)


def scorecam_weights(session, image: np.ndarray, acts: np.ndarray, target: np.ndarray, channels: np.ndarray,
                     batch_size: int, extra_feeds: dict, progress: Progress | None = None) -> np.ndarray:
    """Softmax over the chosen channels of the target score of each masked image; 0 elsewhere.
    `image` is one sample (1, ...), `acts` its activations (C, *spatial)."""
    def run(start: int, stop: int) -> np.ndarray:
        idx = channels[start:stop]
        feeds = {IMAGE: image, MASKS: np.ascontiguousarray(acts[idx], np.float32)}
        feeds.update({k: np.repeat(v, len(idx), axis=0) for k, v in extra_feeds.items()})
        return _explained(session.run([SCORE], feeds)[0], target)

    scores = _run_batches(len(channels), batch_size, run, progress)
    weights = np.zeros(acts.shape[0], np.float64)
    e = np.exp(scores - scores.max())
    weights[channels] = e / e.sum()
    return weights.astype(np.float32)


def ablation_value(acts: np.ndarray) -> float:
    """What an ablated channel is set to: 0 after a ReLU (min == 0), else far below every activation.
    (pytorch-grad-cam lowers the value again for each channel of a batch when min != 0; we use
    min - 1e7 for every channel, which is what that code intends.)"""
    lo = float(acts.min())
    return 0.0 if lo == 0 else lo - 1e7


def ablation_weights(session, acts: np.ndarray, original: float, target: np.ndarray, channels: np.ndarray,
                     batch_size: int, extra_feeds: dict, progress: Progress | None = None) -> np.ndarray:
    """(original - ablated) / original for the chosen channels; 0 elsewhere (as pytorch-grad-cam)."""
    value = ablation_value(acts)

    def run(start: int, stop: int) -> np.ndarray:
        idx = channels[start:stop]
        batch = np.repeat(acts[None], len(idx), axis=0)
        batch[np.arange(len(idx)), idx] = value
        feeds = {LAYER_IN: batch}
        feeds.update({k: np.repeat(v, len(idx), axis=0) for k, v in extra_feeds.items()})
        return _explained(session.run([SCORE], feeds)[0], target)

    scores = _run_batches(len(channels), batch_size, run, progress)
    weights = np.zeros(acts.shape[0], np.float64)
    if not np.isfinite(original) or not np.isfinite(scores).all():
        raise OnnxcamError(f"Ablation-CAM: the explained score is NaN or Inf "
                           f"{'with a channel ablated' if np.isfinite(original) else ''}".rstrip())
    if original == 0:
        # The relative drop is undefined; every channel gets weight 0 (an empty map) rather than NaN.
        warnings.warn("Ablation-CAM: the explained score is exactly 0, so relative drops are undefined; "
                      "the map is empty", RuntimeWarning, stacklevel=2)
        return weights.astype(np.float32)
    weights[channels] = (original - scores) / original
    return weights.astype(np.float32)
