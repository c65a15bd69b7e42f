"""Grad-CAM on Vision Transformers (torchvision ViT-B/16, Swin-T), both torch exporters, against pytorch-grad-cam
with the reshape transforms its documentation gives, and against a PyTorch autograd reference.

onnxcam is given only the ONNX file: it must find the layer, see that it is not channels-first, and map it to
(N, C, h, w) by itself. The documented choices it must reproduce:

* ViT-B/16: the layer is the last encoder block's first LayerNorm (`encoder.layers[-1].ln_1`, pytorch-grad-cam's
  `blocks[-1].norm1`), tokens (N, 197, 768): the class token is dropped and the 196 patch tokens are read as a
  14x14 grid, row-major. (The last block's *output* would give all-zero maps: the head reads only the class token,
  which the other tokens no longer reach after the last attention.)
* Swin-T: the layer is the last block's output (`features[-1][-1]`), channels-last (N, 7, 7, 768) -> permuted.

torchvision initialises ViT's classification head to zeros (every gradient would be zero, every map trivially
equal); it is re-initialised here with N(0, 1/768) so the logits are O(1). Swin's head is random already.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import onnxcam
from onnxcam.model.layouts import CHANNELS_LAST, TOKENS, LayerLayout
from tests import torch_export

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SIZE = 224
# Raw maps vs the autograd reference (relative L2): float32 forward/backward through 12 attention blocks in two
# runtimes; measured <= ~1e-5.
MAPS_RTOL = 1e-3
# Heatmaps vs pytorch-grad-cam: same min-max/bilinear pipeline as tests/test_parity.py (HEATMAP_ATOL there).
HEATMAP_ATOL = 1e-3
LAYER_RTOL = 1e-3


def vit_tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape transform: drop the class token, 196 tokens -> 14x14, NCHW."""
    n, _, c = t.shape
    return t[:, 1:, :].reshape(n, 14, 14, c).permute(0, 3, 1, 2)


def swin_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """torchvision's Swin blocks output (N, H, W, C): channels first for Grad-CAM."""
    return t.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class TransformerCase:
    name: str
    layer: object  # module -> the module Grad-CAM explains
    transform: object
    layout: LayerLayout


CASES = {
    "vit_b_16": TransformerCase("vit_b_16", lambda m: m.encoder.layers[-1].ln_1, vit_tokens_to_grid,
                                LayerLayout(TOKENS, 1, (14, 14))),
    "swin_t": TransformerCase("swin_t", lambda m: m.features[-1][-1], swin_to_nchw, LayerLayout(CHANNELS_LAST)),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if name == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=768 ** -0.5)
        torch.nn.init.normal_(model.heads.head.bias, std=0.1)
    return model.eval()


@dataclass
class Case:
    label: str
    spec: TransformerCase
    path: str
    model: torch.nn.Module
    x: torch.Tensor
    targets: list[int]
    explainer: onnxcam.Explainer
    result: onnxcam.Explanation
    module_out: np.ndarray | None = None  # the layer module's output, PyTorch
    ref_maps: np.ndarray | None = None  # autograd Grad-CAM maps


@pytest.fixture(scope="module", params=[pytest.param((m, e), id=f"{m}-{e}", marks=pytest.mark.slow)
                                        for m in CASES for e in torch_export.EXPORTERS])
def case(request, tmp_path_factory) -> Case:
    name, exporter = request.param
    model = build(name)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    path = str(tmp_path_factory.mktemp(name) / f"{name}_{exporter}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_export.export(model, x, path, exporter)
    with torch.no_grad():
        logits = model(x).numpy()
    targets = [int(t) for t in np.argsort(-logits, axis=1)[:, 2]]  # 3rd-highest: not the argmax
    explainer = onnxcam.Explainer(path)
    c = Case(f"{name}/{exporter}", CASES[name], path, model, x, targets, explainer,
             explainer.explain(x.numpy(), targets))
    c.module_out, c.ref_maps = _autograd_maps(c)
    return c


def _layer_value(path: str, tensor: str, x: np.ndarray) -> np.ndarray:
    model = onnx.load(path)
    ir = model.ir_version
    model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    model.ir_version = ir
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], {sess.get_inputs()[0].name: x})[0]


def _autograd_maps(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(layer output, Grad-CAM maps) in PyTorch: hook the layer, backprop the target logits, apply the reshape
    transform to activations and gradients, alpha = spatial mean of the gradient, map = ReLU(sum alpha A)."""
    module = case.spec.layer(case.model)
    saved = {}

    def hook(mod, inp, out):
        saved["a"] = out
        out.register_hook(lambda g: saved.__setitem__("g", g))

    handle = module.register_forward_hook(hook)
    try:
        logits = case.model(case.x)
        logits[torch.arange(len(case.targets)), torch.tensor(case.targets)].sum().backward()
    finally:
        handle.remove()
    a = case.spec.transform(saved["a"].detach())
    g = case.spec.transform(saved["g"])
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return saved["a"].detach().numpy(), torch.relu((alpha * a).sum(1)).numpy()


def test_layer_and_layout_are_found(case: Case):
    module_out = case.module_out
    value = _layer_value(case.path, case.explainer.layer, case.x.numpy())
    assert value.shape == module_out.shape, f"{case.label}: layer {case.explainer.layer} has shape {value.shape}"
    err = float(np.abs(value - module_out).max() / np.abs(module_out).max())
    print(f"TRANSFORMER {case.label} layer {case.explainer.layer!r} rel max err {err:.1e}, "
          f"layout {case.explainer.layer_layouts[0].describe()}")
    assert err < LAYER_RTOL
    assert case.explainer.layer_layouts[0] == case.spec.layout


def test_maps_match_autograd(case: Case):
    ref = case.ref_maps
    maps = case.result.maps
    assert maps.shape == ref.shape
    assert np.abs(ref).max() > 0, "reference maps are all zero: the test would prove nothing"
    rel = float(np.linalg.norm(maps - ref) / np.linalg.norm(ref))
    print(f"TRANSFORMER {case.label} maps rel L2 {rel:.1e}")
    assert rel < MAPS_RTOL
    np.testing.assert_array_equal(case.result.targets, case.targets)


def test_heatmaps_match_pytorch_grad_cam(case: Case):
    cam = pytorch_grad_cam.GradCAM(model=case.model, target_layers=[case.spec.layer(case.model)],
                                   reshape_transform=case.spec.transform)
    ref = cam(input_tensor=case.x, targets=[ClassifierOutputTarget(t) for t in case.targets])
    err = float(np.abs(case.result.heatmaps - ref).max())
    print(f"TRANSFORMER {case.label} heatmaps max abs err vs pytorch-grad-cam {err:.1e}")
    assert err < HEATMAP_ATOL


def test_layers_listing_shows_grid_and_layout(case: Case):
    from onnxcam.model import select
    from onnxcam.model.graph import ModelView, infer_shapes, load_model

    view = ModelView(infer_shapes(load_model(case.path)))
    cands = select.layer_candidates(view, select.image_input(view), select.find_score(view))
    default = [c for c in cands if c.default]
    assert [c.name for c in default] == [case.explainer.layer]
    assert default[0].layout == case.spec.layout.describe()
    # TorchScript's Swin export leaves H, W symbolic: a static dim must be the map's, a symbolic one stays a name.
    assert len(default[0].spatial) == 2
    for listed, actual in zip(default[0].spatial, case.result.maps.shape[1:]):
        assert listed == actual or not isinstance(listed, int)


class TinyViT(torch.nn.Module):
    """A DeiT-style transformer small enough to export in a second: 4x4 patches of 8 px on a 32x32 input, pre-norm
    blocks; `tokens` leading tokens (2 = DeiT's class + distillation, whose head averages both; 0 = mean-pooled
    patch tokens, no class token)."""

    def __init__(self, tokens: int, dim: int = 32, classes: int = 10):
        super().__init__()
        self.tokens = tokens
        self.patch = torch.nn.Conv2d(3, dim, 8, 8)
        self.extra = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(1, tokens + 16, dim) * 0.5)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2))
        self.norm = torch.nn.LayerNorm(dim)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, classes) for _ in range(max(tokens, 1)))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.extra.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for block in self.blocks:
            t = block(t)
        t = self.norm(t)
        if self.tokens == 0:
            return self.heads[0](t.mean(1))
        return sum(head(t[:, i]) for i, head in enumerate(self.heads)) / self.tokens


@pytest.mark.parametrize("exporter", torch_export.EXPORTERS)
@pytest.mark.parametrize("tokens", [2, 0], ids=["class+distillation", "mean-pooled"])
def test_leading_tokens_are_dropped_and_the_grid_found(tmp_path, tokens, exporter):
    torch.manual_seed(tokens)
    model = TinyViT(tokens).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    path = str(tmp_path / "tiny_vit.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_export.export(model, x, path, exporter)
    ex = onnxcam.Explainer(path)
    assert ex.layer_layouts[0] == LayerLayout(TOKENS, tokens, (4, 4))
    # The reference layer: with a class-token head, the last block's attention input (its norm1); with a mean over
    # all tokens every token reaches the score, so the last tensor before the pool (the final norm) is right.
    module = model.blocks[-1].norm1 if tokens else model.norm
    saved = {}

    def hook(mod, inp, out):
        saved["a"] = out
        out.register_hook(lambda g: saved.__setitem__("g", g))

    handle = module.register_forward_hook(hook)
    logits = model(x)
    handle.remove()
    targets = [int(t) for t in np.argsort(-logits.detach().numpy(), axis=1)[:, 1]]
    logits[torch.arange(2), torch.tensor(targets)].sum().backward()
    grid = lambda t: t[:, tokens:, :].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # noqa: E731
    a, g = grid(saved["a"].detach()), grid(saved["g"])
    ref = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1)).numpy()
    maps = ex.explain(x.numpy(), targets).maps
    assert np.abs(ref).max() > 0
    assert np.linalg.norm(maps - ref) / np.linalg.norm(ref) < MAPS_RTOL
