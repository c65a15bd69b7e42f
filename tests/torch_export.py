"""Torchvision classifiers with random weights, exported to ONNX by both torch exporters.

Shared by tests/test_parity.py and tools/bench_gradcam.py (which puts the repository root on sys.path).

Weights: torchvision's own random initialisation under `torch.manual_seed(seed)`; no download. The
BatchNorm running statistics are then *calibrated* on a few random batches (train-mode forward, cumulative
average), so that activations and logits are O(1): with the stock statistics (mean 0, var 1) MobileNetV2's
logits are ~1e-9 and EfficientNet-B0's ~1e-14, which makes their Grad-CAM maps smaller than the 1e-7 of
the min-max normalisation and every heatmap comparison trivially true. Weights are untouched.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class TorchvisionCase:
    name: str
    kwargs: dict
    layer: Callable[[nn.Module], nn.Module]  # the module whose output Grad-CAM explains
    layer_label: str
    size: int  # input height = width


def _vgg_size() -> int:
    # VGG's AdaptiveAvgPool2d((7, 7)) only exports (TorchScript exporter) when 7 divides the feature size:
    # 224 -> 7x7 after features. relu5_3 (features[29]) is then 14x14.
    return 224


MODELS: dict[str, TorchvisionCase] = {c.name: c for c in [
    TorchvisionCase("resnet18", {}, lambda m: m.layer4, "layer4", 160),
    TorchvisionCase("resnet50", {}, lambda m: m.layer4, "layer4", 160),
    TorchvisionCase("vgg16", {}, lambda m: m.features[29], "features[29] (relu5_3)", _vgg_size()),
    TorchvisionCase("mobilenet_v2", {}, lambda m: m.features, "features", 160),
    TorchvisionCase("efficientnet_b0", {}, lambda m: m.features, "features", 160),
    TorchvisionCase("convnext_tiny", {}, lambda m: m.features, "features", 160),
    TorchvisionCase("googlenet", {"aux_logits": False, "init_weights": True}, lambda m: m.inception5b,
                    "inception5b", 160),
]}


def calibrate_batchnorm(model: nn.Module, size: int, seed: int, batches: int = 2, batch: int = 8) -> None:
    """Sets every BatchNorm's running mean/var to the statistics of a few random N(0, 1) batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, generator=gen))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def build(name: str, seed: int = 0, calibrate: bool = True) -> nn.Module:
    """The torchvision model `name`, random weights under `seed`, eval mode."""
    case = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, **case.kwargs)
    if calibrate:
        calibrate_batchnorm(model, case.size, seed)
    return model.eval()


def random_input(name: str, batch: int = 2, seed: int = 0, size: int | None = None) -> torch.Tensor:
    size = size or MODELS[name].size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 12345))


def export(model: nn.Module, x: torch.Tensor, path: str | os.PathLike, exporter: str) -> str:
    """Exports with a dynamic batch: input `input` (N, 3, H, W), output `logits` (N, K).

    torchscript: `dynamo=False`, opset 17, `dynamic_axes`. dynamo: `dynamo=True` (the exporter's default
    opset), `dynamic_shapes` with a `torch.export.Dim`; weights may go to `<path>.data` next to the model.
    """
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), verbose=False)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
    return path


def torch_gradcam(forward, layer: nn.Module, y_of):
    """(maps (N, h, w), y (N,)) for y = y_of(forward()): Grad-CAM at `layer`'s output, by autograd."""
    store = {}

    def hook(_module, _inputs, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(hook)
    try:
        y = y_of(forward())
    finally:
        handle.remove()
    y.sum().backward()  # samples do not interact (eval mode), so one backward serves the batch
    a = store["a"]
    alpha = a.grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * a).sum(1)).detach().numpy(), y.detach().numpy()
