"""CAM arithmetic on activations A and gradients G.

Gradient methods are emitted as ONNX nodes of the fused graph. Each returns the *weighted activations*
W (N, C, *spatial); the map is `ReLU(sum_c W)`, or, with eigen_smooth, the first principal component of
W (done in numpy, as pytorch-grad-cam does). Formulas follow pytorch-grad-cam so that results can be
compared number for number. `normalize` and `upsample` turn maps into heatmaps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import OnnxcamError
from ..model.graph import Emitter

Weighting = Callable[[Emitter, str, str, int], str]


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "gradient": W in the graph; "eigen": SVD of W in numpy; "perturbation": many forwards;
    #            "pixel": gradients w.r.t. the input (guided backprop ...), plus Grad-CAM
    weighting: Weighting | None = None  # for gradient and eigen kinds
    needs_gradients: bool = True
    relu_mode: str = "grad"  # for pixel methods: how ReLUs pass gradients back to the input
    second_order: bool = False  # the weights also need H A (ShapleyCAM: a second run with a corrected seed)
    help: str = ""

    @property
    def uses_gradients(self) -> bool:
        """Whether the map comes from gradients (so that a counterfactual, negated gradients, means something)."""
        return self.kind != "perturbation" and self.needs_gradients


METHODS: dict[str, Method] = {}


def _register(name: str, kind: str, weighting=None, **kw) -> None:
    METHODS[name] = Method(name, kind, weighting, **kw)


def _squash(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch not in "-_ ")


def get_method(name: str) -> Method:
    """A method by name, spelled any way users write it: "GradCAM", "grad_cam", "Guided-Backprop" ..."""
    if name in METHODS:
        return METHODS[name]
    matches = [m for key, m in METHODS.items() if _squash(key) == _squash(name)]
    if matches:
        return matches[0]
    import difflib

    close = difflib.get_close_matches(_squash(name), [_squash(k) for k in METHODS], n=3, cutoff=0.6)
    names = [k for c in close for k in METHODS if _squash(k) == c]
    hint = f" (did you mean {' or '.join(names)}?)" if names else ""
    raise OnnxcamError(f"unknown method '{name}'{hint}; available: {', '.join(METHODS)}")


def _spatial(rank: int) -> list[int]:
    return list(range(2, rank))


def gradcam(emit: Emitter, a: str, g: str, rank: int) -> str:
    """alpha_k = mean_ij G (Selvaraju et al.)."""
    spread = emit.broadcast_of(g)
    if spread is not None and list(spread[1]) == _spatial(rank):  # G is constant over ij (a global pool's)
        return emit.op("Mul", [spread[0], a])
    return emit.op("Mul", [emit.reduce("ReduceMean", g, _spatial(rank), keepdims=1), a])


def gradcam_pp(emit: Emitter, a: str, g: str, rank: int) -> str:
    """Grad-CAM++ closed form: a = g^2 / (2 g^2 + sum_ij(A) g^3 + 1e-6) where g != 0; w = sum_ij ReLU(g) a."""
    g2 = emit.op("Mul", [g, g])
    g3 = emit.op("Mul", [g2, g])
    sum_a = emit.reduce("ReduceSum", a, _spatial(rank), keepdims=1)
    two = emit.scalar(2.0, np.float32)
    denom = emit.op("Add", [emit.op("Add", [emit.op("Mul", [two, g2]), emit.op("Mul", [sum_a, g3])]),
                            emit.scalar(1e-6, np.float32)])
    aij = emit.op("Div", [g2, denom])
    zero = emit.scalar(0.0, np.float32)
    aij = emit.op("Where", [emit.op("Equal", [g, zero]), zero, aij])
    w = emit.reduce("ReduceSum", emit.op("Mul", [emit.op("Relu", [g]), aij]), _spatial(rank), keepdims=1)
    return emit.op("Mul", [w, a])


def xgradcam(emit: Emitter, a: str, g: str, rank: int) -> str:
    """XGrad-CAM: w = sum_ij G A / (sum_ij A + 1e-7)."""
    sum_a = emit.reduce("ReduceSum", a, _spatial(rank), keepdims=1)
    norm = emit.op("Div", [emit.op("Mul", [g, a]), emit.op("Add", [sum_a, emit.scalar(1e-7, np.float32)])])
    return emit.op("Mul", [emit.reduce("ReduceSum", norm, _spatial(rank), keepdims=1), a])


def layercam(emit: Emitter, a: str, g: str, rank: int) -> str:
    """LayerCAM: ReLU(G) * A, position by position."""
    return emit.op("Mul", [emit.op("Relu", [g]), a])


def hirescam(emit: Emitter, a: str, g: str, rank: int) -> str:
    """HiResCAM: G * A, position by position."""
    return emit.op("Mul", [g, a])


def gradcam_elementwise(emit: Emitter, a: str, g: str, rank: int) -> str:
    """Element-wise Grad-CAM: ReLU(G * A)."""
    return emit.op("Relu", [emit.op("Mul", [g, a])])


def activations_only(emit: Emitter, a: str, g: str, rank: int) -> str:
    return a


_register("gradcam", "gradient", gradcam, help="Grad-CAM: channel weights = mean gradient")
_register("gradcam++", "gradient", gradcam_pp, help="Grad-CAM++: closed-form higher-order weights")
_register("xgradcam", "gradient", xgradcam, help="XGrad-CAM: activation-normalised gradient weights")
_register("layercam", "gradient", layercam, help="LayerCAM: positive gradients weight each position")
_register("hirescam", "gradient", hirescam, help="HiResCAM: gradient times activation per position")
_register("gradcam-elementwise", "gradient", gradcam_elementwise, help="ReLU(gradient * activation)")
_register("shapleycam", "gradient", gradcam, second_order=True,
          help="ShapleyCAM: Grad-CAM of dy/dA - H A / 2 (second-order term; equals Grad-CAM for a class logit)")
_register("eigencam", "eigen", activations_only, needs_gradients=False,
          help="Eigen-CAM: first principal component of the activations (no gradients)")
_register("eigengradcam", "eigen", hirescam, help="Eigen-Grad-CAM: first principal component of G * A")
_register("scorecam", "perturbation", help="Score-CAM: softmax of the scores of activation-masked inputs")
_register("ablationcam", "perturbation", help="Ablation-CAM: score drop when each channel is zeroed")
_register("reciprocam", "perturbation", needs_gradients=False,
          help="ReciproCAM: the target's probability with the layer kept at one position (no gradients)")
_register("rise", "perturbation", needs_gradients=False,
          help="RISE: the target's probability under random input masks (no layer, no gradients: any model)")
_register("guided-backprop", "pixel", relu_mode="guided",
          help="Guided Backpropagation: input gradient, ReLUs pass only positive gradients")
_register("deconvnet", "pixel", relu_mode="deconvnet", help="Deconvnet: input gradient, ReLUs pass ReLU(gradient)")
_register("guided-gradcam", "pixel", relu_mode="guided",
          help="Guided Grad-CAM: guided backprop times the bilinearly upsampled Grad-CAM")


def exportable_methods() -> list[str]:
    """The methods whose whole map one ONNX graph computes (onnxcam export, explain_bound)."""
    # ShapleyCAM: its H A term is a second run (and a check of the head) that one graph does not hold
    return [name for name, m in METHODS.items() if m.kind == "gradient" and not m.second_order]


def cam_from_weighted(emit: Emitter, weighted: str) -> str:
    """ReLU(sum over channels): the map (N, *spatial)."""
    return emit.op("Relu", [emit.reduce("ReduceSum", weighted, [1], keepdims=0)], hint="cam")


def normalize(emit: Emitter, cam: str, rank: int) -> str:
    """Per-sample (x - min) / (max - min + 1e-7) over all non-batch axes (pytorch-grad-cam's scaling)."""
    axes = list(range(1, rank))
    shifted = emit.op("Sub", [cam, emit.reduce("ReduceMin", cam, axes, keepdims=1)])
    peak = emit.reduce("ReduceMax", shifted, axes, keepdims=1)
    return emit.op("Div", [shifted, emit.op("Add", [peak, emit.scalar(1e-7, np.float32)])])


def upsample(emit: Emitter, cam: str, size: str, mode: str = "half_pixel") -> str:
    """Bilinear resize of an (N, *spatial) map to `size`, an int64 tensor of the target spatial dims.

    half_pixel is cv2.resize's and F.interpolate(align_corners=False)'s convention; align_corners is
    nn.UpsamplingBilinear2d's (used by pytorch-grad-cam's Score-CAM)."""
    x = emit.unsqueeze(cam, [1])
    n = emit.op("Slice", [emit.shape_of(x), emit.ints([0]), emit.ints([2])])
    sizes = emit.op("Concat", [n, size], axis=0)
    empty = emit.const(np.zeros((0,), np.float32), hint="empty")
    resized = emit.op("Resize", [x, empty, empty, sizes], mode="linear", coordinate_transformation_mode=mode)
    return emit.squeeze(resized, [1])


def heatmap(emit: Emitter, cam: str, rank: int, size: str) -> str:
    """pytorch-grad-cam's scale_cam_image then resize, then the final per-image scaling."""
    return normalize(emit, upsample(emit, normalize(emit, cam, rank), size), rank)


def first_component(weighted: np.ndarray) -> np.ndarray:
    """Projection of each sample's (positions x channels) matrix, centred, on its first right singular
    vector (pytorch-grad-cam's get_2d_projection)."""
    w = np.nan_to_num(np.asarray(weighted, np.float32))
    out = []
    for sample in w:
        flat = sample.reshape(sample.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        # Only the first right singular vector is used; the thin SVD gives the same row, much faster.
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        out.append((flat @ vt[0, :]).reshape(sample.shape[1:]))
    return np.float32(out)
