"""`onnxcam explain` on whole datasets (issue #15): folders and globs, mirrored outputs, skipped files, maps and
results files, JSON lines, bounded decoding. Every number is checked against Explainer.explain on the same
preprocessed images; the model is a tiny Conv-Relu-Conv-Relu-GAP-Gemm classifier made here."""
from __future__ import annotations

import csv
import io
import json
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnxcam
from onnxcam.cli import dataset, main
from onnxcam.images import preprocess, render

LABELS = ["zero", "one", "two", "three"]
LAYER = "r2"


def tiny_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((6, 3, 3, 3)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((8, 6, 3, 3)) * 0.4).astype(np.float32)
    w3 = rng.standard_normal((4, 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], [LAYER]),
             helper.make_node("GlobalAveragePool", [LAYER], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W3"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                                       numpy_helper.from_array(w3, "W3")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    for key, value in ((preprocess.LABELS_KEY, json.dumps(LABELS)),
                       (preprocess.PREPROCESS_KEY, json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3}))):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx"))


def photo(path: Path, seed: int, size=(24, 20)) -> Path:
    """A small picture with structure (a bright blob somewhere), as PNG or JPEG by the name."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)[..., None] * rng.uniform(100, 255, 3)
    pixels = np.clip(blob + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def tree(root: Path) -> dict[str, Path]:
    """name below root -> file: same-named files in different folders, a .jpg and a .png of one stem, a hidden file
    and a text file (neither is an image of the run)."""
    files = {name: photo(root / name, i) for i, name in enumerate(
        ["a/cat.png", "b/cat.png", "a/deep/er/dog.jpg", "cat.jpg", "cat.png", "C/UPPER.PNG"])}
    (root / ".hidden.png").write_bytes((root / "a" / "cat.png").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return files


WALK_ORDER = ["cat.jpg", "cat.png", "C/UPPER.PNG", "a/cat.png", "a/deep/er/dog.jpg", "b/cat.png"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def api(model, files, **kwargs):
    """Explainer.explain on the same preprocessed images, one batch: (Explanation, pictures)."""
    ex = onnxcam.Explainer(model, **kwargs)
    pp = ex.preprocessing()
    pictures = [preprocess.load_image(str(f)) for f in files]
    return ex.explain(np.concatenate([preprocess.to_tensor(p, pp) for p in pictures])), pictures


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_folder_tree_is_mirrored_below_the_output(model, tmp_path, capsys):
    files = tree(tmp_path / "data")
    before = {p: p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", out, "--batch-size", 4)
    assert code == 0, stderr
    assert stderr == ""  # a run this short shows no progress
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # cat.jpg and cat.png share a stem: the second (in sorted order) gets _2, as files given directly always did
    assert written == ["C/UPPER_gradcam.png", "a/cat_gradcam.png", "a/deep/er/dog_gradcam.png", "b/cat_gradcam.png",
                       "cat_2_gradcam.png", "cat_gradcam.png"]
    assert {p: p.read_bytes() for p in before} == before  # the inputs are untouched
    order = WALK_ORDER  # a folder's own files first, then its subfolders, each sorted
    outputs = ["cat_gradcam.png", "cat_2_gradcam.png", "C/UPPER_gradcam.png", "a/cat_gradcam.png",
               "a/deep/er/dog_gradcam.png", "b/cat_gradcam.png"]
    r, pictures = api(model, [files[n] for n in order])
    for i, (name, written_name) in enumerate(zip(order, outputs)):
        want = render.overlay(pictures[i], r.heatmaps[i])
        with Image.open(out / written_name) as im:
            assert im.format == "PNG"
            np.testing.assert_array_equal(np.asarray(im), np.asarray(want), err_msg=name)
        assert f"{files[name]}: gradcam for class {int(r.targets[i])} ({LABELS[int(r.targets[i])]})" in stdout


def test_glob_and_several_folder_arguments(model, tmp_path, capsys):
    files = tree(tmp_path / "data")
    photo(tmp_path / "more" / "cat.png", 99)
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, "explain", model, str(tmp_path / "data" / "**" / "*.png"), "-o", out, "--json")
    assert code == 0, stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    # recursive, the tree below the glob's fixed part; the .jpg files do not match, nor (a glob is case-sensitive,
    # as the shell's) UPPER.PNG
    assert written == ["a/cat_gradcam.png", "b/cat_gradcam.png", "cat_gradcam.png"]
    assert not (out / "a" / "deep").exists()
    # two folders holding a cat.png: the second one's outputs and keys get _2 instead of overwriting the first
    out2 = tmp_path / "out2"
    code, stdout, stderr = cli(capsys, "explain", model, tmp_path / "data" / "a", tmp_path / "more", "-o", out2,
                               "--json", "--save-maps", tmp_path / "m.npz")
    assert code == 0, stderr
    names = [json.loads(line)["name"] for line in stdout.splitlines()]
    assert names == ["cat.png", "deep/er/dog.jpg", "cat_2.png"]
    assert sorted(p.relative_to(out2).as_posix() for p in out2.rglob("*.png")) == [
        "cat_2_gradcam.png", "cat_gradcam.png", "deep/er/dog_gradcam.png"]
    with np.load(tmp_path / "m.npz") as z:
        assert sorted(z.files) == ["cat.png", "cat_2.png", "deep/er/dog.jpg"]
    assert files["a/cat.png"].exists()


@pytest.mark.parametrize("case", ["empty folder", "glob matches nothing", "folder of text"])
def test_nothing_to_explain_is_one_line(model, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    arg = {"empty folder": tmp_path / "empty", "glob matches nothing": str(tmp_path / "**" / "*.jpg"),
           "folder of text": tmp_path / "text"}[case]
    code, stdout, stderr = cli(capsys, "explain", model, arg)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("onnxcam: error: ") and "no images" in stderr, stderr
    assert not (tmp_path / "onnxcam-out").exists()


def test_a_corrupt_file_is_skipped_and_the_run_goes_on(model, tmp_path, capsys):
    good = [photo(tmp_path / "data" / f"{i}.png", i) for i in range(5)]
    bad = tmp_path / "data" / "2b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20)
    truncated = tmp_path / "data" / "sub" / "t.png"
    truncated.parent.mkdir()
    truncated.write_bytes(good[0].read_bytes()[:60])
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", out, "--batch-size", 2,
                               "--results", tmp_path / "r.csv")
    assert code == 1
    lines = stderr.splitlines()
    assert lines == [f"onnxcam: skipped {bad}: cannot read image: not a supported image",
                     f"onnxcam: skipped {truncated}: cannot read image: not a supported image",
                     "onnxcam: skipped 2 of 7 images (named above); the other 5 were explained"], stderr
    assert sorted(p.name for p in out.rglob("*.png")) == [f"{i}_gradcam.png" for i in range(5)]
    with open(tmp_path / "r.csv") as fh:
        assert [row["path"] for row in csv.DictReader(fh)] == [str(g) for g in good]
    assert "Traceback" not in stderr and stdout.count(": gradcam for class") == 5


def test_every_file_unreadable_is_an_error(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.jpg"):
        (tmp_path / "data" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"junk")
    code, _, stderr = cli(capsys, "explain", model, tmp_path / "data")
    assert code == 2
    assert stderr.splitlines()[-1].startswith("onnxcam: error: none of the 2 images could be read")
    assert not (tmp_path / "onnxcam-out").exists()


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_results_rows_equal_the_api(model, tmp_path, capsys, kind):
    files = [photo(tmp_path / "data" / f"p{i}.png", 10 + i) for i in range(7)]
    results = tmp_path / f"r.{kind}"
    code, _, stderr = cli(capsys, "explain", model, tmp_path / "data", "--no-overlay", "--results", results,
                          "--batch-size", 3)
    assert code == 0, stderr
    if kind == "csv":
        with open(results, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == list(dataset.RESULT_FIELDS)
    else:
        rows = [json.loads(line) for line in results.read_text().splitlines()]
    r, _ = api(model, files)
    assert [row["path"] for row in rows] == [str(f) for f in files]
    for i, row in enumerate(rows):
        t = int(r.targets[i])
        assert int(row["target"]) == t and row["label"] == LABELS[t]
        assert float(row["score"]) == pytest.approx(float(r.scores[i, t]), rel=1e-5, abs=1e-6)
        assert float(row["probability"]) == pytest.approx(float(softmax(r.scores[i].astype(np.float64))[t]),
                                                          rel=1e-5)
        assert row["layer"] == LAYER and row["method"] == "gradcam"


@pytest.mark.parametrize("size, dtype", [("layer", "float32"), ("input", "float32"), ("input", "float16")])
def test_saved_maps_equal_the_api(model, tmp_path, capsys, monkeypatch, size, dtype):
    monkeypatch.chdir(tmp_path)
    files = tree(tmp_path / "data")
    names = WALK_ORDER
    r, _ = api(model, [files[n] for n in names])
    want = {n: (r.maps if size == "layer" else r.heatmaps)[i] for i, n in enumerate(names)}
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == "float16" else dict(rtol=1e-5, atol=1e-6)
    for target in ("maps.npz", "maps_dir"):
        code, _, stderr = cli(capsys, "explain", model, tmp_path / "data", "--no-overlay", "--save-maps", target,
                              "--maps-size", size, "--maps-dtype", dtype, "--batch-size", 4)
        assert code == 0, stderr
        if target.endswith(".npz"):
            with np.load(target) as z:
                got = {k: z[k] for k in z.files}
        else:
            got = {p.relative_to(tmp_path / target).as_posix()[:-4]: np.load(p)
                   for p in (tmp_path / target).rglob("*.npy")}
        assert sorted(got) == sorted(names)
        for n in names:
            assert got[n].dtype == np.dtype(dtype) and got[n].shape == want[n].shape
            np.testing.assert_allclose(got[n].astype(np.float32), want[n], **tol, err_msg=n)
        expected_shape = (8, 8) if size == "layer" else (16, 16)
        assert got[names[0]].shape == expected_shape
    assert not (tmp_path / "onnxcam-out").exists()  # --no-overlay: no picture, no folder


@pytest.mark.parametrize("fmt, pil_format", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_overlay_format_of_a_folder(model, tmp_path, capsys, fmt, pil_format):
    tree(tmp_path / "data")
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", out, "--format", fmt)
    assert code == 0, stderr
    written = sorted(out.rglob("*.*"))
    assert len(written) == 6 and all(p.suffix == "." + fmt for p in written)
    for p in written:
        with Image.open(p) as im:
            assert im.format == pil_format


def test_option_conflicts_are_one_line(model, tmp_path, capsys):
    tree(tmp_path / "data")
    one = tmp_path / "data" / "cat.png"
    cases = [
        (["-o", tmp_path / "x.jpg", "--format", "png", one], "disagree"),
        (["-o", tmp_path / "x.png", tmp_path / "data"], "names one file but"),
        (["--no-overlay", "-o", tmp_path / "o", one], "--no-overlay writes none"),
        (["--no-overlay", "--panel", one], "--no-overlay writes none"),
        (["--save-maps", tmp_path / "m.h5", one], ".npz file or a folder"),
        (["--results", tmp_path / "r.txt", one], ".jsonl or .csv"),
        (["--labels", tmp_path / "labels.csv", "--results", tmp_path / "labels.csv", one], "would overwrite"),
    ]
    (tmp_path / "labels.csv").write_text("\n".join(LABELS))
    for args, message in cases:
        code, _, stderr = cli(capsys, "explain", model, *args)
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, (args, stderr)


def test_json_lines_have_the_same_keys_for_every_image(model, tmp_path, capsys):
    tree(tmp_path / "data")
    code, stdout, stderr = cli(capsys, "explain", model, tmp_path / "data", "--no-overlay", "--json", "--top", "2")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("{") and "\n" not in line for line in lines)
    records = [json.loads(line) for line in lines]
    keys = list(records[0])
    assert all(list(r) == keys for r in records)
    assert {"image", "name", "output", "target", "target_label", "target_score", "score", "probability", "top",
            "warnings", "note", "layers", "method", "provider"} <= set(keys)
    assert all(r["output"] is None and len(r["top"]) == 2 and r["target_score"] is None for r in records)
    assert records[0]["score"] == records[0]["top"][0]["score"]


def test_panel_and_counterfactual_per_batch(model, tmp_path, capsys):
    files = [photo(tmp_path / "data" / f"{i}.png", 30 + i) for i in range(3)]
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", out, "--panel", "--batch-size", 2,
                          "--layer", LAYER)
    assert code == 0, stderr
    for f in files:
        with Image.open(out / f"{f.stem}_panel.png") as im:
            assert im.width > 5 * 24
    code, _, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", out, "--counterfactual",
                          "--batch-size", 2, "--save-maps", tmp_path / "cf.npz", "--maps-size", "input")
    assert code == 0, stderr
    ex = onnxcam.Explainer(model)
    with np.load(tmp_path / "cf.npz") as z:
        for f in files:
            want = ex.explain_image(str(f), counterfactual=True).heatmaps[0]
            np.testing.assert_allclose(z[f.name], want, rtol=1e-5, atol=1e-6)
            assert (out / f"{f.stem}_counterfactual.png").exists()


def test_decoding_is_bounded_by_the_batch_not_the_dataset(model, tmp_path, capsys, monkeypatch):
    n, batch = 60, 2
    for i in range(n):
        photo(tmp_path / "data" / f"{i:03d}.png", i, size=(18, 18))
    alive, peak, lock = [0], [0], threading.Lock()
    real = preprocess.load_image

    def counted(path):
        image = real(path)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def gone():
            with lock:
                alive[0] -= 1
        weakref.finalize(image, gone)
        return image

    monkeypatch.setattr(preprocess, "load_image", counted)
    code, _, stderr = cli(capsys, "explain", model, tmp_path / "data", "-o", tmp_path / "out", "--batch-size", batch,
                          "--save-maps", tmp_path / "m.npz")
    assert code == 0, stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == n
    # one batch being decoded, one explained, two being written, and a decode per worker thread
    assert peak[0] <= 4 * batch + dataset.workers(), peak[0]
    with np.load(tmp_path / "m.npz") as z:
        assert len(z.files) == n


def test_progress_lines_when_stderr_is_not_a_terminal():
    stream = io.StringIO()
    progress = dataset.Progress(300, show=True, every=0.0, stream=stream)
    progress.update(120)
    progress.update(180)  # the last update says nothing: close() does
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("onnxcam: 120/300 images, ") and " images/s, ETA " in lines[0]
    assert lines[1].startswith("onnxcam: 300/300 images in ")
    quiet = io.StringIO()
    small = dataset.Progress(3, show=False, every=0.0, stream=quiet)
    small.update(3)
    small.close()
    assert quiet.getvalue() == ""
