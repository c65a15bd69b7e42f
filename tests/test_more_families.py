"""More torchvision families, both exporters: a full backward (Guided Backprop) through the ops they add and
Grad-CAM at the default layer, against Captum / autograd on the same weights.

- squeezenet1_1: ceil_mode MaxPools, Fire modules (Concat), a conv classifier (the default layer is the ReLU
  after the 1x1 classifier conv, just before the global pool).
- shufflenet_v2_x0_5: channel shuffle (Reshape -> Transpose -> Reshape), channel Split / chunk.
- mobilenet_v3_small: HardSwish, squeeze-excite with HardSigmoid.

Guided Backprop uses guided_ops=("Relu",): Captum's GuidedBackprop rectifies nn.ReLU modules only, and these
models use nn.ReLU for every ReLU (inception_v3's functional F.relu would not be rectified by Captum).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import GuidedBackprop

from onnxcam import Explainer
from tests.torch_export import EXPORTERS, calibrate_batchnorm, export, torch_gradcam

SIZE = 160
# module whose output is onnxcam's default layer for each family
LAYER = {"squeezenet1_1": lambda m: m.classifier[2], "shufflenet_v2_x0_5": lambda m: m.conv5,
         "mobilenet_v3_small": lambda m: m.features}
# Measured (both exporters): Guided Backprop 1.1e-7 / 2.0e-7 / 2.0e-6, Grad-CAM 3.3e-7 / 1.4e-5 / 1.7e-6. Bounds 1e-4:
# a missing rectifier, a wrong shuffle permutation or a wrong ceil-mode window gives O(1).
TOL = 1e-4


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=[(n, e) for n in LAYER for e in EXPORTERS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    name, exporter = request.param
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    calibrate_batchnorm(model, SIZE, seed=0)
    model.eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    path = export(model, x, tmp_path_factory.mktemp(name) / f"{name}.onnx", exporter)
    return name, model, x, path


def test_guided_backprop_matches_captum(case):
    name, model, x, path = case
    with torch.no_grad():
        targets = model(x).argmax(1)
    ours = Explainer(path, method="guided-backprop", guided_ops=("Relu",)).explain(x.numpy(), targets.numpy())
    ref = GuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=targets).detach().numpy()
    err = _rel(ours.guided, ref)
    print(f"{name}: guided backprop rel L2 {err:.1e}")
    assert err < TOL


def test_gradcam_at_the_default_layer_matches_autograd(case):
    name, model, x, path = case
    with torch.no_grad():
        logits = model(x)
    targets = logits.argmax(1)
    ref, _ = torch_gradcam(lambda: model(x), LAYER[name](model), lambda out: out.gather(1, targets[:, None])[:, 0])
    ex = Explainer(path)
    r = ex.explain(x.numpy(), targets.numpy())
    assert r.maps.shape == ref.shape, (ex.layers, r.maps.shape, ref.shape)
    err = _rel(r.maps, ref)
    print(f"{name}: Grad-CAM at {ex.layers[0]} rel L2 {err:.1e}")
    assert err < TOL
    np.testing.assert_allclose(r.scores, logits.numpy(), rtol=1e-4, atol=1e-4)
