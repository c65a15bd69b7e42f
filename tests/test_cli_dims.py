"""`onnxcam explain` on 1-D (time series) and 3-D (volume) conv models: inputs as .npy, a curve / a sheet of slices
as output. The maps themselves are checked against Captum in tests/test_dims.py; here the CLI must draw exactly the
API's heatmap of the right sample, and refuse bad tensors with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from onnxcam import Explainer
from onnxcam.images import render
from onnxcam.cli import main

torch = pytest.importorskip("torch")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _convnet(tmp_path, dim: int, shape: tuple) -> str:
    torch.manual_seed(dim)
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
    pool = {1: torch.nn.AdaptiveAvgPool1d, 2: torch.nn.AdaptiveAvgPool2d, 3: torch.nn.AdaptiveAvgPool3d}[dim]
    net = torch.nn.Sequential(conv(shape[1], 8, 3, padding=1), torch.nn.ReLU(), conv(8, 16, 3, padding=1),
                              torch.nn.ReLU(), pool(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    path = tmp_path / f"conv{dim}d.onnx"
    torch.onnx.export(net, (torch.randn(*shape),), str(path), input_names=["x"], dynamic_axes={"x": {0: "N"}},
                      dynamo=False, opset_version=17)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dims")
    return {1: _convnet(root, 1, (1, 2, 60)), 2: _convnet(root, 2, (1, 3, 16, 16)),
            3: _convnet(root, 3, (1, 1, 6, 10, 10))}


def test_1d_signal_gives_a_curve_of_the_api_heatmap(models, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((2, 60)).astype(np.float32)
    np.save(tmp_path / "signal.npy", x)
    out = tmp_path / "signal.png"
    heats = Explainer(models[1]).explain(np.repeat(x[None], 5, axis=0), np.arange(5)).heatmaps
    target = int(np.argmax(heats.max(axis=1) > 0))  # a class whose map is not all zero (random weights)
    heat = heats[target]
    assert heat.shape == (60,) and heat.max() == pytest.approx(1)
    code, stdout, stderr = run_cli(capsys, "explain", models[1], tmp_path / "signal.npy", "-o", out, "--target",
                                   target, "--json")
    assert code == 0, stderr
    rec = json.loads(stdout)
    assert rec["target"] == target and rec["output"] == str(out)
    expected = render.curve(x, heat, title=f"signal.npy: gradcam for {target}")
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
    # The black map curve is highest (smallest y) above the heatmap's peak.
    drawn = np.asarray(expected).astype(int)
    black = np.argwhere((drawn.sum(axis=2) == 0))
    black = black[black[:, 0] >= 24 + 18]  # below the title line, inside the plot
    top_x = black[black[:, 0] == black[:, 0].min(), 1].mean()
    x0, x1 = 24, drawn.shape[1] - 24
    assert abs((top_x - x0) / (x1 - x0) * 59 - np.argmax(heat)) <= 2


def test_3d_volume_gives_one_tile_per_slice(models, tmp_path, capsys):
    v = np.random.default_rng(1).standard_normal((1, 1, 6, 10, 10)).astype(np.float32)  # batch of 1 is fine too
    np.save(tmp_path / "vol.npy", v)
    out = tmp_path / "vol.png"
    code, _, stderr = run_cli(capsys, "explain", models[3], tmp_path / "vol.npy", "-o", out)
    assert code == 0, stderr
    r = Explainer(models[3]).explain(v)
    expected = render.slices(v[0], r.heatmaps[0])
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
    assert r.heatmaps.shape == (1, 6, 10, 10)
    # 6 slices -> a 3x2 grid of 120x120 tiles (10 px scaled by 12) with 2 px gutters.
    assert expected.size == (3 * 122, 2 * 122)


def test_2d_model_accepts_a_preprocessed_tensor(models, tmp_path, capsys):
    x = np.random.default_rng(2).standard_normal((3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "t.npy", x)
    code, _, stderr = run_cli(capsys, "explain", models[2], tmp_path / "t.npy", "-o", tmp_path / "t.png")
    assert code == 0, stderr
    heat = Explainer(models[2]).explain(x[None]).heatmaps[0]
    expected = render.overlay(render.tensor_image(x), heat)
    with Image.open(tmp_path / "t.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(expected))


def test_bad_tensors_give_one_line(models, tmp_path, capsys):
    np.save(tmp_path / "rank.npy", np.zeros((3, 2, 60), np.float32))
    np.save(tmp_path / "chans.npy", np.zeros((3, 60), np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "text.npy", np.array([["a"] * 60] * 2))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cat = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(cat)
    cases = [
        ("rank.npy", "has shape (3, 2, 60); input 'x' takes one sample of rank 2"),
        ("chans.npy", "input 'x' has shape (1, 3, 60); the model expects (N, 2, 60)"),
        ("obj.npy", "cannot read"),
        ("text.npy", "holds <U1 values"),
        ("junk.npy", "cannot read"),
        ("cat.png", "input 'x' has rank 3, not an image: give each sample as a .npy file"),
    ]
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    for name, message in cases:
        code, stdout, stderr = run_cli(capsys, "explain", models[1], tmp_path / name, "-o", tmp_path / "o.png")
        assert code == 2, name
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxcam: error:") and message in lines[0], (name, stderr)
    code, _, stderr = run_cli(capsys, "explain", models[1], tmp_path / "chans.npy", cat, "-o", tmp_path / "o")
    assert code == 2 and "either images or .npy tensors" in stderr
    assert {p: p.read_bytes() for p in before} == before  # nothing given was touched
