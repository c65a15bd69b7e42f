"""Rules for element-wise activation functions.

Every rule here maps the incoming gradient `gy` of output 0 to the gradient of input 0 (plus, where an
op has them, the few other float inputs: Clip's min/max, PRelu's slope).

Conventions at kinks (measure-zero sets; chosen to agree with PyTorch's backward where it is consistent):
  * Relu, LeakyRelu, PRelu, Elu, Selu, Celu: the "positive" branch is x > 0 strictly, so at x == 0 the
    gradient is the negative branch's (0 for Relu, alpha for LeakyRelu, the slope for PRelu, ...).
  * Clip: the gradient passes only where min < x < max strictly; at x == min or x == max it is 0 (as
    PyTorch's ReLU6 / hardtanh). An absent bound is no bound. Gradients to the min / max inputs (opset
    >= 11) are [x < min][min < max] and [x > max or min > max], summed over all elements.
  * ThresholdedRelu: x > alpha strictly.  HardSigmoid: 0 < alpha*x + beta < 1 strictly.
  * HardSwish: derivative x/3 + 1/2 on the open interval (-3, 3), 1 for x >= 3, 0 for x <= -3.
  * Abs: Sign(x), i.e. 0 at x == 0.

Guided Backpropagation / deconvnet (`ctx.relu_mode`) change only the ReLU-family rules -- Relu, Clip,
LeakyRelu, PRelu, HardSwish, Elu, Selu, Celu, ThresholdedRelu -- see `_relu_family`. Every other rule
(Sigmoid, Tanh, Gelu, ...) always returns the true gradient.

Only operators available at the model's opset are emitted, and no rule here needs `Where` (opset 9),
`Equal` on floats (opset 11) or `GreaterOrEqual` (opset 12), so they also work on opset 7/8 models.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from .registry import Context, register

RELU_MODES = ("grad", "guided", "deconvnet")

_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


# --- small helpers ------------------------------------------------------------------------------

def _only_first(ctx: Context, g):
    """Gradient list with `g` for input 0 and None for every other input."""
    return [g if ctx.needs[0] else None] + [None] * (len(ctx.node.input) - 1)


def _cast_like(ctx: Context, b: str, like: str) -> str:
    """Cast a boolean tensor to the float type of `like` (0/1 mask)."""
    return ctx.op("Cast", [b], to=ctx.view.elem_type(like))


def _mask(ctx: Context, cmp: str, a: str, b: str, like: str) -> str:
    """Cast(cmp(a, b)) as a 0/1 tensor of `like`'s type; cmp is Greater or Less."""
    return _cast_like(ctx, ctx.op(cmp, [a, b]), like)


def _k(ctx: Context, value: float, like: str) -> str:
    return ctx.scalar(value, like)


def _one_minus(ctx: Context, t: str, like: str) -> str:
    """1 - t, with the constant typed like the forward tensor `like` (new tensors have no known type)."""
    return ctx.op("Sub", [_k(ctx, 1.0, like), t])


def _mul(ctx: Context, *ts: str) -> str:
    out = ts[0]
    for t in ts[1:]:
        out = ctx.op("Mul", [out, t])
    return out


def _check_mode(mode: str) -> str:
    if mode not in RELU_MODES:
        raise ValueError(f"unknown relu_mode {mode!r}; expected one of {', '.join(RELU_MODES)}")
    return mode


def _relu_family(ctx: Context, g: str, local: Callable[[], Optional[str]]) -> str:
    """Backward of a ReLU-like op, honouring `ctx.relu_mode`; `local()` builds dy/dx (None means 1).

    * "grad":      gx = gy * local(x)                   -- the true gradient.
    * "guided":    gx = ReLU(gy) * local(x)             -- Guided Backpropagation.
    * "deconvnet": gx = ReLU(gy)                        -- the forward mask (and slope) is ignored.

    For Relu, "guided" is exactly the textbook rule gx = gy * [x > 0] * [gy > 0]. Guided Backprop is
    only defined for ReLU, so for the generalisations we keep each op's own local derivative (it already
    carries the op's forward gate) and add the backward gate [gy > 0] on top:
      * Clip used as ReLU6: [0 < x < 6] * ReLU(gy) -- the saturated region x >= 6 is zero as well,
        exactly as in the true gradient, so ReLU6 behaves as a ReLU that also blocks saturated units.
      * LeakyRelu (and PRelu): ReLU(gy) * (1 if x > 0 else alpha) -- the negative branch keeps its small
        slope rather than being zeroed, because zeroing it would pretend the network used a ReLU there.
      * HardSwish: ReLU(gy) * HardSwish'(x); the local derivative is negative on (-3, -1.5), and we keep
        that sign: the guided rule filters the backward signal, not the forward derivative.
      * Elu / Selu / Celu / ThresholdedRelu: the same pattern, ReLU(gy) * local derivative.
    "deconvnet" treats each of these ops as a plain ReLU in the backward pass (gx = ReLU(gy)), which is
    the deconvnet rule: the backward ReLU is applied to the signal and the forward mask is not used.
    (pytorch-grad-cam and Captum only replace nn.ReLU modules and leave ReLU6 / LeakyReLU / Hardswish
    with the true gradient; for networks using only Relu the results coincide.)
    """
    mode = _check_mode(ctx.relu_mode)
    if mode == "deconvnet":
        return ctx.op("Relu", [g])
    if mode == "guided":
        g = ctx.op("Relu", [g])
    loc = local()
    return g if loc is None else ctx.op("Mul", [g, loc])


# --- the ReLU family ----------------------------------------------------------------------------

@register("Relu")
def relu(ctx: Context, gy):
    """gx = gy * [x > 0]; guided: gy * [x > 0] * [gy > 0]; deconvnet: ReLU(gy)."""
    x = ctx.input(0)
    return _only_first(ctx, _relu_family(ctx, gy[0], lambda: _mask(ctx, "Greater", x, _k(ctx, 0.0, x), x)))


def _clip_bounds(ctx: Context) -> tuple[Optional[str], Optional[str], bool]:
    """(min, max, bounds_are_inputs): tensor names of the bounds, None where absent."""
    x = ctx.input(0)
    if ctx.opset < 11:  # Clip-6: attributes, absent meaning -/+ FLT_MAX
        lo, hi = ctx.attr("min"), ctx.attr("max")
        return (None if lo is None else _k(ctx, float(lo), x),
                None if hi is None else _k(ctx, float(hi), x), False)
    return ctx.input(1) or None, ctx.input(2) or None, True


@register("Clip")
def clip(ctx: Context, gy):
    """gx = gy * [min < x < max]; gmin = gy * [x < min] * [min < max]; gmax = gy * [x > max or min > max].

    An absent bound is no bound. guided / deconvnet change gx as for Relu (guided: ReLU(gy) * [min < x < max];
    deconvnet: ReLU(gy)); gmin / gmax (bounds as inputs, opset >= 11) are always the true gradient, summed
    over the bound's broadcast axes.
    """
    x, g = ctx.input(0), gy[0]
    lo, hi, as_inputs = _clip_bounds(ctx)
    out: list = [None] * len(ctx.node.input)

    def local():
        conds = []
        if lo is not None:
            conds.append(ctx.op("Greater", [x, lo]))
        if hi is not None:
            conds.append(ctx.op("Less", [x, hi]))
        if not conds:
            return None
        return _cast_like(ctx, conds[0] if len(conds) == 1 else ctx.op("And", conds), x)

    if ctx.needs[0]:
        out[0] = _relu_family(ctx, g, local)
    # Bounds as inputs (opset >= 11): the true gradient, whatever relu_mode says (they are parameters).
    if as_inputs and len(out) > 1 and ctx.needs[1] and lo is not None:
        sel = ctx.op("Less", [x, lo])
        if hi is not None:
            sel = ctx.op("And", [sel, ctx.op("Less", [lo, hi])])
        out[1] = ctx.unbroadcast(ctx.op("Mul", [g, _cast_like(ctx, sel, x)]), lo)
    if as_inputs and len(out) > 2 and ctx.needs[2] and hi is not None:
        sel = ctx.op("Greater", [x, hi])
        if lo is not None:
            sel = ctx.op("Or", [sel, ctx.op("Greater", [lo, hi])])
        out[2] = ctx.unbroadcast(ctx.op("Mul", [g, _cast_like(ctx, sel, x)]), hi)
    return out


@register("LeakyRelu")
def leaky_relu(ctx: Context, gy):
    """gx = gy * (1 if x > 0 else alpha); guided: ReLU(gy) * (1 if x > 0 else alpha); deconvnet: ReLU(gy)."""
    x = ctx.input(0)
    alpha = float(ctx.attr("alpha", 0.01))

    def local():  # alpha + (1 - alpha) * [x > 0]
        m = _mask(ctx, "Greater", x, _k(ctx, 0.0, x), x)
        return ctx.op("Add", [ctx.op("Mul", [m, _k(ctx, 1.0 - alpha, x)]), _k(ctx, alpha, x)])

    return _only_first(ctx, _relu_family(ctx, gy[0], local))


@register("PRelu")
def prelu(ctx: Context, gy):
    """gx = gy * (1 if x > 0 else slope); gslope = gy * x * [x <= 0] summed over slope's broadcast axes.

    guided / deconvnet change gx only (guided: ReLU(gy) * local slope; deconvnet: ReLU(gy)).
    """
    x, slope, g = ctx.input(0), ctx.input(1), gy[0]
    out: list = [None, None]
    state: dict = {}

    def neg_mask():  # [x <= 0], shared by both gradients
        if "neg" not in state:
            state["neg"] = _one_minus(ctx, _mask(ctx, "Greater", x, _k(ctx, 0.0, x), x), x)
        return state["neg"]

    def local():  # 1 - [x <= 0] + slope * [x <= 0]; slope broadcasts (unidirectionally) to x
        n = neg_mask()
        return ctx.op("Add", [_one_minus(ctx, n, x), ctx.op("Mul", [slope, n])])

    if ctx.needs[0]:
        out[0] = _relu_family(ctx, g, local)
    if ctx.needs[1]:  # true gradient for the slope, summed over the axes it was broadcast along
        out[1] = ctx.unbroadcast(_mul(ctx, g, x, neg_mask()), slope)
    return out


@register("HardSwish")
def hard_swish(ctx: Context, gy):
    """gx = gy * (0 if x <= -3, x/3 + 1/2 if -3 < x < 3, 1 if x >= 3); guided/deconvnet as for LeakyRelu."""
    x = ctx.input(0)

    def local():  # [-3 < x < 3] * (x/3 + 1/2) + [x >= 3]
        inner = _cast_like(ctx, ctx.op("And", [ctx.op("Greater", [x, _k(ctx, -3.0, x)]),
                                               ctx.op("Less", [x, _k(ctx, 3.0, x)])]), x)
        upper = _cast_like(ctx, ctx.op("Not", [ctx.op("Less", [x, _k(ctx, 3.0, x)])]), x)
        slope = ctx.op("Add", [ctx.op("Mul", [x, _k(ctx, 1.0 / 3.0, x)]), _k(ctx, 0.5, x)])
        return ctx.op("Add", [ctx.op("Mul", [inner, slope]), upper])

    return _only_first(ctx, _relu_family(ctx, gy[0], local))


def _exp_linear(ctx: Context, gy, pos_scale: float, neg_local: Callable[[str], str]):
    """Elu-like: dy/dx = pos_scale for x > 0, neg_local(y) for x <= 0."""
    x, y = ctx.input(0), ctx.output(0)

    def local():
        pos = _mask(ctx, "Greater", x, _k(ctx, 0.0, x), x)
        pos_term = pos if pos_scale == 1.0 else ctx.op("Mul", [pos, _k(ctx, pos_scale, x)])
        return ctx.op("Add", [pos_term, ctx.op("Mul", [_one_minus(ctx, pos, x), neg_local(y)])])

    return _only_first(ctx, _relu_family(ctx, gy[0], local))


@register("Elu")
def elu(ctx: Context, gy):
    """gx = gy * (1 if x > 0 else y + alpha = alpha * e^x); guided/deconvnet as for LeakyRelu."""
    # x <= 0: y = alpha (e^x - 1), so dy/dx = alpha e^x = y + alpha.
    alpha = float(ctx.attr("alpha", 1.0))
    return _exp_linear(ctx, gy, 1.0, lambda y: ctx.op("Add", [y, _k(ctx, alpha, y)]))


@register("Selu")
def selu(ctx: Context, gy):
    """gx = gy * (gamma if x > 0 else y + gamma * alpha); guided/deconvnet as for LeakyRelu."""
    # x <= 0: y = gamma alpha (e^x - 1), so dy/dx = y + gamma alpha; x > 0: gamma.
    alpha = float(ctx.attr("alpha", _SELU_ALPHA))
    gamma = float(ctx.attr("gamma", _SELU_GAMMA))
    return _exp_linear(ctx, gy, gamma, lambda y: ctx.op("Add", [y, _k(ctx, gamma * alpha, y)]))


@register("Celu")
def celu(ctx: Context, gy):
    """gx = gy * (1 if x > 0 else y / alpha + 1 = e^(x/alpha)); guided/deconvnet as for LeakyRelu."""
    # x <= 0: y = alpha (e^(x/alpha) - 1), so dy/dx = e^(x/alpha) = y / alpha + 1.
    alpha = float(ctx.attr("alpha", 1.0))
    return _exp_linear(ctx, gy, 1.0, lambda y: ctx.op("Add", [ctx.op("Mul", [y, _k(ctx, 1.0 / alpha, y)]),
                                                              _k(ctx, 1.0, y)]))


@register("ThresholdedRelu")
def thresholded_relu(ctx: Context, gy):
    """gx = gy * [x > alpha]; guided: ReLU(gy) * [x > alpha]; deconvnet: ReLU(gy)."""
    x = ctx.input(0)
    alpha = float(ctx.attr("alpha", 1.0))
    return _only_first(ctx, _relu_family(ctx, gy[0], lambda: _mask(ctx, "Greater", x, _k(ctx, alpha, x), x)))


# --- smooth activations (relu_mode does not apply) -------------------------------------------------

@register("Sigmoid")
def sigmoid(ctx: Context, gy):
    """gx = gy * y * (1 - y)."""
    y = ctx.output(0)
    return _only_first(ctx, _mul(ctx, gy[0], y, _one_minus(ctx, y, y)))


@register("Tanh")
def tanh(ctx: Context, gy):
    """gx = gy * (1 - y^2)."""
    y = ctx.output(0)
    return _only_first(ctx, ctx.op("Mul", [gy[0], _one_minus(ctx, ctx.op("Mul", [y, y]), y)]))


@register("HardSigmoid")
def hard_sigmoid(ctx: Context, gy):
    """gx = gy * alpha * [0 < y < 1]."""
    y = ctx.output(0)
    alpha = float(ctx.attr("alpha", 0.2))
    inside = ctx.op("And", [ctx.op("Greater", [y, _k(ctx, 0.0, y)]), ctx.op("Less", [y, _k(ctx, 1.0, y)])])
    return _only_first(ctx, _mul(ctx, gy[0], _cast_like(ctx, inside, y), _k(ctx, alpha, y)))


def _gauss(ctx: Context, x: str, scale: float, inv_var: float) -> str:
    """scale * exp(-x^2 * inv_var / 2)"""
    sq = ctx.op("Mul", [x, x])
    e = ctx.op("Exp", [ctx.op("Mul", [sq, _k(ctx, -0.5 * inv_var, x)])])
    return ctx.op("Mul", [e, _k(ctx, scale, x)])


@register("Erf")
def erf(ctx: Context, gy):
    """gx = gy * 2/sqrt(pi) * exp(-x^2)."""
    x = ctx.input(0)
    return _only_first(ctx, ctx.op("Mul", [gy[0], _gauss(ctx, x, 2.0 / math.sqrt(math.pi), 2.0)]))


@register("Gelu")
def gelu(ctx: Context, gy):
    """gx = gy * (Phi(x) + x * phi(x)); approximate='tanh': the derivative of x/2 * (1 + tanh(c (x + k x^3))).

    Phi / phi are the standard normal CDF / density; c = sqrt(2/pi), k = 0.044715.
    """
    x = ctx.input(0)
    approx = ctx.attr("approximate", "none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    if approx == "tanh":
        # y = x/2 (1 + tanh(u)), u = c (x + k x^3): y' = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 k x^2)
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        sq = ctx.op("Mul", [x, x])
        inner = ctx.op("Add", [ctx.op("Mul", [sq, _k(ctx, k, x)]), _k(ctx, 1.0, x)])
        t = ctx.op("Tanh", [_mul(ctx, x, inner, _k(ctx, c, x))])
        du = ctx.op("Add", [ctx.op("Mul", [sq, _k(ctx, 3.0 * k * c, x)]), _k(ctx, c, x)])
        a = ctx.op("Mul", [ctx.op("Add", [t, _k(ctx, 1.0, x)]), _k(ctx, 0.5, x)])
        b = _mul(ctx, x, _one_minus(ctx, ctx.op("Mul", [t, t]), x), du, _k(ctx, 0.5, x))
        local = ctx.op("Add", [a, b])
    elif approx == "none":
        # y = x Phi(x): y' = Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
        cdf = ctx.op("Erf", [ctx.op("Mul", [x, _k(ctx, 1.0 / math.sqrt(2.0), x)])])
        cdf = ctx.op("Mul", [ctx.op("Add", [cdf, _k(ctx, 1.0, x)]), _k(ctx, 0.5, x)])
        local = ctx.op("Add", [cdf, ctx.op("Mul", [x, _gauss(ctx, x, 1.0 / math.sqrt(2.0 * math.pi), 1.0)])])
    else:
        raise ValueError(f"Gelu approximate={approx!r} is not supported")
    return _only_first(ctx, ctx.op("Mul", [gy[0], local]))


@register("Softplus")
def softplus(ctx: Context, gy):
    """gx = gy * Sigmoid(x)."""
    return _only_first(ctx, ctx.op("Mul", [gy[0], ctx.op("Sigmoid", [ctx.input(0)])]))


@register("Softsign")
def softsign(ctx: Context, gy):
    """gx = gy / (1 + Abs(x))^2."""
    x = ctx.input(0)
    d = ctx.op("Add", [ctx.op("Abs", [x]), _k(ctx, 1.0, x)])
    return _only_first(ctx, ctx.op("Div", [gy[0], ctx.op("Mul", [d, d])]))


@register("Mish")
def mish(ctx: Context, gy):
    """gx = gy * (t + x * (1 - t^2) * Sigmoid(x)), t = Tanh(Softplus(x))."""
    # y = x tanh(sp(x)), sp = softplus: y' = t + x (1 - t^2) sigmoid(x)
    x = ctx.input(0)
    t = ctx.op("Tanh", [ctx.op("Softplus", [x])])
    local = ctx.op("Add", [t, _mul(ctx, x, _one_minus(ctx, ctx.op("Mul", [t, t]), x), ctx.op("Sigmoid", [x]))])
    return _only_first(ctx, ctx.op("Mul", [gy[0], local]))


# --- elementary functions ----------------------------------------------------------------------

@register("Exp")
def exp(ctx: Context, gy):
    """gx = gy * y."""
    return _only_first(ctx, ctx.op("Mul", [gy[0], ctx.output(0)]))


@register("Log")
def log(ctx: Context, gy):
    """gx = gy / x."""
    return _only_first(ctx, ctx.op("Div", [gy[0], ctx.input(0)]))


@register("Sqrt")
def sqrt(ctx: Context, gy):
    """gx = gy * 0.5 / y."""
    y = ctx.output(0)
    return _only_first(ctx, ctx.op("Div", [ctx.op("Mul", [gy[0], _k(ctx, 0.5, y)]), y]))


@register("Reciprocal")
def reciprocal(ctx: Context, gy):
    """gx = -gy * y^2."""
    y = ctx.output(0)  # d(1/x)/dx = -1/x^2 = -y^2
    return _only_first(ctx, ctx.op("Neg", [_mul(ctx, gy[0], y, y)]))


@register("Neg")
def neg(ctx: Context, gy):
    """gx = -gy."""
    return _only_first(ctx, ctx.op("Neg", [gy[0]]))


@register("Abs")
def abs_(ctx: Context, gy):
    """gx = gy * Sign(x) (0 at x == 0)."""
    x = ctx.input(0)
    if ctx.opset >= 9:
        sign = ctx.op("Sign", [x])
    else:
        zero = _k(ctx, 0.0, x)
        sign = ctx.op("Sub", [_mask(ctx, "Greater", x, zero, x), _mask(ctx, "Less", x, zero, x)])
    return _only_first(ctx, ctx.op("Mul", [gy[0], sign]))


@register("Sin")
def sin(ctx: Context, gy):
    """gx = gy * Cos(x)."""
    return _only_first(ctx, ctx.op("Mul", [gy[0], ctx.op("Cos", [ctx.input(0)])]))


@register("Cos")
def cos(ctx: Context, gy):
    """gx = -gy * Sin(x)."""
    return _only_first(ctx, ctx.op("Neg", [ctx.op("Mul", [gy[0], ctx.op("Sin", [ctx.input(0)])])]))
