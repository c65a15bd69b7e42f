"""tools/compare_ovxai.py's own plumbing, without OpenVINO XAI: the conversion of an OpenVINO XAI map to an onnxcam
heatmap, the scoring of maps computed elsewhere (against the metric functions called directly), the timing rounds
and the doc block."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "models" / "synthetic" / "shapes_cnn.onnx"
EVAL = ROOT / "models" / "synthetic" / "eval"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_ovxai", ROOT / "tools" / "compare_ovxai.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _onnx_resize(a: np.ndarray, size) -> np.ndarray:
    """ONNX Resize, linear, half_pixel: the op onnxcam's heatmap graph upsamples with."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                          coordinate_transformation_mode="half_pixel")], "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, *a.shape]),
         helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": a[None, None].astype(np.float32),
                              "sizes": np.array([1, 1, *size], np.int64)})[0][0, 0]


def test_ov_heatmap_is_onnxcams_heatmap_of_the_uint8_map(tool):
    raw = np.array([[0, 10, 40, 0], [5, 255, 90, 0], [0, 30, 60, 20], [0, 0, 0, 0]], np.uint8)
    heat = tool.ov_heatmap(raw, (16, 20))
    assert heat.shape == (16, 20) and heat.dtype == np.float32
    direct = _onnx_resize((raw - 0.0) / (255 + 1e-7), (16, 20))
    direct = (direct - direct.min()) / (direct.max() - direct.min() + 1e-7)
    np.testing.assert_allclose(heat, direct, atol=1e-5)
    assert heat.min() == 0 and heat.max() == pytest.approx(1, abs=1e-6)
    # the peak stays where the map's peak was: cell (1, 1) of 4 covers rows 4..7, columns 5..9
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert 4 <= r < 8 and 5 <= c < 10
    # a map at the input's resolution (RISE) is only scaled; a constant one gives zeros, not NaN
    np.testing.assert_allclose(tool.ov_heatmap(raw, (4, 4)), raw / (255 + 1e-7), atol=1e-6)
    assert not tool.ov_heatmap(np.full((3, 3), 7, np.uint8), (9, 9)).any()


@pytest.mark.skipif(not SYNTHETIC.exists(), reason="no synthetic benchmark")
def test_external_maps_scored_like_direct_metric_calls(tool):
    from onnxcam import Explainer
    from onnxcam import metrics as M
    from onnxcam.evaluate import Evaluator, load_dataset
    from onnxcam.images import preprocess
    from PIL import Image

    samples = load_dataset(EVAL)[:3]
    coarse = {}  # a fake OpenVINO XAI map per image: the object mask pooled to 16x16, as uint8

    def fake_ov(xs, targets, indices, layout):
        out = []
        for i in indices:
            mask = np.asarray(Image.open(samples[i].mask).convert("L"), np.float64) > 0
            raw = np.uint8(255 * mask.reshape(16, 8, 16, 8).mean(axis=(1, 3)))
            coarse[i] = raw
            out.append(tool.ov_heatmap(raw, xs.shape[2:]))
        return np.stack(out)

    summary, accuracy, top1, labels = tool.score(str(SYNTHETIC), samples, ["gradcam"], {"ovxai:fake": fake_ov},
                                                 synthetic=True)
    assert set(summary) == {"gradcam", "ovxai:fake"} and len(coarse) == 3
    assert labels and accuracy is not None and set(top1) == {0, 1, 2}

    # direct: onnxruntime + onnxcam.metrics, no Evaluator
    session = ort.InferenceSession(str(SYNTHETIC), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predict = lambda b: session.run(None, {name: np.ascontiguousarray(b, np.float32)})[0]  # noqa: E731
    pp = Explainer(str(SYNTHETIC)).preprocessing()
    rec = {k: [] for k in ("pointing", "iou", "top1_loc_error", "deletion_auc", "insertion_auc")}
    loc50 = []
    for i, s in enumerate(samples):
        x = preprocess.to_tensor(preprocess.load_image(s.image), pp)[0]
        mask = np.asarray(Image.open(s.mask).convert("L")) > 0
        cam = tool.ov_heatmap(coarse[i], x.shape[1:])
        scores = predict(x[None])[0]
        assert top1[i] == int(np.argmax(scores))
        rec["pointing"].append(100 * M.pointing_game(M.resize(cam, mask.shape), mask, 15.0))
        iou, _ = M.localization(M.resize(cam, mask.shape), s.boxes, 0.15)
        rec["iou"].append(iou)
        rec["top1_loc_error"].append(100 * M.topk_localization_error(scores, s.label, iou, 1, 0.5))
        loc50.append(100 * M.topk_localization_error(scores, s.label, M.localization(cam, s.boxes, 0.5)[0], 1, 0.5))
        rec["deletion_auc"].append(M.deletion(x, cam, s.label, predict, steps=20, score="probability")[0])
        rec["insertion_auc"].append(M.insertion(x, cam, s.label, predict, steps=20, score="probability")[0])
    got = summary["ovxai:fake"]
    for key, values in rec.items():
        assert got[key] == pytest.approx(np.mean(values), abs=1e-6), key
    assert got["top1_loc_error@50"] == pytest.approx(np.mean(loc50), abs=1e-6)
    assert got["pointing"] == 100  # the map is the object itself

    # onnxcam's own rows are the stock Evaluator's
    ref = Evaluator(str(SYNTHETIC), ["gradcam"], metrics=tool.SYNTHETIC_METRICS, steps=20, batch_size=64)
    stock = ref.run(samples, log=None).summary["gradcam"]
    for key in ("pointing", "iou", "deletion_auc", "insertion_auc", "average_drop", "faithfulness"):
        assert summary["gradcam"][key] == pytest.approx(stock[key], abs=1e-6), key


def test_time_rounds_pairs_ratios_and_limits_slow_methods(tool):
    calls = {"fwd": 0, "fast": 0, "slow": 0}

    def make(name, seconds):
        def fn():
            calls[name] += 1
            return seconds
        return fn

    times = tool.time_rounds({"fwd": make("fwd", 0.002), "fast": make("fast", 0.006), "slow": make("slow", 3.0)},
                             warmup=1, repeats=4, slow=2.0, slow_repeats=1)
    assert calls == {"fwd": 5, "fast": 5, "slow": 2}
    assert sorted(times["fwd"]) == [1, 2, 3, 4] and list(times["slow"]) == [1]
    assert times["fast"][2] == pytest.approx(6.0)
    assert tool.paired_ratio(times, "fast", "fwd") == pytest.approx(3.0)
    assert tool.paired_ratio(times, "slow", "fwd") == pytest.approx(1500.0)
    assert tool.paired_ratio(times, "fast", "missing") is None


def test_table_and_doc_block(tool, tmp_path):
    rows = [{"method": "*forward*", "engine": "onnxruntime fp32", "ms": 0.5, "n": 5, "ratio": 1.0},
            {"method": "OpenVINO XAI ReciproCAM", "engine": "OpenVINO bfloat16", "ms": 4321.0, "n": 1, "ratio": 250.4,
             "summary": {"deletion_auc": 0.2512, "insertion_auc": 0.8}}]
    table = tool.markdown_table(rows, ["deletion_auc", "insertion_auc", "faithfulness"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[3].count("|")
    assert "| OpenVINO XAI ReciproCAM | OpenVINO bfloat16 | 4,321 (1) | 250x | 0.251 | 0.800 | – |" in table
    doc = tmp_path / "cmp.md"
    tool.write_doc(doc, f"{tool.MARK_START}\nfirst\n{tool.MARK_END}")
    tool.write_doc(doc, f"{tool.MARK_START}\nsecond\n{tool.MARK_END}")
    text = doc.read_text()
    assert text.startswith("# onnxcam and OpenVINO XAI") and "second" in text and "first" not in text
    assert text.count(tool.MARK_END) == 1


def test_optional_methods_are_picked_up_only_when_present(tool, monkeypatch):
    monkeypatch.setattr(tool, "OPTIONAL", ["gradcam++", "no-such-cam"])
    methods, notes = tool.pick_methods(["GradCAM", "layercam"], optional=True)
    assert methods == ["gradcam", "layercam", "gradcam++"]
    assert notes == ["onnxcam has no `no-such-cam` method here: left out"]
    assert tool.pick_methods(["gradcam"], optional=False) == (["gradcam"], [])
