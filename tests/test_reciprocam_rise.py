"""ReciproCAM and RISE against direct implementations of the papers' definitions on the same weights.

ReciproCAM (Byun & Lee, arXiv 2209.14074): map_c(i, j) = softmax(head(A * onehot_ij))_c, with the head in numpy
from the torch weights. RISE (Petsiuk et al. 2018): S_c = sum_i softmax(f(I * M_i))_c M_i / (N p), with f the
torch model (another engine than onnxruntime) and the same masks; the masks themselves against torch's bilinear
upsampling. Tolerances: float32 engines; ReciproCAM 1e-6 absolute (its maps vary by ~1e-3 on these
nets), RISE 2e-6 relative to the map's scale.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import onnxcam
from onnxcam import OnnxcamError
from onnxcam.cam import perturb
from tests.test_multi_target import Net, export


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reciprocam_reference(net: Net, x: np.ndarray, classes) -> np.ndarray:
    """The paper's definition, position by position, in float64 numpy."""
    with torch.no_grad():
        t = net.trunk(torch.from_numpy(x))
        acts = net.layer(t).double().numpy()
        skip = t.amax((2, 3)).double().numpy()
    w, b = net.fc.weight.detach().double().numpy(), net.fc.bias.detach().double().numpy()
    out = []
    for s, cls in enumerate(classes):
        c, h, wd = acts[s].shape
        m = np.zeros((h, wd))
        for i in range(h):
            for j in range(wd):
                kept = np.zeros_like(acts[s])
                kept[:, i, j] = acts[s][:, i, j]
                feats = kept.mean((1, 2))
                if net.skip:
                    feats = np.concatenate([feats, skip[s]])
                m[i, j] = softmax(w @ feats + b)[cls]
        out.append(m)
    return np.array(out)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("recipro")
    plain, skip, view = Net(), Net(skip=True), Net(view=True)
    with torch.no_grad():
        for net in (plain, skip, view):
            net.fc.weight.mul_(6.0)  # peaked probabilities: the maps vary far beyond float32 noise
    return {"plain": (plain, export(plain, folder / "plain.onnx")),
            "skip": (skip, export(skip, folder / "skip.onnx")),
            "view": (view, export(view, folder / "view.onnx")),
            "one": (plain, export(plain, folder / "one.onnx", batch_dynamic=False))}


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("which", ["plain", "skip", "view"])
def test_reciprocam_equals_the_papers_definition(nets, which):
    net, path = nets[which]
    x = images(3)
    ex = onnxcam.Explainer(path, method="reciprocam", batch_size=5)  # 64 positions: several runs of the head
    auto = ex.explain(x)
    with torch.no_grad():
        top = net(torch.from_numpy(x)).argmax(1).numpy()
    np.testing.assert_array_equal(auto.targets, top)
    ref = reciprocam_reference(net, x, top)
    assert auto.maps.shape == ref.shape == (3, 8, 8)
    # One position of 64 moves the pooled features a little: the maps vary by ~1e-3, far above float32 noise.
    assert np.ptp(ref, axis=(1, 2)).min() > 5e-4
    np.testing.assert_allclose(auto.maps, ref, atol=1e-6)
    given = ex.explain(x, [4, 0, 9])
    np.testing.assert_allclose(given.maps, reciprocam_reference(net, x, [4, 0, 9]), atol=1e-6)
    # the heatmap is the map's min-max scaling, upsampled (the paper's normalisation)
    lo, hi = ref.min((1, 2), keepdims=True), ref.max((1, 2), keepdims=True)
    up = F.interpolate(torch.from_numpy((ref - lo) / (hi - lo))[:, None], size=(16, 16), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(auto.heatmaps, (up - up.min((1, 2), keepdims=True))
                               / np.ptp(up, axis=(1, 2), keepdims=True), atol=1e-4)
    assert ex.perturbation_count(3) == 3 * 64
    # `view(x.size(0), -1)` reads only the input's batch size: the head takes it from the activations, so the
    # perturbed runs are not fed a copy of the image per position; a skip connection still needs the image.
    head_inputs = {i.name for i in ex._head_session(0).get_inputs()}
    assert ("x" in head_inputs) == (which == "skip")


def test_reciprocam_on_a_one_sample_graph(nets):
    net, path = nets["one"]
    x = images(2, seed=1)
    r = onnxcam.Explainer(path, method="reciprocam").explain(x, [1, 2])
    np.testing.assert_allclose(r.maps, reciprocam_reference(net, x, [1, 2]), atol=1e-6)


def test_rise_masks_are_the_papers(nets):
    options = perturb.RiseOptions(masks=6, cells=4, p=0.5, seed=5)
    masks = perturb.rise_masks(np.random.default_rng(5), 6, (16, 16), options)
    # the same draws, upsampled by torch: a 4x4 grid to 5 cells of 4 pixels, cropped at the drawn shift
    rng = np.random.default_rng(5)
    for m in masks:
        grid = rng.random((4, 4)) < 0.5
        dy, dx = rng.integers(0, 4), rng.integers(0, 4)
        up = F.interpolate(torch.tensor(grid, dtype=torch.float64)[None, None], size=(20, 20), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(m, up[dy:dy + 16, dx:dx + 16], atol=1e-6)
    assert 0 <= masks.min() and masks.max() <= 1
    # drawn one by one: the first masks do not depend on how many are drawn
    np.testing.assert_array_equal(perturb.rise_masks(np.random.default_rng(5), 2, (16, 16), options), masks[:2])


def test_rise_equals_its_definition_on_torch(nets):
    net, path = nets["plain"]
    x = images(2, seed=2)
    options = perturb.RiseOptions(masks=300, cells=4, p=0.4, seed=11)
    r = onnxcam.Explainer(path, method="rise", rise=options, batch_size=64).explain(x, [3, 6])
    masks = perturb.rise_masks(np.random.default_rng(11), 300, (16, 16), options)
    with torch.no_grad():
        ref = []
        for s, cls in enumerate([3, 6]):
            probs = torch.softmax(net(torch.from_numpy(x[s:s + 1] * masks[:, None])), 1)[:, cls].double().numpy()
            ref.append(np.tensordot(probs, masks, axes=1) / (300 * 0.4))
    ref = np.array(ref)
    assert r.maps.shape == (2, 16, 16) and r.layer == "x"
    assert np.ptp(ref) > 0.02
    np.testing.assert_allclose(r.maps, ref, atol=2e-6 * ref.max())
    # another batch size draws the same masks: the same map
    again = onnxcam.Explainer(path, method="rise", rise={"masks": 300, "cells": 4, "p": 0.4, "seed": 11},
                              batch_size=7).explain(x, [3, 6])
    np.testing.assert_allclose(again.maps, r.maps, atol=1e-6)


def test_rise_needs_no_gradient_rule(tmp_path):
    """A model with an op that has no gradient rule: gradient methods name it and suggest RISE, which runs."""
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            a = torch.relu(self.conv(x))
            return self.fc(torch.atan(a).mean((2, 3)))  # Atan: no gradient rule

    path = tmp_path / "odd.onnx"
    torch.onnx.export(Odd().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                      dynamo=False)
    import onnx
    relu = next(n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu")
    with pytest.raises(OnnxcamError, match="no gradient rule for op 'Atan'.*--method rise"):
        onnxcam.Explainer(str(path), layer=relu)
    r = onnxcam.Explainer(str(path), method="rise", rise={"masks": 50}).explain(images(1))
    assert r.maps.shape == (1, 16, 16) and np.isfinite(r.maps).all() and np.ptp(r.maps) > 0


def test_refusals(nets):
    _, path = nets["plain"]
    with pytest.raises(OnnxcamError, match="takes no layer"):
        onnxcam.Explainer(path, method="rise", layer="anything")
    with pytest.raises(OnnxcamError, match="RISE options given"):
        onnxcam.Explainer(path, method="gradcam", rise={"masks": 5})
    with pytest.raises(OnnxcamError, match="masks >= 1"):
        onnxcam.Explainer(path, method="rise", rise={"masks": 0})
    with pytest.raises(OnnxcamError, match="channels apply"):
        onnxcam.Explainer(path, method="reciprocam").explain(images(1), channels=[0])
    with pytest.raises(OnnxcamError, match="counterfactual"):
        onnxcam.Explainer(path, method="reciprocam").explain(images(1), counterfactual=True)


def test_cli(nets, tmp_path, capsys):
    from onnxcam.cli import main

    net, path = nets["plain"]
    x = images(1, seed=4)
    np.save(tmp_path / "x.npy", x)
    code = main(["explain", path, str(tmp_path / "x.npy"), "--method", "reciprocam", "--target", "2",
                 "--no-overlay", "--save-maps", str(tmp_path / "r.npz")])
    err = capsys.readouterr().err
    assert code == 0, err
    saved = np.load(tmp_path / "r.npz")
    np.testing.assert_allclose(saved[saved.files[0]], reciprocam_reference(net, x, [2])[0], atol=1e-6)
    code = main(["explain", path, str(tmp_path / "x.npy"), "--method", "rise", "--rise-masks", "40",
                 "--rise-cells", "4", "--target", "2", "--no-overlay", "--save-maps", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert code == 0, err
    saved = np.load(tmp_path / "s.npz")
    api = onnxcam.Explainer(path, method="rise", rise={"masks": 40, "cells": 4}).explain(x, 2)
    np.testing.assert_allclose(saved[saved.files[0]], api.maps[0], atol=1e-6)
    code = main(["explain", path, str(tmp_path / "x.npy"), "--rise-masks", "40"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--method rise" in err
