"""Reference side of tests/test_methods_parity.py: the PyTorch models, their ONNX exports, and the
pytorch-grad-cam / Captum computations onnxcam's methods are compared with.

Models (torchvision, random weights under a fixed seed, BatchNorm statistics calibrated on random data by
`tests.torch_export.calibrate_batchnorm` so activations are O(1), eval mode). Two of them need a
function-preserving change so that the PyTorch reference and the ONNX graph are the same computation at
the small test size:

* vgg16: `avgpool` is AdaptiveAvgPool2d((7, 7)). At the 64x64 test input the feature map is 2x2, and
  2 -> 7 adaptive pooling does not export as a pooling op: the TorchScript exporter refuses it (7 is not a
  factor of 2), the dynamo exporter decomposes it into Transpose/GatherND/Where/Gather (and onnxcam then
  has no GatherND gradient and picks a rank-5 Gather output as its auto layer). Pooling 2x2 -> 7x7 is a
  fixed linear map (output rows 0-2 copy input row 0, row 3 averages rows 0 and 1, rows 4-6 copy row 1),
  so `fold_vgg_head` folds it into classifier[0]: Linear(512*7*7 -> 4096) becomes Linear(512*2*2 -> 4096)
  with W'[o, c, i, j] = sum_kl W[o, c, k, l] P[k, i] P[l, j], and avgpool becomes Identity. The same function
  (up to float32 rounding), and the weights shrink from 550 MB to 180 MB, which matters for the test's
  runtime (every Explainer copies and serialises the model a few times).
* densenet121: `features` ends with norm5 (BatchNorm) and `DenseNet.forward` applies `F.relu` afterwards,
  so no module outputs the ReLU'd feature map onnxcam explains (its auto layer is that Relu). The
  reference `DenseNetReLUModule` runs the same submodules but with the ReLU as a module
  (`features` = Sequential(densenet.features, nn.ReLU())) and no functional ReLU after it: the same
  function, and the hooked gradient is d score / d ReLU output, exactly the ONNX Relu output's gradient.
  (Merely appending an nn.ReLU to the stock model would leave the functional F.relu after it, whose
  backward masks the gradient where the activation is 0: Grad-CAM's channel means would then differ from
  onnxcam's.) Captum's GuidedBackprop also needs the ReLU as a module to modify it. The ONNX model is
  exported from the stock torchvision DenseNet.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from onnx import shape_inference
from torch import nn

from tests import torch_export

SEED = 0


def adaptive_pool_matrix(size: int, out: int) -> torch.Tensor:
    """P (out, size): AdaptiveAvgPool1d(out) of a length-`size` signal is P @ x (PyTorch's bins:
    [floor(i*size/out), ceil((i+1)*size/out)))."""
    p = torch.zeros(out, size)
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        p[i, lo:hi] = 1.0 / (hi - lo)
    return p


def fold_vgg_head(model: nn.Module, size: int) -> None:
    """avgpool (AdaptiveAvgPool2d((7, 7)) of a size x size map) folded into classifier[0] (see above). The
    reference and the exports both use the folded model, so the fold's own rounding does not matter."""
    out = model.avgpool.output_size
    out = (out, out) if isinstance(out, int) else tuple(out)
    ph, pw = adaptive_pool_matrix(size, out[0]), adaptive_pool_matrix(size, out[1])
    fc = model.classifier[0]
    channels = fc.in_features // (out[0] * out[1])
    w = fc.weight.detach().reshape(fc.out_features * channels, out[0], out[1])
    folded = (ph.t() @ w @ pw).reshape(fc.out_features, channels * size * size)  # sum_kl P[k,i] W[..,k,l] P[l,j]
    new = nn.Linear(channels * size * size, fc.out_features)
    with torch.no_grad():
        new.weight.copy_(folded)
        new.bias.copy_(fc.bias)
    model.classifier[0] = new
    model.avgpool = nn.Identity()


class DenseNetReLUModule(nn.Module):
    """torchvision DenseNet with its final ReLU as a module (see the module docstring)."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features = nn.Sequential(densenet.features, nn.ReLU())
        self.classifier = densenet.classifier

    def forward(self, x):
        out = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(out, 1))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    size: int  # input height = width
    layer: Callable[[nn.Module], nn.Module]  # on the reference model: the module whose output is explained
    layer_label: str
    second_layer: Callable[[nn.Module], nn.Module]  # for the two-layer case
    second_label: str


SPECS: dict[str, ModelSpec] = {s.name: s for s in [
    # Not layer3: see "Two layers" in test_methods_parity.py.
    ModelSpec("resnet50", 64, lambda m: m.layer4, "layer4", lambda m: m.layer4[1], "layer4[1]"),
    ModelSpec("vgg16", 64, lambda m: m.features[29], "features[29] (relu5_3)",
              lambda m: m.features[22], "features[22] (relu4_3)"),
    ModelSpec("mobilenet_v2", 64, lambda m: m.features, "features",
              lambda m: m.features[13], "features[13]"),
    ModelSpec("densenet121", 64, lambda m: m.features[1], "ReLU(features) (the Relu after norm5)",
              lambda m: m.features[0].denseblock3, "features.denseblock3"),
]}


def build(name: str) -> tuple[nn.Module, nn.Module]:
    """(model to export, reference model): torchvision `name`, seeded random init, calibrated BN, eval.
    They are the same object except for densenet121 (the reference wraps the same submodules)."""
    spec = SPECS[name]
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None)
    if name == "vgg16":
        fold_vgg_head(model, spec.size // 32)
    torch_export.calibrate_batchnorm(model, spec.size, SEED)
    model.eval()
    reference = DenseNetReLUModule(model).eval() if name == "densenet121" else model
    return model, reference


def random_input(name: str, batch: int = 2) -> torch.Tensor:
    size = SPECS[name].size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(SEED + 12345))


def export(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, exporter: str) -> onnx.ModelProto:
    """tests.torch_export.export (dynamic batch, both exporters), loaded back with its external data."""
    return onnx.load(torch_export.export(model, x, path, exporter))


def tensor_names_equal_to(model: onnx.ModelProto, feed: np.ndarray, refs: Sequence[np.ndarray],
                          rtol: float = 1e-4) -> list[tuple[list[str], dict[str, float]]]:
    """For each reference value: the names of the ONNX tensors equal to it (max abs error <= rtol * max|ref|),
    and each same-shaped candidate's relative error (for failure messages). One extra run of the model with
    every candidate tensor added as a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    ir = m.ir_version
    inferred = shape_inference.infer_shapes(m)
    wanted = {tuple(r.shape[1:]) for r in refs}
    cands = []
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim[1:])
        if dims in wanted and len(t.shape.dim) == 4:
            cands.append(vi)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(vi for vi in cands if vi.name not in existing)
    m.ir_version = ir
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [vi.name for vi in cands]
    values = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: feed}))) if names else {}
    out = []
    for ref in refs:
        scale = float(np.abs(ref).max())
        errors = {n: float(np.abs(v - ref).max()) / scale for n, v in values.items() if v.shape == ref.shape}
        out.append(([n for n, e in errors.items() if e <= rtol], errors))
    return out


def hooked_outputs(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor):
    """(logits, [output of each module]) of one forward pass."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, i=i: captured.setdefault(i, out.detach().clone()))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), [captured[i].numpy() for i in range(len(modules))]


def top_contributing_channels(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: Sequence[int],
                              count: int) -> np.ndarray:
    """`count` channels of `layer` for Score-CAM / Ablation-CAM: for each sample in turn, its channels with the
    largest contribution sum_ij (dS/dA * A) to its target score, until `count` distinct ones are chosen.
    (With an arbitrary subset, Ablation-CAM's map -- the subset's weighted channel sum -- is often negative
    everywhere, so all zero after the ReLU, and the comparison would be vacuous.)"""
    store = {}

    def hook(module, inp, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = model(x)
            out[torch.arange(len(targets)), torch.as_tensor(targets)].sum().backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    a = store["a"]
    contrib = (a.grad * a).detach().flatten(2).sum(-1).numpy()  # (N, C)
    order = np.argsort(-contrib, axis=1)
    chosen: list[int] = []
    for rank in range(contrib.shape[1]):
        for n in range(contrib.shape[0]):
            c = int(order[n, rank])
            if c not in chosen and len(chosen) < count:
                chosen.append(c)
        if len(chosen) == count:
            break
    return np.sort(np.int64(chosen))


# -- pytorch-grad-cam -------------------------------------------------------------------------------

def _capturing(cls):
    """A subclass of a pytorch-grad-cam class that also keeps each layer's raw map, ReLU(cam) before any
    scaling (what onnxcam returns as `.maps` / `.maps_per_layer`)."""

    class Capturing(cls):
        def get_cam_image(self, *args, **kwargs):
            cam = super().get_cam_image(*args, **kwargs)
            self.raw_maps.append(np.maximum(cam, 0))
            return cam

    Capturing.__name__ = f"Capturing{cls.__name__}"
    return Capturing


def _subset_scorecam(channels: np.ndarray):
    from pytorch_grad_cam import ScoreCAM

    class SubsetScoreCAM(_capturing(ScoreCAM)):
        """Score-CAM over a channel subset: the parent's weights (softmax over the subset's scores) scattered
        into zeros, as onnxcam's `channels=` does."""

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            w = super().get_cam_weights(input_tensor, target_layer, targets, activations[:, channels], grads)
            full = np.zeros(activations.shape[:2], np.float32)
            full[:, channels] = w
            return full

    return SubsetScoreCAM


def _subset_ablation_layer(channels: np.ndarray):
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class SubsetAblationLayer(AblationLayer):
        """Ablates only `channels`; AblationCAM gives the others the original score, i.e. weight 0."""

        def activations_to_be_ablated(self, activations, ratio_channels_to_ablate=1.0):
            self.indices = np.int32(channels)
            return self.indices

    return SubsetAblationLayer()


@dataclass
class CamReference:
    heatmaps: np.ndarray  # (N, H, W), pytorch-grad-cam's output
    maps: list | None  # per layer (N, h, w) raw ReLU'd maps; None where not comparable (aug_smooth)


def grad_cam_reference(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor, targets: Sequence[int],
                       method: str, *, aug_smooth: bool = False, eigen_smooth: bool = False,
                       counterfactual: bool = False, channels: np.ndarray | None = None,
                       batch_size: int = 32) -> CamReference:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
               "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "gradcam-elementwise": pgc.GradCAMElementWise,
               "eigencam": pgc.EigenCAM, "eigengradcam": pgc.EigenGradCAM}
    if method == "scorecam":
        cam = _subset_scorecam(channels)(model=model, target_layers=list(layers))
        cam.batch_size = batch_size
    elif method == "ablationcam":
        cam = _capturing(pgc.AblationCAM)(model=model, target_layers=list(layers),
                                          ablation_layer=_subset_ablation_layer(channels), batch_size=batch_size)
    else:
        cam = _capturing(classes[method])(model=model, target_layers=list(layers))
    cam.raw_maps = []
    if counterfactual:
        tgts = [(lambda out, t=t: -out[..., t]) for t in targets]
    else:
        tgts = [ClassifierOutputTarget(t) for t in targets]
    with cam:
        heat = cam(input_tensor=x, targets=tgts, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    maps = None if aug_smooth else [np.float32(m) for m in cam.raw_maps]
    return CamReference(np.float32(heat), maps)


class RectifierReLU6(nn.ReLU):
    """ReLU6 as an nn.ReLU subclass, so that Captum's GuidedBackprop / Deconvolution (which hook nn.ReLU
    modules only) treat it as a rectifier: guided: ReLU(grad_input) = ReLU(gy) * [0 < x < 6];
    deconvnet: ReLU(gy) -- onnxcam's rules for Clip in guided_ops."""

    def forward(self, x):
        return F.hardtanh(x, 0.0, 6.0)


def with_rectifier_relu6(model: nn.Module) -> nn.Module | None:
    """A copy of `model` with every nn.ReLU6 replaced by RectifierReLU6; None if it has none."""
    if not any(isinstance(m, nn.ReLU6) for m in model.modules()):
        return None
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, RectifierReLU6())
    return twin.eval()


# -- Captum -------------------------------------------------------------------------------------------

def captum_reference(model: nn.Module, layer: nn.Module | None, x: torch.Tensor, targets: Sequence[int],
                     method: str) -> np.ndarray:
    from captum import attr

    t = list(targets)
    if method == "guided-backprop":
        out = attr.GuidedBackprop(model).attribute(x, target=t)
    elif method == "deconvnet":
        out = attr.Deconvolution(model).attribute(x, target=t)
    elif method == "guided-gradcam":
        out = attr.GuidedGradCam(model, layer).attribute(x, target=t, interpolate_mode="bilinear")
    else:
        raise ValueError(method)
    return out.detach().numpy()
