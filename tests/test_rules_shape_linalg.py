"""Adjoint checks for the shape-moving rules (rules/shape.py) and linear algebra / reductions (rules/linalg.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adjoint import check_vjp, run, single_node_model, vjp_model
from onnxcam.errors import OnnxcamError
from onnxcam.model.graph import infer_shapes

F64 = np.float64


def rnd(*shape, dtype=F64, seed=None):
    rng = np.random.default_rng(seed if seed is not None else hash(shape) % 2**32)
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


def i64(*v):
    return np.array(v, dtype=np.int64)


def check_model_vjp(model: onnx.ModelProto, feeds: dict, wrt: list[str], output: str = "y", seed: int = 0):
    """check_vjp for a hand-built model (e.g. index inputs that are computed, not constant)."""
    model = infer_shapes(model)
    y = run(model, feeds, [output])[0]
    rng = np.random.default_rng(seed)
    gy = rng.standard_normal(y.shape).astype(y.dtype)
    gmodel, gnames = vjp_model(model, wrt, output)
    gxs = run(gmodel, {**feeds, "gy": gy}, gnames)
    eps = 1e-6
    for w, gx in zip(wrt, gxs):
        x = feeds[w]
        assert gx.shape == x.shape
        dx = np.asarray(rng.standard_normal(x.shape))
        plus = run(model, {**feeds, w: np.asarray(x + eps * dx)}, [output])[0]
        minus = run(model, {**feeds, w: np.asarray(x - eps * dx)}, [output])[0]
        lhs = float(np.sum(gy * (plus - minus) / (2 * eps)))
        rhs = float(np.sum(gx * dx))
        assert abs(lhs - rhs) <= 1e-6 * (abs(lhs) + abs(rhs) + 1e-9), (lhs, rhs)


def check_vjp_0d(op_type, inputs, attrs=None, opset=17, input_order=None):
    """check_vjp for nodes with 0-d float inputs (the shared harness feeds numpy scalars for those)."""
    wrt = [k for k, v in inputs.items() if v.dtype.kind == "f"]
    m = single_node_model(op_type, inputs, wrt, attrs or {}, opset=opset, input_order=input_order)
    check_model_vjp(m, {w: inputs[w] for w in wrt}, wrt, output="y0")


def make_model(nodes, inputs, output_shape=None, opset=17, initializers=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, output_shape)],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


# ============================================================ shape.py

@pytest.mark.parametrize("opset", [11, 13, 17])
def test_identity_dropout(opset):
    check_vjp("Identity", {"x": rnd(2, 3)}, opset=opset)
    check_vjp("Dropout", {"x": rnd(2, 3)}, opset=opset)
    check_vjp("Dropout", {"x": rnd(2, 3)}, n_outputs=2, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_reshape_family(opset):
    x = rnd(2, 3, 1, 4)
    check_vjp("Flatten", {"x": x}, attrs={"axis": 2}, opset=opset)
    check_vjp("Flatten", {"x": x}, attrs={"axis": -1}, opset=opset, dynamic={"x": {0: "N"}})
    check_vjp("Reshape", {"x": x, "s": i64(0, -1, 2)}, opset=opset, dynamic={"x": {0: "N"}})
    if opset < 13:
        check_vjp("Squeeze", {"x": x}, attrs={"axes": [-2]}, opset=opset)
        check_vjp("Unsqueeze", {"x": x}, attrs={"axes": [0, -1]}, opset=opset)
    else:
        check_vjp("Squeeze", {"x": x, "a": i64(-2)}, opset=opset, dynamic={"x": {0: "N"}})
        check_vjp("Squeeze", {"x": x}, opset=opset)
        check_vjp("Unsqueeze", {"x": x, "a": i64(0, -1)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_transpose(opset):
    x = rnd(2, 3, 4, 5)
    check_vjp("Transpose", {"x": x}, attrs={"perm": [2, 0, 3, 1]}, opset=opset)
    check_vjp("Transpose", {"x": x}, opset=opset)  # default: reversed
    check_vjp("Transpose", {"x": x}, attrs={"perm": [1, 0, 2, 3]}, opset=opset, dynamic={"x": {0: "N"}})


def test_cast():
    check_vjp("Cast", {"x": rnd(3, 4, dtype=np.float32)}, attrs={"to": TensorProto.DOUBLE})
    check_vjp("Cast", {"x": rnd(3, 4)}, attrs={"to": TensorProto.FLOAT}, eps=1e-3, rtol=1e-3)
    check_vjp("CastLike", {"x": rnd(3, 4, dtype=np.float32), "t": rnd(1)}, wrt=["x"])


def test_cast_from_int_has_no_gradient():
    # x -> Cast(int) -> Cast(double) -> y: no gradient reaches x through the integer tensor.
    from onnxcam.autodiff import gradient
    m = make_model([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
                    helper.make_node("Cast", ["i"], ["y"], to=TensorProto.DOUBLE)],
                   [("x", TensorProto.DOUBLE, [3]), ("gy", TensorProto.DOUBLE, [3])], [3])
    with pytest.raises(OnnxcamError):
        gradient(infer_shapes(m), of="y", wrt=["x"], seed="gy")


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(opset, mode):
    check_vjp("DepthToSpace", {"x": rnd(2, 8, 3, 2)}, attrs={"blocksize": 2, "mode": mode}, opset=opset)
    check_vjp("DepthToSpace", {"x": rnd(2, 18, 2, 3)}, attrs={"blocksize": 3, "mode": mode}, opset=opset,
              dynamic={"x": {0: "N", 2: "H"}})


@pytest.mark.parametrize("opset", [11, 13])
def test_space_to_depth(opset):
    check_vjp("SpaceToDepth", {"x": rnd(2, 3, 4, 6)}, attrs={"blocksize": 2}, opset=opset)
    check_vjp("SpaceToDepth", {"x": rnd(1, 2, 6, 3)}, attrs={"blocksize": 3}, opset=opset, dynamic={"x": {0: "N"}})


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_concat(opset):
    ins = {"a": rnd(2, 3, 4), "b": rnd(2, 1, 4), "c": rnd(2, 5, 4)}
    check_vjp("Concat", ins, attrs={"axis": 1}, opset=opset)
    check_vjp("Concat", ins, attrs={"axis": -2}, opset=opset, dynamic={"a": {0: "N", 1: "A"}, "b": {1: "B"}})
    check_vjp("Concat", {"a": rnd(2, 3), "b": rnd(4, 3)}, attrs={"axis": 0}, opset=opset, wrt=["b"])
    check_vjp("Concat", {"a": rnd(3, 2), "b": rnd(3, 0), "c": rnd(3, 4)}, attrs={"axis": -1}, opset=opset,
              wrt=["a", "c"])


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split(opset):
    x = rnd(3, 7, 2)
    if opset < 13:
        attrs, ins = {"axis": 1, "split": [2, 4, 1]}, {"x": x}
    else:
        attrs, ins = {"axis": 1}, {"x": x, "s": i64(2, 4, 1)}
    for out in range(3):
        check_vjp("Split", ins, attrs=attrs, n_outputs=3, output=out, opset=opset)
    check_vjp("Split", ins, attrs={**attrs, "axis": -2}, n_outputs=3, output=1, opset=opset,
              dynamic={"x": {0: "N"}})
    if opset < 18:  # equal split (opset 18 needs num_outputs for that)
        check_vjp("Split", {"x": rnd(4, 6)}, attrs={"axis": -1}, n_outputs=3, output=2, opset=opset)
    else:
        check_vjp("Split", {"x": x}, attrs={"axis": 1, "num_outputs": 3}, n_outputs=3, output=2, opset=opset)
        check_vjp("Split", {"x": x}, attrs={"axis": 1, "num_outputs": 3}, n_outputs=3, output=0, opset=opset)


def test_split_several_outputs_seeded():
    # y = Split(x) -> Sum(y0, y2): two of three outputs carry gradient, the middle one none.
    nodes = [helper.make_node("Split", ["x", "s"], ["y0", "y1", "y2"], axis=0),
             helper.make_node("Sum", ["y0", "y2"], ["y"])]
    m = make_model(nodes, [("x", TensorProto.DOUBLE, ["N", 3])], None, opset=13,
                   initializers=[numpy_helper.from_array(i64(2, 1, 2), "s")])
    check_model_vjp(m, {"x": rnd(5, 3)}, ["x"])


SLICE_CASES = [
    # starts, ends, axes, steps
    ([1], [3], [1], None),
    ([0, 1], [2, 100], [0, -1], None),                     # out-of-range end
    ([-1], [-1000], [1], [-1]),                            # full reverse
    ([4], [0], [-1], [-1]),
    ([0, 1], [100, 5], [1, 2], [2, 3]),
    ([-2, 5], [-1000, -100], [1, 2], [-2, -3]),
    ([1, 0], [2, 1], [0, 2], [1, 1]),                      # single element
    ([3], [1], [2], [1]),                                  # empty slice
    ([-10], [-20], [1], [-1]),                             # ONNX clamps a too-negative start to 0
    ([0], [2**62], [2], [2]),
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICE_CASES)
@pytest.mark.parametrize("opset", [11, 13])
def test_slice(starts, ends, axes, steps, opset):
    ins = {"x": rnd(3, 5, 6), "s": i64(*starts), "e": i64(*ends), "a": i64(*axes)}
    if steps is not None:
        ins["st"] = i64(*steps)
    check_vjp("Slice", ins, opset=opset)
    check_vjp("Slice", ins, opset=opset, dynamic={"x": {0: "N", 1: "A", 2: "B"}})


def test_slice_without_axes_and_steps():
    check_vjp("Slice", {"x": rnd(4, 5), "s": i64(1, -3), "e": i64(3, 100)})
    check_vjp("Slice", {"x": rnd(4, 5), "s": i64(1, 1), "e": i64(3, 100)}, dynamic={"x": {1: "W"}})


def test_slice_opset9_attributes():
    check_vjp("Slice", {"x": rnd(4, 5)}, attrs={"starts": [1, -3], "ends": [3, 100], "axes": [0, 1]}, opset=9)
    check_vjp("Slice", {"x": rnd(4, 5)}, attrs={"starts": [1], "ends": [3], "axes": [1]}, opset=9,
              dynamic={"x": {0: "N"}})


def test_slice_opset10():
    check_vjp("Slice", {"x": rnd(4, 5), "s": i64(3, 1), "e": i64(0, 3), "a": i64(0, 1), "st": i64(-1, 1)}, opset=10)


def test_old_opset_errors_are_clear():
    from onnxcam.errors import UnsupportedOpError
    with pytest.raises(UnsupportedOpError, match="opset 11"):
        check_vjp("Slice", {"x": rnd(5), "s": i64(0), "e": i64(5), "a": i64(0), "st": i64(2)}, opset=10)
    with pytest.raises(UnsupportedOpError, match="opset 11"):
        check_vjp("Gather", {"x": rnd(5), "i": i64(0, 1)}, opset=10)
    with pytest.raises(UnsupportedOpError, match="opset 11"):
        check_vjp("Slice", {"x": rnd(4, 5)}, attrs={"starts": [1], "ends": [3]}, opset=9, dynamic={"x": {0: "N"}})


@pytest.mark.parametrize("steps", [None, [2], [-1]])
def test_slice_computed_bounds(steps):
    # starts/ends computed from the shape of x: not constants of the model.
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Gather", ["shp", "one"], ["d"], axis=0),         # [W]
             helper.make_node("Div", ["d", "three"], ["s"]),                     # W // 3
             helper.make_node("Sub", ["d", "one"], ["e"])]                       # W - 1
    inits = [numpy_helper.from_array(i64(1), "one"), numpy_helper.from_array(i64(3), "three"),
             numpy_helper.from_array(i64(1), "ax")]
    slice_in = ["x", "s", "e", "ax"]
    if steps is not None:
        inits.append(numpy_helper.from_array(i64(*steps), "st"))
        slice_in.append("st")
    nodes.append(helper.make_node("Slice", slice_in, ["y"]))
    m = make_model(nodes, [("x", TensorProto.DOUBLE, ["N", "W"])], None, opset=13, initializers=inits)
    check_model_vjp(m, {"x": rnd(2, 9)}, ["x"])


@pytest.mark.parametrize("opset", [11, 13, 16, 18])
def test_gather(opset):
    x = rnd(4, 5, 3)
    for axis in (0, 1, -1):
        check_vjp("Gather", {"x": x, "i": i64(2, 0, 2, -1, 2)}, attrs={"axis": axis}, opset=opset)
    check_vjp("Gather", {"x": x, "i": np.array(-2, dtype=np.int64)}, attrs={"axis": 1}, opset=opset)   # scalar
    check_vjp("Gather", {"x": x, "i": np.array([[1, 1], [0, -1]], dtype=np.int32)}, attrs={"axis": -2},
              opset=opset)
    check_vjp("Gather", {"x": x, "i": i64(1, 1, 1)}, attrs={"axis": 2}, opset=opset, dynamic={"x": {0: "N", 1: "M"}})
    check_vjp("Gather", {"x": rnd(6), "i": np.array([[0, 5], [5, -6]], dtype=np.int64)}, opset=opset)


@pytest.mark.parametrize("opset", [13, 16])
def test_gather_computed_indices(opset):
    # indices computed in the graph (negative, repeated): no constant folding possible.
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Gather", ["shp", "zero"], ["d"], axis=0),
             helper.make_node("Sub", ["base", "d"], ["i"]),                       # base - rows
             helper.make_node("Gather", ["x", "i"], ["y"], axis=0)]
    inits = [numpy_helper.from_array(i64(0), "zero"), numpy_helper.from_array(i64(1, 2, 2, 4, 0), "base")]
    m = make_model(nodes, [("x", TensorProto.DOUBLE, ["N", 3])], None, opset=opset, initializers=inits)
    check_model_vjp(m, {"x": rnd(4, 3)}, ["x"])


@pytest.mark.parametrize("opset", [11, 13, 16, 18])
def test_gather_elements(opset):
    x = rnd(3, 4, 2)
    idx = np.array([[[0, 3], [3, -1], [-4, 1]], [[2, 2], [1, 1], [0, 0]]], dtype=np.int64)   # (2, 3, 2)
    check_vjp("GatherElements", {"x": x, "i": idx}, attrs={"axis": 1}, opset=opset)
    check_vjp("GatherElements", {"x": x, "i": idx[:, :, :1] % 2}, attrs={"axis": -1}, opset=opset)
    idx0 = np.array([[[1, 2], [2, 2], [0, -1], [1, 1]]] * 3, dtype=np.int64)   # (3, 4, 2)
    check_vjp("GatherElements", {"x": x, "i": idx0}, attrs={"axis": 0}, opset=opset, dynamic={"x": {0: "N"}})


@pytest.mark.parametrize("opset", [2, 11, 13, 18])
def test_pad_constant(opset):
    x = rnd(2, 3, 4)
    pads = [0, 1, 2, 1, 0, 3]
    if opset < 11:
        check_vjp("Pad", {"x": x}, attrs={"pads": pads, "value": 1.5}, opset=opset)
        check_vjp("Pad", {"x": x}, attrs={"pads": [0, -1, 2, 1, 0, -2]}, opset=opset)
        return
    check_vjp("Pad", {"x": x, "p": i64(*pads)}, opset=opset, dynamic={"x": {0: "N"}})
    check_vjp_0d("Pad", {"x": x, "p": i64(*pads), "v": np.array(0.5)}, opset=opset)         # d/d value as well
    check_vjp("Pad", {"x": x, "p": i64(0, -1, 2, 1, 0, -2)}, opset=opset)                    # cropping
    if opset >= 18:
        check_vjp_0d("Pad", {"x": x, "p": i64(1, 2, 0, 3), "v": np.array(0.0), "a": i64(-1, 1)}, opset=opset)
        check_vjp("Pad", {"x": x, "p": i64(2, 1), "a": i64(0)}, input_order=["x", "p", "", "a"], opset=opset)


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
@pytest.mark.parametrize("opset", [11, 13, 18, 19])
def test_pad_reflect_edge(mode, opset):
    if mode == "wrap" and opset < 19:
        pytest.skip("wrap mode is opset 19")
    x = rnd(2, 3, 5)
    check_vjp("Pad", {"x": x, "p": i64(0, 2, 1, 0, 1, 3)}, attrs={"mode": mode}, opset=opset,
              dynamic={"x": {0: "N"}})


def test_pad_reflect_needs_opset_11():
    from onnxcam.errors import UnsupportedOpError
    with pytest.raises(UnsupportedOpError, match="opset 11"):
        check_vjp("Pad", {"x": rnd(2, 4)}, attrs={"mode": "reflect", "pads": [1, 2, 1, 3]}, opset=10)


# ============================================================ linalg.py

@pytest.mark.parametrize("ta", [0, 1])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 1), (3, 5)])
def test_gemm(ta, tb, c_shape):
    a = rnd(*((4, 3) if ta else (3, 4)))
    b = rnd(*((5, 4) if tb else (4, 5)))
    ins = {"a": a, "b": b}
    if c_shape is not None:
        ins["c"] = rnd(*c_shape, seed=7)
    check = check_vjp_0d if c_shape == () else check_vjp
    check("Gemm", ins, attrs={"transA": ta, "transB": tb, "alpha": 0.7, "beta": -1.3}, opset=13)
    check("Gemm", ins, attrs={"transA": ta, "transB": tb}, opset=11)


def test_gemm_dynamic_batch():
    check_vjp("Gemm", {"a": rnd(3, 4), "b": rnd(5, 4), "c": rnd(5)}, attrs={"transB": 1}, dynamic={"a": {0: "N"}})


MATMUL_CASES = [
    ((3, 4), (4, 5)),
    ((2, 1, 3, 4), (5, 4, 6)),
    ((5, 4, 6), (2, 1, 6, 3)),
    ((2, 3, 4), (4, 2)),
    ((4,), (4, 5)),
    ((4,), (2, 3, 4, 5)),
    ((3, 4), (4,)),
    ((2, 1, 3, 4), (4,)),
    ((4,), (4,)),
    ((1, 3, 4), (2, 4, 5)),
    ((2, 3, 1, 4), (1, 1, 4, 2)),
]


@pytest.mark.parametrize("sa,sb", MATMUL_CASES)
def test_matmul(sa, sb):
    check_vjp("MatMul", {"a": rnd(*sa), "b": rnd(*sb)}, opset=13)


@pytest.mark.parametrize("opset", [11, 13])
def test_matmul_dynamic(opset):
    check_vjp("MatMul", {"a": rnd(2, 3, 4), "b": rnd(4, 5)}, dynamic={"a": {0: "N", 1: "M"}}, opset=opset)
    check_vjp("MatMul", {"a": rnd(4,), "b": rnd(2, 4, 5)}, dynamic={"b": {0: "N"}}, opset=opset)
    check_vjp("MatMul", {"a": rnd(2, 3, 4), "b": rnd(2, 4, 5)}, dynamic={"a": {0: "N"}, "b": {0: "N"}}, opset=opset)


def test_matmul_dynamic_broadcast():
    # a's batch dim is symbolic and b's is 5: a may be 1 (broadcast) at run time -> summed in the graph.
    check_vjp("MatMul", {"a": rnd(1, 3, 4), "b": rnd(5, 4, 2)}, dynamic={"a": {0: "N"}}, opset=13)
    check_vjp("MatMul", {"a": rnd(5, 3, 4), "b": rnd(5, 4, 2)}, dynamic={"a": {0: "N"}}, opset=13)
    check_vjp("MatMul", {"a": rnd(5, 3, 4), "b": rnd(1, 4, 2)}, dynamic={"a": {0: "N"}, "b": {0: "K"}}, opset=13)


def test_matmul_float32():
    check_vjp("MatMul", {"a": rnd(2, 3, 4, dtype=np.float32), "b": rnd(4, 2, dtype=np.float32)})


REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"]


def reduce_check(op, x, axes, keepdims, opset, noop=None, dynamic=None):
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    attrs = {"keepdims": keepdims}
    ins = {"x": x}
    if noop is not None:
        attrs["noop_with_empty_axes"] = noop
    if axes is not None:
        if axes_as_input:
            ins["a"] = i64(*axes)
        else:
            attrs["axes"] = list(axes)
    check_vjp(op, ins, attrs=attrs, opset=opset, dynamic=dynamic)


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_reduce(op, opset):
    x = rnd(3, 4, 5)
    if op == "ReduceLogSum":
        x = np.abs(x) + 0.5
    for keepdims in (0, 1):
        reduce_check(op, x, [1], keepdims, opset)
        reduce_check(op, x, [-1, 0], keepdims, opset, dynamic={"x": {1: "M"}})
        reduce_check(op, x, None, keepdims, opset)                                   # all axes
    reduce_check(op, x, [0, 1, 2], 0, opset, dynamic={"x": {0: "N"}})
    if opset >= 18 or (op == "ReduceSum" and opset >= 13):
        reduce_check(op, x, None, 1, opset, noop=1)                                  # no-op reduction
        reduce_check(op, x, None, 0, opset, noop=0)
        reduce_check(op, x, [], 0, opset, noop=0)


def test_reduce_max_ties_share_gradient():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]])
    nodes = [helper.make_node("ReduceMax", ["x"], ["y"], axes=[1], keepdims=0)]
    m = infer_shapes(make_model(nodes, [("x", TensorProto.DOUBLE, [2, 3])], [2], opset=13))
    gm, names = vjp_model(m, ["x"], "y")
    (gx,) = run(gm, {"x": x, "gy": np.array([1.0, 2.0])}, names)
    np.testing.assert_allclose(gx, [[0, 0.5, 0.5], [2, 0, 0]])


def test_reduce_mean_dynamic_count():
    check_vjp("ReduceMean", {"x": rnd(3, 4, 5)}, attrs={"axes": [1, 2], "keepdims": 0}, opset=13,
              dynamic={"x": {0: "N", 1: "H", 2: "W"}})
    check_vjp("ReduceMean", {"x": rnd(3, 4, 5), "a": i64(-2)}, attrs={"keepdims": 1}, opset=18,
              dynamic={"x": {1: "H"}})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_softmax(op, opset):
    x = rnd(2, 3, 4)
    check_vjp(op, {"x": x}, opset=opset)                                   # default axis (1 / -1)
    for axis in (0, 1, -1, -2):
        check_vjp(op, {"x": x}, attrs={"axis": axis}, opset=opset)
    check_vjp(op, {"x": x}, attrs={"axis": 1}, opset=opset, dynamic={"x": {0: "N", 2: "C"}})
    check_vjp(op, {"x": rnd(2, 5, dtype=np.float32)}, attrs={"axis": -1}, opset=opset)


EINSUM_CASES = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,kj", [(3, 4), (5, 4)]),                        # implicit output "ik"
    ("ij->", [(3, 4)]),
    ("ij->j", [(3, 4)]),
    ("ijk->kji", [(2, 3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("i,i", [(5,), (5,)]),
    ("abc,cd,de->ae", [(2, 3, 4), (4, 5), (5, 2)]),
    ("...ij,...jk->...ik", [(1, 3, 4), (5, 4, 2)]),     # broadcast '...' (onnx shape inference
    ("...ij,...jk->...ik", [(2, 5, 3, 4), (2, 1, 4, 2)]),  # needs equal '...' ranks)
    ("...ij,jk", [(2, 3, 4), (4, 5)]),
    ("bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),
    ("ii,j->j", [(3, 3), (4,)]),                        # trace in the other operand
]


@pytest.mark.parametrize("eq,shapes", EINSUM_CASES)
def test_einsum(eq, shapes):
    ins = {f"x{k}": rnd(*s, seed=k) for k, s in enumerate(shapes)}
    wrt = None
    if eq.startswith("ii"):
        wrt = ["x1"]
    check_vjp("Einsum", ins, attrs={"equation": eq}, opset=13, wrt=wrt)


def test_einsum_dynamic_batch():
    check_vjp("Einsum", {"a": rnd(2, 3, 4), "b": rnd(2, 4, 5)}, attrs={"equation": "bij,bjk->bik"}, opset=13,
              dynamic={"a": {0: "N"}, "b": {0: "N"}})
    check_vjp("Einsum", {"a": rnd(2, 3, 4), "b": rnd(4, 5)}, attrs={"equation": "...j,jk->...k"}, opset=13,
              dynamic={"a": {0: "N"}})


def test_einsum_diagonal_unsupported():
    from onnxcam.errors import UnsupportedOpError
    with pytest.raises(UnsupportedOpError, match="repeated index"):
        check_vjp("Einsum", {"a": rnd(3, 3)}, attrs={"equation": "ii->i"}, opset=13)


def test_pad_computed_pads():
    # pads = [0, 0, 0, W - 3] computed from the input's shape (not a constant of the model).
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Slice", ["shp", "one", "two", "zero"], ["w"]),
             helper.make_node("Sub", ["w", "three"], ["e"]),
             helper.make_node("Concat", ["zeros3", "e"], ["p"], axis=0),
             helper.make_node("Pad", ["x", "p"], ["y"])]
    inits = [numpy_helper.from_array(i64(*v), n) for n, v in
             [("one", [1]), ("two", [2]), ("zero", [0]), ("three", [3]), ("zeros3", [0, 1, 0])]]
    m = make_model(nodes, [("x", TensorProto.DOUBLE, [2, "W"])], None, opset=13, initializers=inits)
    check_model_vjp(m, {"x": rnd(2, 5)}, ["x"])


def test_attention_like_chain():
    # Transpose -> MatMul -> Softmax -> MatMul -> Slice -> ReduceMean -> Gemm: rules composed by the driver.
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "x"], ["o"]),
             helper.make_node("Gather", ["o", "zero"], ["cls"], axis=1),
             helper.make_node("Concat", ["cls", "cls"], ["cc"], axis=1),
             helper.make_node("Gemm", ["cc", "w"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"), numpy_helper.from_array(rnd(3, 8), "w")]
    m = make_model(nodes, [("x", TensorProto.DOUBLE, ["N", 5, 4])], None, opset=17, initializers=inits)
    check_model_vjp(m, {"x": rnd(2, 5, 4)}, ["x"])


@pytest.mark.parametrize("indices", [
    np.array([[0, 1], [2, 0], [0, 1]], np.int64),          # repeated tuples accumulate
    np.array([[[1], [-1]], [[0], [2]]], np.int64),        # slices of the remaining dims, negative index
    np.array([[1, 2, 3], [0, -1, 0]], np.int64),          # full index tuples
])
def test_gather_nd(indices):
    data = np.random.default_rng(7).standard_normal((3, 4, 5))
    check_vjp("GatherND", {"data": data, "indices": indices}, wrt=["data"], opset=18)


# A class target's seed holds one nonzero per row: Gemm / MatMul then gather the weight's rows it selects (an
# If on the seed, linalg.one_hot_product) instead of reading the whole matrix. Both branches against numpy.
def _seed_product(op, attrs, a, b, gy, opset, monkeypatch, dynamic=None, one_hot_seed=True):
    from onnxcam.autodiff.rules import linalg

    monkeypatch.setattr(linalg, "ONE_HOT_MIN_ELEMENTS", 0)
    model = single_node_model(op, {"a": a, "b": b}, ["a"], attrs, opset=opset, dynamic=dynamic)
    gmodel, (name,) = vjp_model(model, ["a"], one_hot_seed=one_hot_seed)
    branched = any(n.op_type == "If" for n in gmodel.graph.node)
    return run(gmodel, {"a": a, "gy": gy}, [name])[0], branched


def _seeds(n, k, rng):
    one_hot = np.zeros((n, k))
    one_hot[np.arange(n), rng.integers(0, k, n)] = rng.standard_normal(n)  # any value, either sign
    one_hot[-1] = 0.0  # a row with no target at all
    dense = rng.standard_normal((n, k))
    two = one_hot.copy()
    two[0, :2] = [1.0, -2.0]  # one row with two classes: the whole product
    return {"one-hot": one_hot, "dense": dense, "two in a row": two}


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_gemm_one_hot_seed_gathers_rows(opset, tb, alpha, monkeypatch):
    rng = np.random.default_rng(3)
    a, w = rnd(4, 6, seed=1), rnd(5, 6, seed=2)  # op(B) = w^T: (6, 5)
    b = w if tb else np.ascontiguousarray(w.T)
    for label, gy in _seeds(4, 5, rng).items():
        got, branched = _seed_product("Gemm", {"transB": tb, "alpha": alpha}, a, b, gy, opset, monkeypatch,
                                      dynamic={"a": {0: "N"}})
        assert branched
        # alpha is a float32 attribute: the forward and both branches use that value
        np.testing.assert_allclose(got, float(np.float32(alpha)) * gy @ w, rtol=1e-12, atol=1e-12, err_msg=label)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_matmul_one_hot_seed_gathers_rows(opset, monkeypatch):
    rng = np.random.default_rng(4)
    a, b = rnd(3, 6, seed=5), rnd(6, 7, seed=6)
    for label, gy in _seeds(3, 7, rng).items():
        got, branched = _seed_product("MatMul", {}, a, b, gy, opset, monkeypatch, dynamic={"a": {0: "N"}})
        assert branched
        np.testing.assert_allclose(got, gy @ b.T, rtol=1e-12, atol=1e-12, err_msg=label)
    f32, _ = _seed_product("MatMul", {}, a.astype(np.float32), b.astype(np.float32),
                           _seeds(3, 7, rng)["one-hot"].astype(np.float32), 17, monkeypatch)
    assert f32.dtype == np.float32


def test_one_hot_seed_branch_only_where_it_pays(monkeypatch):
    from onnxcam.autodiff.rules import linalg

    a, b = rnd(2, 6), rnd(6, 7)
    gy = np.eye(2, 7)
    # not the seed (an ordinary cotangent), a batched MatMul, an old opset: the plain product
    for op_args in [dict(one_hot_seed=False), dict(opset=10)]:
        _, branched = _seed_product("MatMul", {}, a, b, gy, op_args.get("opset", 17), monkeypatch,
                                    one_hot_seed=op_args.get("one_hot_seed", True))
        assert not branched
    _, branched = _seed_product("MatMul", {}, rnd(3, 2, 6), b, np.zeros((3, 2, 7)), 17, monkeypatch)
    assert not branched
    # a small matrix: cheaper to multiply whole than to check the seed
    monkeypatch.undo()
    model = single_node_model("MatMul", {"a": a, "b": b}, ["a"], {})
    gmodel, _ = vjp_model(model, ["a"], one_hot_seed=True)
    assert b.size < linalg.ONE_HOT_MIN_ELEMENTS and not any(n.op_type == "If" for n in gmodel.graph.node)


def test_one_hot_seed_reads_only_the_selected_rows(monkeypatch):
    # Proof that the gather branch is the one that runs: a weight row no target selects holds inf, which the
    # whole product would spread to every row (0 * inf = nan); the selected rows' gradient is still exact.
    a, w = rnd(2, 6, seed=8), rnd(5, 6, seed=9)
    w[4] = np.inf
    gy = np.zeros((2, 5))
    gy[0, 1], gy[1, 3] = 2.0, -1.0
    got, _ = _seed_product("Gemm", {"transB": 1}, a, w, gy, 17, monkeypatch)
    np.testing.assert_allclose(got, np.stack([2.0 * w[1], -w[3]]), rtol=1e-12)
    gy[1, 0] = 1.0  # two classes in a row: the whole product
    dense, _ = _seed_product("Gemm", {"transB": 1}, a, w, gy, 17, monkeypatch)
    assert np.isnan(dense).all()
