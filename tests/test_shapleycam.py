"""ShapleyCAM and the ReST target against pytorch-grad-cam (ShapleyCAM, ClassifierOutputReST) on the same weights.

pytorch-grad-cam builds the Hessian-vector product by double backward; onnxcam from first-order graphs (the head
after the layer is piecewise linear, so H A = J^T H_y J A). Tolerance 1e-4 on the [0, 1] heatmaps (float32).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import onnxcam
from onnxcam import OnnxcamError, ReSTTarget
from onnxcam.cam.targets import hessian_vector, rest_weights
from tests.test_multi_target import Net, export


class MLPHead(nn.Module):
    """Net's trunk and layer, then GAP and a ReLU MLP (kinks between the layer and the score), or a sigmoid."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.fc1, self.act, self.fc = nn.Linear(12, 16), act(), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.act(self.fc1(self.layer(self.trunk(x)).mean((2, 3)))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapley")
    torch.manual_seed(0)
    affine = Net()
    with torch.no_grad():
        affine.fc.weight.mul_(4.0)
    kinked, curved = MLPHead(), MLPHead(nn.Sigmoid)
    with torch.no_grad():
        kinked.fc.weight.mul_(4.0)
    return {name: (net, export(net, folder / f"{name}.onnx"))
            for name, net in (("affine", affine), ("kinked", kinked), ("curved", curved))}


def images(n=4, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)
    return x * np.float32([0.5, 1, 2, 3][:n])[:, None, None, None]


def reference(net, x, cls, method="ShapleyCAM", rest=True):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    kind = ClassifierOutputReST if rest else ClassifierOutputTarget
    with getattr(pytorch_grad_cam, method)(model=net, target_layers=[net.layer]) as cam:
        return cam(input_tensor=torch.from_numpy(x), targets=[kind(int(c)) for c in cls])


def test_rest_weights_and_hessian_are_the_derivatives():
    z = np.random.default_rng(1).normal(size=7) * 3
    y = lambda z: z[2] + np.log(np.exp(z - z.max())[2] / np.exp(z - z.max()).sum())  # noqa: E731
    eps = 1e-6
    fd = np.array([(y(z + eps * e) - y(z - eps * e)) / (2 * eps) for e in np.eye(7)])
    np.testing.assert_allclose(rest_weights(z, ReSTTarget(2)), fd, atol=1e-8)
    v = np.random.default_rng(2).normal(size=7)
    hv = (rest_weights(z + eps * v, ReSTTarget(2)) - rest_weights(z - eps * v, ReSTTarget(2))) / (2 * eps)
    np.testing.assert_allclose(hessian_vector(ReSTTarget(2), z, v), hv, atol=1e-7)
    assert hessian_vector(onnxcam.ClassTarget(2), z, v) is None  # a logit is linear in the score


@pytest.mark.parametrize("which", ["affine", "kinked"])
def test_shapleycam_with_rest_equals_pytorch_grad_cam(models, which):
    net, path = models[which]
    x = images()
    with torch.no_grad():
        top = net(torch.from_numpy(x)).argmax(1).numpy()
    ex = onnxcam.Explainer(path, method="shapleycam")
    r = ex.explain(x, ReSTTarget())
    np.testing.assert_array_equal([t.source.cls for t in r.targets], top)
    ref = reference(net, x, top)
    np.testing.assert_allclose(r.heatmaps, ref, atol=1e-4)
    # The Hessian term matters here: Grad-CAM with the same target is a different map.
    plain = onnxcam.Explainer(path, method="gradcam").explain(x, ReSTTarget())
    np.testing.assert_allclose(plain.heatmaps, reference(net, x, top, "GradCAM"), atol=1e-4)
    assert np.abs(plain.heatmaps - r.heatmaps).max() > 0.02
    given = ex.explain(x, ReSTTarget(5))
    np.testing.assert_allclose(given.heatmaps, reference(net, x, [5] * len(x)), atol=1e-4)


def test_shapleycam_of_a_logit_is_gradcam(models):
    """A class logit is linear in the score and the head is piecewise linear: H A = 0, as pytorch-grad-cam's
    double backward finds."""
    net, path = models["kinked"]
    x = images()
    r = onnxcam.Explainer(path, method="shapleycam").explain(x, [1, 2, 3, 4])
    np.testing.assert_allclose(r.heatmaps, reference(net, x, [1, 2, 3, 4], rest=False), atol=1e-4)
    np.testing.assert_allclose(r.heatmaps, onnxcam.Explainer(path).explain(x, [1, 2, 3, 4]).heatmaps, atol=1e-6)


def test_finer_target_gets_its_hessian_term(models):
    """Finer-CAM's score is curved in the logits too; its H_y v by central differences of the exact gradient."""
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    net, path = models["affine"]
    x = images()
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    r = onnxcam.Explainer(path, method="shapleycam").explain(x, [onnxcam.FinerTarget(int(c)) for c in
                                                                 logits.argmax(1)])
    targets = []
    for s, c in enumerate(logits.argmax(1)):
        order = np.argsort(np.abs(logits[s] - logits[s, c]), kind="stable")
        targets.append(FinerWeightedTarget(int(c), [int(j) for j in order if j != c][:3], 1.0))
    with ShapleyCAM(model=net, target_layers=[net.layer]) as cam:
        ref = cam(input_tensor=torch.from_numpy(x), targets=targets)
    np.testing.assert_allclose(r.heatmaps, ref, atol=1e-4)


def test_curved_heads_and_several_layers_are_refused(models):
    _, path = models["curved"]
    with pytest.raises(OnnxcamError, match="ShapleyCAM needs the score's second derivative.*Sigmoid"):
        onnxcam.Explainer(path, method="shapleycam")
    onnxcam.Explainer(path, method="gradcam")  # first order is fine
    _, affine = models["affine"]
    import onnx
    relus = [n.output[0] for n in onnx.load(affine).graph.node if n.op_type == "Relu"]
    with pytest.raises(OnnxcamError, match="one layer at a time"):
        onnxcam.Explainer(affine, method="shapleycam", layer=relus[:2])


def test_cli(models, tmp_path, capsys):
    """--method shapleycam --rest writes the map the API computes; bad combinations are one line, exit 2."""
    from onnxcam.cli import main

    net, path = models["affine"]
    x = images(1)
    np.save(tmp_path / "x.npy", x)
    code = main(["explain", path, str(tmp_path / "x.npy"), "--method", "shapleycam", "--rest", "--target", "3",
                 "--no-overlay", "--save-maps", str(tmp_path / "maps.npz"), "--maps-size", "input"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "class 3 logit + log-probability (ReST)" in out
    saved = np.load(tmp_path / "maps.npz")
    np.testing.assert_allclose(saved[saved.files[0]], reference(net, x, [3])[0], atol=1e-4)
    code = main(["explain", path, str(tmp_path / "x.npy"), "--rest", "--finer"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--finer and --rest" in err
