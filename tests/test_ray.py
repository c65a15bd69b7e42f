"""onnxcam.ray on a local Ray instance: what read_images -> map_batches(ExplainImages) and explain_folder give must
be what the Explainer gives for the same pictures decoded and preprocessed as the CLI does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxcam import Explainer, OnnxcamError
from onnxcam.images import preprocess
from onnxcam.ray import ExplainImages, explain_dataset, explain_folder

REPO = Path(__file__).resolve().parents[1]
MODEL = str(REPO / "models" / "synthetic" / "shapes_cnn.onnx")  # 128x128 input, 16x16 layer, 4 labelled classes
N_IMAGES = 200


@pytest.fixture(scope="module")
def explainer():
    return Explainer(MODEL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """N_IMAGES PNGs of 40..120 px a side, stripes and dots over noise so that the top class varies."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = (int(v) for v in rng.integers(40, 121, 2))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        period = int(rng.integers(3, 9))
        if i % 2:
            a[::period] = rng.integers(0, 256, 3, dtype=np.uint8)
        else:
            a[::period, ::period] = 255
        Image.fromarray(a).save(d / f"img_{i:03d}.png")
    return d


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def reference(explainer, pils, **overrides):
    """The CLI's path: a decoded picture -> preprocess.to_tensor -> Explainer.explain, with independent
    per-map [0, 1] scaling and a float64 softmax."""
    pp = explainer.preprocessing(**overrides)
    r = explainer.explain(np.concatenate([preprocess.to_tensor(p, pp) for p in pils]))
    maps = r.maps.astype(np.float64)
    scaled = np.stack([(m - m.min()) / (m.max() - m.min() + 1e-7) for m in maps])
    logits = r.scores.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    idx = np.arange(len(pils))
    return r, scaled, logits[idx, r.targets], probs[idx, r.targets]


def heatmaps_of(table):
    """The heatmap column as (N, h, w), from the parquet files alone: a flat list per row, its shape in the
    field's metadata (Ray's tensor extension; what a reader without Ray sees)."""
    import json

    col = table.column("heatmap").combine_chunks()
    storage = col.storage if hasattr(col, "storage") else col
    meta = table.schema.field("heatmap").metadata or {}
    shape = json.loads(meta[b"ARROW:extension:metadata"]) if b"ARROW:extension:metadata" in meta else \
        list(col.type.shape)
    return storage.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shape)


def test_read_images_pipeline_equals_the_explainer(ray, folder, explainer):
    ds = ray.data.read_images(str(folder), include_paths=True, mode="RGB")
    rows = explain_dataset(ds, MODEL, concurrency=1, batch_size=32).take_all()
    assert len(rows) == N_IMAGES
    rows.sort(key=lambda r: r["path"])
    paths = sorted(folder.glob("*.png"))
    assert [Path(r["path"]).name for r in rows] == [p.name for p in paths]
    assert "image" not in rows[0]
    r, maps, score, prob = reference(explainer, [preprocess.load_image(p) for p in paths])
    assert len(set(r.targets.tolist())) > 1  # the targets do vary, so matching them means something
    got = np.stack([row["heatmap"] for row in rows])
    assert got.dtype == np.float32 and got.shape == (N_IMAGES, 16, 16)
    assert np.abs(got - maps).max() <= 1e-6
    assert [row["target"] for row in rows] == r.targets.tolist()
    assert [row["label"] for row in rows] == [explainer.labels[t] for t in r.targets]
    np.testing.assert_allclose([row["score"] for row in rows], score, rtol=0, atol=1e-6)
    np.testing.assert_allclose([row["probability"] for row in rows], prob, rtol=0, atol=1e-9)
    assert all(row["error"] == "" for row in rows)


def test_explain_folder_writes_one_parquet_row_per_image(ray, folder, explainer, tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    names = sorted(p.name for p in folder.glob("*.png"))[:20]
    for name in names:
        (tmp_path / "in" / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    summary = explain_folder(MODEL, str(tmp_path / "in"), str(out), target="dotted", batch_size=8)
    assert ray.is_initialized()  # a connection it did not open stays open
    assert (summary["rows"], summary["errors"]) == (21, 1) and summary["seconds"] > 0

    table = pq.read_table(out)
    assert table.num_rows == 21
    assert {"path", "target", "label", "score", "probability", "heatmap", "error"} <= set(table.column_names)
    order = np.argsort(table.column("path").to_pylist())
    paths = np.array(table.column("path").to_pylist())[order]
    errors = np.array(table.column("error").to_pylist())[order]
    targets = np.array(table.column("target").to_pylist())[order]
    heat = heatmaps_of(table)[order]
    assert Path(paths[0]).name == "broken.png" and errors[0].startswith("cannot read")
    assert targets[0] == -1 and np.isnan(heat[0]).all() and "\n" not in errors[0]
    assert (errors[1:] == "").all() and (targets[1:] == 2).all()
    dotted = explainer.class_index("dotted")
    r = explainer.explain(np.concatenate([preprocess.to_tensor(preprocess.load_image(tmp_path / "in" / n),
                                                                explainer.preprocessing()) for n in names]), dotted)
    maps = np.stack([(m - m.min()) / (m.max() - m.min() + 1e-7) for m in r.maps.astype(np.float64)])
    assert np.abs(heat[1:] - maps).max() <= 1e-6
    np.testing.assert_allclose(np.array(table.column("score").to_pylist())[order][1:], r.scores[:, dotted],
                               rtol=0, atol=1e-6)

    with pytest.raises(OnnxcamError, match="not empty"):
        explain_folder(MODEL, str(tmp_path / "in"), str(out))


def test_arrays_of_any_mode_and_input_resolution(explainer, tmp_path):
    """Grayscale HW, RGBA and RGB of different sizes in one object column, and encoded bytes: each decoded as
    the CLI decodes the same picture saved as a PNG file (transparency flattened onto white)."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (50, 70), dtype=np.uint8), rng.integers(0, 256, (90, 60, 4), dtype=np.uint8),
              rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), rng.integers(0, 256, (33, 99, 1), dtype=np.uint8)]
    column = np.empty(len(arrays), object)
    column[:] = arrays
    files = []
    for i, a in enumerate(arrays):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(files[-1])
    fn = ExplainImages(MODEL, resolution="input", keep_image=True)
    out = fn({"image": column, "id": np.arange(len(arrays))})
    r = explainer.explain(np.concatenate([preprocess.to_tensor(preprocess.load_image(f), explainer.preprocessing())
                                          for f in files]))
    assert out["heatmap"].shape == (4, 128, 128)
    assert np.abs(out["heatmap"] - r.heatmaps).max() <= 1e-6
    assert out["target"].tolist() == r.targets.tolist() and out["id"].tolist() == [0, 1, 2, 3]
    assert out["image"] is column

    encoded = [f.read_bytes() for f in files] + [b"junk", b""]
    half = ExplainImages(MODEL, heatmap_dtype="float16")({"bytes": np.array(encoded, dtype=object)})
    assert "bytes" not in half and half["heatmap"].dtype == np.float16
    assert half["target"].tolist() == r.targets.tolist() + [-1, -1]
    assert half["error"][4].startswith("cannot read") and half["error"][5].startswith("cannot read")
    assert half["error"][:4].tolist() == [""] * 4 and np.isnan(half["score"][4:]).all()


@pytest.mark.parametrize("options, message", [
    ({"resolution": "pixels"}, "resolution must be layer or input"),
    ({"layer": "no_such_layer"}, "no_such_layer"),
    ({"target": 7}, "out of range"),
    ({"target": "zebra"}, "zebra"),
    ({"preset": "nope"}, "unknown preprocessing preset"),
    ({"heatmap_dtype": "int8"}, "heatmap_dtype"),
])
def test_a_bad_option_fails_at_construction_in_one_line(options, message):
    with pytest.raises(OnnxcamError, match=message) as info:
        ExplainImages(MODEL, **options)
    assert "\n" not in str(info.value)


def test_an_unknown_option_is_named(ray):
    ds = ray.data.from_items([{"x": 1}])
    with pytest.raises(OnnxcamError, match="did you mean 'resolution'"):
        explain_dataset(ds, MODEL, resolutoin="input")
    with pytest.raises(OnnxcamError, match="image path not found"):
        explain_folder(MODEL, "/no/such/folder", "/tmp/unused")


def test_failures_on_the_cluster_come_back_as_one_line(ray, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxcamError, match="no image files"):
        explain_folder(MODEL, str(tmp_path / "empty"), str(tmp_path / "out"))
    # Two actors holding both CPUs of the test cluster would leave the read tasks waiting forever.
    with pytest.raises(OnnxcamError, match="leave no CPU to read"):
        explain_folder(MODEL, str(folder), str(tmp_path / "out"), concurrency=2, num_cpus=1)
    from onnxcam.run.runtime import ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    # The driver checks the options on the CPU; the actor, asked for CUDA, fails, and its OnnxcamError is what
    # the caller gets, not Ray's traceback.
    with pytest.raises(OnnxcamError, match="^CUDA was requested") as info:
        explain_folder(MODEL, str(folder), str(tmp_path / "out"), device="cuda")
    assert "\n" not in str(info.value)


def test_without_ray_the_helpers_say_what_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from onnxcam import OnnxcamError\n"
            "from onnxcam.ray import ExplainImages, explain_folder\n"
            f"ExplainImages({MODEL!r})\n"
            "try:\n    explain_folder('m.onnx', '.', 'out')\n"
            "except OnnxcamError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "pip install 'onnxcam[ray]'" in res.stdout


def test_cli_ray_flag_runs_the_same_pipeline(ray, folder, explainer, tmp_path, capsys):
    """`onnxcam explain MODEL DIR --ray -o OUT`: explain_folder on the running instance; rows equal the API's,
    an unreadable file makes exit status 1, options the pipeline does not take are one line."""
    import pyarrow.parquet as pq

    from onnxcam.cli import main

    (tmp_path / "in").mkdir()
    names = sorted(p.name for p in folder.glob("*.png"))[:12]
    for name in names:
        (tmp_path / "in" / name).write_bytes((folder / name).read_bytes())
    code = main(["explain", MODEL, str(tmp_path / "in"), "--ray", "-o", str(tmp_path / "out"), "--batch-size", "4"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert stdout.startswith("wrote 12 rows to ")
    table = pq.read_table(tmp_path / "out")
    order = np.argsort(table.column("path").to_pylist())
    r, maps, score, _ = reference(explainer, [preprocess.load_image(tmp_path / "in" / n) for n in names])
    assert np.abs(heatmaps_of(table)[order] - maps).max() <= 1e-6
    assert np.array(table.column("target").to_pylist())[order].tolist() == r.targets.tolist()

    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    code = main(["explain", MODEL, str(tmp_path / "in"), "--ray", "-o", str(tmp_path / "out2")])
    stdout, stderr = capsys.readouterr()
    assert code == 1 and "1 unreadable" in stdout

    code = main(["explain", MODEL, str(tmp_path / "in"), "--ray", "-o", str(tmp_path / "out3"), "--panel"])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and "--panel go without it" in stderr and stderr.count("\n") == 1
