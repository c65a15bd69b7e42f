"""Adjoint checks of the convolution, pooling and normalisation rules (onnxcam/rules/conv.py)."""
from __future__ import annotations

import numpy as np
import pytest

import onnxcam.autodiff.rules  # noqa: F401  (registers the rules)
from onnxcam.autodiff.rules import registry
from tests.adjoint import check_vjp

F32 = np.float32
F64 = np.float64


def rand(shape, seed=0, dtype=F32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def distinct(shape, seed=0, dtype=F32):
    """Values without ties and with gaps >> finite-difference eps, for max-type ops."""
    n = int(np.prod(shape))
    perm = np.random.default_rng(seed).permutation(n).astype(np.float64)
    return (perm * 0.5 - n / 4).reshape(shape).astype(dtype)


def dyn_batch(name="x"):
    return {name: {0: "N"}}


def dyn_all(rank, name="x"):
    return {name: {i: f"d{i}" for i in range(rank) if i != 1}}


# --------------------------------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------------------------------
CONV_CASES = [
    # (x shape, w shape, attrs)
    ((2, 3, 7, 6), (4, 3, 3, 3), {}),
    ((1, 3, 9, 8), (5, 3, 3, 2), {"strides": [2, 3], "pads": [1, 0, 0, 2]}),
    ((2, 4, 10, 9), (6, 2, 3, 3), {"group": 2, "dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    ((1, 6, 11, 11), (6, 1, 3, 3), {"group": 6, "strides": [2, 2], "pads": [0, 0, 1, 1]}),  # depthwise
    ((1, 4, 8, 8), (8, 1, 5, 5), {"group": 4, "strides": [2, 2], "pads": [2, 2, 2, 2]}),   # multiplier 2
    ((1, 3, 9, 7), (4, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 3, 8, 7), (4, 3, 4, 2), {"strides": [3, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 3, 8, 7), (4, 3, 4, 2), {"strides": [3, 2], "auto_pad": "SAME_UPPER"}),              # odd total pad
    ((1, 3, 9, 7), (4, 3, 3, 3), {"strides": [2, 2], "auto_pad": "VALID"}),
    ((2, 3, 13), (4, 3, 3), {"strides": [2], "pads": [1, 2]}),                            # 1-D
    ((2, 3, 12), (3, 1, 5), {"group": 3, "dilations": [2], "pads": [4, 0]}),               # 1-D depthwise
    ((1, 2, 5, 6, 7), (3, 2, 3, 2, 3), {"strides": [2, 1, 2], "pads": [1, 0, 1, 0, 1, 1]}),  # 3-D
    ((1, 3, 8, 8), (4, 3, 1, 1), {"strides": [2, 2]}),                                    # 1x1 stride 2
    # stride 1: the adjoint is a Conv with the flipped, per-group transposed kernel
    ((1, 3, 7, 8), (4, 3, 3, 2), {"pads": [1, 0, 2, 1]}),                                 # asymmetric pads
    ((1, 4, 7, 7), (8, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),                     # multiplier 2
    ((1, 6, 7, 6), (6, 1, 3, 3), {"group": 6, "dilations": [2, 1], "pads": [2, 1, 1, 0]}),  # depthwise
    ((1, 4, 5, 6, 4), (6, 2, 3, 1, 2), {"group": 2, "dilations": [1, 1, 2], "pads": [1, 0, 1, 1, 0, 1]}),  # 3-D
    ((2, 5, 4, 4), (3, 5, 1, 1), {}),                                                     # 1x1 stride 1
    ((1, 3, 6, 7), (4, 3, 4, 3), {"auto_pad": "SAME_UPPER"}),                             # even kernel
    ((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [3, 1, 0, 2]}),   # pad beyond the kernel: ConvTranspose fallback
]


@pytest.mark.parametrize("xs,ws,attrs", CONV_CASES)
def test_conv(xs, ws, attrs):
    inputs = {"x": rand(xs, 1), "w": rand(ws, 2), "b": rand(ws[:1], 3)}
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4)


def test_stride_one_conv_gradient_is_a_conv():
    # The faster form must actually be emitted (a silent fallback to ConvTranspose would pass the adjoint checks).
    import onnx
    from onnx import TensorProto, helper

    from tests.adjoint import vjp_model

    def grad_ops(attrs):
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y0"], **attrs)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 7, 7]),
             helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, 2, 3, 3])],
            [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        return [n.op_type for n in vjp_model(model, ["x"])[0].graph.node][1:]

    assert "ConvTranspose" not in grad_ops({"group": 2, "pads": [1, 1, 1, 1]})
    assert grad_ops({"group": 2, "pads": [1, 1, 1, 1]}).count("Conv") == 1
    assert "ConvTranspose" in grad_ops({"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1]})


@pytest.mark.parametrize("xs,ws,attrs", [CONV_CASES[i] for i in (1, 3, 5, 6, 7, 9, 11)])
def test_conv_dynamic(xs, ws, attrs):
    inputs = {"x": rand(xs, 1), "w": rand(ws, 2)}
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, dynamic=dyn_batch())
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, dynamic=dyn_all(len(xs)))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_conv_opsets(opset):
    inputs = {"x": rand((1, 3, 9, 8), 1), "w": rand((4, 3, 3, 3), 2)}
    attrs = {"strides": [2, 2], "pads": [1, 0, 0, 1]}
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, opset=opset)
    check_vjp("Conv", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, opset=opset, dynamic=dyn_all(4))



# --------------------------------------------------------------------------------------------------
# ConvTranspose (gradient w.r.t. its data input)
# --------------------------------------------------------------------------------------------------
CONVT_CASES = [
    ((2, 3, 5, 4), (3, 4, 3, 3), {}),
    ((1, 3, 5, 6), (3, 2, 3, 2), {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]}),
    ((1, 4, 5, 5), (4, 3, 3, 3), {"group": 2, "dilations": [2, 1], "pads": [1, 1, 2, 0]}),
    ((1, 4, 6, 6), (4, 1, 4, 4), {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}),   # depthwise
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 4, 5), (2, 3, 4, 3), {"strides": [2, 2], "output_shape": [9, 10]}),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER", "output_shape": [7, 9]}),
    ((2, 3, 6), (3, 2, 3), {"strides": [3], "pads": [0, 2], "output_padding": [2]}),       # 1-D
    ((1, 2, 3, 4, 3), (2, 2, 3, 2, 3), {"strides": [2, 1, 2], "pads": [1, 0, 1, 0, 1, 1]}),  # 3-D
    ((1, 2, 5, 5), (2, 2, 3, 3), {"strides": [2, 2], "dilations": [3, 3], "output_padding": [1, 1]}),
    ((1, 2, 4, 5), (2, 3, 4, 4), {"auto_pad": "SAME_UPPER"}),                             # odd total pad
    ((1, 2, 4, 5), (2, 3, 4, 4), {"auto_pad": "SAME_LOWER"}),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER", "output_shape": [8, 10]}),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER", "output_shape": [8, 10]}),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [6, 8]}),
]


@pytest.mark.parametrize("xs,ws,attrs", CONVT_CASES)
def test_conv_transpose(xs, ws, attrs):
    inputs = {"x": rand(xs, 1), "w": rand(ws, 2), "b": rand((ws[1] * attrs.get("group", 1),), 3)}
    check_vjp("ConvTranspose", inputs, wrt=["x"], attrs=attrs, rtol=1e-4)


def test_conv_transpose_dynamic():
    xs, ws, attrs = CONVT_CASES[1]
    inputs = {"x": rand(xs, 1), "w": rand(ws, 2)}
    check_vjp("ConvTranspose", inputs, wrt=["x"], attrs=attrs, rtol=1e-4, dynamic=dyn_all(4))


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------
MAXPOOL_CASES = [
    ((2, 3, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2]}),                  # overlapping (ResNet)
    ((1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1}),
    ((1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),         # ceil adds a window
    ((1, 2, 8, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ((1, 2, 10, 9), {"kernel_shape": [2, 3], "dilations": [2, 2], "strides": [1, 2]}),
    ((1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),                   # non-overlapping
    ((2, 3, 12), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}),       # 1-D
    ((1, 2, 5, 6, 7), {"kernel_shape": [3, 2, 3], "strides": [2, 2, 2], "pads": [1, 0, 1, 1, 0, 0]}),  # 3-D
]


@pytest.mark.parametrize("xs,attrs", MAXPOOL_CASES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_max_pool(xs, attrs, dtype):
    check_vjp("MaxPool", {"x": distinct(xs, 1, dtype)}, attrs=attrs, eps=1e-3 if dtype == F32 else None)


def test_max_pool_dynamic_and_opsets():
    xs, attrs = MAXPOOL_CASES[2]
    for opset in (16, 18, 21):
        check_vjp("MaxPool", {"x": distinct(xs, 2, F64)}, attrs=attrs, opset=opset, dynamic=dyn_all(4))
        check_vjp("MaxPool", {"x": distinct(xs, 2, F64)}, attrs=attrs, opset=opset, dynamic=dyn_batch())


def test_max_pool_storage_order():
    check_vjp("MaxPool", {"x": distinct((2, 2, 7, 6), 3, F64)},
              attrs={"kernel_shape": [3, 3], "strides": [2, 2], "storage_order": 1})


def test_max_pool_old_opset_is_refused():
    with pytest.raises(Exception, match="opset >= 16"):
        check_vjp("MaxPool", {"x": distinct((1, 1, 4, 4), 1, F64)}, attrs={"kernel_shape": [2, 2]}, opset=13)


AVGPOOL_CASES = [
    ((2, 3, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2]}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2], "count_include_pad": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1}),
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1,
                    "count_include_pad": 1}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER", "count_include_pad": 1}),
    ((2, 3, 12), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}),      # 1-D
    ((1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),              # ceil adds a window
    ((1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 1}),
    ((1, 2, 8, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
                    "count_include_pad": 1}),
    ((1, 2, 8, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 0], "ceil_mode": 1}),
    ((1, 2, 5, 6, 7), {"kernel_shape": [3, 2, 3], "strides": [2, 2, 2], "pads": [1, 0, 1, 1, 0, 0],
                       "count_include_pad": 1}),                                              # 3-D
]


@pytest.mark.parametrize("xs,attrs", AVGPOOL_CASES)
def test_average_pool(xs, attrs):
    check_vjp("AveragePool", {"x": rand(xs, 1)}, attrs=attrs, rtol=1e-4)


@pytest.mark.parametrize("case", [1, 3, 4, 5, 6, 7, 9, 10, 11])
def test_average_pool_dynamic(case):
    xs, attrs = AVGPOOL_CASES[case]
    check_vjp("AveragePool", {"x": rand(xs, 1)}, attrs=attrs, rtol=1e-4, dynamic=dyn_all(len(xs)))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("cip", [0, 1])
def test_pool_ceil_window_starting_in_end_padding(op, cip):
    """onnxruntime drops a ceil_mode window that would start in the end padding; onnx shape inference
    keeps it (3x3 inferred, 2x2 computed here), so only symbolic spatial sizes make a runnable model."""
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}
    if op == "AveragePool":
        attrs["count_include_pad"] = cip
        check_vjp(op, {"x": rand((1, 2, 4, 6), 1)}, attrs=attrs, rtol=1e-4, dynamic=dyn_all(4))
    else:
        check_vjp(op, {"x": distinct((1, 2, 4, 6), 1, F64)}, attrs=attrs, dynamic=dyn_all(4))


def test_average_pool_static_input_with_wrong_inferred_output(monkeypatch):
    """Static x, but the pool's output shape as shape inference states it is wrong (see above): the rule
    must not build its static constants from it. The output is declared symbolic to keep it runnable."""
    import tests.adjoint as adjoint

    original = adjoint.infer_shapes

    def infer(model):
        model = original(model)
        for vi in list(model.graph.value_info) + list(model.graph.output):
            if vi.name == "y0":
                for i, dim in enumerate(vi.type.tensor_type.shape.dim):
                    if i >= 2:
                        dim.dim_param = f"o{i}"
        return model

    monkeypatch.setattr(adjoint, "infer_shapes", infer)
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}
    for cip in (0, 1):
        check_vjp("AveragePool", {"x": rand((1, 2, 4, 6), 1)}, attrs={**attrs, "count_include_pad": cip},
                  rtol=1e-4)


@pytest.mark.parametrize("opset,xs,attrs", [
    (11, *AVGPOOL_CASES[2]), (13, *AVGPOOL_CASES[4]),
    # dilations for AveragePool exist from opset 19
    (19, (1, 2, 10, 9), {"kernel_shape": [2, 3], "dilations": [2, 2], "strides": [1, 2], "pads": [1, 1, 1, 1]}),
    (19, (1, 2, 10, 9), {"kernel_shape": [2, 3], "dilations": [2, 2], "strides": [2, 2], "pads": [1, 0, 1, 1],
                         "ceil_mode": 1, "count_include_pad": 1}),
])
def test_average_pool_opsets(opset, xs, attrs):
    check_vjp("AveragePool", {"x": rand(xs, 1)}, attrs=attrs, rtol=1e-4, opset=opset)
    check_vjp("AveragePool", {"x": rand(xs, 1)}, attrs=attrs, rtol=1e-4, opset=opset, dynamic=dyn_batch())


@pytest.mark.parametrize("xs", [(2, 3, 5, 4), (1, 2, 7), (1, 2, 3, 4, 2)])
@pytest.mark.parametrize("dyn", [False, True])
def test_global_average_pool(xs, dyn):
    # onnxruntime's CPU GlobalAveragePool/GlobalMaxPool are float32 only
    check_vjp("GlobalAveragePool", {"x": rand(xs, 1)}, rtol=1e-4, dynamic=dyn_all(len(xs)) if dyn else None)


@pytest.mark.parametrize("xs", [(2, 3, 5, 4), (1, 2, 7), (1, 2, 3, 4, 2)])
@pytest.mark.parametrize("dyn", [False, True])
def test_global_max_pool(xs, dyn):
    check_vjp("GlobalMaxPool", {"x": distinct(xs, 1)}, rtol=1e-4, dynamic=dyn_all(len(xs)) if dyn else None)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def bn_inputs(xs, dtype=F64):
    c = xs[1]
    rng = np.random.default_rng(5)
    return {"x": rand(xs, 1, dtype), "scale": rng.standard_normal(c).astype(dtype),
            "b": rng.standard_normal(c).astype(dtype), "mean": rng.standard_normal(c).astype(dtype),
            "var": rng.uniform(0.5, 2.0, c).astype(dtype)}


@pytest.mark.parametrize("xs", [(4, 3), (2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 3)])
@pytest.mark.parametrize("opset", [9, 15])
def test_batch_normalization(xs, opset):
    check_vjp("BatchNormalization", bn_inputs(xs), wrt=["x"], attrs={"epsilon": 1e-3}, opset=opset)


def test_batch_normalization_opset7_per_activation():
    """spatial=0 (opsets 7-8): statistics and scale per activation, shaped (C, H, W)."""
    inputs = bn_inputs((2, 3, 4, 5))
    rng = np.random.default_rng(8)
    for k in ("scale", "b", "mean"):
        inputs[k] = rng.standard_normal((3, 4, 5))
    inputs["var"] = rng.uniform(0.5, 2.0, (3, 4, 5))
    check_vjp("BatchNormalization", inputs, wrt=["x"], attrs={"spatial": 0}, opset=7)
    check_vjp("BatchNormalization", bn_inputs((2, 3, 4, 5)), wrt=["x"], opset=7)


def test_batch_normalization_dynamic_and_float32():
    check_vjp("BatchNormalization", bn_inputs((2, 3, 4, 5)), wrt=["x"], dynamic=dyn_all(4))
    check_vjp("BatchNormalization", bn_inputs((2, 3, 4, 5), F32), wrt=["x"], dynamic=dyn_batch())


def test_batch_normalization_training_mode_is_refused():
    with pytest.raises(Exception, match="training mode"):
        check_vjp("BatchNormalization", bn_inputs((4, 3, 2)), wrt=["x"], attrs={"training_mode": 1},
                  n_outputs=3, opset=15)


def ln_inputs(xs, axis, dtype=F64, bias=True):
    norm_shape = xs[axis:]
    rng = np.random.default_rng(6)
    out = {"x": rand(xs, 1, dtype) * 2 + 0.5, "scale": rng.standard_normal(norm_shape).astype(dtype)}
    if bias:
        out["b"] = rng.standard_normal(norm_shape).astype(dtype)
    return out


@pytest.mark.parametrize("xs,axis", [((3, 7), -1), ((2, 5, 6), -1), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), -2),
                                     ((2, 3, 4), 0)])
def test_layer_normalization(xs, axis):
    check_vjp("LayerNormalization", ln_inputs(xs, axis), wrt=["x"], attrs={"axis": axis, "epsilon": 1e-3})


@pytest.mark.parametrize("output", [0, 1, 2])
def test_layer_normalization_statistics_outputs(output):
    """Mean / InvStdDev present as outputs; also the gradient flowing in through each of them."""
    # The statistics are float32 (stash_type=1) even for double X: float32 throughout here.
    inputs = ln_inputs((2, 3, 6), -1, F32)
    check_vjp("LayerNormalization", inputs, wrt=["x"], n_outputs=3, output=output, eps=1e-3, rtol=5e-3)


def test_layer_normalization_dynamic_no_bias_float32():
    inputs = ln_inputs((2, 5, 6), -1, F32, bias=False)
    check_vjp("LayerNormalization", inputs, wrt=["x"], dynamic={"x": {0: "N", 1: "T"}}, rtol=5e-3)
    inputs = ln_inputs((2, 5, 6), -1, bias=False)
    check_vjp("LayerNormalization", inputs, wrt=["x"], dynamic={"x": {0: "N", 1: "T"}}, opset=18)


@pytest.mark.parametrize("xs", [(2, 3, 7), (2, 3, 4, 5), (1, 2, 3, 4, 3)])
def test_instance_normalization(xs):
    inputs = bn_inputs(xs, F32)  # onnxruntime's CPU InstanceNormalization is float32 only
    inputs = {"x": inputs["x"], "scale": inputs["scale"], "b": inputs["b"]}
    check_vjp("InstanceNormalization", inputs, wrt=["x"], attrs={"epsilon": 1e-3}, eps=1e-3, rtol=5e-3)
    check_vjp("InstanceNormalization", inputs, wrt=["x"], opset=13, dynamic=dyn_all(len(xs)), eps=1e-3, rtol=5e-3)


@pytest.fixture
def typed_function_outputs(monkeypatch):
    """onnx shape inference leaves the output of function ops such as GroupNormalization untyped, which
    makes the forward model unloadable; give such outputs the type of the node's first input."""
    import tests.adjoint as adjoint

    original = adjoint.infer_shapes

    def infer(model):
        model = original(model)
        types = {vi.name: vi.type for vi in list(model.graph.input) + list(model.graph.value_info)}
        for node in model.graph.node:
            for out in node.output:
                if out and out not in types and node.input[0] in types:
                    model.graph.value_info.add(name=out).type.CopyFrom(types[node.input[0]])
        return model

    monkeypatch.setattr(adjoint, "infer_shapes", infer)


@pytest.mark.usefixtures("typed_function_outputs")
@pytest.mark.parametrize("xs,groups", [((2, 6, 4, 3), 3), ((2, 4, 5), 2), ((1, 6, 2, 3, 2), 6), ((1, 4, 3, 3), 1)])
@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization(xs, groups, opset, monkeypatch):
    if opset < 21:
        # onnx 1.23's checker rejects GroupNormalization-18 as deprecated; onnxruntime still runs it.
        import tests.adjoint as adjoint
        monkeypatch.setattr(adjoint.onnx.checker, "check_model", lambda *a, **k: None)
    rng = np.random.default_rng(7)
    n_scale = xs[1] if opset >= 21 else groups
    inputs = {"x": rand(xs, 1, F32), "scale": rng.standard_normal(n_scale).astype(F32),
              "b": rng.standard_normal(n_scale).astype(F32)}
    check_vjp("GroupNormalization", inputs, wrt=["x"], attrs={"num_groups": groups, "epsilon": 1e-3},
              opset=opset, eps=1e-3, rtol=5e-3)
    check_vjp("GroupNormalization", inputs, wrt=["x"], attrs={"num_groups": groups, "epsilon": 1e-3},
              opset=opset, eps=1e-3, rtol=5e-3, dynamic=dyn_all(len(xs)))


# --------------------------------------------------------------------------------------------------
# The harness itself
# --------------------------------------------------------------------------------------------------
def test_harness_catches_a_wrong_rule(monkeypatch):
    """A Conv rule that forgets the stride geometry (ConvTranspose without pads/output_padding, resized
    by a Slice) must be caught, as must one that is only off by a constant factor."""
    from onnxcam.autodiff.rules import conv as conv_rules

    def wrong_conv(ctx, gy):
        return [ctx.op("Mul", [conv_rules.conv(ctx, gy)[0], ctx.scalar(1.01, ctx.input(0))]), None]

    monkeypatch.setitem(registry.RULES, ("", "Conv"), wrong_conv)
    inputs = {"x": rand((1, 3, 9, 8), 1), "w": rand((4, 3, 3, 3), 2)}
    with pytest.raises(AssertionError):
        check_vjp("Conv", inputs, wrt=["x"], attrs={"strides": [2, 2], "pads": [1, 0, 0, 1]}, rtol=1e-4)

    def shifted_max_pool(ctx, gy):  # gradient to the window's neighbour: right shape, wrong place
        g = conv_rules.max_pool(ctx, gy)[0]
        return [ctx.op("Concat", [ctx.op("Slice", [g, ctx.emit.ints([1]), ctx.emit.ints([2**62]),
                                                   ctx.emit.ints([3])]),
                                  ctx.op("Slice", [g, ctx.emit.ints([0]), ctx.emit.ints([1]),
                                                   ctx.emit.ints([3])])], axis=3)]

    monkeypatch.setitem(registry.RULES, ("", "MaxPool"), shifted_max_pool)
    with pytest.raises(AssertionError):
        check_vjp("MaxPool", {"x": distinct((1, 2, 8, 8), 1, F64)}, attrs={"kernel_shape": [3, 3], "strides": [2, 2]})


# --------------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------------
def resize_inputs(xs, scales=None, sizes=None, roi=None, dtype=F32):
    inputs = {"x": rand(xs, 1, dtype), "roi": np.array(roi if roi else [], F32),
              "scales": np.array(scales if scales else [], F32)}
    order = ["x", "roi", "scales"]
    if sizes is not None:
        inputs["sizes"] = np.array(sizes, np.int64)
        order.append("sizes")
    return inputs, order


RESIZE_CASES = [
    ((1, 2, 3, 4), [1, 1, 2, 2], None, {"mode": "nearest"}),
    ((1, 2, 3, 4), [1, 1, 2, 2], None, {"mode": "linear"}),
    ((2, 2, 3, 4), [1, 1, 2.5, 1.5], None, {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ((1, 2, 5, 6), None, [1, 2, 3, 4], {"mode": "linear"}),                                   # downscale
    ((1, 2, 5, 6), None, [1, 2, 7, 13], {"mode": "nearest", "nearest_mode": "floor",
                                         "coordinate_transformation_mode": "asymmetric"}),
    ((1, 2, 4, 5), [1, 1, 2, 2], None, {"mode": "cubic"}),
    ((1, 2, 4, 5), [1, 1, 1.5, 2], None, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    ((1, 2, 6), [1, 1, 3], None, {"mode": "nearest"}),                                          # 1-D
    ((1, 2, 3, 4, 3), [1, 1, 2, 1, 2], None, {"mode": "nearest"}),                              # 3-D
    ((1, 2, 3, 4, 3), [1, 1, 2, 2, 2], None, {"mode": "linear"}),                               # trilinear
]


@pytest.mark.parametrize("xs,scales,sizes,attrs", RESIZE_CASES)
def test_resize(xs, scales, sizes, attrs):
    inputs, order = resize_inputs(xs, scales, sizes)
    check_vjp("Resize", inputs, wrt=["x"], attrs=attrs, input_order=order, rtol=1e-4, opset=13)


@pytest.mark.parametrize("case", [0, 1, 3, 5])
def test_resize_dynamic(case):
    xs, scales, sizes, attrs = RESIZE_CASES[case]
    inputs, order = resize_inputs(xs, scales, sizes)
    check_vjp("Resize", inputs, wrt=["x"], attrs=attrs, input_order=order, rtol=1e-4, opset=13,
              dynamic=dyn_all(len(xs)))


def test_resize_crop_and_antialias_and_opsets():
    inputs, order = resize_inputs((1, 2, 5, 6), None, [1, 2, 4, 4], roi=[0, 0, 0.2, 0.1, 1, 1, 0.9, 0.7])
    check_vjp("Resize", inputs, wrt=["x"], input_order=order, rtol=1e-4, opset=13,
              attrs={"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
                     "extrapolation_value": 5.0})
    inputs, order = resize_inputs((1, 2, 8, 9), [1, 1, 0.5, 0.6])
    check_vjp("Resize", inputs, wrt=["x"], input_order=order, rtol=1e-4, opset=18,
              attrs={"mode": "linear", "antialias": 1})
    inputs, order = resize_inputs((1, 2, 8, 9), [0.5, 0.6])
    check_vjp("Resize", inputs, wrt=["x"], input_order=order, rtol=1e-4, opset=18,
              attrs={"mode": "cubic", "axes": [2, 3]})
    inputs, order = resize_inputs((1, 2, 3, 4), [1, 1, 2, 2])
    check_vjp("Resize", inputs, wrt=["x"], input_order=order, rtol=1e-4, opset=11, attrs={"mode": "linear"})
    check_vjp("Resize", {"x": rand((1, 2, 3, 4), 1), "scales": np.array([1, 1, 2, 3], F32)}, wrt=["x"],
              rtol=1e-4, opset=10, attrs={"mode": "linear"})
    check_vjp("Upsample", {"x": rand((1, 2, 3, 4), 1), "scales": np.array([1, 1, 2, 3], F32)}, wrt=["x"],
              rtol=1e-4, opset=9, attrs={"mode": "nearest"})


def _graph_vjp_check(model, x, rtol=1e-4, eps=1e-2):
    """Dot-product test of d y0 / d x for a small multi-node model (the harness takes single nodes)."""
    from tests.adjoint import run, vjp_model

    y = run(model, {"x": x}, ["y0"])[0]
    rng = np.random.default_rng(0)
    gy = rng.standard_normal(y.shape).astype(y.dtype)
    gmodel, (gname,) = vjp_model(model, ["x"])
    gx = run(gmodel, {"x": x, "gy": gy}, [gname])[0].astype(F64)
    dx = rng.standard_normal(x.shape).astype(x.dtype)
    plus, minus = (run(model, {"x": (x + s * eps * dx).astype(x.dtype)}, ["y0"])[0].astype(F64) for s in (1, -1))
    lhs, rhs = float(np.sum(gy * (plus - minus) / (2 * eps))), float(np.sum(gx * dx))
    assert abs(lhs - rhs) <= rtol * (abs(lhs) + abs(rhs)), (lhs, rhs)


@pytest.mark.parametrize("use_sizes", [True, False])
def test_resize_with_computed_sizes_or_scales(use_sizes):
    """FPN-style: the target size comes from another tensor's Shape at run time, not a constant."""
    from onnx import TensorProto, helper

    from onnxcam.model.graph import infer_shapes

    nodes = [helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Slice", ["xs", "zero", "two"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Mul", ["sc", "one"], ["scales"])]
    inputs = ["x", "", "", "sizes"] if use_sizes else ["x", "", "scales"]
    nodes.append(helper.make_node("Resize", inputs, ["y0"], mode="linear"))
    inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
             helper.make_tensor("two", TensorProto.INT64, [1], [2]),
             helper.make_tensor("hw", TensorProto.INT64, [2], [7, 9]),
             helper.make_tensor("sc", TensorProto.FLOAT, [4], [1, 1, 1.5, 2.5]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = infer_shapes(model)
    _graph_vjp_check(model, rand((2, 2, 4, 5), 1))


# --------------------------------------------------------------------------------------------------
# LpNormalization / LRN
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xs,axis,p", [((3, 5), -1, 2), ((2, 4, 3, 3), 1, 2), ((2, 4, 3), 1, 1), ((2, 4, 3), 0, 2)])
def test_lp_normalization(xs, axis, p):
    x = rand(xs, 1, F64) + 0.1  # keep away from the kink of |x| at 0 for p = 1
    check_vjp("LpNormalization", {"x": x}, attrs={"axis": axis, "p": p}, opset=13)
    check_vjp("LpNormalization", {"x": x}, attrs={"axis": axis, "p": p}, opset=18, dynamic=dyn_batch())


# onnxruntime's CPU LRN takes 4-D input and odd sizes only.
@pytest.mark.parametrize("xs,size", [((2, 7, 3, 4), 5), ((1, 6, 5, 2), 3), ((1, 3, 2, 2), 7), ((1, 5, 3, 3), 1)])
def test_lrn(xs, size):
    attrs = {"size": size, "alpha": 0.5, "beta": 0.75, "bias": 2.0}
    check_vjp("LRN", {"x": rand(xs, 1)}, attrs=attrs, eps=1e-3, rtol=5e-3)
    check_vjp("LRN", {"x": rand(xs, 1)}, attrs=attrs, eps=1e-3, rtol=5e-3, opset=13, dynamic=dyn_all(len(xs)))


# --------------------------------------------------------------------------------------------------
# End to end against PyTorch autograd
# --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Converting a tensor to a Python boolean")
@pytest.mark.parametrize("opset", [17, 18])
def test_exported_cnn_matches_torch_autograd(opset):
    """A small exported CNN (stride-2 conv, ceil-mode max/avg pools with pads, dilated depthwise conv,
    GroupNorm, bilinear upsampling, ConvTranspose, LayerNorm, GAP, Linear) with symbolic N/H/W: the
    gradient graph's d<seed, y>/dx equals torch's."""
    torch = pytest.importorskip("torch")
    import io

    import onnx
    from onnx import helper
    from torch import nn
    from torch.nn import functional as tf

    from onnxcam.autodiff import gradient
    from onnxcam.model.graph import infer_shapes
    from tests.adjoint import run

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
            self.gn = nn.GroupNorm(2, 8)
            self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = tf.relu(self.bn(self.c1(x)))
            x = tf.max_pool2d(x, 3, 2, 1, ceil_mode=True)
            x = self.gn(self.dw(x))
            x = tf.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
            x = tf.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.ln(self.up(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(tf.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 29, 31)
    buf = io.BytesIO()
    torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=["y"], opset_version=opset,
                      dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}, dynamo=False)
    model = infer_shapes(onnx.load_from_string(buf.getvalue()))
    model.graph.input.append(helper.make_tensor_value_info("seed", onnx.TensorProto.FLOAT, ["N", 5]))
    gx_name = gradient(model, "y", ["x"], "seed")["x"]
    model.graph.output.append(helper.make_tensor_value_info(gx_name, onnx.TensorProto.FLOAT, None))
    seed = np.random.default_rng(0).standard_normal((2, 5)).astype(F32)
    gx = run(model, {"x": x.numpy(), "seed": seed}, [gx_name])[0]
    xt = x.clone().requires_grad_()
    (net(xt) * torch.from_numpy(seed)).sum().backward()
    ref = xt.grad.numpy()
    np.testing.assert_allclose(gx, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
