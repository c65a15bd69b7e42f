"""`onnxcam explain --top-k-maps K` and repeated `--target`: one map per class per image from one forward
(issue #15), checked against Explainer.explain with one class per call on the same preprocessed images."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxcam
from onnxcam.images import preprocess, render
from tests.test_dataset_cli import LABELS, api, cli, model, photo  # noqa: F401 -- `model` is a fixture


def test_top_k_maps_writes_one_overlay_per_class_and_rank(model, tmp_path, capsys):  # noqa: F811
    files = [photo(tmp_path / "data" / f"im{i}.png", i) for i in range(3)]
    out, maps, results = tmp_path / "out", tmp_path / "maps.npz", tmp_path / "r.csv"
    code, stdout, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", out, "--top-k-maps", 3,
                               "--save-maps", maps, "--results", results, "--json")
    assert code == 0, stderr
    ex = onnxcam.Explainer(model)
    assert ex.multi_target_session() is not None, ex.multi_target_note  # the one-run path is what is checked
    r, pictures = api(model, files)
    order = np.argsort(-r.scores, axis=1, kind="stable")[:, :3]
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [(rec["name"], rec["k"]) for rec in lines] == [(f"im{i}.png", q) for i in range(3) for q in range(3)]
    rows = list(csv.DictReader(open(results)))
    saved = np.load(maps)
    for i in range(len(files)):
        for q in range(3):
            cls = int(order[i, q])
            single = onnxcam.Explainer(model).explain(
                preprocess.to_tensor(pictures[i], onnxcam.Explainer(model).preprocessing()), cls)
            rec = lines[3 * i + q]
            assert rec["target"] == cls and rec["target_label"] == LABELS[cls]
            assert rec["output"].endswith(f"im{i}_gradcam_top{q + 1}.png")
            np.testing.assert_allclose(rec["score"], r.scores[i, cls], rtol=1e-6)
            with Image.open(rec["output"]) as im:
                want = render.overlay(pictures[i], single.heatmaps[0])
                assert np.abs(np.asarray(im, np.int16) - np.asarray(want, np.int16)).max() <= 1
            assert rows[3 * i + q]["k"] == str(q) and rows[3 * i + q]["target"] == str(cls)
            np.testing.assert_allclose(saved[f"im{i}.png"][q], single.maps[0], rtol=1e-5, atol=1e-7)
    assert saved["im0.png"].shape[0] == 3


def test_repeated_target_takes_indices_and_labels(model, tmp_path, capsys):  # noqa: F811
    f = photo(tmp_path / "cat.png", 5)
    code, stdout, stderr = cli(capsys, "explain", model, f, "-o", tmp_path / "out", "--target", "1",
                               "--target", LABELS[3])
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat_gradcam_1.png", "cat_gradcam_3.png"]
    assert "gradcam for class 1 (one)" in stdout and "gradcam for class 3 (three)" in stdout


@pytest.mark.parametrize("args, message", [
    (["--top-k-maps", "2", "--target", "1"], "--top-k-maps and --target cannot be combined"),
    (["--target", "1", "--target", "0,2"], "not index tuples"),
    (["--top-k-maps", "2", "--panel"], "--panel explains one target per image"),
    (["--top-k-maps", "9"], "--top-k-maps 9: the model has 4 classes"),
    (["--target", "1", "--target", "nine"], "nine"),
])
def test_conflicts_are_one_line(model, tmp_path, capsys, args, message):  # noqa: F811
    f = photo(tmp_path / "cat.png", 5)
    code, stdout, stderr = cli(capsys, "explain", model, f, "-o", tmp_path / "out", *args)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr


def test_precision_flags_say_what_ran(tmp_path, capsys):
    """--precision int8 with --calibration: the note names the choice; the map's class is the fp32 one."""
    from tests.test_dataset_cli import cli as run_cli

    root = Path(__file__).resolve().parents[1] / "models"
    model, cat = root / "efficientnet_lite0.onnx", root / "cat.png"
    code, stdout, stderr = run_cli(capsys, "explain", model, cat, "-o", tmp_path / "a", "--top", "1",
                                   "--precision", "int8", "--calibration", root / "cat_and_cup.png")
    assert code == 0, stderr
    assert "onnxcam: precision: int8" in stderr and "class 285 (Egyptian cat)" in stdout
    code, _, stderr = run_cli(capsys, "explain", model, cat, "-o", tmp_path / "b", "--calibration", cat)
    assert code == 2 and "--calibration calibrates --precision int8" in stderr and stderr.count("\n") == 1
