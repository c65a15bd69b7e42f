"""Several classes per image in one explain call: `explain(x, targets=[[3, 7, 9], ...])`, `top_classes(k)`,
`TopClass(r)`. The one-run path (the head repeated per target after the layer, onnxcam.cam.build.repeat_layers)
must give what K separate calls give, and both what pytorch-grad-cam gives on the same weights; heads it cannot
repeat fall back to K runs, with the same answers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxcam
from onnxcam import OnnxcamError, TopClass, top_classes
from onnxcam.cam import build
from onnxcam.model.graph import infer_shapes

torch.manual_seed(0)


class Net(nn.Module):
    """conv trunk -> layer -> GAP + linear; `skip`: the head also reads a pooled map from before the layer (a
    batch-first tensor outside the head); `shape_read`: the head reads the input's shape (no batch axis first)."""

    def __init__(self, classes=10, skip=False, shape_read=False, view=False):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12 + (8 if skip else 0), classes)
        self.skip, self.shape_read, self.view = skip, shape_read, view

    def forward(self, x):
        t = self.trunk(x)
        a = self.layer(t)
        feats = a.mean((2, 3), keepdim=True)
        # `view(x.size(0), -1)`: a shape whose first element is read from the input (EfficientNet-Lite's export)
        feats = feats.view(x.size(0), -1) if self.view else feats.flatten(1)
        if self.skip:
            feats = torch.cat([feats, t.amax((2, 3))], 1)
        out = self.fc(feats)
        if self.shape_read:  # a scale read from the input's shape: the head depends on a non-batch tensor
            out = out * (x.shape[2] / 16.0)
        return out


def export(net, path, batch_dynamic=True, size=16):
    x = torch.randn(2 if batch_dynamic else 1, 3, size, size)
    torch.onnx.export(net.eval(), (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if batch_dynamic else None, dynamo=False)
    return str(path)


def gradcam_reference(net, x, cls):
    """pytorch-grad-cam on the same weights: the heatmaps (N, H, W)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=net, target_layers=[net.layer]) as cam:
        return cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(int(c)) for c in cls])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    net = Net()
    return net, export(net, tmp_path_factory.mktemp("m") / "net.onnx")


def test_lists_in_one_run_equal_separate_calls_and_pytorch_grad_cam(plain):
    net, path = plain
    ex = onnxcam.Explainer(path)
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    lists = [[3, 7, 9], [1, 2, 4], [5, 5, 0]]
    r = ex.explain(x, lists)
    assert ex.multi_target_session() is not None, ex.multi_target_note
    assert r.targets_per_sample == 3 and r.heatmaps.shape == (3, 3, 16, 16) and r.maps.shape == (3, 3, 8, 8)
    assert r.targets.tolist() == lists and r.scores.shape == (3, 10)
    for k in range(3):
        cls = [row[k] for row in lists]
        one = ex.explain(x, cls)
        np.testing.assert_allclose(r.heatmaps[:, k], one.heatmaps, atol=1e-6)
        np.testing.assert_allclose(r.maps[:, k], one.maps, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.scores, one.scores, rtol=1e-6)
        np.testing.assert_allclose(r.heatmaps[:, k], gradcam_reference(net, x, cls), atol=1e-4)
        assert r.per_target(k).targets.tolist() == cls
    # the maps differ per target: the test would not notice one map copied K times otherwise
    assert np.abs(r.heatmaps[:, 0] - r.heatmaps[:, 1]).max() > 0.05


def test_the_trunk_runs_once(plain):
    """The one-run graph holds the model's convolutions once (forward) plus their backward where the gradient
    passes: the layer's own conv is before the repeat, so no conv is duplicated for the K targets."""
    _, path = plain
    ex = onnxcam.Explainer(path)
    model, names = build.repeat_layers(infer_shapes(onnx.load(path)), ex.layers, ex.score, ex.image_input)
    assert [n.op_type for n in model.graph.node].count("Conv") == 2
    # the head reads the repeated layer; nothing reads the layer itself but the repeat
    assert [n.op_type for n in model.graph.node if names[0] in n.input] == ["ReduceMean"]
    assert {n.op_type for n in model.graph.node if ex.layers[0] in n.input} <= {"Shape", "Unsqueeze"}


def test_top_classes_and_ranks(plain):
    _, path = plain
    ex = onnxcam.Explainer(path)
    x = np.random.default_rng(1).normal(size=(4, 3, 16, 16)).astype(np.float32)
    r = ex.explain(x, top_classes(4))
    scores = ex.explain(x).scores
    order = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    assert r.targets.tolist() == order.tolist()
    for k in range(4):
        np.testing.assert_allclose(r.heatmaps[:, k], ex.explain(x, list(order[:, k])).heatmaps, atol=1e-6)
    second = ex.explain(x, TopClass(1))  # one target per sample: the usual shape
    assert second.targets_per_sample is None and second.targets.tolist() == order[:, 1].tolist()
    np.testing.assert_allclose(second.heatmaps, r.heatmaps[:, 1], atol=1e-6)
    with pytest.raises(OnnxcamError, match="rank 10 is out of range"):
        ex.explain(x, TopClass(10))


def test_labels_overlay_and_errors(plain):
    _, path = plain
    ex = onnxcam.Explainer(path)
    ex.use_defaults(labels=[f"class{i}" for i in range(10)])
    x = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    r = ex.explain(x, [["class3", 7], [1, "class2"]])
    assert r.targets.tolist() == [[3, 7], [1, 2]]
    one_list = ex.explain(x, [[3, 7]])  # one list: for every sample
    assert one_list.targets.tolist() == [[3, 7], [3, 7]]
    assert r.overlay(1, k=1).size == (16, 16)
    assert r.title(0, k=1) == "class7 (7) - gradcam"
    with pytest.raises(OnnxcamError, match="pass k="):
        r.overlay(0)
    with pytest.raises(OnnxcamError, match="same number of targets"):
        ex.explain(x, [[3, 7], [1]])
    with pytest.raises(OnnxcamError, match="mix single targets and lists"):
        ex.explain(x, [[3, 7], 1])
    with pytest.raises(OnnxcamError, match="2 target lists for a batch of 3"):
        ex.explain(np.concatenate([x, x[:1]]), [[3, 7], [1, 2]])
    with pytest.raises(OnnxcamError, match="class indices, labels or TopClass"):
        ex.explain(x, [[onnxcam.IndexTarget((3,)), 2], [1, 2]])


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "eigengradcam"])
def test_other_gradient_methods_in_one_run(plain, method):
    _, path = plain
    ex = onnxcam.Explainer(path, method=method)
    x = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
    lists = [[3, 7], [1, 2]]
    r = ex.explain(x, lists)
    assert ex.multi_target_session() is not None
    for k in range(2):
        np.testing.assert_allclose(r.heatmaps[:, k], ex.explain(x, [row[k] for row in lists]).heatmaps, atol=1e-5)


@pytest.mark.parametrize("method", ["guided-gradcam", "scorecam"])
def test_methods_that_run_the_targets_one_after_the_other(plain, method):
    _, path = plain
    ex = onnxcam.Explainer(path, method=method)
    x = np.random.default_rng(4).normal(size=(2, 3, 16, 16)).astype(np.float32)
    r = ex.explain(x, top_classes(2))
    assert ex.multi_target_session() is None and "method" in ex.multi_target_note
    order = np.argsort(-ex.explain(x).scores, axis=1, kind="stable")[:, :2]
    assert r.targets.tolist() == order.tolist()
    for k in range(2):
        one = ex.explain(x, list(order[:, k]))
        np.testing.assert_allclose(r.heatmaps[:, k], one.heatmaps, atol=1e-6)
        if one.guided is not None:
            np.testing.assert_allclose(r.guided[:, k], one.guided, atol=1e-6)
            np.testing.assert_allclose(r.per_target(k).guided, one.guided, atol=1e-6)
            np.testing.assert_allclose(r.per_target(k).extras["guided_backprop"], one.extras["guided_backprop"],
                                       atol=1e-6)


@pytest.mark.parametrize("case", ["skip", "view"])
def test_a_head_reading_the_samples_before_the_layer_is_repeated_too(tmp_path, case):
    """The head reads a batch-first map from before the layer (repeated with it), or the number of samples for
    a Reshape (scaled by K)."""
    net = Net(skip=case == "skip", view=case == "view")
    ex = onnxcam.Explainer(export(net, tmp_path / "skip.onnx"), layer=None)
    x = np.random.default_rng(5).normal(size=(3, 3, 16, 16)).astype(np.float32)
    r = ex.explain(x, [[0, 1], [2, 3], [4, 5]])
    assert ex.multi_target_session() is not None, ex.multi_target_note
    for k in range(2):
        cls = [[0, 1], [2, 3], [4, 5]]
        one = ex.explain(x, [row[k] for row in cls])
        np.testing.assert_allclose(r.heatmaps[:, k], one.heatmaps, atol=1e-6)
        np.testing.assert_allclose(r.heatmaps[:, k], gradcam_reference(net, x, [row[k] for row in cls]), atol=1e-4)


def test_heads_that_cannot_be_repeated_fall_back_with_the_same_answers(tmp_path):
    x = np.random.default_rng(6).normal(size=(2, 3, 16, 16)).astype(np.float32)
    cases = {"shape": (Net(shape_read=True), True), "batch-1": (Net(), False)}
    for name, (net, dynamic) in cases.items():
        path = export(net, tmp_path / f"{name}.onnx", batch_dynamic=dynamic)
        ex = onnxcam.Explainer(path)
        xs = x if dynamic else x[:1]
        r = ex.explain(xs, top_classes(3))
        assert ex.multi_target_session() is None, name
        assert ex.multi_target_note
        scores = ex.explain(xs).scores
        order = np.argsort(-scores, axis=1, kind="stable")[:, :3]
        assert r.targets.tolist() == order.tolist()
        for k in range(3):
            np.testing.assert_allclose(r.heatmaps[:, k], ex.explain(xs, list(order[:, k])).heatmaps, atol=1e-6)
            np.testing.assert_allclose(r.heatmaps[:, k], gradcam_reference(net, xs, order[:, k]), atol=1e-4)


def test_the_model_is_not_modified(plain):
    _, path = plain
    before = open(path, "rb").read()
    ex = onnxcam.Explainer(path)
    ex.explain(np.zeros((1, 3, 16, 16), np.float32), top_classes(2))
    assert open(path, "rb").read() == before
    assert isinstance(onnx.load(path), onnx.ModelProto)


def test_eigen_smooth_in_one_run(plain):
    _, path = plain
    ex = onnxcam.Explainer(path)
    x = np.random.default_rng(7).normal(size=(2, 3, 16, 16)).astype(np.float32)
    lists = [[3, 7], [1, 2]]
    r = ex.explain(x, lists, eigen_smooth=True)
    assert ex.multi_target_session() is not None
    for k in range(2):
        one = ex.explain(x, [row[k] for row in lists], eigen_smooth=True)
        np.testing.assert_allclose(r.heatmaps[:, k], one.heatmaps, atol=1e-5)
