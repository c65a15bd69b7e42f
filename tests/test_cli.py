"""The command line on the bundled demo: outputs, and one clear line for every kind of bad input."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxcam.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
CAT = ROOT / "models" / "cat.png"
CAT_CUP = ROOT / "models" / "cat_and_cup.png"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_writes_overlay_and_prints_top5(tmp_path, capsys):
    before = {p: digest(p) for p in (MODEL, CAT)}
    out = tmp_path / "cat.png"
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT, "-o", out)
    assert code == 0, stderr
    assert {p: digest(p) for p in (MODEL, CAT)} == before  # inputs untouched
    with Image.open(out) as im:
        assert im.size == Image.open(CAT).size and im.mode == "RGB"
    lines = stdout.strip().splitlines()
    assert "Egyptian cat" in lines[0] and len(lines) == 6
    assert lines[1].split()[1] == "Egyptian"


def test_explain_json_panel_and_named_target(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT, CAT_CUP, "-o", tmp_path / "res", "--panel",
                                   "--target", "coffee mug", "--json")
    assert code == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]  # JSON lines: one object per image
    assert [r["target"] for r in records] == [504, 504]
    assert records[0]["top"][0]["label"] == "Egyptian cat"
    assert abs(sum(np.exp([t["score"] for t in records[0]["top"]]))) > 0
    for r in records:
        assert Path(r["output"]).exists() and Path(r["output"]).parent == tmp_path / "res"
        with Image.open(r["output"]) as im:  # panel: photo and overlay side by side
            assert im.width > 2 * Image.open(r["image"]).width * im.height / Image.open(r["image"]).height * 0.9


def test_layers_and_ops(capsys):
    code, stdout, _ = run_cli(capsys, "layers", MODEL)
    assert code == 0
    marked = [line for line in stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "Clip" in marked[0] and "7x7" in marked[0]
    code, stdout, _ = run_cli(capsys, "ops")
    ops = stdout.split()
    assert code == 0 and {"Conv", "Relu", "Gemm", "MaxPool", "Softmax", "Concat"} <= set(ops)


def _bad_model(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"this is not a protobuf" * 10)
    return p


def _bad_image(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return p


@pytest.mark.parametrize("case, make_args, message", [
    ("missing model", lambda t: ["explain", t / "nope.onnx", CAT], "model not found"),
    ("corrupt model", lambda t: ["explain", _bad_model(t), CAT], "cannot read ONNX model"),
    ("missing image", lambda t: ["explain", MODEL, t / "nope.png"], "image not found"),
    ("corrupt image", lambda t: ["explain", MODEL, _bad_image(t), "-o", t / "o.png"], "cannot read image"),
    ("unknown layer", lambda t: ["explain", MODEL, CAT, "--layer", "no_such", "-o", t / "o.png"], "unknown layer"),
    ("target out of range", lambda t: ["explain", MODEL, CAT, "--target", "1000", "-o", t / "o.png"], "out of range"),
    ("unknown label", lambda t: ["explain", MODEL, CAT, "--target", "unicorn", "-o", t / "o.png"], "matches no class"),
    ("unknown method", lambda t: ["explain", MODEL, CAT, "--method", "magic", "-o", t / "o.png"], "unknown method"),
    ("unwritable output", lambda t: ["explain", MODEL, CAT, "-o", t / "missing_dir" / "o.png"], "does not exist"),
    ("output over input", lambda t: ["explain", MODEL, CAT, "-o", CAT], "overwrite an input"),
    ("bad size", lambda t: ["explain", MODEL, CAT, "--size", "abc", "-o", t / "o.png"], "--size"),
    ("conflicting size", lambda t: ["explain", MODEL, CAT, "--size", "300", "-o", t / "o.png"], "size"),
    ("model is a directory", lambda t: ["layers", t], "directory"),
    ("model output given as -o", lambda t: ["explain", MODEL, CAT, "--output", "logits"], "--output-name logits"),
    ("output inside a file", lambda t: ["explain", MODEL, CAT, "-o", CAT / "sub"], "not a directory"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, monkeypatch, case, make_args, message):
    before = digest(CAT)
    monkeypatch.chdir(tmp_path)  # the default output folder would go here: a failed run must not create it
    args = make_args(tmp_path)
    files_before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = run_cli(capsys, *args)
    assert sorted(tmp_path.rglob("*")) == files_before, f"{case}: a failed run left files behind"
    assert code != 0, case
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"{case}: {stderr!r}"
    assert lines[0].startswith("onnxcam: error:") and message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert digest(CAT) == before
    assert not (tmp_path / "o.png").exists()


def test_console_script_exit_status(tmp_path):
    exe = [sys.executable, "-m", "onnxcam"]
    ok = subprocess.run(exe + ["explain", str(MODEL), str(CAT), "-o", str(tmp_path / "x.png")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "x.png").exists(), ok.stderr
    bad = subprocess.run(exe + ["explain", str(MODEL), str(tmp_path / "absent.jpg")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    usage = subprocess.run(exe + ["explain"], capture_output=True, text=True, env={**os.environ})
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_methods_panel_and_smoothing(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT_CUP, "--panel", "--target", "504", "-o",
                                   tmp_path / "panel.png")
    assert code == 0, stderr
    with Image.open(tmp_path / "panel.png") as im, Image.open(CAT_CUP) as src:
        assert im.width >= 5 * src.width  # original | Grad-CAM | GB | Guided Grad-CAM | counterfactual
    code, _, stderr = run_cli(capsys, "explain", MODEL, CAT, "--method", "guided-backprop", "-o", tmp_path / "gb.png")
    assert code == 0, stderr
    gb = np.asarray(Image.open(tmp_path / "gb.png").convert("L"), np.float64)
    assert abs(gb.mean() - 127.5) < 10 and gb.std() > 5  # centred grey with structure
    layers_out = run_cli(capsys, "layers", MODEL)[1].splitlines()
    two = [line.split()[1] if line.startswith("*") else line.split()[0] for line in layers_out[-4:-2]]
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT, "--method", "layercam", "--aug-smooth",
                                   "--eigen-smooth", "--layer", two[0], "--layer", two[1], "--json",
                                   "-o", tmp_path / "multi.png")
    assert code == 0, stderr
    assert json.loads(stdout)["layers"] == two


def test_scorecam_runs_batched_with_bounded_batches(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT, "--method", "ablationcam", "--batch-size", "300",
                                   "-o", tmp_path / "abl.png")
    assert code == 0, stderr
    assert "ablationcam for class 285" in stdout
    code, _, stderr = run_cli(capsys, "explain", MODEL, CAT, "--method", "scorecam", "--counterfactual",
                              "-o", tmp_path / "x.png")
    assert code == 2 and "needs gradients" in stderr
