"""Finer-CAM (issue #19): a target whose weights W = dy/dz are taken at the sample's own logits, checked against
pytorch-grad-cam's FinerCAM on the same weights, and W itself against float64 central finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import onnxcam
from onnxcam import FinerTarget, OnnxcamError
from onnxcam.cam.targets import finer_weights
from tests.test_multi_target import Net, export


def finer_score(z: np.ndarray, t: FinerTarget) -> float:
    """pytorch-grad-cam's FinerWeightedTarget, in float64 numpy."""
    c = int(np.argmax(z)) if t.cls is None else t.cls
    order = np.argsort(np.abs(z - z[c]), kind="stable")
    others = [j for j in order if j != c][:t.comparisons]
    p = np.exp(z - z.max())
    p /= p.sum()
    return sum(p[j] * (z[c] - t.alpha * z[j]) for j in others) / (p[others].sum() + 1e-9)


@pytest.mark.parametrize("t", [FinerTarget(), FinerTarget(2), FinerTarget(4, comparisons=1, alpha=0.5),
                               FinerTarget(0, comparisons=6, alpha=2.0)])
def test_weights_are_the_gradient_of_the_finer_score(t):
    z = np.random.default_rng(1).normal(size=7) * 3
    eps = 1e-6
    fd = np.array([(finer_score(z + eps * e, t) - finer_score(z - eps * e, t)) / (2 * eps) for e in np.eye(7)])
    np.testing.assert_allclose(finer_weights(z, t), fd, atol=1e-8)


@pytest.fixture(scope="module")
def net_and_model(tmp_path_factory):
    torch.manual_seed(0)
    net = Net(classes=10)
    with torch.no_grad():  # spread the logits so that the top classes differ between the samples
        net.fc.weight.mul_(8.0)
        net.fc.bias.zero_()
    return net, export(net, tmp_path_factory.mktemp("finer") / "net.onnx")


@pytest.mark.parametrize("base, method", [("GradCAM", "gradcam"), ("LayerCAM", "layercam")])
def test_maps_equal_pytorch_grad_cam(net_and_model, base, method):
    import pytorch_grad_cam
    from pytorch_grad_cam import FinerCAM

    net, path = net_and_model
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    x *= np.float32([0.5, 1, 2, 4])[:, None, None, None]
    x[1] += 1
    x[2] -= 1
    ex = onnxcam.Explainer(path, method=method)
    cam = FinerCAM(net, [net.layer], base_method=getattr(pytorch_grad_cam, base))
    r = ex.explain(x, FinerTarget())
    assert len({int(t.source.cls) for t in r.targets}) > 1  # the top classes differ: each sample's own W
    np.testing.assert_allclose(r.heatmaps, cam(torch.from_numpy(x)), atol=1e-5)
    explicit = ex.explain(x, FinerTarget(7, alpha=0.5))
    np.testing.assert_allclose(explicit.heatmaps, cam(torch.from_numpy(x), target_idx=7, alpha=0.5), atol=1e-5)
    # not the plain class map: the comparison classes change it
    assert np.abs(explicit.heatmaps - ex.explain(x, 7).heatmaps).max() > 0.05


def test_finer_target_errors_and_cli(net_and_model, tmp_path, capsys):
    from onnxcam.cli import main

    _, path = net_and_model
    with pytest.raises(OnnxcamError, match="positive number of classes"):
        FinerTarget(comparisons=0)
    ex = onnxcam.Explainer(path)
    with pytest.raises(OnnxcamError, match="target 12 is out of range"):
        ex.explain(np.zeros((1, 3, 16, 16), np.float32), FinerTarget(12))
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype(np.float32))
    code = main(["explain", path, str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"), "--finer", "--target", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "class 3 vs its 3 closest classes (Finer-CAM)" in out
    code = main(["explain", path, str(tmp_path / "x.npy"), "--finer", "--top-k-maps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--finer" in err
