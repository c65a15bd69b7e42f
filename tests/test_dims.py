"""1-D (time series) and 3-D (volume) conv models: Grad-CAM over time / per voxel, checked against Captum."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from captum.attr import LayerGradCam  # noqa: E402

from onnxcam import Explainer  # noqa: E402


@pytest.mark.parametrize("dim, shape", [(1, (2, 2, 40)), (3, (2, 2, 8, 12, 12))])
def test_grad_cam_on_1d_and_3d_convnets(tmp_path, dim, shape):
    torch.manual_seed(dim)
    conv = {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[dim]
    pool = {1: torch.nn.AdaptiveAvgPool1d, 3: torch.nn.AdaptiveAvgPool3d}[dim]
    net = torch.nn.Sequential(conv(2, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 16, 3, stride=2, padding=1),
                              torch.nn.ReLU(), pool(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x = torch.randn(*shape)
    path = tmp_path / f"conv{dim}d.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["x"], dynamic_axes={"x": {0: "N"}}, dynamo=False,
                      opset_version=17)
    e = Explainer(str(path)).explain(x.numpy(), [1, 2])
    ref = LayerGradCam(net, net[3]).attribute(x, target=[1, 2], relu_attributions=True).detach().numpy()[:, 0]
    assert e.maps.shape == ref.shape and e.heatmaps.shape == (2, *shape[2:])
    assert np.linalg.norm(e.maps - ref) / np.linalg.norm(ref) < 1e-4
    live = e.maps.reshape(2, -1).max(axis=1) > 0  # a random net's ReLU can leave a map all zero
    peaks = e.heatmaps.reshape(2, -1).max(axis=1)
    assert e.heatmaps.min() >= 0 and np.allclose(peaks[live], 1, atol=0.05) and np.all(peaks[~live] == 0)
