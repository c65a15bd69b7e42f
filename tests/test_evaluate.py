"""`onnxcam evaluate` on a tiny generated folder: the three annotation formats, CSV/JSON output, the summary
table, and one clear line with exit status 2 for bad input. Model: the committed synthetic CNN."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxcam import evaluate as ev
from onnxcam.cli import main
from onnxcam.errors import OnnxcamError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "synthetic" / "shapes_cnn.onnx"
LABELS = ["striped", "checkered", "dotted", "grid"]


def _make_synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "tools" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four synthetic images with masks and annotations.json (one label given by name)."""
    ms = _make_synthetic()
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(7)
    ann = {}
    for i in range(4):
        img, mask, label, box = ms.make_sample(rng)
        Image.fromarray(img).save(d / f"im{i}.png")
        Image.fromarray(mask).convert("1").save(d / f"im{i}_mask.png")
        ann[f"im{i}.png"] = {"label": LABELS[label] if i == 0 else label, "boxes": [box], "mask": f"im{i}_mask.png"}
    (d / "annotations.json").write_text(json.dumps(ann))
    return d


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_and_summary(folder, tmp_path, capsys):
    out = tmp_path / "res.json"
    code, stdout, stderr = run_cli(capsys, "evaluate", MODEL, folder, "--method", "gradcam", "--method", "random",
                                   "--method", "center", "--metrics", "localization,pointing",
                                   "--metrics", "deletion,insertion,drop", "--steps", "5", "-o", out)
    assert code == 0, stderr
    assert "evaluating" in stderr  # the progress bar, on stderr
    doc = json.loads(out.read_text())
    assert doc["methods"] == ["gradcam", "random", "center"] and len(doc["results"]) == 12
    first = doc["results"][0]
    ann = json.loads((folder / "annotations.json").read_text())
    assert first["image"] == "im0.png" and first["label"] == LABELS.index(ann["im0.png"]["label"])
    for r in doc["results"]:
        assert 0 <= r["iou"] <= 1 and r["pointing_hit"] in (0, 1) and r["top1_loc_error"] in (0, 1)
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1 and 0 <= r["drop"] <= 100
        assert "road" not in r and "faithfulness" not in r
    s = doc["summary"]["gradcam"]
    assert s["images"] == 4 and 0 <= s["pointing"] <= 100 and "road" not in s
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["method", "n", "point%", "locerr1%"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["gradcam", "random", "center"]
    assert any(ln.startswith("classification: top-1") for ln in lines) and lines[-1] == f"wrote {out}"


def test_csv_data_and_output_with_every_metric(folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    ann = json.loads((folder / "annotations.json").read_text())
    rows = ["image,label,x0,y0,x1,y1"]
    for name in ("im1.png", "im2.png"):
        (data / name).write_bytes((folder / name).read_bytes())
        rows.append(",".join([name, str(ann[name]["label"])] + [str(v) for v in ann[name]["boxes"][0]]))
    (data / "boxes.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "res.csv"
    code, stdout, stderr = run_cli(capsys, "evaluate", MODEL, data, "-o", out, "--steps", "4",
                                   "--road-percentiles", "30,70", "--batch-size", "8")
    assert code == 0, stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["im1.png", "im2.png"] and {r["method"] for r in rows} == {"gradcam"}
    for r in rows:
        for key in ("iou", "pointing_hit", "deletion_auc", "insertion_auc", "drop", "increase", "road",
                    "road_morf", "road_lerf", "faithfulness"):
            assert r[key] != "", key
        assert -1 <= float(r["faithfulness"]) <= 1 and -1 <= float(r["road"]) <= 1
    assert "ROAD" in stdout and "faith" in stdout


def test_folder_without_annotations_and_pascal_voc(folder, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(2):
        (plain / f"im{i}.png").write_bytes((folder / f"im{i}.png").read_bytes())
        (plain / f"im{i}_mask.png").write_bytes((folder / f"im{i}_mask.png").read_bytes())  # not a sample
    samples = ev.load_dataset(plain)
    assert [s.name for s in samples] == ["im0.png", "im1.png"] and not any(s.annotated for s in samples)
    result = ev.Evaluator(MODEL, ["center"], metrics=["pointing", "drop"]).run(samples)
    assert all("pointing_hit" not in r and "drop" in r for r in result.records)

    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "a.png").write_bytes((folder / "im0.png").read_bytes())
    (voc / "a.xml").write_text(
        "<annotation><filename>a.png</filename>"
        "<object><name>dotted</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>40</xmax><ymax>50</ymax></bndbox></object>"
        "<object><name>grid</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        "<object><name>dotted</name><bndbox><xmin>61</xmin><ymin>61</ymin><xmax>70</xmax><ymax>80</ymax></bndbox></object>"
        "</annotation>")
    samples = ev.load_dataset(voc, LABELS)
    assert [(s.label, s.boxes) for s in samples] == [(2, [(10, 20, 40, 50), (60, 60, 70, 80)]), (3, [(0, 0, 10, 10)])]
    with pytest.raises(OnnxcamError, match="'dog' is not one of the model's labels"):
        (voc / "a.xml").write_text("<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                                   "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
        ev.load_dataset(voc, LABELS)


def _bad_json(d: Path, text: str) -> Path:
    d.mkdir()
    Image.new("RGB", (128, 128)).save(d / "x.png")
    (d / "annotations.json").write_text(text)
    return d


@pytest.mark.parametrize("case, message", [
    ("missing data", "data not found"),
    ("unknown metric", "unknown metric 'iou'"),
    ("unknown method", "unknown method 'gradcom'"),
    ("bad json", "is not valid JSON"),
    ("empty box", "is empty"),
    ("label out of range", "label 7 is out of range for 4 classes"),
    ("bad output", "must end in .csv or .json"),
    ("mask size", "mask"),
    ("missing image", "image not found"),
])
def test_bad_input_is_one_line_exit_2(case, message, tmp_path, capsys, folder):
    args = ["evaluate", MODEL, folder, "--metrics", "localization"]
    if case == "missing data":
        args[2] = tmp_path / "nope"
    elif case == "unknown metric":
        args[4] = "localization,iou"
    elif case == "unknown method":
        args += ["--method", "gradcom"]
    elif case == "bad json":
        args[2] = _bad_json(tmp_path / "d", "{not json")
    elif case == "empty box":
        args[2] = _bad_json(tmp_path / "d", '{"x.png": {"label": 1, "boxes": [[10, 10, 5, 20]]}}')
    elif case == "label out of range":
        args[2] = _bad_json(tmp_path / "d", '{"x.png": {"label": 7, "boxes": [[0, 0, 5, 5]]}}')
    elif case == "bad output":
        args += ["-o", tmp_path / "res.txt"]
    elif case == "mask size":
        d = _bad_json(tmp_path / "d", '{"x.png": {"label": 1, "mask": "m.png"}}')
        Image.new("L", (10, 10), 255).save(d / "m.png")
        args[2] = d
    elif case == "missing image":
        args[2] = _bad_json(tmp_path / "d", '{"y.png": {"label": 1}}')
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2, (stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("evaluating")]
    assert len(lines) == 1 and lines[0].startswith("onnxcam: error: ") and message in lines[0], stderr


def test_nhwc_model_scores_like_its_nchw_twin(folder, tmp_path):
    """The same network behind an input Transpose, fed NHWC: identical per-image results."""
    import onnx
    from onnx import helper

    m = onnx.load(str(MODEL))
    old = m.graph.input[0]
    old_name = old.name
    nhwc = helper.make_tensor_value_info("image_nhwc", onnx.TensorProto.FLOAT, ["N", 128, 128, 3])
    m.graph.node.insert(0, helper.make_node("Transpose", ["image_nhwc"], [old_name], perm=[0, 3, 1, 2]))
    del m.graph.input[:]
    m.graph.input.append(nhwc)
    for p in m.metadata_props:
        if p.key == "onnxcam.preprocess":
            meta = json.loads(p.value)
            meta["layout"] = "NHWC"
            p.value = json.dumps(meta)
    path = tmp_path / "nhwc.onnx"
    onnx.save(m, str(path))
    samples = ev.load_dataset(folder, LABELS)[:2]
    kw = dict(metrics=["localization", "pointing", "deletion", "drop"], steps=4)
    a = ev.Evaluator(MODEL, ["gradcam", "random"], **kw).run(samples).records
    b = ev.Evaluator(path, ["gradcam", "random"], **kw).run(samples).records
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("iou", "pointing_hit", "top1_loc_error", "target", "predicted"):
            assert ra[key] == rb[key], key
        for key in ("deletion_auc", "drop"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), key


PROGRESS = r"onnxcam: evaluate: (\d+)/(\d+) (images|\(image, method\) pairs) \((\d+\.\d) s(?:, ETA (\d+) s)?\)"


def test_progress_lines_when_stderr_is_not_a_terminal(folder, capsys):
    import re

    code, _, stderr = run_cli(capsys, "evaluate", MODEL, folder, "--metrics", "deletion", "--steps", "2")
    assert code == 0, stderr
    found = [re.fullmatch(PROGRESS, ln) for ln in stderr.splitlines() if ln.startswith("onnxcam: evaluate:")]
    assert found and all(found), stderr
    # 4 images, one method: every image is a further 10%, so one line each; the last has no ETA
    assert [(int(m[1]), int(m[2]), m[3]) for m in found] == [(i, 4, "images") for i in range(1, 5)]
    assert all(m[5] is not None for m in found[:-1]) and found[-1][5] is None
    assert [float(m[4]) for m in found] == sorted(float(m[4]) for m in found)
    code, _, stderr = run_cli(capsys, "evaluate", MODEL, folder, "--metrics", "drop", "--method", "gradcam",
                              "--method", "center")
    counts = [re.fullmatch(PROGRESS, ln) for ln in stderr.splitlines() if ln.startswith("onnxcam: evaluate:")]
    assert code == 0 and [(int(m[1]), int(m[2]), m[3]) for m in counts] == [(i, 8, "(image, method) pairs")
                                                                           for i in range(1, 9)]


def test_progress_bar_and_no_lines_on_a_terminal(folder, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, stderr = run_cli(capsys, "evaluate", MODEL, folder, "--metrics", "drop")
    assert code == 0, stderr
    assert "evaluating on" in stderr and "\r" in stderr and "100%" in stderr  # click's bar, redrawn in place
    assert "onnxcam: evaluate:" not in stderr


def test_progress_lines_every_tenth_or_every_interval():
    import io

    now = [0.0]
    out = io.StringIO()
    lines = ev.ProgressLines(1000, out, every=30.0, clock=lambda: now[0])
    for _ in range(1000):
        now[0] += 0.5  # 10% = 100 ticks = 50 s: the 30 s interval comes first
        lines(1)
    got = out.getvalue().splitlines()
    assert got[0] == "onnxcam: evaluate: 60/1000 images (30.0 s, ETA 470 s)"
    assert got[1] == "onnxcam: evaluate: 100/1000 images (50.0 s, ETA 450 s)"  # the 10% mark
    assert got[2] == "onnxcam: evaluate: 160/1000 images (80.0 s, ETA 420 s)"
    assert got[-1] == "onnxcam: evaluate: 1000/1000 images (500.0 s)"
    # every 10% mark, and one line 30 s after each mark (60 ticks later) before the next mark comes
    assert [int(ln.split()[2].split("/")[0]) for ln in got] == sorted([*range(60, 1000, 100), *range(100, 1001, 100)])
    fast = io.StringIO()
    lines = ev.ProgressLines(1000, fast, clock=lambda: 0.0)
    for _ in range(1000):
        lines(1)
    assert [int(ln.split()[2].split("/")[0]) for ln in fast.getvalue().splitlines()] == list(range(100, 1001, 100))


# ----------------------------------------------------------------------------- verdicts against the controls


def test_verdict_lines_for_a_fixed_evaluation(folder, tmp_path, capsys):
    out = tmp_path / "res.json"
    code, stdout, stderr = run_cli(capsys, "evaluate", MODEL, folder, "--method", "gradcam", "--method", "eigencam",
                                   "--controls", "--metrics", "pointing,deletion,insertion,drop", "--steps", "4",
                                   "-o", out)
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["methods"] == ["gradcam", "eigencam", "random", "center"]
    s = doc["summary"]
    # the rule, restated: strictly better than both controls' means; the direction per metric
    keys = [("pointing", "point%", 1, "{:.1f}"), ("deletion_auc", "del", -1, "{:.3f}"),
            ("insertion_auc", "ins", 1, "{:.3f}"), ("average_drop", "drop%", -1, "{:.1f}"),
            ("increase_in_confidence", "incr%", 1, "{:.1f}")]
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("gradcam:", "eigencam:"))]
    assert doc["verdicts"] == lines and len(lines) == 2
    for method, line in zip(("gradcam", "eigencam"), lines):
        wins = [k for k, _, sign, _ in keys
                if all(sign * s[method][k] > sign * s[c][k] for c in ("random", "center"))]
        k, title, _, fmt = keys[0]
        quote = f"{title} {fmt.format(s[method][k])} vs random {fmt.format(s['random'][k])} / " \
                f"center {fmt.format(s['center'][k])}"
        assert line.startswith(f"{method}: beats both controls on {len(wins)} of 5 metrics ({quote})")
        lost = [title for k, title, _, _ in keys if k not in wins]
        assert ("; not on " in line) == bool(lost)
        for title in lost:
            assert f"{title} " in line.split("; not on ", 1)[1]


def test_verdict_needs_controls_and_names_a_missing_one():
    base = {"images": 3, "pointing": 90.0, "deletion_auc": 0.2, "insertion_auc": 0.8}
    assert ev.verdicts({"gradcam": base}) == [
        "verdict: no control was run, so no verdict (add --controls, or --method random --method center)"]
    summary = {"gradcam": base, "center": {"images": 3, "pointing": 90.0, "deletion_auc": 0.3, "insertion_auc": 0.9}}
    assert ev.verdicts(summary) == [
        "gradcam: beats the center control (random not run) on 1 of 3 metrics (point% 90.0 vs center 90.0); "
        "not on point% 90.0 vs center 90.0, ins 0.800 vs center 0.900"]
    assert ev.verdicts({"random": base, "center": base}) == []


def test_cli_says_when_no_control_ran(folder, capsys):
    code, stdout, stderr = run_cli(capsys, "evaluate", MODEL, folder, "--metrics", "pointing")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1].startswith("verdict: no control was run")
