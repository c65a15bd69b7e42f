"""Issue #16: why deconvnet looks like a near-uniform checkerboard, pinned.

Finding: the numbers are right and so is the rendering; the look is the method's own.
* onnxcam's deconvnet equals Captum's Deconvolution: on a small strided ReLU net with max pooling
  (`test_deconvnet_matches_captum`) and on the demo model's own weights (`test_demo_model_matches_captum`,
  a PyTorch replay of efficientnet_lite0.onnx with its ReLU6 as Captum rectifiers): rel. L2 ~1e-6.
* The deconvnet backward applies ReLU to the backward signal and never looks at the forward activations,
  so in a network without max pooling (no switches) it is a fixed function of the target class: the same
  picture for every image (`test_no_maxpool_means_no_input_dependence`, `test_demo_model_is_a_class_template`).
  The uniform gradient of the global average pool, spread back through the stride-2 transposed convolutions,
  tiles the image with a pattern of the network's stride (16-32 px on efficientnet_lite0).
* gradient_image is pytorch-grad-cam's deprocess_image, bit for bit (`test_rendering_is_deprocess_image`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxcam
from onnxcam.images import render

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
RTOL = 1e-4  # relative L2; measured ~1e-6 (float32 summation order only)


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(np.ravel(a - b)) / max(np.linalg.norm(np.ravel(b)), 1e-30))


class StridedNet(nn.Module):
    """Stride-2 convolutions and ReLUs (optionally a max pool), global average pool, linear head."""

    def __init__(self, maxpool: bool):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()]
        if maxpool:
            layers += [nn.MaxPool2d(3, stride=2, padding=1)]
        layers += [nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                   nn.Conv2d(16, 16, 4, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _export(net: nn.Module, path: Path) -> str:
    import warnings
    x = torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return str(path)


def _net(maxpool: bool) -> nn.Module:
    torch.manual_seed(3)
    return StridedNet(maxpool).eval()


def _inputs(n: int = 2) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("maxpool", [True, False], ids=["maxpool", "no-maxpool"])
def test_deconvnet_matches_captum(tmp_path, maxpool):
    attr = pytest.importorskip("captum.attr")
    net = _net(maxpool)
    ex = onnxcam.Explainer(_export(net, tmp_path / "net.onnx"), method="deconvnet")
    x = _inputs()
    targets = [1, 4]
    ours = ex.explain(x, targets=targets).guided
    ref = attr.Deconvolution(net).attribute(torch.from_numpy(x), target=targets).detach().numpy()
    assert np.linalg.norm(ref) > 0
    for i in range(len(x)):
        assert _rel_l2(ours[i], ref[i]) < RTOL
    # ... and it is not the plain gradient (which would also "look" fine): the rule really changed.
    grad = torch.from_numpy(x).requires_grad_(True)
    net(grad)[range(2), targets].sum().backward()
    assert _rel_l2(ours[0], grad.grad.numpy()[0]) > 0.1


def test_no_maxpool_means_no_input_dependence(tmp_path):
    """Without max-pool switches deconvnet never reads the image: one picture per class."""
    ex_plain = onnxcam.Explainer(_export(_net(False), tmp_path / "plain.onnx"), method="deconvnet")
    ex_pool = onnxcam.Explainer(_export(_net(True), tmp_path / "pool.onnx"), method="deconvnet")
    x = _inputs()
    plain = ex_plain.explain(x, targets=[2, 2]).guided
    np.testing.assert_array_equal(plain[0], plain[1])
    pool = ex_pool.explain(x, targets=[2, 2]).guided
    assert _rel_l2(pool[0], pool[1]) > 0.1  # the switches carry the image in


def _demo_explainer():
    if not MODEL.exists():
        pytest.skip("models/efficientnet_lite0.onnx is missing")
    return onnxcam.Explainer(str(MODEL), method="deconvnet")


def test_demo_model_is_a_class_template():
    """efficientnet_lite0 (Conv, ReLU6, Pad, Add, average pool: no max pool): the same deconvnet picture for
    the cat photo and for noise; its interior repeats every 16 px (the stride of the 14x14 stage)."""
    ex = _demo_explainer()
    cat = ex.explain_image(str(ROOT / "models" / "cat.png"), targets=[285]).guided[0]
    noise = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_array_equal(ex.explain(noise, targets=[285]).guided[0], cat)

    inner = cat[:, 32:192, 32:192]

    def shift(p):
        return float(np.linalg.norm((inner - np.roll(inner, p, 1))[:, p:]) / np.linalg.norm(inner))

    assert shift(16) < 0.15 < 0.4 < shift(2)  # measured 0.098 and 0.51
    # Rendered the usual way, half the values sit within 0.05 of grey (|z| < 0.5): a faint, tiled texture.
    z = (cat - cat.mean()) / cat.std()
    assert 0.4 < float((np.abs(z) < 0.5).mean()) < 0.65  # measured 0.525


def test_demo_model_matches_captum():
    """Captum's Deconvolution on the demo model's own weights: a PyTorch replay of its ONNX graph in which
    every Clip(0, 6) is an nn.ReLU subclass (so Captum rectifies it, as onnxcam's default guided_ops do)."""
    attr = pytest.importorskip("captum.attr")
    import onnx
    import torch.nn.functional as F
    from onnx import numpy_helper

    from tests.methods_reference import RectifierReLU6

    ex = _demo_explainer()
    model = onnx.load(str(MODEL))
    values = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = torch.from_numpy(numpy_helper.to_array(node.attribute[0].t).copy())
    nodes = [n for n in model.graph.node if n.op_type not in ("Constant", "Shape", "Gather", "Unsqueeze", "Concat")]

    class Replay(nn.Module):
        def __init__(self):
            super().__init__()
            self.rectifiers = nn.ModuleList(RectifierReLU6() for n in nodes if n.op_type == "Clip")

        def forward(self, x):
            env = {**values, model.graph.input[0].name: x}
            k = 0
            for n in nodes:
                a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
                i = [env.get(s) for s in n.input]
                if n.op_type == "Conv":
                    assert list(a.get("pads", [0] * 4)) == [0] * 4
                    y = F.conv2d(i[0], i[1], i[2], stride=a["strides"], groups=a.get("group", 1))
                elif n.op_type == "Clip":
                    assert (float(i[1]), float(i[2])) == (0.0, 6.0)
                    y = self.rectifiers[k](i[0])
                    k += 1
                elif n.op_type == "Pad":
                    p = [int(v) for v in i[1]]
                    assert not any(p[:2] + p[4:6]) and (len(i) < 3 or i[2] is None or float(i[2]) == 0.0)
                    y = F.pad(i[0], (p[3], p[7], p[2], p[6]))
                elif n.op_type == "Add":
                    y = i[0] + i[1]
                elif n.op_type == "GlobalAveragePool":
                    y = i[0].mean((2, 3), keepdim=True)
                elif n.op_type == "Reshape":
                    y = i[0].flatten(1)
                elif n.op_type == "Gemm":
                    assert a.get("transB", 0) == 1
                    y = F.linear(i[0], i[1], i[2])
                else:
                    raise NotImplementedError(n.op_type)
                env[n.output[0]] = y
            return env[model.graph.output[0].name]

    net = Replay().eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    assert _rel_l2(logits, ex.explain(x, targets=[0, 0]).scores) < 1e-5  # the replay is the model
    targets = [285, 3]
    ours = ex.explain(x, targets=targets).guided
    ref = attr.Deconvolution(net).attribute(torch.from_numpy(x), target=targets).detach().numpy()
    for i in range(2):
        assert _rel_l2(ours[i], ref[i]) < RTOL  # measured 1.3e-6


def test_rendering_is_deprocess_image():
    """gradient_image is pytorch-grad-cam's deprocess_image (global mean and std over all channels, x0.1 around
    grey): the grey, low-contrast look of deconvnet is that convention's, not a rendering bug."""
    image_utils = pytest.importorskip("pytorch_grad_cam.utils.image")
    rng = np.random.default_rng(5)
    g = rng.standard_normal((3, 20, 24)) * np.array([4.0, 5.0, 1.0])[:, None, None] + np.array([-4, 4, 0.5])[:, None, None]
    ours = np.asarray(render.gradient_image(g.astype(np.float32)))
    ref = image_utils.deprocess_image(g.astype(np.float32).transpose(1, 2, 0))
    np.testing.assert_array_equal(ours, ref)
