"""Builds the fused explain graph: forward + backward (score -> layer) + CAM, one ONNX model.

Graph interface (all batch-leading, batch dynamic):
  inputs : the model's own inputs, `onnxcam_target` int64 (N,) (-1 = argmax of the score),
           optionally `onnxcam_sign` float (1,) (+1 Grad-CAM, -1 counterfactual: negated gradients)
  outputs: `onnxcam_scores` (N, K), `onnxcam_targets` (N,), `onnxcam_maps` (N, *layer spatial),
           `onnxcam_heatmaps` (N, *input spatial), optionally the model's own outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import methods
from .autodiff import gradient
from .errors import OnnxcamError
from .graph import Emitter, ModelView, ensure_opset, infer_shapes, opset_version

TARGET = "onnxcam_target"
SIGN = "onnxcam_sign"
SCORES = "onnxcam_scores"
TARGETS = "onnxcam_targets"
MAPS = "onnxcam_maps"
HEATMAPS = "onnxcam_heatmaps"
ACTIVATIONS = "onnxcam_activations"
GRADIENTS = "onnxcam_gradients"


@dataclass(frozen=True)
class Spec:
    """Which tensors to explain and how."""

    image: str
    layer: str
    score: str
    method: str = "gradcam"
    layout: str = "NCHW"  # of the image input: where its spatial dims are


def _spatial_size(emit: Emitter, image: str, rank: int, layout: str) -> str:
    shape = emit.shape_of(image)
    if layout == "NHWC":
        return emit.op("Slice", [shape, emit.ints([1]), emit.ints([rank - 1])])
    return emit.op("Slice", [shape, emit.ints([2]), emit.ints([rank])])


def build_explain_graph(model: onnx.ModelProto, spec: Spec, *, sign_input: bool = True,
                        keep_outputs: bool = False, expose_tensors: bool = False) -> onnx.ModelProto:
    """Rewrites a (shape-inferred) copy of `model` into the fused explain graph described above."""
    cam_method = methods.get_method(spec.method)
    before = opset_version(model)
    model = ensure_opset(model, 11)
    if opset_version(model) != before:
        model = infer_shapes(model)
    view = ModelView(model)
    graph = model.graph
    emit = Emitter.for_model(model)

    layer_rank = view.rank(spec.layer)
    image_rank = view.rank(spec.image)
    if layer_rank is None or layer_rank < 3:
        raise OnnxcamError(f"layer '{spec.layer}' is not a feature map (rank {layer_rank})")

    # Score as (N, K): the seed is a one-hot of the target per sample (samples do not interact).
    score2d = emit.op("Reshape", [spec.score, emit.ints([0, -1])], hint="score2d")
    score_f = emit.op("Cast", [score2d], to=TensorProto.FLOAT, hint="scores") \
        if view.elem_type(spec.score) != TensorProto.FLOAT else score2d
    argmax = emit.op("ArgMax", [score2d], axis=1, keepdims=0, hint="argmax")
    zero_i = emit.const(np.array(0, np.int64), hint="zero_i")
    target = emit.op("Where", [emit.op("Less", [TARGET, zero_i]), argmax, TARGET], hint="target")
    k = emit.op("Gather", [emit.shape_of(score2d), emit.const(np.array(1, np.int64))], axis=0)
    classes = emit.op("Range", [zero_i, k, emit.const(np.array(1, np.int64))], hint="classes")
    onehot = emit.op("Equal", [emit.unsqueeze(classes, [0]), emit.unsqueeze(target, [1])])
    seed2d = emit.op("Cast", [onehot], to=view.elem_type(spec.score), hint="onehot")
    if sign_input:
        sign = emit.op("Cast", [SIGN], to=view.elem_type(spec.score)) \
            if view.elem_type(spec.score) != TensorProto.FLOAT else SIGN
        seed2d = emit.op("Mul", [seed2d, sign], hint="signed_seed")
    seed = emit.op("Reshape", [seed2d, emit.shape_of(spec.score)], hint="seed")

    grads = gradient(model, of=spec.score, wrt=[spec.layer], seed=seed, emit=emit)[spec.layer]

    acts, grads_f = spec.layer, grads
    if view.elem_type(spec.layer) != TensorProto.FLOAT:
        # CAM arithmetic (means, ReLU, min-max) in float32 even for float16 models.
        acts = emit.op("Cast", [acts], to=TensorProto.FLOAT)
        grads_f = emit.op("Cast", [grads_f], to=TensorProto.FLOAT)
    cam = cam_method(emit, acts, grads_f, layer_rank)
    emit.op("Identity", [cam], outputs=[MAPS])
    size = _spatial_size(emit, spec.image, image_rank, spec.layout)
    heat = methods.normalize(emit, methods.upsample(emit, methods.normalize(emit, cam, layer_rank - 1), size),
                             layer_rank - 1)
    emit.op("Identity", [heat], outputs=[HEATMAPS])
    emit.op("Identity", [score_f], outputs=[SCORES])
    emit.op("Identity", [target], outputs=[TARGETS])
    if expose_tensors:
        emit.op("Identity", [acts], outputs=[ACTIVATIONS])
        emit.op("Identity", [grads_f], outputs=[GRADIENTS])
    emit.commit(model)

    graph.input.append(helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["N"]))
    if sign_input:
        graph.input.append(helper.make_tensor_value_info(SIGN, TensorProto.FLOAT, [1]))
    spatial_layer = ["h%d" % i for i in range(layer_rank - 2)]
    spatial_image = ["H%d" % i for i in range(image_rank - 2)]
    new_outputs = [
        helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["N", "K"]),
        helper.make_tensor_value_info(TARGETS, TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info(MAPS, TensorProto.FLOAT, ["N", *spatial_layer]),
        helper.make_tensor_value_info(HEATMAPS, TensorProto.FLOAT, ["N", *spatial_image]),
    ]
    if expose_tensors:
        new_outputs += [
            helper.make_tensor_value_info(ACTIVATIONS, TensorProto.FLOAT, ["N", "C", *spatial_layer]),
            helper.make_tensor_value_info(GRADIENTS, TensorProto.FLOAT, ["N", "C", *spatial_layer]),
        ]
    if not keep_outputs:
        del graph.output[:]
    graph.output.extend(new_outputs)
    return model
