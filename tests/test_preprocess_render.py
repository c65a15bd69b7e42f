"""Tests for onnxcam.images.preprocess and onnxcam.render, plus the bundled demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxcam.errors import OnnxcamError
from onnxcam.images.preprocess import (
    PRESETS,
    Preprocess,
    labels_from_file,
    load_image,
    model_metadata,
    resolve_preprocess,
    to_tensor,
)
from onnxcam.images.render import jet, overlay, panel, save_png

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "efficientnet_lite0.onnx"
CAT = REPO / "models" / "cat.png"
CAT_AND_CUP = REPO / "models" / "cat_and_cup.png"
CAT_CLASSES = set(range(281, 286))
CUP_CLASSES = {967, 968, 504}

RGB = (200, 100, 50)


def solid(size=(10, 7), colour=RGB, mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.fixture(scope="module")
def demo_proto() -> onnx.ModelProto:
    return onnx.load(str(DEMO_MODEL))


# --------------------------------------------------------------------------- to_tensor


def test_imagenet_constant_colour_exact_values():
    pp = resolve_preprocess([1, 3, 4, 5], preset="imagenet")
    assert pp.size == (4, 5) and pp.layout == "NCHW" and pp.scale == pytest.approx(1 / 255)
    x = to_tensor(solid(), pp)
    assert x.dtype == np.float32 and x.shape == (1, 3, 4, 5)
    expected = [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]
    for c in range(3):
        np.testing.assert_allclose(x[0, c], expected[c], rtol=0, atol=1e-6)
    assert x[0, 0, 0, 0] == pytest.approx(1.3070469, abs=1e-6)


def test_presets_known_values():
    img = solid((3, 3))
    shape = [1, 3, 3, 3]
    unit = to_tensor(img, resolve_preprocess(shape, preset="unit"))[0, :, 0, 0]
    np.testing.assert_allclose(unit, np.array(RGB) / 255, atol=1e-7)
    sym = to_tensor(img, resolve_preprocess(shape, preset="symmetric"))[0, :, 0, 0]
    np.testing.assert_allclose(sym, np.array(RGB) / 127.5 - 1, atol=1e-6)
    none = to_tensor(img, resolve_preprocess(shape, preset="none"))[0, :, 0, 0]
    np.testing.assert_array_equal(none, np.array(RGB, np.float32))
    # caffe: channels are B, G, R and the mean is listed in that order
    pp = resolve_preprocess(shape, preset="caffe")
    assert pp.channel_order == "BGR" and pp.scale == 1.0
    caffe = to_tensor(img, pp)[0, :, 0, 0]
    np.testing.assert_allclose(caffe, [50 - 103.939, 100 - 116.779, 200 - 123.68], atol=1e-4)


def test_nhwc_matches_nchw_transposed():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    nchw = resolve_preprocess([1, 3, 16, 12])
    nhwc = resolve_preprocess([1, 16, 12, 3])
    assert nchw.layout == "NCHW" and nhwc.layout == "NHWC"
    a, b = to_tensor(img, nchw), to_tensor(img, nhwc)
    assert a.shape == (1, 3, 16, 12) and b.shape == (1, 16, 12, 3)
    np.testing.assert_array_equal(a.transpose(0, 2, 3, 1), b)
    assert b.flags["C_CONTIGUOUS"]


def test_squash_resize_is_pil_bilinear_to_exact_size():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8))
    pp = resolve_preprocess([1, 3, 20, 30], preset="none")
    x = to_tensor(img, pp)
    ref = np.asarray(img.resize((30, 20), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(x[0], ref)


def test_grayscale_model_uses_first_mean_and_L_conversion():
    pp = resolve_preprocess([1, 1, 8, 8], preset="imagenet")
    assert pp.channels == 1 and pp.mean == (0.485,) and pp.std == (0.229,)
    x = to_tensor(solid(), pp)
    assert x.shape == (1, 1, 8, 8)
    lum = np.asarray(solid().convert("L"))[0, 0]  # PIL's ITU-R 601 luma
    np.testing.assert_allclose(x, (lum / 255 - 0.485) / 0.229, atol=1e-6)


# --------------------------------------------------------------------------- resolution


def test_layout_inference_and_overrides():
    assert resolve_preprocess([1, 3, 224, 224]).layout == "NCHW"
    assert resolve_preprocess(["N", 224, 224, 3]).layout == "NHWC"
    assert resolve_preprocess([None, 1, 28, 28]).layout == "NCHW"
    assert resolve_preprocess([1, 28, 28, 1]).layout == "NHWC"
    assert resolve_preprocess([1, 3, 7, 3]).layout == "NCHW"  # ambiguous
    assert resolve_preprocess([1, 3, 7, 3], layout="nhwc").layout == "NHWC"
    assert resolve_preprocess([1, 3, 7, 3], metadata={"layout": "NHWC"}).layout == "NHWC"
    # explicit beats metadata
    assert resolve_preprocess([1, 3, 7, 3], layout="NCHW", metadata={"layout": "NHWC"}).layout == "NCHW"


def test_size_resolution():
    assert resolve_preprocess(["N", 3, 224, 224]).size == (224, 224)
    assert resolve_preprocess(["N", 3, 224, 224], size=224).size == (224, 224)
    assert resolve_preprocess(["N", 3, "H", "W"], size=(160, 192)).size == (160, 192)
    assert resolve_preprocess(["N", 3, "H", "W"], size="160x192").size == (160, 192)
    assert resolve_preprocess(["N", 3, None, None], metadata={"size": [96, 128]}).size == (96, 128)
    assert resolve_preprocess([1, 3, 64, 64], metadata={"size": [96, 128]}).size == (64, 64)
    with pytest.raises(OnnxcamError, match="dynamic height/width; pass --size"):
        resolve_preprocess(["N", 3, "H", "W"])
    with pytest.raises(OnnxcamError, match="dynamic height/width"):
        resolve_preprocess(["N", 3, 224, "W"])
    with pytest.raises(OnnxcamError, match="conflicts"):
        resolve_preprocess(["N", 3, 224, 224], size=(256, 256))
    with pytest.raises(OnnxcamError, match="conflicts"):
        resolve_preprocess(["N", 3, 224, "W"], size=(200, 300))
    assert resolve_preprocess(["N", 3, 224, "W"], size=(224, 300)).size == (224, 300)
    with pytest.raises(OnnxcamError, match="size"):
        resolve_preprocess(["N", 3, "H", "W"], size=(0, 10))


def test_bad_shapes():
    with pytest.raises(OnnxcamError, match="rank 4"):
        resolve_preprocess([1, 3, 224])
    with pytest.raises(OnnxcamError, match="4 channels"):
        resolve_preprocess([1, 4, 32, 32])
    with pytest.raises(OnnxcamError, match="batch size of 8"):
        resolve_preprocess([8, 3, 32, 32])


def test_mean_std_precedence():
    meta = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    shape = [1, 3, 8, 8]
    assert resolve_preprocess(shape).mean == PRESETS["imagenet"].mean
    assert resolve_preprocess(shape, metadata=meta).mean == (0.1, 0.2, 0.3)
    assert resolve_preprocess(shape, metadata={"preprocess": meta, "labels": None}).std == (0.4, 0.5, 0.6)
    assert resolve_preprocess(shape, preset="symmetric", metadata=meta).mean == (0.5, 0.5, 0.5)
    pp = resolve_preprocess(shape, preset="symmetric", mean=[0.0, 0.1, 0.2], metadata=meta)
    assert pp.mean == (0.0, 0.1, 0.2) and pp.std == (0.5, 0.5, 0.5)
    assert resolve_preprocess(shape, mean=0.5, std="0.25").mean == (0.5, 0.5, 0.5)
    assert resolve_preprocess(shape, mean=0.5, std="0.25").std == (0.25, 0.25, 0.25)
    with pytest.raises(OnnxcamError, match="unknown preprocessing preset"):
        resolve_preprocess(shape, preset="bogus")
    with pytest.raises(OnnxcamError, match="std"):
        resolve_preprocess(shape, std=[1.0, 0.0, 1.0])
    with pytest.raises(OnnxcamError, match="mean"):
        resolve_preprocess(shape, mean=[1.0, 2.0])


def test_preprocess_dataclass_validates():
    with pytest.raises(OnnxcamError):
        Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, scale=1 / 255, size=(224, 224), layout="CHW")
    pp = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, scale=1 / 255, size=(224, 224))
    with pytest.raises(Exception):
        pp.scale = 1.0  # frozen


# --------------------------------------------------------------------------- metadata


def _tiny_model(props: dict[str, str]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    return m


def test_metadata_round_trip_on_demo_model(demo_proto):
    md = model_metadata(demo_proto)
    assert len(md["labels"]) == 1000
    assert md["labels"][285] == "Egyptian cat" and md["labels"][504] == "coffee mug"
    pre = md["preprocess"]
    assert pre["size"] == [224, 224] and pre["layout"] == "NCHW" and pre["resize"] == "squash"
    np.testing.assert_allclose(pre["mean"], [127 / 255] * 3)
    np.testing.assert_allclose(pre["std"], [128 / 255] * 3)
    shape = [d.dim_param or d.dim_value for d in demo_proto.graph.input[0].type.tensor_type.shape.dim]
    assert shape == ["N", 3, 224, 224]
    pp = resolve_preprocess(shape, metadata=md)
    assert pp.mean == tuple(pre["mean"]) and pp.size == (224, 224)
    assert demo_proto.ir_version <= 10
    # round trip through a freshly written model
    m = _tiny_model({"onnxcam.labels": json.dumps(md["labels"]), "onnxcam.preprocess": json.dumps(pre)})
    assert model_metadata(onnx.load_from_string(m.SerializeToString())) == md


def test_metadata_absent_and_malformed():
    assert model_metadata(_tiny_model({})) == {"labels": None, "preprocess": None}
    with pytest.raises(OnnxcamError, match="onnxcam.labels"):
        model_metadata(_tiny_model({"onnxcam.labels": "[not json"}))
    with pytest.raises(OnnxcamError, match="onnxcam.preprocess"):
        model_metadata(_tiny_model({"onnxcam.preprocess": "{'single': 'quotes'}"}))
    with pytest.raises(OnnxcamError, match="onnxcam.labels"):
        model_metadata(_tiny_model({"onnxcam.labels": '{"a": 1}'}))
    with pytest.raises(OnnxcamError, match="onnxcam.preprocess"):
        resolve_preprocess([1, 3, 8, 8], metadata={"mean": "oops"})


# --------------------------------------------------------------------------- images and labels


def test_load_image_missing_and_corrupt(tmp_path):
    with pytest.raises(OnnxcamError, match="image not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    before = bad.read_bytes()
    with pytest.raises(OnnxcamError, match="not a supported image") as info:
        load_image(bad)
    assert "\n" not in str(info.value)
    assert bad.read_bytes() == before
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(OnnxcamError, match="not a supported image"):
        load_image(str(txt))
    with pytest.raises(OnnxcamError, match="directory"):
        load_image(tmp_path)


def test_load_image_modes_and_no_mutation(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))  # fully transparent red
    rgba.save(path)
    before = path.read_bytes()
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 3)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # flattened onto white
    assert path.read_bytes() == before
    gray = Image.new("L", (5, 5), 77)
    out = load_image(gray)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (77, 77, 77) and gray.mode == "L"
    rgb = solid()
    assert load_image(rgb) is not rgb
    g16 = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert load_image(g16).getpixel((0, 0)) == (255, 255, 255)


def test_labels_from_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("cat\ndog\n\n")
    assert labels_from_file(p) == ["cat", "dog"]
    p.write_text(json.dumps(["a", "b", "c"]))
    assert labels_from_file(p) == ["a", "b", "c"]
    p.write_text(json.dumps({"1": "b", "0": "a"}))
    assert labels_from_file(p) == ["a", "b"]
    p.write_text("[broken")
    with pytest.raises(OnnxcamError, match="JSON"):
        labels_from_file(p)
    p.write_text("   \n")
    with pytest.raises(OnnxcamError, match="empty"):
        labels_from_file(p)
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(OnnxcamError, match="UTF-8"):
        labels_from_file(p)
    with pytest.raises(OnnxcamError, match="not found"):
        labels_from_file(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- render


def test_jet_endpoints_and_middle():
    c = jet(np.array([[0.0, 0.5, 1.0]]))
    assert c.dtype == np.uint8 and c.shape == (1, 3, 3)
    assert tuple(c[0, 0]) == (0, 0, 128)  # dark blue
    assert tuple(c[0, 2]) == (128, 0, 0)  # dark red
    assert tuple(c[0, 1]) == (123, 255, 123)  # matplotlib jet(0.5) ~ (0.49, 1.0, 0.48)
    # clipping and NaN
    d = jet(np.array([-1.0, 2.0, np.nan]))
    assert tuple(d[0]) == (0, 0, 128) and tuple(d[1]) == (128, 0, 0) and tuple(d[2]) == (0, 0, 128)
    # monotone hue sweep: red rises, blue falls overall
    sweep = jet(np.linspace(0, 1, 256)).astype(int)
    assert sweep[0, 2] > sweep[-1, 2] and sweep[0, 0] < sweep[-1, 0]


def test_overlay_size_and_blending():
    img = Image.new("RGB", (451, 300), (10, 20, 30))
    heat = np.random.default_rng(0).random((7, 7))
    out = overlay(img, heat)
    assert out.size == img.size and out.mode == "RGB"
    assert overlay(img, heat, alpha=0.0).tobytes() == img.tobytes()
    full = np.asarray(overlay(img, np.ones((224, 224)), alpha=1.0))
    assert (full == np.array([128, 0, 0], np.uint8)).all()
    half = np.asarray(overlay(img, np.zeros((224, 224)), alpha=0.5))
    assert tuple(half[0, 0]) == (5, 10, 79)  # (10,20,30)/2 + (0,0,128)/2, rounded
    # a hot spot in the top-left stays in the top-left after stretching
    spot = np.zeros((4, 4))
    spot[0, 0] = 1.0
    s = np.asarray(overlay(img, spot, alpha=1.0)).astype(int)
    assert s[0, 0, 0] > s[-1, -1, 0]
    with pytest.raises(OnnxcamError):
        overlay(img, np.zeros((2, 2, 2)))


def test_panel_layout():
    a = Image.new("RGB", (100, 50), "red")
    b = Image.new("RGB", (60, 100), "blue")
    p = panel([a, b], ["first", "second"], gap=6)
    assert p.width == 200 + 6 + 60  # a scaled up to the tallest height, 100
    strip = p.height - 100
    assert 10 < strip < 40
    assert p.getpixel((100, strip + 10)) == (255, 0, 0)
    assert p.getpixel((200 + 6 + 30, strip + 10)) == (0, 0, 255)
    title = np.asarray(p.crop((0, 0, 200, strip)))
    assert (title < 128).any()  # some text was drawn
    # long titles wrap onto more lines (capped), the images stay intact
    long = panel([a, b], ["first", "a very long title that needs several lines here"], gap=6)
    assert long.width == p.width and long.height > p.height
    capped = panel([a, b], ["x", "word " * 50], max_title_lines=2)
    assert capped.height - 100 < long.height - 100 + 20
    assert panel([a], ["\u732b \u2014 unicode"]).size[0] == 100
    with pytest.raises(OnnxcamError):
        panel([a], ["x", "y"])


def test_save_png(tmp_path):
    img = Image.new("RGB", (8, 6), (1, 2, 3))
    out = tmp_path / "out.png"
    save_png(img, out)
    with Image.open(out) as back:
        assert back.format == "PNG" and back.size == (8, 6) and back.getpixel((0, 0)) == (1, 2, 3)
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temporary left behind
    save_png(img, str(tmp_path / "out.jpg"))
    with Image.open(tmp_path / "out.jpg") as back:
        assert back.format == "JPEG"


def test_save_png_unwritable(tmp_path):
    img = Image.new("RGB", (4, 4))
    with pytest.raises(OnnxcamError, match="does not exist") as info:
        save_png(img, tmp_path / "missing" / "out.png")
    assert "\n" not in str(info.value)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OnnxcamError, match="not a directory"):
        save_png(img, f / "out.png")
    with pytest.raises(OnnxcamError, match="is a directory"):
        save_png(img, tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_save_png_permission_denied(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OnnxcamError, match="permission denied"):
            save_png(Image.new("RGB", (4, 4)), ro / "out.png")
    finally:
        ro.chmod(0o700)


def test_save_png_permission_error_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OnnxcamError, match="permission denied") as info:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "out.png")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.png").exists()


# --------------------------------------------------------------------------- demo


def _demo_logits(proto: onnx.ModelProto, path: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    pp = resolve_preprocess(inp.shape, metadata=model_metadata(proto))
    return sess.run(None, {inp.name: to_tensor(load_image(path), pp)})[0][0]


def test_demo_model_classifies_cat(demo_proto):
    logits = _demo_logits(demo_proto, CAT)
    assert logits.shape == (1000,)
    assert int(np.argmax(logits)) in CAT_CLASSES
    assert int(np.argmax(logits)) == 285  # Egyptian cat
    assert logits[285] == pytest.approx(10.518, abs=0.05)


def test_demo_composite_has_cat_and_cup(demo_proto):
    logits = _demo_logits(demo_proto, CAT_AND_CUP)
    top10 = set(np.argsort(-logits)[:10].tolist())
    assert top10 & CAT_CLASSES and top10 & CUP_CLASSES


def test_jet_equals_interpolating_its_knots():
    """render.jet's ramps against np.interp over matplotlib's jet knots (render._JET) in float64: the same uint8
    colour but for rounding ties."""
    from onnxcam.images import render

    v = np.concatenate([np.random.default_rng(0).random(200_000), np.linspace(0, 1, 100_001)])
    want = np.stack([np.round(np.interp(v, *zip(*render._JET[ch])) * 255.0) for ch in ("red", "green", "blue")], -1)
    diff = np.abs(render.jet(v).astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.9999
