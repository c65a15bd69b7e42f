"""Every onnxcam method against the implementation of the same name in pytorch-grad-cam or Captum.

Models: torchvision resnet50, vgg16, mobilenet_v2, densenet121 (tests/methods_reference.py: seeded random
weights, calibrated BatchNorm, eval; two function-preserving adjustments explained there), a batch of 2
random 64x64 images, targets = the 3rd-highest logit of each sample (never the argmax). Each model is
exported by both exporters (tests/torch_export.py: TorchScript `dynamo=False` opset 17 and `dynamo=True`,
dynamic batch) and compared at the same layer:

  resnet50      layer4                           (onnxcam's auto layer)
  vgg16         features[29] = relu5_3           (auto)
  mobilenet_v2  features (ends in ReLU6 = Clip)  (auto)
  densenet121   the Relu after norm5             (auto; reference: methods_reference.DenseNetReLUModule)

`test_layers_and_scores` checks that the auto layer is that module's output (numerically) and that the
scores are the logits; the other tests use the numerically found tensor, so a wrong auto layer is reported
once, there.

CAM methods (`test_cam`) vs pytorch-grad-cam's class of the same name on the PyTorch model: gradcam,
gradcam++, xgradcam, layercam, hirescam, gradcam-elementwise, eigencam, eigengradcam, scorecam,
ablationcam; aug_smooth (gradcam; eigencam, whose maps are made outside the fused graph), eigen_smooth
(gradcam, layercam; hirescam's would be eigengradcam exactly), counterfactual gradcam. Compared:
`.heatmaps` with pytorch-grad-cam's output (max abs error) and, except with aug_smooth (where
pytorch-grad-cam averages de-augmented heatmaps, not maps), each of `.maps_per_layer` with the raw ReLU'd
map pytorch-grad-cam computes for that layer before scaling (relative L2 error).

* Two layers. In resnet50, mobilenet_v2 and densenet121 the main layer is followed by global average
  pooling and one linear layer, so its gradient is constant over positions: there HiResCAM and XGrad-CAM
  equal Grad-CAM exactly (measured 0 and 1e-7 apart), and a swapped formula would pass unnoticed. And
  wherever the activations are >= 0, LayerCAM's ReLU(G) * A equals element-wise Grad-CAM's ReLU(G * A).
  So every gradient-weighted method except Grad-CAM itself (tested on the main layer alone, as by
  default, plus "gradcam-two-layers") runs on two layers, [second, main], for both onnxcam (layer=[...])
  and pytorch-grad-cam (target_layers=[...]); both per-layer maps and the combined heatmap are compared.
  Second layers: resnet50 layer4[1], vgg16 features[22] (relu4_3, 8x8), mobilenet_v2 features[13] (4x4, a
  residual Add, signed) and densenet121 features.denseblock3 (4x4, a Concat of convolutions, signed).
  There the methods differ by 0.4-1.0 (rel. L2) from Grad-CAM, and LayerCAM from element-wise Grad-CAM by
  0.9 (mobilenet_v2) and 0.17 (densenet121). Three of the four pairs combine different resolutions.
  Not resnet50's layer3: its gradient passes layer4[0]'s ReLUs, and one of their inputs is +2.5e-5 in
  float64 but -2.8e-5 in PyTorch float32 (see "float32 noise" below), so the float32 mask flips. One
  flipped unit out of 2x512x2x2 changes the layer3 gradient by ~2% in any float32 engine (measured against
  a float64 PyTorch run: onnxruntime 1.1e-2, PyTorch float32 1.7e-2; onnxcam vs pytorch-grad-cam 2.7e-2)
  -- a property of this input in float32, not of onnxcam. The chosen second layers have no such flip for
  the test input (errors as on the main layer), but the 5 other aug_smooth inputs (flipped, x0.9, x1.1)
  do: with mobilenet_v2's features[13], two of them (x1.1, flipped x0.9) put a ReLU6 (Clip) input near a
  threshold and the second-layer map differs by 3-4e-3 between the engines (3e-6 for the others; the
  main-layer maps agree to 3e-6 for all six). So aug_smooth runs on the main layer only, where no
  rectifier lies between the layer and the score (except VGG16's classifier ReLUs, 4096 units each).
* Score-CAM / Ablation-CAM perturb CHANNELS channels, the same for onnxcam (`channels=`) and the reference
  (a ScoreCAM whose weights are the parent's on the subset, scattered into zeros; an AblationLayer whose
  `activations_to_be_ablated` is the subset). The subset is each sample's most contributing channels
  (methods_reference.top_contributing_channels): with an arbitrary subset Ablation-CAM's map is often
  negative everywhere, i.e. all zero, and the comparison vacuous. Ablation needs a layer whose minimum is
  0 for pytorch-grad-cam to zero the channel (as onnxcam does); all four layers end in a ReLU / ReLU6.
* counterfactual: the reference's target is the negated logit. Explained class: the 3rd-LOWEST logit;
  for the 3rd-highest the counterfactual map is zero everywhere on these small maps (vacuous test).
  A non-zero reference also makes the test sensitive to the sign: ignoring `counterfactual` would give
  ReLU(cam) instead of ReLU(-cam), and both can only agree where both are zero.

Pixel methods (`test_pixel`) vs Captum: guided-backprop vs GuidedBackprop, deconvnet vs Deconvolution,
guided-gradcam vs GuidedGradCam(model, layer).attribute(..., interpolate_mode="bilinear"); relative L2 error.
Captum modifies nn.ReLU modules only. onnxcam's default `guided_ops` is ("Relu", "Clip"): ReLU6 (an ONNX
Clip) counts as a rectifier. So:
* "default" variants: onnxcam's defaults vs Captum on the model with every nn.ReLU6 replaced by an nn.ReLU
  subclass computing ReLU6 (methods_reference.RectifierReLU6), which Captum then modifies like onnxcam
  modifies Clip. Only MobileNetV2 has ReLU6; for the others this is the stock model.
* "relu-only" variants (MobileNetV2 only; skipped elsewhere, where they equal "default"):
  guided_ops=("Relu",) vs Captum on the stock model. MobileNetV2 has no nn.ReLU, so both sides reduce to
  the plain input gradient.
Every Relu in these ONNX graphs comes from an nn.ReLU module of the reference (DenseNet's last one thanks
to DenseNetReLUModule), so Captum modifies the same units as onnxcam.

Tolerances. float32 noise: the random-weight networks' float32 forward passes carry relative errors far
above float32 epsilon by the last layers: ResNet-50 layer4 is 6e-5 (rel. L2) from a float64 run in PyTorch
itself, and onnxruntime's activations differ from PyTorch's by up to 8e-5 of their maximum (6.7e-4 absolute).
Everything below is measured on top of that (PARITY lines, pytest -s):
* MAPS_RTOL = 5e-4, raw maps, relative L2. The maps are sums over up to 2048 channels of terms of mixed
  sign (partial cancellation amplifies the activations' error); measured <= 6e-5 (resnet50), <= 4.4e-5
  (mobilenet_v2), <= 1.5e-5 (densenet121), <= 4e-6 (vgg16).
* HEAT_ATOL = 1e-3, heatmaps, max abs: both sides min-max scale the map, resize it bilinearly (half-pixel;
  cv2 in float32 vs onnxruntime's Resize) and scale again. On 2x2 maps the scaling divides by the range of 4
  values, amplifying the map error several times: measured <= 2.3e-4 (resnet50), 1.4e-4 (mobilenet_v2),
  <= 6e-5 (densenet121), 2e-6 (vgg16). (Same bound as tests/test_parity.py's HEATMAP_ATOL.)
* Ablation-CAM: the same tolerances. Its weights (s - s_k) / s come from the head run on ablated
  activations, ~1e-6 relative per score, a few digits lost to the subtraction.
* SCORECAM_MAPS_RTOL = 2e-2, SCORECAM_HEAT_ATOL = 1e-2: Score-CAM's weights are softmax(s_k), s_k the
  target logit of the image times the min-max-scaled, upsampled channel k, and each side builds its masks
  from its own activations. On resnet50 the masked images' logits are O(40), so the ~1e-4 relative
  activation difference moves them by ~4e-3, which the softmax turns into ~4e-3 relative weight errors:
  measured maps 3.7e-3 / heatmaps 1.6e-3 on resnet50 (onnxcam's weights agree with PyTorch's to 3e-6 when
  both use PyTorch's activations), <= 2.4e-5 elsewhere. A wrong mask (e.g. half-pixel instead of
  align-corners upsampling, no min-max scaling) or softmax changes the weights by O(1).
* XGRADCAM_MAPS_RTOL = 1e-2, XGRADCAM_HEAT_ATOL = 1e-2, XGrad-CAM on the second layer: its weights divide
  by sum_ij A_c, and on signed layers that sum cancels: sum_ij |A_c| / |sum_ij A_c| reaches 1447 on
  densenet121's denseblock3 (94 on mobilenet_v2's features[13]), multiplying the engines' rounding
  differences (different summation orders) by as much: measured maps 1.1e-3 / heatmaps 9.6e-4
  (densenet121), 2e-4 / 1.6e-4 (mobilenet_v2). Grad-CAM's maps differ from XGrad-CAM's by 0.4-1.0 there.
  (Its main-layer map keeps MAPS_RTOL.)
* GUIDED_RTOL = 1e-2, guided backprop and guided Grad-CAM, relative L2: the backward gate [gy > 0] flips
  elements whose gradient is ~0 in float32 between the engines, each flip changing one element by its full
  value, so max abs is meaningless; measured <= 6.5e-4 (resnet50), <= 4e-6 elsewhere.
* DECONV_RTOL = 1e-4, deconvnet, relative L2: its gate is ReLU(gy) -- a flip of a ~0 element changes it by
  ~0 -- and it uses no forward masks; measured <= 2e-6.

Budget (~3.5 min of CPU, ~5 min wall on 2 cores shared with other jobs): each model's exports (2) are made
once (module-scoped `case`), each torch reference once (shared by both exporters), each Explainer once per
(exporter, method, layers, guided_ops) (consecutive tests reuse it). torch, onnxruntime and numpy's BLAS
(the SVDs of eigen_smooth / Eigen-CAM) run single-threaded: with two threads their spinning workers compete
with each other and with other processes, and a pytorch-grad-cam pass or an SVD then takes 10-40x longer.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import onnxcam
from tests import methods_reference as ref
from tests import torch_export

pytest.importorskip("captum.attr")
pytest.importorskip("pytorch_grad_cam")

try:  # a dependency of scikit-learn, which pytorch-grad-cam imports
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

pytestmark = pytest.mark.slow  # exports four torchvision models twice

EXPORTERS = torch_export.EXPORTERS
CHANNELS = 16  # Score-CAM / Ablation-CAM channel subset

MAPS_RTOL = 5e-4
HEAT_ATOL = 1e-3
SCORECAM_MAPS_RTOL = 2e-2
SCORECAM_HEAT_ATOL = 1e-2
XGRADCAM_MAPS_RTOL = 1e-2  # on the second layer only; see the module docstring
XGRADCAM_HEAT_ATOL = 1e-2
GUIDED_RTOL = 1e-2
DECONV_RTOL = 1e-4
SCORES_RTOL = 1e-4  # ONNX logits vs PyTorch logits, of max |logit|
LAYER_RTOL = 1e-3  # ONNX tensor vs hooked module output, of max |value| (resnet50 layer4: 8e-5)


@dataclass(frozen=True)
class Variant:
    id: str
    method: str
    aug_smooth: bool = False
    eigen_smooth: bool = False
    counterfactual: bool = False  # also: explain the 3rd-lowest logit (see the module docstring)
    two_layers: bool = False


# two_layers=True: onnxcam layer=[second, main] vs pytorch-grad-cam target_layers=[second, main]; see the module
# docstring for why every gradient-weighted method other than Grad-CAM runs that way.
CAM_VARIANTS = [
    Variant("gradcam", "gradcam"),
    Variant("gradcam-aug", "gradcam", aug_smooth=True),
    Variant("gradcam-eigen", "gradcam", eigen_smooth=True),
    Variant("gradcam-counterfactual", "gradcam", counterfactual=True),
    Variant("gradcam-two-layers", "gradcam", two_layers=True),
    Variant("gradcam++-two-layers", "gradcam++", two_layers=True),
    Variant("xgradcam-two-layers", "xgradcam", two_layers=True),
    Variant("layercam-two-layers", "layercam", two_layers=True),
    Variant("layercam-two-layers-eigen", "layercam", two_layers=True, eigen_smooth=True),
    Variant("hirescam-two-layers", "hirescam", two_layers=True),
    Variant("gradcam-elementwise-two-layers", "gradcam-elementwise", two_layers=True),
    Variant("eigencam", "eigencam"),
    Variant("eigencam-aug", "eigencam", aug_smooth=True),
    Variant("eigengradcam-two-layers", "eigengradcam", two_layers=True),
    Variant("scorecam", "scorecam"),
    Variant("ablationcam", "ablationcam"),
]
PIXEL_METHODS = ["guided-backprop", "deconvnet", "guided-gradcam"]
PIXEL_RTOL = {"guided-backprop": GUIDED_RTOL, "deconvnet": DECONV_RTOL, "guided-gradcam": GUIDED_RTOL}
RELU_ONLY = ("Relu",)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def _session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return opts


@dataclass
class Case:
    name: str
    model: torch.nn.Module  # exported
    reference: torch.nn.Module  # given to pytorch-grad-cam / Captum (same function)
    layer: torch.nn.Module
    second_layer: torch.nn.Module
    x: torch.Tensor
    logits: np.ndarray
    layer_values: list  # outputs of (layer, second_layer)
    targets: list
    low_targets: list
    channels: np.ndarray
    tmp: object
    options: ort.SessionOptions
    onnx_models: dict = field(default_factory=dict)
    layer_info: dict = field(default_factory=dict)  # exporter -> auto layer, matching tensors, ...
    refs: dict = field(default_factory=dict)
    _explainer_key: tuple | None = None
    _explainer: onnxcam.Explainer | None = None
    _auto: dict = field(default_factory=dict)  # exporter -> the auto-layer gradcam Explainer, until used

    def onnx_model(self, exporter: str) -> onnx.ModelProto:
        if exporter not in self.onnx_models:
            start = time.perf_counter()
            path = self.tmp / f"{self.name}_{exporter}.onnx"
            self.onnx_models[exporter] = ref.export(self.model, self.x, path, exporter)
            print(f"TIMING {self.name}/{exporter} export {time.perf_counter() - start:.1f}s")
        return self.onnx_models[exporter]

    def _make_explainer(self, exporter: str, layer, method: str, guided_ops) -> onnxcam.Explainer:
        self._explainer = self._explainer_key = None  # one big model at a time (VGG16: ~190 MB per copy)
        gc.collect()
        kwargs = {} if guided_ops is None else {"guided_ops": guided_ops}
        return onnxcam.Explainer(self.onnx_model(exporter), layer=layer, method=method,
                                 session_options=self.options, **kwargs)

    def layers(self, exporter: str) -> dict:
        """ONNX names of the explained tensors (found numerically) and the auto layer."""
        if exporter not in self.layer_info:
            model = self.onnx_model(exporter)
            try:
                auto, auto_error = self._make_explainer(exporter, None, "gradcam", None), None
            except onnxcam.OnnxcamError as exc:  # reported by test_layers_and_scores
                auto, auto_error = None, str(exc)
            (main, main_err), (second, second_err) = ref.tensor_names_equal_to(
                model, self.x.numpy(), self.layer_values, LAYER_RTOL)
            auto_layer = auto.layer if auto is not None else None
            self.layer_info[exporter] = dict(
                auto=auto_layer, auto_error=auto_error, matches=main, errors=main_err, second_matches=second,
                second_errors=second_err, main=auto_layer if auto_layer in main or not main else main[-1],
                second=second[-1] if second else None)
            if auto is not None:
                self._auto[exporter] = auto  # kept for the gradcam tests (test_layers_and_scores runs first)
        return self.layer_info[exporter]

    def explainer(self, exporter: str, method: str, layers: tuple, guided_ops=None) -> onnxcam.Explainer:
        key = (exporter, method, layers, guided_ops)
        auto = self._auto.get(exporter)
        if method == "gradcam" and guided_ops is None and auto is not None and layers == (auto.layer,):
            return auto
        self._auto.pop(exporter, None)  # the gradcam tests are over
        if self._explainer_key != key:
            layer = layers[0] if len(layers) == 1 else list(layers)
            self._explainer = self._make_explainer(exporter, layer, method, guided_ops)
            self._explainer_key = key
        return self._explainer

    def reference_cam(self, v: Variant) -> ref.CamReference:
        if v.id not in self.refs:
            layers = [self.second_layer, self.layer] if v.two_layers else [self.layer]
            targets = self.low_targets if v.counterfactual else self.targets
            self.refs[v.id] = ref.grad_cam_reference(
                self.reference, layers, self.x, targets, v.method, aug_smooth=v.aug_smooth,
                eigen_smooth=v.eigen_smooth, counterfactual=v.counterfactual, channels=self.channels)
        return self.refs[v.id]

    def reference_pixel(self, method: str, relu_only: bool) -> np.ndarray | None:
        """Captum on the stock reference (relu_only) or on its ReLU6-as-rectifier twin; None when relu_only
        is asked for a model without ReLU6 (the two are the same)."""
        if "twin" not in self.refs:
            self.refs["twin"] = ref.with_rectifier_relu6(self.reference)
        twin = self.refs["twin"]
        key = (method, relu_only)
        if key not in self.refs:
            if relu_only and twin is None:
                self.refs[key] = None
            else:
                model = self.reference if relu_only or twin is None else twin
                layer = ref.SPECS[self.name].layer(model)
                self.refs[key] = ref.captum_reference(model, layer, self.x, self.targets, method)
        return self.refs[key]


@pytest.fixture(scope="module", params=list(ref.SPECS))
def case(request, tmp_path_factory):
    name = request.param
    spec = ref.SPECS[name]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    blas = threadpool_limits(limits=1) if threadpool_limits is not None else contextlib.nullcontext()
    with blas:
        torch.set_num_threads(1)
        try:
            model, reference = ref.build(name)
            layer, second = spec.layer(reference), spec.second_layer(reference)
            x = ref.random_input(name)
            logits, values = ref.hooked_outputs(reference, [layer, second], x)
            targets = [int(t) for t in np.argsort(-logits, axis=1)[:, 2]]  # 3rd-highest logit: never the argmax
            low_targets = [int(t) for t in np.argsort(logits, axis=1)[:, 2]]  # 3rd-lowest
            channels = ref.top_contributing_channels(reference, layer, x, targets, CHANNELS)
            c = Case(name, model, reference, layer, second, x, logits, values, targets, low_targets, channels,
                     tmp_path_factory.mktemp(f"methods_{name}"), _session_options())
            yield c
            print(f"\nTIMING {name}: {time.perf_counter() - start:.0f}s for all its tests")
            c._explainer = None
            c._auto.clear()
            c.onnx_models.clear()
            c.refs.clear()
            gc.collect()
        finally:
            torch.set_num_threads(threads)


def _layers_for(case: Case, exporter: str, two: bool) -> tuple:
    info = case.layers(exporter)
    spec = ref.SPECS[case.name]
    if not info["matches"]:
        pytest.fail(f"{case.name}/{exporter}: no ONNX tensor equals {spec.layer_label}")
    if two and info["second"] is None:
        pytest.fail(f"{case.name}/{exporter}: no ONNX tensor equals {spec.second_label}; closest "
                    f"{sorted(info['second_errors'].items(), key=lambda kv: kv[1])[:3]}")
    return (info["second"], info["main"]) if two else (info["main"],)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_layers_and_scores(case: Case, exporter: str):
    """The auto layer is the reference module's output; the scores are the logits."""
    info = case.layers(exporter)
    spec = ref.SPECS[case.name]
    print(f"PARITY {case.name}/{exporter} auto layer {info['auto']!r}; {spec.layer_label} = {info['matches']}; "
          f"{spec.second_label} = {info['second_matches']}")
    assert info["matches"], (f"no ONNX tensor equals {spec.layer_label}; closest "
                             f"{sorted(info['errors'].items(), key=lambda kv: kv[1])[:3]}")
    assert info["auto_error"] is None, f"Explainer with the auto layer fails: {info['auto_error']}"
    assert info["auto"] in info["matches"], (
        f"auto layer {info['auto']!r} is not {spec.layer_label} (error {info['errors'].get(info['auto'])}); "
        f"the tensors that are: {info['matches']}")
    assert info["second_matches"], f"no ONNX tensor equals {spec.second_label}"
    result = case.explainer(exporter, "gradcam", _layers_for(case, exporter, False)).explain(
        case.x.numpy(), case.targets)
    err = float(np.abs(result.scores - case.logits).max())
    assert err <= SCORES_RTOL * float(np.abs(case.logits).max()), err
    np.testing.assert_array_equal(result.targets, case.targets)


CAM_PARAMS = [pytest.param(e, v, id=f"{e}-{v.id}") for e in EXPORTERS for v in CAM_VARIANTS]


@pytest.mark.parametrize("exporter, variant", CAM_PARAMS)
def test_cam(case: Case, exporter: str, variant: Variant):
    layers = _layers_for(case, exporter, variant.two_layers)
    expected = case.reference_cam(variant)
    targets = case.low_targets if variant.counterfactual else case.targets
    n = len(targets)
    assert (expected.heatmaps.reshape(n, -1).max(axis=1) > 0).all(), \
        "degenerate reference (an all-zero map): the comparison would be vacuous; change the seed or targets"
    explainer = case.explainer(exporter, variant.method, layers)
    start = time.perf_counter()
    got = explainer.explain(case.x.numpy(), targets, counterfactual=variant.counterfactual,
                            aug_smooth=variant.aug_smooth, eigen_smooth=variant.eigen_smooth,
                            channels=case.channels if variant.method in ("scorecam", "ablationcam") else None)
    elapsed = time.perf_counter() - start
    assert got.heatmaps.shape == expected.heatmaps.shape, (got.heatmaps.shape, expected.heatmaps.shape)
    heat_err = float(np.abs(got.heatmaps - expected.heatmaps).max())
    map_errs = []
    if expected.maps is not None:
        assert len(got.maps_per_layer) == len(expected.maps)
        for mine, theirs in zip(got.maps_per_layer, expected.maps):
            assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
            map_errs.append(_rel_l2(mine, theirs))
    print(f"PARITY {case.name}/{exporter} {variant.id}: heatmaps max abs err {heat_err:.1e}, maps rel L2 err "
          f"{', '.join(f'{e:.1e}' for e in map_errs) or '-'} (explain {elapsed:.2f}s)")
    heat_tol, maps_tol = {"scorecam": (SCORECAM_HEAT_ATOL, [SCORECAM_MAPS_RTOL]),
                          "xgradcam": (XGRADCAM_HEAT_ATOL, [XGRADCAM_MAPS_RTOL, MAPS_RTOL])
                          }.get(variant.method, (HEAT_ATOL, [MAPS_RTOL]))
    maps_tol = maps_tol + maps_tol[-1:] * (len(map_errs) - len(maps_tol))  # per layer; the main layer last
    assert heat_err < heat_tol, f"heatmaps max abs error {heat_err:.2e}"
    assert all(e < tol for e, tol in zip(map_errs, maps_tol)), f"maps rel L2 errors {map_errs}"


PIXEL_PARAMS = [pytest.param(e, m, ops, id=f"{e}-{m}-{ops}")
                for e in EXPORTERS for ops in ("default", "relu-only") for m in PIXEL_METHODS]


@pytest.mark.parametrize("exporter, method, ops", PIXEL_PARAMS)
def test_pixel(case: Case, exporter: str, method: str, ops: str):
    relu_only = ops == "relu-only"
    expected = case.reference_pixel(method, relu_only)
    if expected is None:
        pytest.skip("no ReLU6 in this model: guided_ops=('Relu',) is the default variant")
    layers = _layers_for(case, exporter, False)
    assert (np.abs(expected).reshape(len(expected), -1).max(axis=1) > 0).all(), "degenerate reference"
    got = case.explainer(exporter, method, layers, RELU_ONLY if relu_only else None).explain(
        case.x.numpy(), case.targets).guided
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = _rel_l2(got, expected)
    print(f"PARITY {case.name}/{exporter} {method} ({ops} guided ops): rel L2 err vs Captum {err:.1e}")
    assert err < PIXEL_RTOL[method], f"rel L2 error {err:.2e}"
