"""Methods that need many forward passes: Score-CAM, Ablation-CAM, ReciproCAM and RISE.

Each gets one auxiliary ONNX graph, run in bounded batches through one session:
  * Score-CAM: the model with a masking prefix: `image * minmax(upsample(A_k))` for a batch of channels k.
  * Ablation-CAM: only the part of the model after the layer (the layer becomes an input), fed with copies
    of the activations in which one channel each is ablated. Usually that is just the head (pool + FC),
    so ablating thousands of channels costs little. ReciproCAM feeds the same graph the activations kept at one
    spatial position per row.
  * RISE: the model itself, fed the input times random masks (no layer, no gradient: any model).
Formulas follow pytorch-grad-cam's ScoreCAM and AblationCAM.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
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
    _batch_from_layer(m)
    emit = Emitter.for_model(m)
    _score_output(m, emit, score if score != layer else fed)
    vi = m.graph.input.add()
    vi.name = LAYER_IN
    vi.type.CopyFrom(layer_type)
    prune(m, [SCORE])
    return m


def _batch_from_layer(m: onnx.ModelProto) -> None:
    """A head that reads only the batch size of a model input (`view(x.size(0), -1)`: Shape(image) -> Gather 0)
    reads it from the fed activations instead, which have the same batch: the perturbed runs then need no copy
    of the image per row (49 copies of a 224x224 image for ReciproCAM, C for Ablation-CAM)."""
    view = ModelView(m)
    inputs = {i.name for i in m.graph.input} - {LAYER_IN}
    consumers: dict[str, list] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def batch_only(node) -> bool:
        if node.op_type != "Gather" or next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
            return False
        index = view.constant_value(node.input[1])
        return index is not None and index.size == 1 and int(index.ravel()[0]) == 0

    for node in m.graph.node:
        if node.op_type == "Shape" and node.input[0] in inputs and not node.attribute and \
                all(batch_only(c) for c in consumers.get(node.output[0], [])):
            node.input[0] = LAYER_IN


def _run_batches(total: int, batch_size: int, run: Callable[[int, int], np.ndarray],
                 progress: Progress | None, verdict: dict | None = None) -> np.ndarray:
    """run(start, stop) over 0..total in batches. `verdict`: the caller's record for this session of whether a
    batch gives each item the score it gets alone (`_batch_if_like_singles`), so that it is checked once."""
    verdict = {} if verdict is None else verdict
    if verdict.get("batched") is False:
        batch_size = 1
    parts = []
    start = 0
    while start < total:
        stop = min(total, start + batch_size)
        if start == 0 and stop > 1 and "batched" not in verdict:
            first = _batch_if_like_singles(run, stop)
            verdict["batched"] = first is not None
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


def explained(scores: np.ndarray, target: np.ndarray, softmax: bool = False) -> np.ndarray:
    """y = <W, score> of each perturbed input; W is one sample's target weights over the flattened score (a
    one-hot for a class), so every target kind is scored the same way. `softmax`: ReciproCAM and RISE score
    *probabilities*, <W, softmax(score)>, for a classifier's logits (as both papers)."""
    s = np.asarray(scores, np.float64)
    if softmax:
        s = np.exp(s - s.max(axis=1, keepdims=True))
        s /= s.sum(axis=1, keepdims=True)
    return s @ np.asarray(target, np.float64)


def scorecam_weights(session, image: np.ndarray, acts: np.ndarray, target: np.ndarray, channels: np.ndarray,
                     batch_size: int, extra_feeds: dict, progress: Progress | None = None,
                     verdict: dict | None = None) -> np.ndarray:
    """Softmax over the chosen channels of the target score of each masked image; 0 elsewhere.
    `image` is one sample (1, ...), `acts` its activations (C, *spatial)."""
    def run(start: int, stop: int) -> np.ndarray:
        idx = channels[start:stop]
        feeds = {IMAGE: image, MASKS: np.ascontiguousarray(acts[idx], np.float32)}
        feeds.update({k: np.repeat(v, len(idx), axis=0) for k, v in extra_feeds.items()})
        return explained(session.run([SCORE], feeds)[0], target)

    scores = _run_batches(len(channels), batch_size, run, progress, verdict)
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
                     batch_size: int, extra_feeds: dict, progress: Progress | None = None,
                     verdict: dict | None = None) -> np.ndarray:
    """(original - ablated) / original for the chosen channels; 0 elsewhere (as pytorch-grad-cam)."""
    value = ablation_value(acts)

    def run(start: int, stop: int) -> np.ndarray:
        idx = channels[start:stop]
        batch = np.repeat(acts[None], len(idx), axis=0)
        batch[np.arange(len(idx)), idx] = value
        feeds = {LAYER_IN: batch}
        feeds.update({k: np.repeat(v, len(idx), axis=0) for k, v in extra_feeds.items()})
        return explained(session.run([SCORE], feeds)[0], target)

    scores = _run_batches(len(channels), batch_size, run, progress, verdict)
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


def reciprocam_map(session, acts: np.ndarray, target: np.ndarray, softmax: bool, batch_size: int,
                   extra_feeds: dict, progress: Progress | None = None, verdict: dict | None = None) -> np.ndarray:
    """ReciproCAM (Byun & Lee, arXiv 2209.14074): the head (the ablation graph) run once per spatial position on
    the activations kept at that position only (one-hot mask, zero elsewhere); the map holds each run's
    probability of the target. `acts`: one sample's (C, *spatial)."""
    c, spatial = acts.shape[0], acts.shape[1:]
    flat = np.ascontiguousarray(acts.reshape(c, -1), np.float32)
    positions = flat.shape[1]

    def run(start: int, stop: int) -> np.ndarray:
        rows = np.arange(start, stop)
        batch = np.zeros((len(rows), c, positions), np.float32)
        batch[np.arange(len(rows)), :, rows] = flat[:, rows].T
        feeds = {LAYER_IN: batch.reshape((len(rows), c, *spatial))}
        feeds.update({k: np.repeat(v, len(rows), axis=0) for k, v in extra_feeds.items()})
        return explained(session.run([SCORE], feeds)[0], target, softmax)

    scores = _run_batches(positions, batch_size, run, progress, verdict).reshape(spatial)
    # Raw scores can be negative; the map is defined up to its min-max scaling, and a map below 0 would read as
    # empty.
    return np.float32(scores if softmax else scores - scores.min())


@dataclass(frozen=True)
class RiseOptions:
    """RISE (Petsiuk et al. 2018): `masks` random masks, each a `cells` x `cells` grid of cells kept with
    probability `p`, bilinearly upsampled and randomly shifted; `seed` makes the masks repeatable."""
    masks: int = 4000
    cells: int = 7
    p: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.masks < 1 or self.cells < 1 or not 0 < self.p <= 1:
            raise OnnxcamError(f"RISE needs masks >= 1, cells >= 1 and 0 < p <= 1 (got masks={self.masks}, "
                               f"cells={self.cells}, p={self.p})")


def _linear_weights(out: int, size: int) -> np.ndarray:
    """(out, size) matrix of half-pixel bilinear upsampling from `size` to `out` samples, edges clamped."""
    pos = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    frac = pos - lo
    m = np.zeros((out, size))
    m[np.arange(out), lo] += 1 - frac
    m[np.arange(out), hi] += frac
    return m


def rise_masks(rng: np.random.Generator, count: int, size: tuple[int, int], options: RiseOptions) -> np.ndarray:
    """`count` masks (count, H, W) in [0, 1], drawn from `rng` as the paper does: a binary cells x cells grid,
    upsampled to (cells + 1) cell sizes, cropped at a random shift of less than one cell."""
    h, w = size
    cell_h, cell_w = -(-h // options.cells), -(-w // options.cells)
    up_h, up_w = (options.cells + 1) * cell_h, (options.cells + 1) * cell_w
    # Drawn mask by mask (grid, then shift), so that the masks do not depend on how many are drawn at once.
    draws = [(rng.random((options.cells, options.cells)) < options.p, rng.integers(0, cell_h),
              rng.integers(0, cell_w)) for _ in range(count)]
    # Separable upsampling restricted to each mask's crop: (h x cells) @ grid @ (cells x w) per mask.
    rows = _linear_weights(up_h, options.cells)[np.array([dy for _, dy, _ in draws])[:, None] + np.arange(h)]
    cols = _linear_weights(up_w, options.cells)[np.array([dx for _, _, dx in draws])[:, None] + np.arange(w)]
    grids = np.float32([grid for grid, _, _ in draws])
    return rows.astype(np.float32) @ grids @ cols.astype(np.float32).transpose(0, 2, 1)


def rise_map(session, image: np.ndarray, image_name: str, score: str, layout: str, target: np.ndarray,
             softmax: bool, options: RiseOptions, batch_size: int, extra_feeds: dict,
             progress: Progress | None = None) -> np.ndarray:
    """sum_i y(image * M_i) M_i / (masks * p) for one sample (1, ...) of the model's input; `session` runs the
    model alone (its input -> `score`). The masks are drawn batch by batch from one seeded generator, so the
    map does not depend on the batch size and memory stays at one batch of masks."""
    spatial = image.shape[1:-1] if layout == "NHWC" else image.shape[2:]
    if len(spatial) != 2:
        raise OnnxcamError(f"RISE masks 2-D images; the input has {len(spatial)} spatial dims")
    rng = np.random.default_rng(options.seed)
    total = np.zeros(spatial, np.float64)
    done = 0
    while done < options.masks:
        count = min(batch_size, options.masks - done)
        masks = rise_masks(rng, count, tuple(spatial), options)
        shaped = masks[..., None] if layout == "NHWC" else masks[:, None]
        feeds = {image_name: (image * shaped).astype(image.dtype)}
        feeds.update({k: np.repeat(v, count, axis=0) for k, v in extra_feeds.items()})
        out = np.asarray(session.run([score], feeds)[0])
        if out.shape[:1] != (count,):
            raise OnnxcamError(f"RISE: the model gave {out.shape[:1]} rows for a batch of {count} masked images")
        y = explained(out.reshape(count, -1), target, softmax)
        total += np.tensordot(y, masks, axes=1)
        done += count
        if progress is not None:
            progress(count)
    return np.float32(total / (options.masks * options.p))
