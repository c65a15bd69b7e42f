"""Adjoint checks of the recurrent rules (onnxcam/rules/recurrent.py): LSTM, GRU and RNN.

onnxruntime's CPU kernels for LSTM / GRU / RNN take float32 only ("LSTM operator does not support double yet";
RNN has no double kernel at all), so the gradient graphs run in float32 and there are two oracles:
* `check`: float32 central differences of onnxruntime's own forward (eps 1e-2), the semantics the rules must
  match; an adjoint mismatch up to TOL of the dot products' scale passes (correct rules: ~1e-5 .. 3e-4).
* `check_reference`: float64 central differences (eps 1e-7) of `numpy_rnn`, a transcription of the ONNX
  equations that is first checked against onnxruntime's forward. Used where float32 differences fail for
  reasons of their own: kinks (clip, ReLU-like activations), where steps straddle the kink. Correct rules: ~1e-7.
Each differentiated input (X, initial_h, initial_c) and each output (Y, Y_h, Y_c) is checked on its own; layout=1
runs through `emulate_batch_first`, as onnxruntime's CPU kernels refuse it. Wrong rules (a dropped term, the
Scan run in the wrong direction, an unmasked clip, a wrong default alpha) fail here with errors of 1e-2 .. 1.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxcam.autodiff.rules  # noqa: F401  (registers the rules)
from onnxcam.autodiff import gradient
from onnxcam.errors import UnsupportedOpError
from onnxcam.model.graph import ensure_opset, infer_shapes
from tests.adjoint import run, vjp_model, with_inferred_outputs

F32 = np.float32
TOL = 2e-3
REF_TOL = 1e-5  # the float32 gradient graph against float64 differences (measured: <= 2e-7)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
OUTPUTS = {"LSTM": ["Y", "Y_h", "Y_c"], "GRU": ["Y", "Y_h"], "RNN": ["Y", "Y_h"]}
INPUTS = {"LSTM": ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"],
          "GRU": ["X", "W", "R", "B", "sequence_lens", "initial_h"],
          "RNN": ["X", "W", "R", "B", "sequence_lens", "initial_h"]}


def rnn_inputs(op, t=4, n=2, i=3, h=5, dirs=1, layout=0, bias=True, states=True, peepholes=False, seed=0,
               scale=0.6):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * scale).astype(F32)

    g = GATES[op]
    x = r(t, n, i) if layout == 0 else r(n, t, i)
    vals = {"X": x, "W": r(dirs, g * h, i), "R": r(dirs, g * h, h)}
    if bias:
        vals["B"] = r(dirs, 2 * g * h)
    if states:
        state_shape = (dirs, n, h) if layout == 0 else (n, dirs, h)
        vals["initial_h"] = r(*state_shape)
        if op == "LSTM":
            vals["initial_c"] = r(*state_shape)
    if peepholes:
        vals["P"] = r(dirs, 3 * h)
    return vals


def rnn_model(op, vals, attrs, wrt, outputs=None, opset=14, dynamic=(), used=None, fed=()):
    """One recurrent node; `wrt` and `fed` become graph inputs (with the symbolic dims named in `dynamic`: 'T',
    'N'), the rest initializers. `used`: which outputs the node produces (others are ""), default all."""
    names = INPUTS[op]
    last = max(k for k, name in enumerate(names) if name in vals)
    node_inputs = [name if name in vals else "" for name in names[:last + 1]]
    used = used or OUTPUTS[op]
    node_outputs = [o if o in used else "" for o in OUTPUTS[op]]
    while node_outputs and not node_outputs[-1]:
        node_outputs.pop()
    node = helper.make_node(op, node_inputs, node_outputs, name=f"{op.lower()}_node", **attrs)
    layout = attrs.get("layout", 0)
    graph_inputs, inits = [], []
    for name in node_inputs:
        if not name:
            continue
        arr = vals[name]
        if name in wrt or name in fed:
            shape = list(arr.shape)
            if name == "X":
                t_axis, n_axis = (0, 1) if layout == 0 else (1, 0)
                if "T" in dynamic:
                    shape[t_axis] = "T"
                if "N" in dynamic:
                    shape[n_axis] = "N"
            elif name.startswith("initial") and "N" in dynamic:
                shape[1 if layout == 0 else 0] = "N"
            elif name == "sequence_lens" and "N" in dynamic:
                shape[0] = "N"
            elem = onnx.TensorProto.INT32 if name == "sequence_lens" else onnx.TensorProto.FLOAT
            graph_inputs.append(helper.make_tensor_value_info(name, elem, shape))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in (outputs or used)]
    model = helper.make_model(helper.make_graph([node], "g", graph_inputs, outs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return with_inferred_outputs(model)


def emulate_batch_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime refuses layout=1 ("Batchwise recurrent operations (layout == 1) are not supported"), so the
    recurrent node is replaced by the spec's equivalent: its layout-0 form between Transposes, same tensor names.
    The gradient nodes only read the node's inputs and outputs, so they are exercised unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type not in GATES or not any(a.name == "layout" and a.i == 1 for a in node.attribute):
            nodes.append(node)
            continue
        ins, outs = list(node.input), list(node.output)
        for k in (0, 5, 6):
            if k < len(ins) and ins[k]:
                nodes.append(helper.make_node("Transpose", [ins[k]], [ins[k] + "_tm"], perm=[1, 0, 2]))
                ins[k] += "_tm"
        for k, perm in ((0, [2, 0, 1, 3]), (1, [1, 0, 2]), (2, [1, 0, 2])):
            if k < len(outs) and outs[k]:
                nodes.append(helper.make_node("Transpose", [outs[k] + "_tm"], [outs[k]], perm=perm))
                outs[k] += "_tm"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
        nodes.insert(len(nodes) - sum(1 for o in node.output if o), helper.make_node(node.op_type, ins, outs, **attrs))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def adjoint_errors(model, vals, wrt, output, eps=1e-2, seed=1, allow_zero=False, fed=()) -> dict[str, float]:
    """{input: |<gy, J dx> - <J^T gy, dx>| / scale} for the cotangent gy of `output`. `allow_zero`: where the
    output does not move at all, the gradient must be exactly zero (else a zero Jacobian fails the check)."""
    feeds = {w: vals[w] for w in list(wrt) + list(fed)}
    gmodel, gnames = vjp_model(model, wrt, output)
    model, gmodel = emulate_batch_first(model), emulate_batch_first(gmodel)
    y = run(model, feeds, [output])[0]
    rng = np.random.default_rng(seed)
    gy = rng.standard_normal(y.shape).astype(F32)
    gxs = run(gmodel, {**feeds, "gy": gy}, gnames)
    errors = {}
    for w, gx in zip(wrt, gxs):
        x = vals[w]
        assert gx.shape == x.shape, f"gradient of {w}: shape {gx.shape}, input {x.shape}"
        dx = rng.standard_normal(x.shape).astype(F32)
        plus = run(model, {**feeds, w: (x + eps * dx).astype(F32)}, [output])[0].astype(np.float64)
        minus = run(model, {**feeds, w: (x - eps * dx).astype(F32)}, [output])[0].astype(np.float64)
        jdx = (plus - minus) / (2 * eps)
        lhs = float(np.sum(gy.astype(np.float64) * jdx))
        rhs = float(np.sum(gx.astype(np.float64) * dx))
        scale = float(np.linalg.norm(gy) * np.linalg.norm(jdx) + np.linalg.norm(gx) * np.linalg.norm(dx))
        if allow_zero and not jdx.any():
            assert not gx.any(), f"d{output}/d{w}: the output is constant but the gradient is not zero"
            errors[w] = 0.0
            continue
        assert scale > 1e-6, f"d{output}/d{w} is (numerically) zero: the check would be vacuous"
        errors[w] = abs(lhs - rhs) / scale
    return errors


def check(op, vals, attrs, wrt=None, opset=14, dynamic=(), used=None, eps=1e-2, tol=TOL, allow_zero=False,
          fed=()):
    """Adjoint check of every output the node produces, with respect to X and the initial states present."""
    if wrt is None:
        wrt = [w for w in ("X", "initial_h", "initial_c") if w in vals]
    used = used or OUTPUTS[op]
    worst = 0.0
    for output in used:
        model = rnn_model(op, vals, attrs, wrt, outputs=[output], opset=opset, dynamic=dynamic, used=used, fed=fed)
        errors = adjoint_errors(model, vals, wrt, output, eps=eps, allow_zero=allow_zero, fed=fed)
        bad = {w: e for w, e in errors.items() if not e <= tol}
        assert not bad, f"{op} {attrs}: d{output}/d(...) adjoint errors {bad}"
        worst = max(worst, *errors.values())
    return worst


# --------------------------------------------------------------------------------------------------
# A float64 oracle for kinks: clip points and ReLU-like activations make float32 steps straddle a kink (errors up
# to 5e-2 at eps 1e-2..1e-3) or drown in rounding (1e-3 at eps 1e-4). A numpy transcription of the ONNX
# equations, run in float64 with eps 1e-7, has neither problem; it is first checked against onnxruntime's
# forward, so it encodes the same semantics (onnxruntime's alpha / beta defaults, clip on every gate).
# --------------------------------------------------------------------------------------------------
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


NUMPY_ACTS = {
    "relu": lambda z, a, b: np.maximum(z, 0.0), "tanh": lambda z, a, b: np.tanh(z),
    "sigmoid": lambda z, a, b: _sigmoid(z),
    "affine": lambda z, a, b: a * z + b, "leakyrelu": lambda z, a, b: np.where(z >= 0, z, a * z),
    "thresholdedrelu": lambda z, a, b: np.where(z > a, z, 0.0), "scaledtanh": lambda z, a, b: a * np.tanh(b * z),
    "hardsigmoid": lambda z, a, b: np.clip(a * z + b, 0.0, 1.0),
    "elu": lambda z, a, b: np.where(z >= 0, z, a * (np.exp(z) - 1.0)),
    "softsign": lambda z, a, b: z / (1.0 + np.abs(z)), "softplus": lambda z, a, b: np.log1p(np.exp(z)),
}
ORT_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}


def numpy_rnn(op, vals, attrs):
    """{output name: float64 array} of one LSTM / GRU / RNN node, straight from the ONNX equations."""
    v = {k: np.asarray(a, np.float64) for k, a in vals.items() if k != "sequence_lens"}
    layout, hidden = attrs.get("layout", 0), attrs["hidden_size"]
    direction = attrs.get("direction", "forward")
    dirs, g = (2 if direction == "bidirectional" else 1), GATES[op]
    x = v["X"] if layout == 0 else v["X"].transpose(1, 0, 2)
    t_len, n = x.shape[:2]
    lens = vals.get("sequence_lens", np.full(n, t_len))
    states = {k: (v[k] if layout == 0 else v[k].transpose(1, 0, 2)) if k in v else np.zeros((dirs, n, hidden))
              for k in ("initial_h", "initial_c")}
    names = [a.lower() for a in attrs.get("activations", {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU":
                                                          ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[op] * dirs)]
    alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
    acts = []
    for name in names:
        takes = {"affine": (1, 1), "leakyrelu": (1, 0), "thresholdedrelu": (1, 0), "scaledtanh": (1, 1),
                 "hardsigmoid": (1, 1), "elu": (1, 0)}.get(name, (0, 0))
        da, db = ORT_DEFAULTS.get(name, (0.0, 0.0))
        a = alphas.pop(0) if takes[0] and alphas else da
        b = betas.pop(0) if takes[1] and betas else db
        acts.append(lambda z, f=NUMPY_ACTS[name], a=a, b=b: f(z, a, b))
    clip = attrs.get("clip")

    def cl(z):
        return z if clip is None else np.clip(z, -clip, clip)

    y = np.zeros((t_len, dirs, n, hidden))
    y_h, y_c = np.zeros((dirs, n, hidden)), np.zeros((dirs, n, hidden))
    per = len(names) // dirs
    for d in range(dirs):
        w, r = v["W"][d], v["R"][d]
        bias = v["B"][d] if "B" in v else np.zeros(2 * g * hidden)
        wb, rb = bias[:g * hidden], bias[g * hidden:]
        f, gg, hh = (acts[d * per:(d + 1) * per] + [None, None])[:3]
        split = (lambda a, k: [a[j * hidden:(j + 1) * hidden] for j in range(k)])
        for s in range(n):
            h, c = states["initial_h"][d, s], states["initial_c"][d, s]
            steps = range(lens[s] - 1, -1, -1) if (direction == "reverse" or d == 1) else range(lens[s])
            for t in steps:
                xt = x[t, s]
                if op == "RNN":
                    h = f(cl(w @ xt + r @ h + wb + rb))
                elif op == "GRU":
                    xz, xr, xh = split(w @ xt + wb, 3)
                    rz, rr, rh = split(r, 3)
                    bz, br, bh = split(rb, 3)
                    z, rg = f(cl(xz + rz @ h + bz)), f(cl(xr + rr @ h + br))
                    if attrs.get("linear_before_reset", 0):
                        cand = gg(cl(xh + rg * (rh @ h + bh)))
                    else:
                        cand = gg(cl(xh + rh @ (rg * h) + bh))
                    h = (1 - z) * cand + z * h
                else:
                    ai, ao, af, ac = split(w @ xt + r @ h + wb + rb, 4)
                    pi, po, pf = split(v["P"][d], 3) if "P" in v else (0.0, 0.0, 0.0)
                    i = f(cl(ai + pi * c))
                    fg = 1 - i if attrs.get("input_forget", 0) else f(cl(af + pf * c))
                    c = fg * c + i * gg(cl(ac))
                    h = f(cl(ao + po * c)) * hh(c)
                y[t, d, s] = h
            y_h[d, s], y_c[d, s] = h, c
    if layout == 1:
        y, y_h, y_c = y.transpose(2, 0, 1, 3), y_h.transpose(1, 0, 2), y_c.transpose(1, 0, 2)
    return {"Y": y, "Y_h": y_h, "Y_c": y_c}


def reference_errors(model, op, vals, attrs, wrt, output, seed=1, eps=1e-7) -> dict[str, float]:
    """Like adjoint_errors, with <gy, J dx> from float64 central differences of numpy_rnn."""
    feeds = {w: vals[w] for w in wrt}
    gmodel, gnames = vjp_model(model, wrt, output)
    model, gmodel = emulate_batch_first(model), emulate_batch_first(gmodel)
    y = run(model, feeds, [output])[0]
    ref = numpy_rnn(op, vals, attrs)[output]
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()),
                               err_msg="the numpy reference disagrees with onnxruntime's forward")
    rng = np.random.default_rng(seed)
    gy = rng.standard_normal(y.shape)
    gxs = run(gmodel, {**feeds, "gy": gy.astype(F32)}, gnames)
    errors = {}
    for w, gx in zip(wrt, gxs):
        dx = rng.standard_normal(vals[w].shape)
        x64 = vals[w].astype(np.float64)
        plus = numpy_rnn(op, {**vals, w: x64 + eps * dx}, attrs)[output]
        minus = numpy_rnn(op, {**vals, w: x64 - eps * dx}, attrs)[output]
        jdx = (plus - minus) / (2 * eps)
        lhs, rhs = float(np.sum(gy * jdx)), float(np.sum(gx.astype(np.float64) * dx))
        scale = float(np.linalg.norm(gy) * np.linalg.norm(jdx) + np.linalg.norm(gx) * np.linalg.norm(dx))
        assert scale > 1e-6, f"d{output}/d{w} is (numerically) zero: the check would be vacuous"
        errors[w] = abs(lhs - rhs) / scale
    return errors


def check_reference(op, vals, attrs, wrt=None, dynamic=(), tol=REF_TOL):
    """check() against the float64 numpy oracle."""
    if wrt is None:
        wrt = [w for w in ("X", "initial_h", "initial_c") if w in vals]
    for output in OUTPUTS[op]:
        model = rnn_model(op, vals, attrs, wrt, outputs=[output], dynamic=dynamic)
        errors = reference_errors(model, op, vals, attrs, wrt, output)
        bad = {w: e for w, e in errors.items() if not e <= tol}
        assert not bad, f"{op} {attrs}: d{output}/d(...) adjoint errors against the float64 oracle {bad}"


# --------------------------------------------------------------------------------------------------
# directions x layouts x initial states x bias, default activations
# --------------------------------------------------------------------------------------------------
CORE = [(op, direction, layout, states)
        for op in ("LSTM", "GRU", "RNN")
        for direction in ("forward", "reverse", "bidirectional")
        for layout in (0, 1)
        for states in (True, False)]


@pytest.mark.parametrize("op,direction,layout,states", CORE,
                         ids=[f"{o}-{d}-layout{lay}-{'h0' if s else 'noh0'}" for o, d, lay, s in CORE])
def test_core_variants(op, direction, layout, states):
    dirs = 2 if direction == "bidirectional" else 1
    seed = CORE.index((op, direction, layout, states))
    vals = rnn_inputs(op, t=4, n=2, i=3, h=5, dirs=dirs, layout=layout, states=states, bias=layout == 0 or states,
                      seed=seed)
    attrs = {"hidden_size": 5, "direction": direction, "layout": layout}
    check(op, vals, attrs)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_linear_before_reset(lbr, direction):
    dirs = 2 if direction == "bidirectional" else 1
    vals = rnn_inputs("GRU", t=5, n=3, i=4, h=6, dirs=dirs, seed=11 + lbr)
    check("GRU", vals, {"hidden_size": 6, "direction": direction, "linear_before_reset": lbr})


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_only_y_h_used(op):
    # A classifier on the last hidden state: the node does not produce Y, which the rule then asks for.
    vals = rnn_inputs(op, t=5, n=2, i=3, h=4, dirs=2, seed=21)
    check(op, vals, {"hidden_size": 4, "direction": "bidirectional"}, used=["Y_h"])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_initial_state_only(op):
    # X is not on the differentiated path; only initial_h (and initial_c) are.
    vals = rnn_inputs(op, t=3, n=2, i=3, h=4, dirs=2, seed=31)
    check(op, vals, {"hidden_size": 4, "direction": "bidirectional"},
          wrt=[w for w in ("initial_h", "initial_c") if w in vals])


def test_single_step_and_long_sequence():
    attrs = {"hidden_size": 4, "direction": "bidirectional"}
    for op in ("LSTM", "GRU"):
        check(op, rnn_inputs(op, t=1, n=2, i=3, h=4, dirs=2, seed=41, scale=0.4), attrs)
        vals = rnn_inputs(op, t=24, n=2, i=3, h=4, dirs=2, seed=64, scale=0.4)
        # After 24 steps d(Y_h, Y_c)/d(initial states) has vanished below float32 finite differences' noise
        # (relative error 4e-2 at eps 1e-2, 2e-3 at eps 1e-1): those pairs are checked on short sequences.
        check(op, vals, attrs, used=["Y"])
        check(op, vals, attrs, wrt=["X"])


# --------------------------------------------------------------------------------------------------
# symbolic T (and N)
# --------------------------------------------------------------------------------------------------
DYNAMIC = [("LSTM", 0, {}), ("LSTM", 1, {}), ("GRU", 0, {"linear_before_reset": 1}), ("GRU", 1, {}),
           ("RNN", 0, {})]


@pytest.mark.parametrize("op,layout,extra", DYNAMIC, ids=[f"{o}-layout{lay}-{i}" for i, (o, lay, _) in
                                                          enumerate(DYNAMIC)])
def test_dynamic_sequence_length(op, layout, extra):
    attrs = {"hidden_size": 4, "direction": "bidirectional", "layout": layout, **extra}
    wrt = ["X", "initial_h"] + (["initial_c"] if op == "LSTM" else [])
    # one gradient graph, checked at several lengths
    model = rnn_model(op, rnn_inputs(op, t=3, dirs=2, h=4, layout=layout), attrs, wrt, outputs=["Y"],
                      dynamic=("T", "N"))
    x_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert "T" in x_dims and "N" in x_dims
    for t, n in ((1, 2), (3, 1), (7, 3)):
        vals = rnn_inputs(op, t=t, n=n, dirs=2, h=4, layout=layout, seed=50 + t)
        errors = adjoint_errors(model, vals, wrt, "Y")
        assert max(errors.values()) <= TOL, f"T={t}, N={n}: {errors}"
    check(op, rnn_inputs(op, t=6, n=2, dirs=2, h=4, layout=layout, seed=59), attrs, dynamic=("T", "N"))


# --------------------------------------------------------------------------------------------------
# activations (with and without activation_alpha / activation_beta), clip, LSTM input_forget and peepholes
# --------------------------------------------------------------------------------------------------
ALL_ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
                   "HardSigmoid", "Elu", "Softsign", "Softplus"]
TAKES = {"Affine": (True, True), "LeakyRelu": (True, False), "ThresholdedRelu": (True, False),
         "ScaledTanh": (True, True), "HardSigmoid": (True, True), "Elu": (True, False)}
ALPHA = {"Affine": 0.7, "LeakyRelu": 0.2, "ThresholdedRelu": 0.1, "ScaledTanh": 1.3, "HardSigmoid": 0.3, "Elu": 0.6}
BETA = {"Affine": 0.1, "ScaledTanh": 0.8, "HardSigmoid": 0.45}


def _activation_attrs(names, explicit):
    attrs = {"activations": names}
    if explicit:
        # distinct values per slot, so that consuming them in the wrong order shows
        alphas = [ALPHA[a] * (1 + 0.1 * k) for k, a in enumerate(names) if TAKES.get(a, (False, False))[0]]
        betas = [BETA[a] * (1 - 0.1 * k) for k, a in enumerate(names) if TAKES.get(a, (False, False))[1]]
        if alphas:
            attrs["activation_alpha"] = alphas
        if betas:
            attrs["activation_beta"] = betas
    return attrs


KINKED = {"Relu", "LeakyRelu", "ThresholdedRelu", "HardSigmoid", "Elu"}  # Elu: slopes 1 and alpha meet at 0


@pytest.mark.parametrize("act", ALL_ACTIVATIONS)
@pytest.mark.parametrize("explicit", [True, False], ids=["alpha_beta", "defaults"])
def test_activations(act, explicit):
    # The activation under test takes every slot in turn (f of RNN; f or g of GRU; f, g or h of LSTM), the
    # other slots keep their defaults; bidirectional, with the two directions' lists in opposite orders, so
    # that alpha/beta are consumed across both directions.
    for op, defaults in (("RNN", ["Tanh"]), ("GRU", ["Sigmoid", "Tanh"]), ("LSTM", ["Sigmoid", "Tanh", "Tanh"])):
        for slot in range(len(defaults)):
            names = list(defaults)
            names[slot] = act
            vals = rnn_inputs(op, t=3, n=2, i=3, h=4, dirs=2, seed=60 + slot + len(act), scale=0.5)
            attrs = {"hidden_size": 4, "direction": "bidirectional",
                     **_activation_attrs(names + names[::-1] if op != "RNN" else names * 2, explicit)}
            if not explicit and act in ("Affine", "ScaledTanh"):
                # onnxruntime's default alpha / beta of these are 0: the gate is constant and so is Y where it
                # is the output's last activation; the gradient must then be exactly 0
                check(op, vals, attrs, used=["Y"], allow_zero=True)
            elif act in KINKED:
                check_reference(op, vals, attrs)
            else:
                check(op, vals, attrs)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_clip(op):
    # clip 0.5 saturates a good share of the pre-activations (their gradient is then 0)
    vals = rnn_inputs(op, t=4, n=2, i=3, h=4, dirs=2, seed=70)
    check_reference(op, vals, {"hidden_size": 4, "direction": "bidirectional", "clip": 0.5})


@pytest.mark.parametrize("peepholes", [False, True], ids=["nopeep", "peep"])
@pytest.mark.parametrize("input_forget", [0, 1])
@pytest.mark.parametrize("layout", [0, 1])
def test_lstm_peepholes_and_input_forget(peepholes, input_forget, layout):
    vals = rnn_inputs("LSTM", t=4, n=2, i=3, h=4, dirs=2, layout=layout, peepholes=peepholes, seed=80 + input_forget)
    check("LSTM", vals, {"hidden_size": 4, "direction": "bidirectional", "input_forget": input_forget,
                         "layout": layout})


def test_lstm_everything_at_once():
    vals = rnn_inputs("LSTM", t=5, n=2, i=3, h=4, dirs=2, layout=1, peepholes=True, seed=90)
    vals["sequence_lens"] = np.array([5, 3], np.int32)
    attrs = {"hidden_size": 4, "direction": "bidirectional", "layout": 1, "clip": 1.5, "input_forget": 1,
             **_activation_attrs(["HardSigmoid", "Softsign", "ScaledTanh", "Sigmoid", "Elu", "Tanh"], True)}
    check_reference("LSTM", vals, attrs, dynamic=("T",))


# --------------------------------------------------------------------------------------------------
# sequence_lens, opset forms
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_full_sequence_lens_is_accepted(op):
    vals = rnn_inputs(op, t=4, n=3, dirs=2, h=4, seed=100)
    vals["sequence_lens"] = np.full(3, 4, np.int32)
    check(op, vals, {"hidden_size": 4, "direction": "bidirectional"})


SEQ_LENS = [(op, direction, layout) for op in ("LSTM", "GRU", "RNN")
            for direction in ("forward", "reverse", "bidirectional") for layout in (0, 1)]


@pytest.mark.parametrize("op,direction,layout", SEQ_LENS, ids=[f"{o}-{d}-layout{lay}" for o, d, lay in SEQ_LENS])
def test_partial_sequence_lens(op, direction, layout):
    # Past its length a sequence's Y is 0 and its state frozen (Y_h / Y_c: the last valid step); a reverse pass
    # starts at len - 1 from the initial state. X beyond the length must get a zero gradient.
    dirs = 2 if direction == "bidirectional" else 1
    vals = rnn_inputs(op, t=5, n=3, dirs=dirs, h=4, layout=layout, seed=102 + SEQ_LENS.index((op, direction, layout)))
    vals["sequence_lens"] = np.array([5, 2, 3], np.int32)
    check(op, vals, {"hidden_size": 4, "direction": direction, "layout": layout})


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_sequence_lens_fed_at_run_time(op):
    # lengths unknown when the graph is built, with symbolic T and N
    attrs = {"hidden_size": 4, "direction": "bidirectional"}
    wrt = [w for w in ("X", "initial_h", "initial_c") if op == "LSTM" or w != "initial_c"]
    template = {**rnn_inputs(op, t=3, dirs=2, h=4), "sequence_lens": np.full(2, 3, np.int32)}
    model = rnn_model(op, template, attrs, wrt, outputs=["Y_h"], dynamic=("T", "N"), fed=["sequence_lens"])
    vals = rnn_inputs(op, t=6, n=4, dirs=2, h=4, seed=103)
    for lens in ([6, 1, 4, 6], [6, 6, 6, 6]):
        vals["sequence_lens"] = np.array(lens, np.int32)
        errors = adjoint_errors(model, vals, wrt, "Y_h", fed=["sequence_lens"])
        assert max(errors.values()) <= TOL, f"lengths {lens}: {errors}"
    vals["sequence_lens"] = np.array([3, 6, 2, 5], np.int32)
    check(op, vals, attrs, dynamic=("T", "N"), fed=["sequence_lens"])


@pytest.mark.parametrize("op,opset", [("LSTM", 11), ("LSTM", 13), ("GRU", 11), ("GRU", 13), ("RNN", 12),
                                      ("LSTM", 21), ("GRU", 18)])
def test_opset_forms(op, opset):
    # opsets 11-13 hold the opset-7 form (no layout attribute); 14+ the opset-14 form.
    vals = rnn_inputs(op, t=3, n=2, dirs=2, h=4, seed=110 + opset)
    check(op, vals, {"hidden_size": 4, "direction": "bidirectional"}, opset=opset)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_old_opset_is_refused_then_works_upgraded(op):
    # The rule emits Scan-9 / Clip-11 forms; the Explainer upgrades every model to opset 11 first.
    vals = rnn_inputs(op, t=3, n=2, dirs=1, h=4, seed=120)
    model = rnn_model(op, vals, {"hidden_size": 4}, ["X"], outputs=["Y"], opset=9)
    with pytest.raises(UnsupportedOpError, match="opset >= 11"):
        gradient(model, of="Y", wrt=["X"], seed="Y")
    upgraded = infer_shapes(ensure_opset(model, 11))
    errors = adjoint_errors(upgraded, vals, ["X"], "Y")
    assert errors["X"] <= TOL


def test_gradient_graph_does_not_grow_with_sequence_length():
    sizes = []
    for t in (3, 30):
        vals = rnn_inputs("LSTM", t=t, dirs=2, h=4, seed=130)
        model = rnn_model("LSTM", vals, {"hidden_size": 4, "direction": "bidirectional"}, ["X"], outputs=["Y"])
        gmodel, _ = vjp_model(model, ["X"], "Y")
        sizes.append(len(gmodel.graph.node))
    assert sizes[0] == sizes[1] < 400


# --------------------------------------------------------------------------------------------------
# end to end: Grad-CAM at the conv of a tiny CRNN (conv -> sequence -> bidirectional LSTM -> Linear)
# --------------------------------------------------------------------------------------------------
def _crnn(classes: int = 5, cell: str = "LSTM"):
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.rnn = getattr(nn, cell)(6 * 4, 7, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(14, classes)

        def head(self, a):  # conv output (N, C, 4, w) -> per-column logits (N, T = w, K)
            seq = torch.relu(a).permute(0, 3, 1, 2).flatten(2)
            return self.fc(self.rnn(seq)[0])

        def forward(self, x):
            return self.head(self.conv(x))

    torch.manual_seed(0)
    return CRNN().eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_end_to_end_crnn_gradcam_matches_finite_differences(tmp_path, cell):
    """The torch export (TorchScript exporter: the recurrent op with ConstantOfShape initial states, T symbolic;
    torch's GRU is linear_before_reset=1) explained at the conv output. The reference is Grad-CAM from float64
    central differences of the torch head itself, alpha_k = (S(A + eps 1_k) - S(A - eps 1_k)) / (2 eps h w), at
    two input widths (sequence lengths) through the one explain graph. The score is batch-first (N, T, K); a
    target is a (time step, class) pair flattened over (T, K)."""
    torch = pytest.importorskip("torch")
    from onnxcam import Explainer

    model, classes = _crnn(cell=cell), 5
    path = tmp_path / "crnn.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 4, 9),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N", 3: "W"}, "logits": {0: "N", 1: "T"}})
    onnx_model = onnx.load(str(path))
    rnn = [n for n in onnx_model.graph.node if n.op_type == cell]
    assert len(rnn) == 1 and helper.get_attribute_value(
        next(a for a in rnn[0].attribute if a.name == "direction")) == b"bidirectional"
    conv_out = next(n.output[0] for n in onnx_model.graph.node if n.op_type == "Conv")
    explainer = Explainer(str(path), layer=conv_out)
    model64 = _crnn(cell=cell).double()
    model64.load_state_dict(model.state_dict())
    for width, seed in ((9, 0), (13, 1)):
        x = np.random.default_rng(seed).standard_normal((2, 3, 4, width)).astype(F32)
        with torch.no_grad():
            a = model64.conv(torch.from_numpy(x).double())  # (N, C, 4, w), the layer
            n, c = a.shape[:2]
            targets = np.array([2 * classes + 3, (width - 1) * classes + 1])
            eps = 1e-4
            alpha = np.zeros((n, c))
            for k in range(c):
                bump = torch.zeros_like(a)
                bump[:, k] = eps
                plus = model64.head(a + bump).reshape(n, -1).numpy()
                minus = model64.head(a - bump).reshape(n, -1).numpy()
                alpha[:, k] = (plus - minus)[np.arange(n), targets] / (2 * eps * a[0, 0].numel())
            ref = np.maximum(np.einsum("nc,nchw->nhw", alpha, a.numpy()), 0.0)
        r = explainer.explain(x, targets=[int(t) for t in targets])
        assert r.maps.shape == ref.shape == (2, 4, width)
        assert all(m.max() > 0 for m in ref)
        err = float(np.linalg.norm(r.maps - ref) / np.linalg.norm(ref))
        print(f"CRNN ({cell}) width {width}: maps rel L2 error {err:.1e}")
        assert err <= 1e-4, f"width {width}: Grad-CAM maps rel L2 error {err:.2e}"
