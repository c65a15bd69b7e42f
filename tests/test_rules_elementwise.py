"""Adjoint checks of the element-wise rules (onnxcam/rules/activations.py, onnxcam/rules/arith.py).

float64 wherever onnxruntime's CPU kernels take double (eps 1e-6, rtol 1e-6 in the harness); several
activations only have float kernels -- or get double only at opset 16-18, where onnxruntime expands the
ONNX function body -- so those are checked in float32 (eps 1e-2): inputs then stay >= 0.1 away from kinks.
"""
from __future__ import annotations

import numpy as np
import pytest

import onnxcam.autodiff.rules  # noqa: F401  (registers the rules)
from onnxcam.errors import UnsupportedOpError
from onnxcam.autodiff.rules import registry
from tests.adjoint import check_vjp, run, single_node_model, vjp_model

F32 = np.float32
F64 = np.float64


def rand(shape, seed=0, dtype=F64, lo=-2.0, hi=2.0, kinks=(), margin=0.1):
    """Uniform values in [lo, hi] at least `margin` away from every point in `kinks`."""
    rng = np.random.default_rng(seed)
    x = np.array(rng.uniform(lo, hi, size=shape), dtype=np.float64)
    for _ in range(100):
        bad = np.zeros(x.shape, dtype=bool)
        for k in kinks:
            bad |= np.abs(x - k) < margin
        if not bad.any():
            break
        x[bad] = rng.uniform(lo, hi, size=int(bad.sum()))
    else:  # pragma: no cover
        raise RuntimeError("could not sample away from kinks")
    return np.asarray(x, dtype=dtype)


def distinct(shapes, seed=0, dtype=F64):
    """Arrays whose values are all distinct, with gaps >> eps (for Max / Min)."""
    sizes = [int(np.prod(s)) for s in shapes]
    vals = np.random.default_rng(seed).permutation(sum(sizes)) * 0.37 - sum(sizes) * 0.15
    out, start = [], 0
    for s, n in zip(shapes, sizes):
        out.append(vals[start:start + n].reshape(s).astype(dtype))
        start += n
    return out


def grad_of(model, feeds, wrt, gy, relu_mode="grad"):
    gm, names = vjp_model(model, wrt, relu_mode=relu_mode)
    return run(gm, {**feeds, "gy": gy}, names)


def ops_in_gradient(model, wrt):
    gm, _ = vjp_model(model, wrt)
    return [n.op_type for n in gm.graph.node[len(model.graph.node):]]


SHAPE = (2, 3, 4)

# --------------------------------------------------------------------------------------------------
# Activations: (op, attrs, opset, dtype, input kwargs for `rand`)
# --------------------------------------------------------------------------------------------------
ACTIVATIONS = [
    ("Relu", {}, 17, F64, dict(kinks=[0])),
    ("Relu", {}, 13, F64, dict(kinks=[0])),
    ("Relu", {}, 8, F32, dict(kinks=[0])),
    ("LeakyRelu", {"alpha": 0.1}, 16, F64, dict(kinks=[0])),
    ("LeakyRelu", {}, 18, F64, dict(kinks=[0])),
    ("LeakyRelu", {"alpha": 0.2}, 13, F32, dict(kinks=[0])),
    ("LeakyRelu", {"alpha": 0.2}, 8, F32, dict(kinks=[0])),
    ("Sigmoid", {}, 17, F64, dict(lo=-5, hi=5)),
    ("Tanh", {}, 17, F64, dict(lo=-3, hi=3)),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17, F32, dict(lo=-5, hi=5, kinks=[-0.4 / 0.3, 0.6 / 0.3])),
    ("HardSigmoid", {}, 18, F64, dict(lo=-5, hi=5, kinks=[-2.5, 2.5])),
    ("HardSwish", {}, 14, F32, dict(lo=-5, hi=5, kinks=[-3, 3])),
    ("HardSwish", {}, 18, F64, dict(lo=-5, hi=5, kinks=[-3, 3])),
    ("Erf", {}, 17, F32, dict(lo=-2, hi=2)),
    ("Erf", {}, 13, F32, dict(lo=-2, hi=2)),
    ("Gelu", {}, 20, F32, dict(lo=-3, hi=3)),
    ("Gelu", {"approximate": "none"}, 20, F32, dict(lo=-3, hi=3)),
    ("Gelu", {"approximate": "tanh"}, 20, F64, dict(lo=-3, hi=3)),
    ("Gelu", {"approximate": "tanh"}, 20, F32, dict(lo=-3, hi=3)),
    ("Elu", {"alpha": 0.7}, 17, F32, dict(kinks=[0])),
    ("Elu", {}, 18, F64, dict(kinks=[0])),
    ("Selu", {}, 18, F64, dict(kinks=[0])),
    ("Selu", {"alpha": 1.2, "gamma": 0.9}, 17, F32, dict(kinks=[0])),
    ("Celu", {"alpha": 1.5}, 17, F32, dict(kinks=[0])),
    ("Celu", {}, 12, F32, dict(kinks=[0])),
    ("ThresholdedRelu", {"alpha": 0.5}, 17, F32, dict(kinks=[0.5])),
    ("ThresholdedRelu", {}, 18, F64, dict(kinks=[1.0])),
    ("Softplus", {}, 18, F64, dict(lo=-4, hi=4)),
    ("Softplus", {}, 17, F32, dict(lo=-4, hi=4)),
    ("Softsign", {}, 18, F64, dict(kinks=[0])),
    ("Softsign", {}, 17, F32, dict(kinks=[0])),
    ("Mish", {}, 18, F64, dict(lo=-4, hi=4)),
    ("Mish", {}, 20, F32, dict(lo=-4, hi=4)),
    ("Exp", {}, 17, F64, dict()),
    ("Exp", {}, 8, F64, dict()),
    ("Log", {}, 17, F64, dict(lo=0.2, hi=3)),
    ("Sqrt", {}, 17, F64, dict(lo=0.2, hi=3)),
    ("Reciprocal", {}, 17, F64, dict(kinks=[0], margin=0.3)),
    ("Neg", {}, 17, F64, dict()),
    ("Abs", {}, 17, F64, dict(kinks=[0])),
    ("Abs", {}, 8, F32, dict(kinks=[0])),
    ("Sin", {}, 17, F64, dict(lo=-4, hi=4)),
    ("Cos", {}, 17, F64, dict(lo=-4, hi=4)),
]


@pytest.mark.parametrize("op,attrs,opset,dtype,kw", ACTIVATIONS,
                         ids=[f"{a[0]}-{a[2]}-{np.dtype(a[3]).name}-{i}" for i, a in enumerate(ACTIVATIONS)])
def test_activation_adjoint(op, attrs, opset, dtype, kw):
    x = rand(SHAPE, seed=len(op) + opset, dtype=dtype, **kw)
    check_vjp(op, {"x": x}, attrs=attrs, opset=opset)


@pytest.mark.parametrize("op,attrs,opset,dtype,kw", [
    ("Relu", {}, 17, F64, dict(kinks=[0])),
    ("Sigmoid", {}, 17, F64, {}),
    ("Gelu", {"approximate": "tanh"}, 20, F64, {}),
    ("HardSwish", {}, 14, F32, dict(lo=-5, hi=5, kinks=[-3, 3])),
    ("Clip", {}, 13, F64, dict(kinks=[0])),  # no bounds: the identity
])
def test_activation_dynamic_dims(op, attrs, opset, dtype, kw):
    x = rand((3, 2, 5), seed=3, dtype=dtype, **kw)
    check_vjp(op, {"x": x}, attrs=attrs, opset=opset, dynamic={"x": {0: "N", 2: "W"}})


# --- Clip ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [7, 10])
def test_clip_attributes_before_opset_11(opset):
    # Clip-6: min/max are attributes. onnxruntime has only float kernels for it, and cannot run
    # opset-6 Mul/Greater at all, so opset 7 is the oldest checkable here.
    x = rand(SHAPE, seed=1, dtype=F32, kinks=[-0.5, 0.8])
    check_vjp("Clip", {"x": x}, attrs={"min": -0.5, "max": 0.8}, opset=opset)
    check_vjp("Clip", {"x": x}, attrs={"max": 0.8}, opset=opset)
    check_vjp("Clip", {"x": x}, attrs={"min": -0.5}, opset=opset)


@pytest.mark.parametrize("opset,dtype", [(11, F32), (12, F64), (13, F64), (18, F64)])
def test_clip_inputs_from_opset_11(opset, dtype):
    x = rand(SHAPE, seed=2, dtype=dtype, kinks=[-0.5, 0.8])
    lo, hi = np.array(-0.5, dtype), np.array(0.8, dtype)
    check_vjp("Clip", {"x": x, "lo": lo, "hi": hi}, wrt=["x"], opset=opset)
    check_vjp("Clip", {"x": x, "hi": hi}, wrt=["x"], opset=opset, input_order=["x", "", "hi"])
    check_vjp("Clip", {"x": x, "lo": lo}, wrt=["x"], opset=opset, input_order=["x", "lo"])
    check_vjp("Clip", {"x": x}, wrt=["x"], opset=opset)


def test_clip_gradient_of_bounds():
    x = rand(SHAPE, seed=4, dtype=F64, kinks=[-0.5, 0.8])
    lo, hi = np.array(-0.5), np.array(0.8)
    check_vjp("Clip", {"x": x, "lo": lo, "hi": hi}, wrt=["x", "lo", "hi"], opset=13)
    check_vjp("Clip", {"x": x, "lo": lo}, wrt=["lo"], opset=13, input_order=["x", "lo"])
    check_vjp("Clip", {"x": x, "hi": hi}, wrt=["hi"], opset=13, input_order=["x", "", "hi"])
    # min > max: ONNX gives max everywhere, so only `hi` has a gradient.
    check_vjp("Clip", {"x": x, "lo": np.array(0.9), "hi": np.array(0.2)}, wrt=["x", "lo", "hi"], opset=13)


def test_clip_boundary_convention():
    """At x == min or x == max exactly, the gradient is 0 (passes only where min < x < max)."""
    x = np.array([-1.0, 0.0, 0.5, 6.0, 7.0])
    m = single_node_model("Clip", {"x": x, "lo": np.array(0.0), "hi": np.array(6.0)}, ["x"], {}, opset=13)
    (gx,) = grad_of(m, {"x": x}, ["x"], np.ones(5))
    np.testing.assert_array_equal(gx, [0, 0, 1, 0, 0])


def test_kink_conventions():
    x = np.array([-1.0, 0.0, 1.0])
    for op, attrs, expected in [("Relu", {}, [0, 0, 1]), ("LeakyRelu", {"alpha": 0.1}, [0.1, 0.1, 1]),
                                ("Abs", {}, [-1, 0, 1])]:
        m = single_node_model(op, {"x": x}, ["x"], attrs, opset=17)
        (gx,) = grad_of(m, {"x": x}, ["x"], np.ones(3))
        np.testing.assert_allclose(gx, expected, err_msg=op)


# --- PRelu --------------------------------------------------------------------------------------

@pytest.mark.parametrize("xshape,sshape", [((2, 3, 4, 5), (3, 1, 1)), ((2, 3, 4, 5), (1,)),
                                           ((2, 3, 4, 5), (5,)), ((2, 3), (2, 3)), ((4, 5), ())])
def test_prelu_adjoint(xshape, sshape):
    x = rand(xshape, seed=5, kinks=[0])
    slope = rand(sshape, seed=6, lo=0.05, hi=0.5)
    check_vjp("PRelu", {"x": x, "slope": slope}, opset=16)  # x and slope
    check_vjp("PRelu", {"x": x, "slope": slope}, wrt=["x"], opset=17)


def test_prelu_dynamic_dims():
    x = rand((2, 3, 4, 5), seed=15, kinks=[0])
    slope = rand((3, 1, 1), seed=16, lo=0.05, hi=0.5)
    check_vjp("PRelu", {"x": x, "slope": slope}, opset=17, dynamic={"x": {0: "N", 2: "H"}, "slope": {1: "one"}})


def test_prelu_float32_old_opset():
    x = rand((2, 3, 4), seed=7, dtype=F32, kinks=[0])
    check_vjp("PRelu", {"x": x, "slope": rand((3, 1), seed=8, dtype=F32, lo=0.1, hi=0.3)}, wrt=["x"], opset=9)


# --------------------------------------------------------------------------------------------------
# Guided Backprop / deconvnet
# --------------------------------------------------------------------------------------------------

def _hardswish_grad(x):
    return np.where(x >= 3, 1.0, np.where(x > -3, x / 3 + 0.5, 0.0))


_SELU_A, _SELU_G = 1.67326319217681884765625, 1.05070102214813232421875
FAMILY = [
    # op, attrs, opset, dtype, extra inputs, local derivative in numpy, input kwargs
    ("Relu", {}, 17, F64, {}, lambda x: (x > 0) * 1.0, dict(kinks=[0])),
    ("Clip", {}, 13, F64, {"lo": np.array(0.0), "hi": np.array(1.0)}, lambda x: ((x > 0) & (x < 1)) * 1.0,
     dict(kinks=[0, 1])),
    ("Clip", {"min": 0.0, "max": 1.0}, 10, F32, {}, lambda x: ((x > 0) & (x < 1)) * 1.0, dict(kinks=[0, 1])),
    # float attributes are float32: the op's slope is float32(0.1), not 0.1
    ("LeakyRelu", {"alpha": 0.1}, 17, F64, {}, lambda x: np.where(x > 0, 1.0, float(np.float32(0.1))),
     dict(kinks=[0])),
    ("PRelu", {}, 17, F64, {"slope": np.array([0.1, 0.2, 0.3]).reshape(3, 1)},
     lambda x: np.where(x > 0, 1.0, np.array([0.1, 0.2, 0.3]).reshape(3, 1)), dict(kinks=[0])),
    ("HardSwish", {}, 14, F32, {}, _hardswish_grad, dict(lo=-5, hi=5, kinks=[-3, 3])),
    ("Elu", {"alpha": 0.5}, 17, F32, {}, lambda x: np.where(x > 0, 1.0, 0.5 * np.exp(x)), dict(kinks=[0])),
    ("Selu", {}, 17, F32, {}, lambda x: np.where(x > 0, _SELU_G, _SELU_G * _SELU_A * np.exp(x)), dict(kinks=[0])),
    ("Celu", {"alpha": 2.0}, 17, F32, {}, lambda x: np.where(x > 0, 1.0, np.exp(x / 2.0)), dict(kinks=[0])),
    ("ThresholdedRelu", {"alpha": 0.3}, 17, F32, {}, lambda x: (x > 0.3) * 1.0, dict(kinks=[0.3])),
]


@pytest.mark.parametrize("mode", ["grad", "guided", "deconvnet"])
@pytest.mark.parametrize("op,attrs,opset,dtype,extra,local,kw", FAMILY,
                         ids=[f"{f[0]}-{f[2]}" for f in FAMILY])
def test_relu_family_modes(op, attrs, opset, dtype, extra, local, kw, mode):
    x = rand(SHAPE, seed=9, dtype=dtype, **{"lo": -4, "hi": 4, **kw})
    extra = {k: v.astype(dtype) for k, v in extra.items()}
    m = single_node_model(op, {"x": x, **extra}, ["x"], attrs, opset=opset)
    gy = np.random.default_rng(10).standard_normal(SHAPE).astype(dtype)
    (gx,) = grad_of(m, {"x": x}, ["x"], gy, relu_mode=mode)
    relu_gy = np.maximum(gy, 0)
    expected = {"grad": gy * local(x), "guided": relu_gy * local(x), "deconvnet": relu_gy}[mode]
    tol = 1e-12 if dtype == F64 else 1e-5
    np.testing.assert_allclose(gx, expected, rtol=tol, atol=tol)
    if op == "Relu" and mode == "guided":  # the textbook rule
        np.testing.assert_allclose(gx, gy * (x > 0) * (gy > 0))


@pytest.mark.parametrize("op,opset", [("Sigmoid", 17), ("Tanh", 17), ("Gelu", 20), ("Softplus", 18)])
def test_smooth_activations_ignore_relu_mode(op, opset):
    x = rand(SHAPE, seed=11, dtype=F32, lo=-3, hi=3)
    m = single_node_model(op, {"x": x}, ["x"], {}, opset=opset)
    gy = np.random.default_rng(12).standard_normal(SHAPE).astype(F32)
    (ref,) = grad_of(m, {"x": x}, ["x"], gy)
    for mode in ("guided", "deconvnet"):
        (gx,) = grad_of(m, {"x": x}, ["x"], gy, relu_mode=mode)
        np.testing.assert_array_equal(gx, ref)


def test_unknown_relu_mode_is_rejected():
    m = single_node_model("Relu", {"x": rand(SHAPE)}, ["x"], {}, opset=17)
    with pytest.raises(UnsupportedOpError, match="relu_mode"):
        vjp_model(m, ["x"], relu_mode="smoothgrad")


# --------------------------------------------------------------------------------------------------
# Arithmetic with broadcasting
# --------------------------------------------------------------------------------------------------
BROADCAST_PAIRS = [
    ((2, 3, 4, 5), (3, 1, 1)),
    ((3, 1, 1), (2, 3, 4, 5)),
    ((2, 3, 4, 5), (1,)),
    ((), (2, 3)),
    ((2, 3), ()),
    ((4, 1), (1, 5)),
    ((2, 1, 4), (3, 1)),
    ((2, 3), (2, 3)),
    ((1, 1), (2, 1, 3)),
]


def _binary_inputs(op, sa, sb, seed=0, dtype=F64):
    if op == "Pow":
        return rand(sa, seed, dtype, lo=0.5, hi=2.0), rand(sb, seed + 1, dtype, lo=-1.5, hi=1.5)
    if op == "Div":
        return rand(sa, seed, dtype), rand(sb, seed + 1, dtype, kinks=[0], margin=0.5)
    return rand(sa, seed, dtype), rand(sb, seed + 1, dtype)


@pytest.mark.parametrize("sa,sb", BROADCAST_PAIRS, ids=[f"{a}-{b}" for a, b in BROADCAST_PAIRS])
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
def test_binary_broadcast(op, sa, sb):
    a, b = _binary_inputs(op, sa, sb)
    check_vjp(op, {"a": a, "b": b}, opset=17)


@pytest.mark.parametrize("opset", [7, 11, 13, 18])
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
def test_binary_opsets(op, opset):
    a, b = _binary_inputs(op, (2, 3, 4), (3, 1), seed=3)
    check_vjp(op, {"a": a, "b": b}, opset=opset)
    check_vjp(op, {"a": a, "b": b}, wrt=["b"], opset=opset)


DYNAMIC_CASES = [
    # (shape a, dynamic dims of a, shape b, dynamic dims of b)
    ((2, 3, 4, 5), {0: "N", 2: "H"}, (3, 1, 1), {1: "one"}),
    ((4, 1), {0: "A"}, (1, 5), {1: "B"}),
    ((2, 3, 4), {0: "N"}, (), {}),
    ((3, 1), {0: "C"}, (2, 3, 4), {0: "N", 2: "W"}),
    ((2, 3), {0: "N", 1: "M"}, (2, 3), {0: "N", 1: "M"}),
]


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
def test_binary_dynamic_shapes(op, opset):
    for i, (sa, da, sb, db) in enumerate(DYNAMIC_CASES):
        a, b = _binary_inputs(op, sa, sb, seed=i)
        check_vjp(op, {"a": a, "b": b}, opset=opset, dynamic={"a": da, "b": db})


def test_dynamic_fallback_is_exercised():
    """Symbolic dims where an operand broadcasts must take the Shape-driven path (NonZero over the mask)."""
    sa, da, sb, db = DYNAMIC_CASES[0]
    a, b = _binary_inputs("Mul", sa, sb)
    m = single_node_model("Mul", {"a": a, "b": b}, ["a", "b"], {}, opset=13, dynamic={"a": da, "b": db})
    assert "NonZero" in ops_in_gradient(m, ["a", "b"])
    m = single_node_model("Mul", {"a": a, "b": b}, ["a", "b"], {}, opset=13)
    assert "NonZero" not in ops_in_gradient(m, ["a", "b"])


def test_pow_constant_exponents():
    a = rand((2, 3), seed=1, lo=0.3, hi=2.0)
    for e in (2.0, 3.0, 0.5, -1.0, 1.0):
        check_vjp("Pow", {"a": a, "e": np.array(e)}, wrt=["a"], opset=17)
    m = single_node_model("Pow", {"a": a, "e": np.array(0.0)}, ["a"], {}, opset=17)
    (ga,) = grad_of(m, {"a": a}, ["a"], np.ones((2, 3)))
    np.testing.assert_array_equal(ga, np.zeros((2, 3)))


def test_pow_integer_exponent_and_zero_base():
    a = rand((2, 3), seed=2, lo=-2.0, hi=2.0, kinks=[0])
    check_vjp("Pow", {"a": a, "e": np.array([[3], [2]], np.int64)}, wrt=["a"], opset=17)
    check_vjp("Pow", {"a": np.abs(a), "e": rand((3,), seed=3, lo=-1, hi=1)}, wrt=["a"], opset=17)
    # d/d exponent of 0 ** e is 0, not nan
    base = np.array([0.0, 2.0])
    m = single_node_model("Pow", {"a": base, "e": np.array([2.0, 2.0])}, ["e"], {}, opset=17)
    (ge,) = grad_of(m, {"e": np.array([2.0, 2.0])}, ["e"], np.ones(2))
    np.testing.assert_allclose(ge, [0.0, 4.0 * np.log(2.0)])


VARIADIC_SHAPES = [[(2, 3, 4), (3, 1), (4,)], [(2, 3)], [(1,), (2, 1), (3,)], [(), (2, 2)]]


@pytest.mark.parametrize("shapes", VARIADIC_SHAPES, ids=[str(s) for s in VARIADIC_SHAPES])
def test_sum_mean(shapes):
    ins = {f"x{i}": rand(s, seed=i) for i, s in enumerate(shapes)}
    check_vjp("Sum", ins, opset=17)
    check_vjp("Sum", ins, opset=8)
    # onnxruntime has no double kernel for Mean
    check_vjp("Mean", {k: v.astype(F32) for k, v in ins.items()}, opset=17)


def test_sum_mean_dynamic():
    ins = {"x0": rand((2, 3, 4), 0), "x1": rand((3, 1), 1), "x2": rand((4,), 2)}
    dyn = {"x0": {0: "N", 1: "C"}, "x1": {0: "C", 1: "one"}}
    check_vjp("Sum", ins, opset=13, dynamic=dyn)
    check_vjp("Mean", {k: v.astype(F32) for k, v in ins.items()}, opset=18, dynamic=dyn)


@pytest.mark.parametrize("shapes", [[(2, 3, 4), (3, 1)], [(2, 3), (2, 3), (3,)], [(4,)], [(), (2, 3)],
                                    [(4, 1), (1, 5), (4, 5)]])
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min(op, shapes):
    arrays = distinct(shapes, seed=len(shapes))
    ins = {f"x{i}": a for i, a in enumerate(arrays)}
    check_vjp(op, ins, opset=17)
    check_vjp(op, ins, opset=8)


def test_max_min_dynamic():
    a, b = distinct([(2, 3, 4), (3, 1)])
    check_vjp("Max", {"a": a, "b": b}, opset=13, dynamic={"a": {0: "N"}, "b": {1: "one"}})
    check_vjp("Min", {"a": a, "b": b}, opset=18, dynamic={"a": {0: "N", 1: "C"}})


def test_max_min_ties_share_the_gradient():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([1.0, 5.0, 3.0])
    c = np.array([1.0, 0.0, 0.0])
    gy = np.array([6.0, 1.0, 2.0])
    m = single_node_model("Max", {"a": a, "b": b, "c": c}, ["a", "b", "c"], {}, opset=17)
    ga, gb, gc = grad_of(m, {"a": a, "b": b, "c": c}, ["a", "b", "c"], gy)
    np.testing.assert_allclose(ga, [2, 0, 1])
    np.testing.assert_allclose(gb, [2, 1, 1])
    np.testing.assert_allclose(gc, [2, 0, 0])
    m = single_node_model("Min", {"a": a, "b": b}, ["a", "b"], {}, opset=17)
    ga, gb = grad_of(m, {"a": a, "b": b}, ["a", "b"], gy)
    np.testing.assert_allclose(ga, [3, 1, 1])
    np.testing.assert_allclose(gb, [3, 0, 1])


@pytest.mark.parametrize("cshape,xshape,yshape", [((3, 1), (2, 3, 4), (4,)), ((2, 3, 4), (), (1, 4)),
                                                  ((4,), (2, 1, 1), (3, 1))])
def test_where(cshape, xshape, yshape):
    rng = np.random.default_rng(13)
    ins = {"c": rng.random(cshape) > 0.5, "x": rand(xshape, 1), "y": rand(yshape, 2)}
    check_vjp("Where", ins, wrt=["x", "y"], opset=17)
    check_vjp("Where", ins, wrt=["y"], opset=9)
    check_vjp("Where", ins, wrt=["x", "y"], opset=13, dynamic={"x": {0: "A"} if xshape else {}})


@pytest.mark.parametrize("xshape,shape", [((3, 1), (2, 3, 4)), ((1,), (2, 3)), ((2, 3), (1, 1)),
                                          ((3, 1), (3, 4)), ((), (2, 2)), ((2, 1, 3), (2, 4, 1))])
def test_expand(xshape, shape):
    ins = {"x": rand(xshape, 3), "s": np.array(shape, np.int64)}
    check_vjp("Expand", ins, wrt=["x"], opset=13)
    check_vjp("Expand", ins, wrt=["x"], opset=8)
    if xshape:
        check_vjp("Expand", ins, wrt=["x"], opset=18, dynamic={"x": {0: "D"}})


@pytest.mark.parametrize("xshape,reps", [((2, 3), (2, 3)), ((2, 1, 3), (1, 3, 2)), ((4,), (3,)),
                                         ((2, 3), (1, 1))])
def test_tile(xshape, reps):
    ins = {"x": rand(xshape, 4), "r": np.array(reps, np.int64)}
    check_vjp("Tile", ins, wrt=["x"], opset=13)
    check_vjp("Tile", ins, wrt=["x"], opset=8)
    check_vjp("Tile", ins, wrt=["x"], opset=18, dynamic={"x": {0: "D"}})


# Einsum's rule is in onnxcam/rules/linalg.py; these cases add broadcast ellipses, implicit outputs and
# indices summed inside one operand.
EINSUMS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij->j", [(3, 4)]),
    ("ij->", [(3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("ij,k->i", [(3, 4), (5,)]),
    ("ij,jk", [(3, 4), (4, 5)]),
    ("...ij,jk->...ik", [(2, 3, 4), (4, 5)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (1, 5, 4, 2)]),
    ("...ij,...jk->...ik", [(1, 3, 4), (2, 4, 5)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
    ("i...,i->...", [(3, 2, 4), (3,)]),
    ("bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),
    ("ii,j->j", [(3, 3), (4,)]),  # trace in another operand
]


@pytest.mark.parametrize("eq,shapes", EINSUMS, ids=[e for e, _ in EINSUMS])
def test_einsum(eq, shapes):
    ins = {f"x{i}": rand(s, seed=i) for i, s in enumerate(shapes)}
    wrt = ["x1"] if eq.startswith("ii,") else None
    check_vjp("Einsum", ins, wrt=wrt, attrs={"equation": eq}, opset=13)


def test_einsum_dynamic():
    ins = {"a": rand((2, 3, 4), 0), "b": rand((4, 5), 1)}
    check_vjp("Einsum", ins, attrs={"equation": "...ij,jk->...ik"}, opset=13, dynamic={"a": {0: "N"}})
    check_vjp("Einsum", ins, attrs={"equation": "bij,jk->bik"}, opset=18, dynamic={"a": {0: "N", 1: "M"}})


def test_einsum_diagonal_is_unsupported():
    m = single_node_model("Einsum", {"x": rand((3, 3))}, ["x"], {"equation": "ii->i"}, opset=13)
    with pytest.raises(UnsupportedOpError, match="diagonal"):
        vjp_model(m, ["x"])


# --------------------------------------------------------------------------------------------------
# The registry and the harness
# --------------------------------------------------------------------------------------------------

BRIEF_OPS = ["Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
             "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Log", "Sqrt",
             "Reciprocal", "Neg", "Abs", "Sin", "Cos", "ThresholdedRelu", "Add", "Sub", "Mul", "Div", "Pow",
             "Sum", "Mean", "Max", "Min", "Where", "Expand", "Tile", "Einsum"]


def test_all_ops_registered():
    missing = [op for op in BRIEF_OPS if ("", op) not in registry.RULES]
    assert not missing


def test_harness_catches_a_wrong_rule(monkeypatch):
    def wrong_relu(ctx, gy):  # forgets the mask: the identity's gradient
        return [gy[0]]

    monkeypatch.setitem(registry.RULES, ("", "Relu"), wrong_relu)
    with pytest.raises(AssertionError, match="Relu"):
        check_vjp("Relu", {"x": rand(SHAPE, seed=14, kinks=[0])}, opset=17)


def test_harness_catches_a_wrong_broadcast(monkeypatch):
    def no_unbroadcast(ctx, gy):  # returns the broadcast-shaped gradient for every operand
        return [gy[0], gy[0]]

    monkeypatch.setitem(registry.RULES, ("", "Add"), no_unbroadcast)
    with pytest.raises(AssertionError):
        check_vjp("Add", {"a": rand((2, 3)), "b": rand((3,))}, opset=17)
