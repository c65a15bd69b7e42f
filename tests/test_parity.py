"""Parity of onnxcam with Captum and pytorch-grad-cam on exported torchvision classifiers.

For every (model, exporter) pair, with random weights (tests/torch_export.py: seeded torchvision init, BatchNorm
statistics calibrated on random data so activations are O(1)), eval mode, a batch of 2 random inputs:

* layer:    `Explainer(path).layer` holds the output of the PyTorch module Grad-CAM is meant to use (ResNet
            `layer4`, VGG16 `features[29]` = relu5_3, MobileNetV2/EfficientNet-B0/ConvNeXt `features`,
            GoogLeNet `inception5b`), checked numerically: the tensor is exposed as an extra graph output and
            compared with the module output captured by a forward hook;
* scores:   `.scores` are the PyTorch logits (max abs error <= 1e-4 x max |logit|);
* maps:     `.maps` for a non-argmax target (the 3rd-highest logit of each sample) equal Captum's
            `LayerGradCam(model, layer).attribute(x, target, relu_attributions=True)`, relative L2 error < 1e-3;
* heatmaps: `.heatmaps` equal pytorch-grad-cam's `GradCAM(model, [layer])(x, [ClassifierOutputTarget(t)])`,
            max abs error < HEATMAP_ATOL (see there);
* counterfactual (ResNet-18, both exporters): `explain(..., counterfactual=True).maps` equal Captum's
  LayerGradCam of the negated logits.

The gradient checks use the auto-chosen layer when it is the right one, else (so that a layer-selection bug
is reported once, by `test_layer_is_the_expected_module`) the right tensor found numerically.

Each export is made once per session (the `exported` cache) and each case is built once
(session-scoped, parametrised `case` fixture: pytest runs all tests of one case together and then frees it).
Input sizes: 160x160 (5x5 maps), VGG16 224x224 (its AdaptiveAvgPool2d((7, 7)) needs a 7x7 feature map to
export; relu5_3 is 14x14).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import shape_inference

import onnxcam
from tests import torch_export

captum_attr = pytest.importorskip("captum.attr")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SLOW = {"vgg16", "resnet50", "convnext_tiny"}
CASES = [(m, e) for m in torch_export.MODELS for e in torch_export.EXPORTERS]

MAPS_RTOL = 1e-3  # relative L2 error of the raw maps vs Captum
# Heatmaps vs pytorch-grad-cam. Both do per-sample min-max, bilinear half-pixel upsampling, min-max again;
# pytorch-grad-cam with cv2.resize in float32, onnxcam with onnxruntime's Resize. Applied to the *same* map the two
# pipelines agree to float32 rounding (measured ~2e-7; asserted < PIPELINE_ATOL), so the end-to-end residual
# (measured 1e-6 .. 1e-4, largest for ResNet-50) is the float32 difference between onnxruntime's and PyTorch's
# forward/backward (the maps' ~1e-5 relative error), amplified by the min-max scaling.
HEATMAP_ATOL = 1e-3
PIPELINE_ATOL = 1e-5
SCORES_RTOL = 1e-4  # of max |logit|
# Layer value vs the hooked module output, of max |value|. ORT and PyTorch differ by up to ~1e-4 after ResNet-50's
# 50 layers; any other tensor of the same shape (the pre-ReLU sum, another block) differs by O(1).
LAYER_RTOL = 1e-3


def _rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def _keep_ir(model: onnx.ModelProto, ir: int) -> onnx.ModelProto:
    # onnx >= 1.19 writes IR 11+ by default, which onnxruntime (<= IR 10 / 11) refuses: keep the exporter's.
    model.ir_version = ir
    return model


def tensors_equal_to(path: str, feed: np.ndarray, ref: np.ndarray) -> tuple[list[str], dict[str, float]]:
    """Names of the ONNX tensors whose value equals `ref` (same shape, max abs error <= LAYER_RTOL * max|ref|).

    Every tensor whose inferred shape fits `ref` is added as a graph output and the model run once; also returns
    the relative max error of each such candidate, for the failure message.
    """
    model = onnx.load(path)  # with its external data, if any
    ir = model.ir_version
    inferred = shape_inference.infer_shapes(model)
    want = list(ref.shape[1:])
    candidates = []
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        if not t.HasField("shape") or len(t.shape.dim) != ref.ndim:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim[1:]]
        if dims == want:
            candidates.append(vi)
    assert candidates, f"no tensor of shape (N, {want}) in the ONNX model"
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(vi for vi in candidates if vi.name not in existing)
    sess = ort.InferenceSession(_keep_ir(model, ir).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [vi.name for vi in candidates]
    values = sess.run(names, {sess.get_inputs()[0].name: feed})
    scale = float(np.abs(ref).max())
    errors = {n: float(np.abs(v - ref).max()) / scale for n, v in zip(names, values) if v.shape == ref.shape}
    return [n for n, e in errors.items() if e <= LAYER_RTOL], errors


@dataclass
class Case:
    name: str
    exporter: str
    path: str
    model: torch.nn.Module
    layer_module: torch.nn.Module
    x: torch.Tensor
    logits: np.ndarray
    targets: list[int]
    auto_layer: str
    matches: list[str]
    layer_errors: dict[str, float]
    explainer: onnxcam.Explainer
    _explanation: onnxcam.Explanation | None = field(default=None, repr=False)

    @property
    def explanation(self) -> onnxcam.Explanation:
        if self._explanation is None:
            self._explanation = self.explainer.explain(self.x.numpy(), self.targets)
        return self._explanation

    @property
    def label(self) -> str:
        return f"{self.name}/{self.exporter}"


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(model name, exporter) -> path of the ONNX export, made once per session."""
    root = tmp_path_factory.mktemp("torchvision_onnx")
    paths: dict[tuple[str, str], str] = {}

    def get(name: str, exporter: str) -> str:
        key = (name, exporter)
        if key not in paths:
            model = torch_export.build(name)
            x = torch_export.random_input(name)
            paths[key] = torch_export.export(model, x, root / f"{name}_{exporter}.onnx", exporter)
        return paths[key]

    return get


def make_case(name: str, exporter: str, path: str) -> Case:
    spec = torch_export.MODELS[name]
    model = torch_export.build(name)
    layer_module = spec.layer(model)
    x = torch_export.random_input(name)
    captured = []
    handle = layer_module.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x).numpy()
    finally:
        handle.remove()
    layer_value = captured[-1].numpy()
    targets = [int(t) for t in np.argsort(-logits, axis=1)[:, 2]]  # 3rd-highest logit: never the argmax
    auto = onnxcam.Explainer(path)
    matches, errors = tensors_equal_to(path, x.numpy(), layer_value)
    explainer = auto if (auto.layer in matches or not matches) else onnxcam.Explainer(path, layer=matches[-1])
    return Case(name, exporter, path, model, layer_module, x, logits, targets, auto.layer, matches, errors,
                explainer)


def _case_param(m: str, e: str):
    marks = [pytest.mark.slow] if m in SLOW else []
    return pytest.param((m, e), id=f"{m}-{e}", marks=marks)


@pytest.fixture(scope="session", params=[_case_param(m, e) for m, e in CASES])
def case(request, exported) -> Case:
    name, exporter = request.param
    return make_case(name, exporter, exported(name, exporter))


def test_layer_is_the_expected_module(case: Case):
    label = torch_export.MODELS[case.name].layer_label
    assert case.matches, (f"{case.label}: no ONNX tensor equals the output of {label}; "
                          f"closest: {sorted(case.layer_errors.items(), key=lambda kv: kv[1])[:3]}")
    err = case.layer_errors.get(case.auto_layer)
    print(f"PARITY {case.label} layer {case.auto_layer!r} == {label}: rel max err {err}")
    assert case.auto_layer in case.matches, (
        f"{case.label}: auto-chosen layer {case.auto_layer!r} is not the output of {label} "
        f"(rel. error {err}); the tensors that are: {case.matches}")


def test_scores_are_the_logits(case: Case):
    scores = case.explanation.scores
    assert scores.shape == case.logits.shape
    err = float(np.abs(scores - case.logits).max())
    scale = float(np.abs(case.logits).max())
    print(f"PARITY {case.label} scores max abs err {err:.2e} (max |logit| {scale:.3g})")
    assert err <= SCORES_RTOL * scale
    np.testing.assert_array_equal(case.explanation.targets, case.targets)


def test_maps_match_captum_layergradcam(case: Case):
    lgc = captum_attr.LayerGradCam(case.model, case.layer_module)
    ref = lgc.attribute(case.x, target=case.targets, relu_attributions=True).detach().numpy()[:, 0]
    maps = case.explanation.maps
    assert maps.shape == ref.shape, (maps.shape, ref.shape)
    per_sample_norm = np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
    assert (per_sample_norm > 0).all(), "degenerate reference (an all-zero Grad-CAM map); change the seed"
    err = _rel_l2(maps, ref)
    print(f"PARITY {case.label} maps {maps.shape[1:]} rel L2 err vs Captum {err:.2e}")
    assert err < MAPS_RTOL


def test_heatmaps_match_pytorch_grad_cam(case: Case):
    with pytorch_grad_cam.GradCAM(model=case.model, target_layers=[case.layer_module]) as cam:
        ref = cam(input_tensor=case.x, targets=[ClassifierOutputTarget(t) for t in case.targets])
    heat = case.explanation.heatmaps
    assert heat.shape == ref.shape, (heat.shape, ref.shape)
    assert heat.min() >= 0 and heat.max() <= 1
    err = float(np.abs(heat - ref).max())
    # pytorch-grad-cam's own scaling + cv2 resize applied to onnxcam's maps: isolates the upsampling/normalisation.
    size = tuple(case.x.shape[:1:-1])  # cv2 wants (width, height)
    pipeline = scale_cam_image(scale_cam_image(case.explanation.maps, size))
    pipeline_err = float(np.abs(heat - pipeline).max())
    print(f"PARITY {case.label} heatmaps {heat.shape[1:]} max abs err vs pytorch-grad-cam {err:.2e} "
          f"(same maps through pytorch-grad-cam's scaling and cv2.resize: {pipeline_err:.1e})")
    assert pipeline_err < PIPELINE_ATOL
    assert err < HEATMAP_ATOL


class _Negated(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return -self.model(x)


@pytest.mark.parametrize("exporter", torch_export.EXPORTERS)
def test_counterfactual_is_gradcam_of_negated_score(exporter, exported):
    c = make_case("resnet18", exporter, exported("resnet18", exporter))
    maps = c.explainer.explain(c.x.numpy(), c.targets, counterfactual=True).maps
    lgc = captum_attr.LayerGradCam(_Negated(c.model), c.layer_module)
    ref = lgc.attribute(c.x, target=c.targets, relu_attributions=True).detach().numpy()[:, 0]
    assert (np.linalg.norm(ref.reshape(len(ref), -1), axis=1) > 0).all()
    err = _rel_l2(maps, ref)
    print(f"PARITY {c.label} counterfactual maps rel L2 err vs Captum(-logits) {err:.2e}")
    assert err < MAPS_RTOL
    # ... and they differ from the factual maps (the test would be vacuous otherwise).
    factual = c.explainer.explain(c.x.numpy(), c.targets).maps
    assert _rel_l2(factual, ref) > 0.1
