"""Rules for the recurrent layers LSTM, GRU and RNN: gradients of X, initial_h and initial_c only.

Whatever does not depend on the recurrence is computed for all time steps at once: h_{t-1} is read from Y
(the node is made to produce Y when the model does not use it), so every gate pre-activation costs two
MatMuls over the whole sequence, and so does dX at the end. What is truly sequential -- LSTM's cell states
(not an output of the op) and the backward recurrence of dh / dc -- runs in a Scan whose body is one step of
(N, H) element-wise ops and a single MatMul with R. Scan iterates over a symbolic length as happily as a
static one, so static and dynamic T share one code path and the graph does not grow with T.

Internally everything runs in layout 0 (time-major); layout=1 (batch-major, opset 14) is transposed in and
the gradients are transposed back. Semantics follow onnxruntime's CPU kernels (the runtime the adjoint tests
check against): `clip` clamps the pre-activations of every gate (not the cell state fed to h), LSTM's
input_forget sets f = 1 - i (ignoring the f peephole and the f clip), and activation_alpha / activation_beta
are consumed, in order, only by the activations that take them, with onnxruntime's defaults.

sequence_lens: absent, or constant and all equal to a static T, costs nothing; otherwise (shorter sequences,
lengths computed at run time) both Scans mask the steps past each sequence's length, where the op leaves its
state unchanged and outputs zeros, and a reverse pass restarts from the initial state at len - 1.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...model.graph import Emitter
from .registry import Context, register

BIG = 2**62

_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# (takes alpha, takes beta) and the defaults onnxruntime uses when the attribute lists run out (0 otherwise).
_TAKES = {"affine": (True, True), "relu": (False, False), "leakyrelu": (True, False),
          "thresholdedrelu": (True, False), "tanh": (False, False), "scaledtanh": (True, True),
          "sigmoid": (False, False), "hardsigmoid": (True, True), "elu": (True, False),
          "softsign": (False, False), "softplus": (False, False)}
_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _activations(ctx: Context, n_dirs: int) -> list[list[tuple[str, float, float]]]:
    """Per direction, the (name, alpha, beta) of each activation slot (f, g, h for LSTM)."""
    per = len(_DEFAULT_ACTIVATIONS[ctx.node.op_type])
    names = [_text(a) for a in (ctx.attr("activations") or [])] or _DEFAULT_ACTIVATIONS[ctx.node.op_type] * n_dirs
    if len(names) == per and n_dirs == 2:
        names = names * 2
    if len(names) != per * n_dirs:
        raise ValueError(f"expected {per * n_dirs} activations, got {len(names)}")
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    out = []
    for name in names:
        key = name.lower()
        if key not in _TAKES:
            raise ValueError(f"unknown activation '{name}'")
        takes_a, takes_b = _TAKES[key]
        da, db = _DEFAULTS.get(key, (0.0, 0.0))
        a = float(alphas.pop(0)) if takes_a and alphas else da
        b = float(betas.pop(0)) if takes_b and betas else db
        out.append((key, a, b))
    return [out[d * per:(d + 1) * per] for d in range(n_dirs)]


# --------------------------------------------------------------------------------------------------
# activations (emitted into the main graph or a Scan body alike)
# --------------------------------------------------------------------------------------------------
class _Ops:
    """The little emitting vocabulary the rules use, over any Emitter (main graph or Scan body)."""

    def __init__(self, em: Emitter, dtype: np.dtype, elem: int):
        self.em, self.dtype, self.elem = em, dtype, elem

    def __call__(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.em.op(op_type, list(inputs), **attrs)

    def k(self, value: float) -> str:
        return self.em.scalar(value, self.dtype)

    def cast(self, b: str) -> str:
        return self("Cast", b, to=self.elem)

    def mul(self, *ts: str) -> str:
        out = ts[0]
        for t in ts[1:]:
            out = self("Mul", out, t)
        return out

    def add(self, *ts: str) -> str:
        out = ts[0]
        for t in ts[1:]:
            out = self("Add", out, t)
        return out

    def sl(self, t: str, start: int, end: int, axis: int) -> str:
        em = self.em
        return self("Slice", t, em.ints([start]), em.ints([end]), em.ints([axis]))

    def pick(self, t: str, index: int, axis: int) -> str:
        return self("Gather", t, self.em.const(np.array(index, np.int64), hint="index"), axis=axis)


def _act(o: _Ops, act, z: str) -> str:
    name, a, b = act
    if name in ("relu", "tanh", "sigmoid", "softsign", "softplus"):
        return o({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
                  "softplus": "Softplus"}[name], z)
    if name == "affine":
        return o.add(o.mul(z, o.k(a)), o.k(b))
    if name == "leakyrelu":
        return o("LeakyRelu", z, alpha=a)
    if name == "thresholdedrelu":
        return o("ThresholdedRelu", z, alpha=a)
    if name == "scaledtanh":
        return o.mul(o("Tanh", o.mul(z, o.k(b))), o.k(a))
    if name == "hardsigmoid":
        return o("HardSigmoid", z, alpha=a, beta=b)
    if name == "elu":
        return o("Elu", z, alpha=a)
    raise ValueError(f"unknown activation '{name}'")


def _act_grad(o: _Ops, act, z: str, y: str) -> str:
    """d act / d z at z (y = act(z)), always shaped like z (it becomes a Scan input, which needs the T axis)."""
    name, a, b = act
    zero, one = (lambda: o.k(0.0)), (lambda: o.k(1.0))
    if name == "relu":
        return o.cast(o("Greater", z, zero()))
    if name == "tanh":
        return o("Sub", one(), o.mul(y, y))
    if name == "sigmoid":
        return o.mul(y, o("Sub", one(), y))
    if name == "affine":
        return o("Expand", o.k(a), o.em.shape_of(z))
    if name == "leakyrelu":
        return o.add(o.mul(o.cast(o("Greater", z, zero())), o.k(1.0 - a)), o.k(a))
    if name == "thresholdedrelu":
        return o.cast(o("Greater", z, o.k(a)))
    if name == "scaledtanh":
        t = o("Tanh", o.mul(z, o.k(b)))
        return o.mul(o("Sub", one(), o.mul(t, t)), o.k(a * b))
    if name == "hardsigmoid":
        u = o.add(o.mul(z, o.k(a)), o.k(b))
        return o.mul(o.cast(o("And", o("Greater", u, zero()), o("Less", u, one()))), o.k(a))
    if name == "elu":
        return o("Where", o("Greater", z, zero()), o("Expand", one(), o.em.shape_of(z)), o.add(y, o.k(a)))
    if name == "softsign":
        d = o.add(o("Abs", z), one())
        return o("Reciprocal", o.mul(d, d))
    if name == "softplus":
        return o("Sigmoid", z)
    raise ValueError(f"unknown activation '{name}'")


def _gate(o: _Ops, act, z: str, clip: float | None, grad: bool = True):
    """(act(clip(z)), d/dz of it) -- the derivative is 0 where the clip saturates."""
    zc = z if clip is None else o("Clip", z, o.k(-clip), o.k(clip))
    y = _act(o, act, zc)
    if not grad:
        return y, None
    d = _act_grad(o, act, zc, y)
    if clip is not None:
        d = o.mul(d, o.cast(o("Less", o("Abs", z), o.k(clip))))
    return y, d


# --------------------------------------------------------------------------------------------------
# Scan bodies
# --------------------------------------------------------------------------------------------------
class _Body:
    """A Scan body built with its own Emitter; its constants go to the main graph (bodies see outer names)."""

    def __init__(self, ctx: Context, dtype: np.dtype, elem: int):
        outer = ctx.emit
        self.outer, self.elem = outer, elem
        self.o = _Ops(Emitter(opset=outer.opset, taken=outer.taken, prefix=outer.prefix), dtype, elem)
        self.inputs: list = []

    def input(self, hint: str, elem: int | None = None) -> str:
        name = self.o.em.fresh(hint)
        self.inputs.append(helper.make_tensor_value_info(name, elem or self.elem, None))
        return name

    def scan(self, states: list[str], scans: list[str], outputs: list[str], n_scan_out: int, reverse: bool,
             mask: str | None = None):
        """Runs the body over time (axis 0); `outputs` are the new states, then the per-step outputs.
        `mask` (T, N, 1) bool: where it is false (past a sequence's length) the step keeps the states as they
        were and outputs zeros, as the op itself does there."""
        o = self.o
        if mask is not None:
            n = len(states)
            old = [vi.name for vi in self.inputs[:n]]
            m = self.input("valid", TensorProto.BOOL)
            outputs = ([o("Where", m, new, prev) for new, prev in zip(outputs[:n], old)]
                       + [o("Where", m, out, o.k(0.0)) for out in outputs[n:]])
            scans = scans + [mask]
        inside = {vi.name for vi in self.inputs}
        # a graph output must be produced inside the body and appear once
        outs, seen = [], set()
        for name in outputs:
            if name in inside or name in seen:
                name = o("Identity", name)
            seen.add(name)
            outs.append(name)
        # Every state and per-step output is (N, width). onnxruntime infers body shapes itself for newer IR
        # versions but insists on declared ranks for older models (ddddocr's CRNN is IR 6).
        graph = helper.make_graph(o.em.nodes, o.em.fresh("scan_body"), self.inputs,
                                  [helper.make_tensor_value_info(n, self.elem, [None, None]) for n in outs])
        self.outer.initializers.extend(o.em.initializers)
        d = 1 if reverse else 0
        res = self.outer.op("Scan", states + scans, n_out=len(states) + n_scan_out, body=graph,
                            num_scan_inputs=len(scans), scan_input_directions=[d] * len(scans),
                            scan_output_directions=[d] * n_scan_out)
        return res if isinstance(res, list) else [res]


# --------------------------------------------------------------------------------------------------
# shared set-up
# --------------------------------------------------------------------------------------------------
class _Rnn:
    """Attributes, layout-0 views of the node's tensors and per-direction weights of one LSTM/GRU/RNN node."""

    def __init__(self, ctx: Context, gy, n_gates: int):
        if ctx.opset < 11:
            raise ValueError(f"the {ctx.node.op_type} gradient needs opset >= 11 (Scan, Clip with inputs); "
                             f"the model has opset {ctx.opset}: upgrade the model's opset first")
        self.ctx, self.g = ctx, n_gates
        x = ctx.input(0)
        self.dtype, self.elem = ctx.dtype(x), ctx.view.elem_type(x)
        o = self.o = _Ops(ctx.emit, self.dtype, self.elem)
        direction = _text(ctx.attr("direction", "forward"))
        if direction not in ("forward", "reverse", "bidirectional"):
            raise ValueError(f"unknown direction '{direction}'")
        self.n_dirs = 2 if direction == "bidirectional" else 1
        self.reverse = [direction == "reverse", True][:self.n_dirs]
        self.layout = int(ctx.attr("layout", 0))
        hidden = ctx.attr("hidden_size")
        if hidden is None:
            rs = ctx.shape(ctx.input(2))
            hidden = rs[2] if rs is not None and isinstance(rs[2], int) else None
        if hidden is None:
            raise ValueError("hidden_size is unknown (no attribute and R's shape is not static)")
        self.h = int(hidden)
        clip = ctx.attr("clip")
        self.clip = None if clip is None else float(clip)
        self.acts = _activations(ctx, self.n_dirs)

        b = self.layout == 1
        self.x = o("Transpose", x, perm=[1, 0, 2]) if b else x
        self.mask = self.mask_next = None
        if not self._full_length(x):
            self._sequence_masks()
        y = ctx.output(0) or ctx.add_output(0, f"{ctx.node.op_type}_Y")
        self.y = o("Transpose", y, perm=[1, 2, 0, 3]) if b else y  # (T, D, N, H)
        self.gy = None if gy[0] is None else (o("Transpose", gy[0], perm=[1, 2, 0, 3]) if b else gy[0])
        self.state_axis = 1 if b else 0  # of initial_h / initial_c / Y_h / Y_c
        self.gy_states = list(gy[1:])

    def _full_length(self, x: str) -> bool:
        """No sequence_lens, or constant lengths all equal to a static T: no masking needed."""
        ctx = self.ctx
        lens = ctx.input(4)
        if not lens:
            return True
        value = ctx.value(lens)
        xs = ctx.shape(x)
        t = None if xs is None else xs[1 if self.layout == 1 else 0]
        return value is not None and isinstance(t, int) and bool(np.all(np.asarray(value) == t))

    def _sequence_masks(self) -> None:
        """mask[t, n] = t < len[n] and mask_next[t, n] = t + 1 < len[n], both (T, N, 1) bool. Past its length a
        sequence's steps change nothing (Y is 0 there, Y_h / Y_c hold the last valid step), and a reverse pass
        starts at len - 1 from the initial state."""
        em, o = self.ctx.emit, self.o
        lens = em.unsqueeze(o("Cast", self.ctx.input(4), to=TensorProto.INT64), [0])          # (1, N)
        t = o("Gather", em.shape_of(self.x), em.const(np.array(0, np.int64)), axis=0)
        steps = em.unsqueeze(o("Range", em.const(np.array(0, np.int64)), t, em.const(np.array(1, np.int64))), [1])
        self.mask = em.unsqueeze(o("Less", steps, lens), [2])
        self.mask_next = em.unsqueeze(o("Less", o("Add", steps, em.ints([1])), lens), [2])

    # per direction ------------------------------------------------------------------------------
    def weights(self, d: int):
        """(W_d (G*H, I), R_d (G*H, H), W bias, R bias or None)"""
        ctx, o, gh = self.ctx, self.o, self.g * self.h
        w = o.pick(ctx.input(1), d, 0)
        r = o.pick(ctx.input(2), d, 0)
        wb = rb = None
        if ctx.input(3):
            bd = o.pick(ctx.input(3), d, 0)
            wb, rb = o.sl(bd, 0, gh, 0), o.sl(bd, gh, 2 * gh, 0)
        return w, r, wb, rb

    def y_d(self, d: int) -> str:
        return self.o.pick(self.y, d, 1)  # (T, N, H)

    def state(self, index: int, d: int, yd: str) -> str:
        """initial state `index` (5: h, 6: c) of direction d as (1, N, H); zeros when absent."""
        name = self.ctx.input(index)
        if name:
            return self.ctx.emit.unsqueeze(self.o.pick(name, d, self.state_axis), [0])
        return self.ctx.emit.zeros_like(self.o.sl(yd, 0, 1, 0), self.dtype)

    def shift(self, seq: str, first: str, d: int) -> str:
        """The value each step started from: [first, seq[:-1]] forward, [seq[1:], first] in reverse."""
        o = self.o
        if self.reverse[d]:
            shifted = o("Concat", o.sl(seq, 1, BIG, 0), first, axis=0)
            # Y (and the recomputed cells) are 0 past a sequence's length, where its reverse pass began
            return shifted if self.mask_next is None else o("Where", self.mask_next, shifted, first)
        return o("Concat", first, o.sl(seq, 0, -1, 0), axis=0)

    def gy_d(self, d: int, yd: str) -> str:
        if self.gy is None:
            return self.ctx.emit.zeros_like(yd, self.dtype)
        return self.o.pick(self.gy, d, 1)

    def gy_state(self, k: int, d: int, zero: str) -> str:
        """cotangent of Y_h (k=0) / Y_c (k=1) for direction d, (N, H)"""
        g = self.gy_states[k] if k < len(self.gy_states) else None
        return zero if g is None else self.o.pick(g, d, self.state_axis)

    def finish(self, dxs: list[str], d_states: dict[int, list[str]]) -> list:
        """Sums dX over directions and stacks the initial-state gradients, back in the node's layout."""
        ctx, o = self.ctx, self.o
        out: list = [None] * len(ctx.node.input)
        if ctx.needs[0]:
            dx = o.add(*dxs)
            out[0] = o("Transpose", dx, perm=[1, 0, 2]) if self.layout == 1 else dx
        for index, per_dir in d_states.items():
            if index < len(ctx.needs) and ctx.needs[index]:
                out[index] = o("Concat", *[ctx.emit.unsqueeze(g, [self.state_axis]) for g in per_dir],
                               axis=self.state_axis)
        return out


def _split(o: _Ops, t: str, n: int, h: int) -> list[str]:
    return [o.sl(t, i * h, (i + 1) * h, -1) for i in range(n)]


def _mm_t(o: _Ops, a: str, w: str) -> str:
    """a @ w^T"""
    return o("MatMul", a, o("Transpose", w, perm=[1, 0]))


# --------------------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------------------
@register("LSTM")
def lstm(ctx: Context, gy):
    """gX, g(initial_h), g(initial_c): a Scan against the recurrence over gates recomputed from Y, cells by a Scan

    h_{t-1} comes from Y, so the gate pre-activations of all steps are X W^T + H_prev R^T + b at once; the cell
    states c_t, which the op does not output, are re-run by a Scan of c_t = f c_{t-1} + i g. The backward Scan
    carries (dh, dc) and emits the gate gradients da_t = [di, do, df, dc] * act'; dX = da W over all steps.
    Peepholes, clip, input_forget, every activation with activation_alpha/beta, layout 0/1, any direction.
    """
    s = _Rnn(ctx, gy, 4)
    o, h = s.o, s.h
    input_forget = bool(int(ctx.attr("input_forget", 0)))
    peep = ctx.input(7)
    dxs, dh0s, dc0s = [], [], []
    for d in range(s.n_dirs):
        f_act, g_act, h_act = s.acts[d]
        w, r, wb, rb = s.weights(d)
        yd = s.y_d(d)
        h0, c0 = s.state(5, d, yd), s.state(6, d, yd)
        hprev = s.shift(yd, h0, d)
        pre = o.add(_mm_t(o, s.x, w), _mm_t(o, hprev, r), *([wb, rb] if wb else []))  # (T, N, 4H), gates iofc
        ai, ao, af, ac = _split(o, pre, 4, h)
        pi = po = pf = None
        if peep:
            pi, po, pf = _split(o, o.pick(peep, d, 0), 3, h)

        # Cell states: c_t = f c_{t-1} + i g is a recurrence that Y does not record.
        body = _Body(ctx, s.dtype, s.elem)
        b = body.o
        c, bi, bf, bc = body.input("c"), body.input("ai"), body.input("af"), body.input("ac")
        i_t, _ = _gate(b, f_act, b.add(bi, b.mul(c, pi)) if peep else bi, s.clip, grad=False)
        if input_forget:
            f_t = b("Sub", b.k(1.0), i_t)
        else:
            f_t, _ = _gate(b, f_act, b.add(bf, b.mul(c, pf)) if peep else bf, s.clip, grad=False)
        g_t, _ = _gate(b, g_act, bc, s.clip, grad=False)
        c_new = b.add(b.mul(f_t, c), b.mul(i_t, g_t))
        _, cells = body.scan([ctx.emit.squeeze(c0, [0])], [ai, af, ac], [c_new, c_new], 1, s.reverse[d],
                              s.mask)
        cprev = s.shift(cells, c0, d)

        # Everything the backward step needs, for all steps at once.
        i, di = _gate(o, f_act, o.add(ai, o.mul(cprev, pi)) if peep else ai, s.clip)
        g, dg = _gate(o, g_act, ac, s.clip)
        oo, do = _gate(o, f_act, o.add(ao, o.mul(cells, po)) if peep else ao, s.clip)
        tc, dtc = _gate(o, h_act, cells, None)
        k_o = o.mul(tc, do)                              # da_o = dh * k_o
        k_co = o.mul(oo, dtc)                            # dc  += dh * k_co
        if input_forget:                                 # f = 1 - i: df flows into i
            k_i, k_f = o.mul(o("Sub", g, cprev), di), ctx.emit.zeros_like(ai, s.dtype)
            f = o("Sub", o.k(1.0), i)
        else:
            k_i = o.mul(g, di)
            f, df = _gate(o, f_act, o.add(af, o.mul(cprev, pf)) if peep else af, s.clip)
            k_f = o.mul(cprev, df)
        k_c = o.mul(i, dg)

        body = _Body(ctx, s.dtype, s.elem)
        b = body.o
        dh_in, dc_in = body.input("dh"), body.input("dc")
        g_t, ko, kco, ki, kc, kf, ft = [body.input(n) for n in ("gy", "ko", "kco", "ki", "kc", "kf", "f")]
        dh_t = b.add(dh_in, g_t)
        da_o = b.mul(dh_t, ko)
        dc_t = b.add(dc_in, b.mul(dh_t, kco))
        if peep:
            dc_t = b.add(dc_t, b.mul(da_o, po))
        da_i, da_f, da_c = b.mul(dc_t, ki), b.mul(dc_t, kf), b.mul(dc_t, kc)
        dc_prev = b.mul(dc_t, ft)
        if peep:
            dc_prev = b.add(dc_prev, b.mul(da_i, pi), *([] if input_forget else [b.mul(da_f, pf)]))
        da = b("Concat", da_i, da_o, da_f, da_c, axis=-1)
        dh_prev = b("MatMul", da, r)
        zero = ctx.emit.squeeze(ctx.emit.zeros_like(h0, s.dtype), [0])
        dh0, dc0, da_all = body.scan([s.gy_state(0, d, zero), s.gy_state(1, d, zero)],
                                     [s.gy_d(d, yd), k_o, k_co, k_i, k_c, k_f, f],
                                     [dh_prev, dc_prev, da], 1, not s.reverse[d], s.mask)
        if ctx.needs[0]:
            dxs.append(o("MatMul", da_all, w))
        dh0s.append(dh0)
        dc0s.append(dc0)
    return s.finish(dxs, {5: dh0s, 6: dc0s})


# --------------------------------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------------------------------
@register("GRU")
def gru(ctx: Context, gy):
    """gX, g(initial_h): a Scan against the recurrence over z, r, h gates recomputed from Y (linear_before_reset 0/1)

    With h_{t-1} read from Y every gate is computed for all steps at once; the backward Scan carries dh only:
    dh_{t-1} = dh z + (terms through r and h~) + [da_z, da_r] R_zr. Clip, activations, layout, any direction.
    """
    s = _Rnn(ctx, gy, 3)
    o, h = s.o, s.h
    lbr = bool(int(ctx.attr("linear_before_reset", 0)))
    dxs, dh0s = [], []
    for d in range(s.n_dirs):
        f_act, g_act = s.acts[d]
        w, r, wb, rb = s.weights(d)
        yd = s.y_d(d)
        h0 = s.state(5, d, yd)
        hprev = s.shift(yd, h0, d)
        xp = _mm_t(o, s.x, w)
        if wb:
            xp = o.add(xp, wb)
        xz, xr, xh = _split(o, xp, 3, h)
        r_zr, r_h = o.sl(r, 0, 2 * h, 0), o.sl(r, 2 * h, 3 * h, 0)
        hz, hr = _split(o, _mm_t(o, hprev, r_zr), 2, h)
        rbz = rbr = rbh = None
        if rb:
            rbz, rbr, rbh = _split(o, rb, 3, h)
        z, dz = _gate(o, f_act, o.add(xz, hz, *([rbz] if rb else [])), s.clip)
        rg, dr = _gate(o, f_act, o.add(xr, hr, *([rbr] if rb else [])), s.clip)
        if lbr:  # h~ = g(Xh + r * (h_{t-1} Rh^T + Rbh))
            h_lin = _mm_t(o, hprev, r_h)
            if rb:
                h_lin = o.add(h_lin, rbh)
            ah = o.add(xh, o.mul(rg, h_lin))
            k_r_base = h_lin
        else:    # h~ = g(Xh + (r * h_{t-1}) Rh^T + Rbh)
            ah = o.add(xh, _mm_t(o, o.mul(rg, hprev), r_h), *([rbh] if rb else []))
            k_r_base = hprev
        hh, dhh = _gate(o, g_act, ah, s.clip)
        k_z = o.mul(o("Sub", hprev, hh), dz)   # h_t = (1 - z) h~ + z h_{t-1}
        k_h = o.mul(o("Sub", o.k(1.0), z), dhh)
        k_r = o.mul(k_r_base, dr)

        body = _Body(ctx, s.dtype, s.elem)
        b = body.o
        dh_in = body.input("dh")
        g_t, kz, kh, kr, zt, rt = [body.input(n) for n in ("gy", "kz", "kh", "kr", "z", "r")]
        dh_t = b.add(dh_in, g_t)
        da_z, da_h = b.mul(dh_t, kz), b.mul(dh_t, kh)
        if lbr:
            da_r = b.mul(da_h, kr)
            dh_prev = b.add(b.mul(dh_t, zt), b("MatMul", b("Concat", da_z, da_r, b.mul(da_h, rt), axis=-1), r))
        else:
            q = b("MatMul", da_h, r_h)  # gradient of r * h_{t-1}
            da_r = b.mul(q, kr)
            dh_prev = b.add(b.mul(dh_t, zt), b.mul(q, rt), b("MatMul", b("Concat", da_z, da_r, axis=-1), r_zr))
        da = b("Concat", da_z, da_r, da_h, axis=-1)
        zero = ctx.emit.squeeze(ctx.emit.zeros_like(h0, s.dtype), [0])
        dh0, da_all = body.scan([s.gy_state(0, d, zero)], [s.gy_d(d, yd), k_z, k_h, k_r, z, rg],
                                [dh_prev, da], 1, not s.reverse[d], s.mask)
        if ctx.needs[0]:
            dxs.append(o("MatMul", da_all, w))
        dh0s.append(dh0)
    return s.finish(dxs, {5: dh0s})


# --------------------------------------------------------------------------------------------------
# RNN
# --------------------------------------------------------------------------------------------------
@register("RNN")
def rnn(ctx: Context, gy):
    """gX, g(initial_h): a Scan against the recurrence of da_t = (gY_t + dh_t) f'(a_t), dh_{t-1} = da_t R

    The pre-activations a_t = X W^T + H_prev R^T + b of all steps are recomputed at once from Y.
    """
    s = _Rnn(ctx, gy, 1)
    o = s.o
    dxs, dh0s = [], []
    for d in range(s.n_dirs):
        (f_act,) = s.acts[d]
        w, r, wb, rb = s.weights(d)
        yd = s.y_d(d)
        h0 = s.state(5, d, yd)
        pre = o.add(_mm_t(o, s.x, w), _mm_t(o, s.shift(yd, h0, d), r), *([wb, rb] if wb else []))
        _, k = _gate(o, f_act, pre, s.clip)

        body = _Body(ctx, s.dtype, s.elem)
        b = body.o
        dh_in, g_t, kt = body.input("dh"), body.input("gy"), body.input("k")
        da = b.mul(b.add(dh_in, g_t), kt)
        zero = ctx.emit.squeeze(ctx.emit.zeros_like(h0, s.dtype), [0])
        dh0, da_all = body.scan([s.gy_state(0, d, zero)], [s.gy_d(d, yd), k], [b("MatMul", da, r), da], 1,
                                not s.reverse[d], s.mask)
        if ctx.needs[0]:
            dxs.append(o("MatMul", da_all, w))
        dh0s.append(dh0)
    return s.finish(dxs, {5: dh0s})
