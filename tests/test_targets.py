"""Targets beyond a class logit (onnxcam/targets.py) and multi-input models, against PyTorch autograd.

Every Grad-CAM here is checked against a reference computed in torch: hook the layer, backward the same
scalar y (a region's summed logits, a box's field, an index, a similarity), alpha = spatial mean of the
gradient, map = ReLU(sum_k alpha_k A^k). Maps are compared per sample by relative L2 error.
"""
from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import onnxcam
from onnxcam.cli import main
from onnxcam.model.graph import ModelView
from onnxcam.cam.targets import ClassTarget, DetectionTarget, IndexTarget, RegionTarget, resize_mask
from tests.torch_export import calibrate_batchnorm, torch_gradcam

SEG_SIZE = 64
CLASSES = 21


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def export(model: nn.Module, args: tuple, path, inputs: list[str], outputs: list[str], exporter="torchscript"):
    """Export with a dynamic batch axis on every input and output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=inputs,
                              output_names=outputs, dynamic_axes={n: {0: "N"} for n in inputs + outputs})
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=tuple({0: batch} for _ in args), verbose=False)
    return str(path)


def conv_input(path, weight_shape) -> str:
    """The ONNX tensor feeding the Conv whose weight has `weight_shape`: the layer's name in either
    exporter's naming."""
    view = ModelView(onnx.load(path, load_external_data=True))
    for node in view.graph.node:
        if node.op_type == "Conv":
            w = view.constant_value(node.input[1])
            if w is not None and list(w.shape) == list(weight_shape):
                return node.input[0]
    raise AssertionError(f"no Conv with weight {weight_shape}")


# -- segmentation: torchvision FCN-ResNet50 -------------------------------------------------------------------
class SegOut(nn.Module):
    """torchvision segmentation models return {"out": ...}; export the tensor."""

    def __init__(self, model: nn.Module, softmax: bool = False):
        super().__init__()
        self.model, self.softmax = model, softmax

    def forward(self, x):
        out = self.model(x)["out"]
        return out.softmax(1) if self.softmax else out


@pytest.fixture(scope="module")
def fcn(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False,
                                                         num_classes=CLASSES)
    calibrate_batchnorm(model, SEG_SIZE, seed=0, batch=4)
    wrapped = SegOut(model).eval()
    x = torch.randn(2, 3, SEG_SIZE, SEG_SIZE, generator=torch.Generator().manual_seed(1))
    path = export(wrapped, (x,), tmp_path_factory.mktemp("fcn") / "fcn.onnx", ["input"], ["out"])
    layer = conv_input(path, [512, 2048, 3, 3])  # classifier.0's input: backbone layer4's output
    # The reference runs in float64: torch's own float32 map of a single logit of this random dilated
    # ResNet-50 is 2e-2 (rel. L2) away from the float64 one (onnxcam's: 7e-5).
    ref = copy.deepcopy(wrapped).double()
    return ref, ref.model.backbone.layer4, x, path, onnxcam.Explainer(path, layer=layer)


def test_segmentation_region_mask_and_predicted_mask_match_autograd(fcn):
    ref_model, layer4, x, _, ex = fcn
    xd = x.double()
    mask = np.zeros((SEG_SIZE, SEG_SIZE), bool)
    mask[10:40, 20:50] = True
    # Sample 0: class 2 over a given mask; sample 1: class c1 over its predicted mask (argmax == c1), which
    # onnxcam computes inside the fused graph.
    with torch.no_grad():
        pred = ref_model(xd).argmax(1)
    c1 = int(torch.mode(pred[1].flatten()).values)  # a class that owns many pixels of sample 1
    assert int((pred[1] == c1).sum()) > 100
    r = ex.explain(x.numpy(), [RegionTarget(2, mask), RegionTarget(c1)])
    ref, y = torch_gradcam(lambda: ref_model(xd), layer4, lambda out: torch.stack([
        (out[0, 2] * torch.from_numpy(mask)).sum(), (out[1, c1] * (out[1].argmax(0) == c1)).sum()]))
    assert r.maps.shape == (2, 8, 8) and r.scores.shape == (2, CLASSES, SEG_SIZE, SEG_SIZE)
    # onnxcam (float32) vs the float64 reference: measured 5e-5 / 3e-5. A wrong mask, class or seed is O(1).
    for s in range(2):
        assert rel_l2(r.maps[s], ref[s]) < 1e-3, s
    # y sums ~1000 logits; measured relative error <= 3e-5.
    np.testing.assert_allclose(r.target_scores, y, rtol=3e-4)
    assert r.targets.dtype == object and r.targets[1] == RegionTarget(c1) or r.targets[1].cls == c1
    assert r.heatmaps.shape == (2, SEG_SIZE, SEG_SIZE) and 0 <= r.heatmaps.min() and r.heatmaps.max() <= 1


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_deeplabv3_region_targets_match_autograd(tmp_path, exporter):
    # DeepLabV3 (MobileNetV3 backbone: hardswish, squeeze-excite, dilated depthwise convs; ASPP's image-pooling
    # branch is resized back to the feature grid), random weights, both exporters, onnxcam's default layer.
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=False, num_classes=5)
    calibrate_batchnorm(model, SEG_SIZE, seed=0, batch=4)
    wrapped = SegOut(model).eval()
    x = torch.randn(2, 3, SEG_SIZE, SEG_SIZE, generator=torch.Generator().manual_seed(2))
    path = export(wrapped, (x,), tmp_path / "deeplab.onnx", ["input"], ["out"], exporter)
    ex = onnxcam.Explainer(path)
    # the default for a dense output: what the last per-position conv (classifier.4, 1x1) reads
    assert ex.layers == (conv_input(path, [5, 256, 1, 1]),)
    ref_model = copy.deepcopy(wrapped).double()
    xd = x.double()
    with torch.no_grad():
        pred = ref_model(xd).argmax(1)
    c1 = int(torch.mode(pred[1].flatten()).values)
    mask = np.zeros((SEG_SIZE, SEG_SIZE), bool)
    mask[5:30, 12:60] = True
    r = ex.explain(x.numpy(), [RegionTarget(3, mask), RegionTarget(c1)])
    ref, y = torch_gradcam(lambda: ref_model(xd), ref_model.model.classifier[3], lambda out: torch.stack([
        (out[0, 3] * torch.from_numpy(mask)).sum(), (out[1, c1] * (out[1].argmax(0) == c1)).sum()]))
    errors = [rel_l2(r.maps[s], ref[s]) for s in range(2)]
    print(f"deeplabv3 {exporter}: maps rel L2 {errors}, scores {r.target_scores} vs {y}")
    # measured 1.9e-6 .. 7.9e-6 (float32 vs float64); a wrong mask, class, layer or seed is O(1)
    assert max(errors) < 1e-4, errors
    np.testing.assert_allclose(r.target_scores, y, rtol=3e-4)


def test_segmentation_index_tuple_and_resized_mask(fcn):
    ref_model, layer4, x, _, ex = fcn
    xd = x.double()
    # One logit (class 5 at pixel (30, 40)): a fixed element, served by the class path's one-hot.
    r = ex.explain(x.numpy(), IndexTarget((5, 30, 40)))
    ref, y = torch_gradcam(lambda: ref_model(xd), layer4, lambda out: out[:, 5, 30, 40])
    for s in range(2):
        assert rel_l2(r.maps[s], ref[s]) < 1e-3, s  # measured 5e-5 / 7e-5
    np.testing.assert_allclose(r.target_scores, y, rtol=1e-4, atol=1e-5)
    # A 24x24 mask is resized nearest-neighbour (pixel centres) to the 64x64 output grid.
    small = np.zeros((24, 24), np.uint8)
    small[3:9, 10:20] = 255
    big = resize_mask(small, (SEG_SIZE, SEG_SIZE))
    centres = np.floor((np.arange(SEG_SIZE) + 0.5) * 24 / SEG_SIZE).astype(int)
    np.testing.assert_array_equal(big, small[centres][:, centres] > 0)
    r = ex.explain(x.numpy()[:1], RegionTarget(7, small))
    ref, y = torch_gradcam(lambda: ref_model(xd[:1]), layer4,
                           lambda out: (out[:, 7] * torch.from_numpy(big)).sum((1, 2)))
    assert rel_l2(r.maps[0], ref[0]) < 1e-3
    np.testing.assert_allclose(r.target_scores, y, rtol=3e-4)


class TinySeg(nn.Module):
    """A small segmentation net ending in Softmax over the class axis (axis 1 of N, K, H, W)."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU())
        self.head = nn.Conv2d(16, classes, 1)

    def logits(self, x):
        return nn.functional.interpolate(self.head(self.features(x)), scale_factor=2.0, mode="bilinear")

    def forward(self, x):
        return self.logits(x).softmax(1)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_segmentation_softmax_over_class_axis_is_stripped(tmp_path, exporter):
    torch.manual_seed(3)
    net = TinySeg().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    path = export(net, (x,), tmp_path / "seg.onnx", ["input"], ["probs"], exporter)
    ex = onnxcam.Explainer(path, layer=conv_input(path, [4, 16, 1, 1]))
    r = ex.explain(x.numpy(), RegionTarget(1))
    # The score is the logit before the Softmax(axis=1), the region the predicted mask of class 1.
    ref, y = torch_gradcam(lambda: net.logits(x), net.features, lambda out: (out[:, 1] * (out.argmax(1) == 1)).sum((1, 2)))
    with torch.no_grad():
        np.testing.assert_allclose(r.scores, net.logits(x).numpy(), atol=1e-5)
    for s in range(2):
        assert rel_l2(r.maps[s], ref[s]) < 1e-4, s  # a small net: float32 noise only
    np.testing.assert_allclose(r.target_scores, y, rtol=1e-5)


# -- detection: a YOLO-style head ------------------------------------------------------------------------------
ANCHORS, DET_CLASSES = 2, 3
FIELDS = 5 + DET_CLASSES


class TinyYolo(nn.Module):
    """Conv backbone + 1x1 conv head reshaped to (N, anchors*h*w, 5 + classes) = [x, y, w, h, objectness,
    classes...]; objectness and class scores go through a Sigmoid, as in YOLOv5's exported graph. The
    second output is the pre-sigmoid head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.head = nn.Conv2d(32, ANCHORS * FIELDS, 1)

    def forward(self, x):
        p = self.head(self.backbone(x))
        n, _, h, w = p.shape
        raw = p.reshape(-1, ANCHORS, FIELDS, h, w).permute(0, 1, 3, 4, 2).reshape(-1, ANCHORS * h * w, FIELDS)
        det = torch.cat([raw[..., :4], torch.sigmoid(raw[..., 4:])], dim=-1)
        return det, raw


def make_yolo(folder, exporter):
    torch.manual_seed(5)
    net = TinyYolo().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    path = export(net, (x,), folder / f"yolo_{exporter}.onnx", ["images"], ["detections", "raw"], exporter)
    return net, x, path, conv_input(path, [ANCHORS * FIELDS, 32, 1, 1])


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def yolo(request, tmp_path_factory):
    return make_yolo(tmp_path_factory.mktemp("yolo"), request.param)


@pytest.fixture(scope="module")
def yolo_cli(tmp_path_factory):
    return make_yolo(tmp_path_factory.mktemp("yolo_cli"), "torchscript")


@pytest.fixture(scope="module")
def tiny_seg(tmp_path_factory):
    """TinySeg (4 classes, 32x32, Softmax over axis 1) for the CLI: quick to build an Explainer for."""
    torch.manual_seed(3)
    net = TinySeg().eval()
    x = torch.randn(1, 3, 32, 32)
    path = export(net, (x,), tmp_path_factory.mktemp("seg") / "seg.onnx", ["input"], ["probs"])
    return path, conv_input(path, [4, 16, 1, 1])


def test_detection_box_fields_match_autograd(yolo):
    net, x, path, layer = yolo
    ex = onnxcam.Explainer(path, layer=layer)
    box = 37
    det = net(x)[0].detach()
    top = int(det[1, box, 5:].argmax())
    cases = [
        (DetectionTarget(box, "objectness"), lambda d: d[:, box, 4]),
        (DetectionTarget(box, "class", cls=2), lambda d: d[:, box, 5 + 2]),
        # The box's top class, resolved inside the fused graph (the weighted session).
        ([DetectionTarget(box, "class"), DetectionTarget(box, "class")], lambda d: d[:, box, 5:].max(-1).values),
        (IndexTarget((box, 6)), lambda d: d[:, box, 6]),
    ]
    for target, y_of in cases:
        r = ex.explain(x.numpy(), target)
        ref, y = torch_gradcam(lambda: net(x)[0], net.backbone, y_of)
        assert r.scores.shape == (2, ANCHORS * 64, FIELDS)
        for s in range(2):
            # Float32 noise through a few small convs and a sigmoid: measured <= 1e-6.
            assert rel_l2(r.maps[s], ref[s]) < 1e-4, (target, s)
        np.testing.assert_allclose(r.target_scores, y, rtol=1e-5, atol=1e-6)
    assert int(np.argmax(ex.explain(x.numpy(), DetectionTarget(box, "class")).scores[1, box, 5:])) == top


def test_detection_logit_via_second_output(yolo):
    """`output=` picks a non-first output: the pre-sigmoid head, i.e. the objectness logit."""
    net, x, path, layer = yolo
    ex = onnxcam.Explainer(path, layer=layer, output="raw")
    r = ex.explain(x.numpy(), DetectionTarget(11, "objectness"))
    ref, y = torch_gradcam(lambda: net(x)[1], net.backbone, lambda raw: raw[:, 11, 4])
    for s in range(2):
        assert rel_l2(r.maps[s], ref[s]) < 1e-4, s
    np.testing.assert_allclose(r.target_scores, y, rtol=1e-5, atol=1e-6)
    # For one box field the sigmoid only scales the gradient by sigmoid'(z) > 0: same normalised heatmap.
    post = onnxcam.Explainer(path, layer=layer).explain(x.numpy(), DetectionTarget(11, "objectness"))
    np.testing.assert_allclose(post.heatmaps, r.heatmaps, atol=1e-4)


def test_plain_class_path_unchanged(yolo):
    """An int still means a flat index into the score (the classic path), and agrees with IndexTarget."""
    _, x, path, layer = yolo
    ex = onnxcam.Explainer(path, layer=layer)
    flat = 37 * FIELDS + 4
    a = ex.explain(x.numpy(), flat)
    b = ex.explain(x.numpy(), IndexTarget((37, 4)))
    c = ex.explain(x.numpy(), ClassTarget(flat))
    assert a.scores.shape == (2, ANCHORS * 64 * FIELDS) and a.targets.tolist() == [flat, flat]
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.maps, c.maps)


def test_target_errors(yolo, fcn, image_text):
    _, x, path, layer = yolo
    ex = onnxcam.Explainer(path, layer=layer)
    bad = [
        (IndexTarget((1, 2, 3)), "has 3 indices"),
        (IndexTarget((500, 2)), "out of range"),
        (DetectionTarget(999), "box 999 is out of range"),
        (DetectionTarget(1, "class", cls=7), "class 7 is out of range"),
        (DetectionTarget(1, "width"), "objectness, class"),
        ([IndexTarget((1, 2))] * 3, "3 targets for a batch of 2"),
    ]
    for target, message in bad:
        with pytest.raises(onnxcam.OnnxcamError, match=re.escape(message)):
            ex.explain(x.numpy(), target)
    with pytest.raises(onnxcam.OnnxcamError, match="aug_smooth"):
        ex.explain(x.numpy(), DetectionTarget(1), aug_smooth=True)
    with pytest.raises(onnxcam.OnnxcamError, match=re.escape("needs an (N, classes, *spatial) output")):
        onnxcam.Explainer(image_text[3]).explain({"image": image_text[1].numpy(), "text": image_text[2].numpy()},
                                                 RegionTarget(0))
    seg = fcn[4]
    with pytest.raises(onnxcam.OnnxcamError, match="region class 40 is out of range"):
        seg.explain(fcn[2].numpy()[:1], RegionTarget(40))
    with pytest.raises(onnxcam.OnnxcamError, match="region mask has shape"):
        seg.explain(fcn[2].numpy()[:1], RegionTarget(1, np.ones((2, 3, 4, 5))))


# -- two inputs: image + text embedding ------------------------------------------------------------------------
class ImageText(nn.Module):
    """CLIP-like similarity: image features pooled and projected, dot with the normalised text vector."""

    def __init__(self, dim=16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 1, 1), nn.ReLU())
        self.proj = nn.Linear(24, dim)

    def forward(self, image, text):
        emb = self.proj(self.features(image).mean((2, 3)))
        return (emb * nn.functional.normalize(text, dim=-1)).sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def image_text(tmp_path_factory):
    torch.manual_seed(7)
    net = ImageText().eval()
    gen = torch.Generator().manual_seed(8)
    x, text = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 16, generator=gen)
    path = export(net, (x, text), tmp_path_factory.mktemp("clip") / "clip.onnx", ["image", "text"], ["similarity"])
    return net, x, text, path


def test_two_input_model_api(image_text):
    net, x, text, path = image_text
    ex = onnxcam.Explainer(path)
    assert ex.image_input == "image"
    r = ex.explain({"image": x.numpy(), "text": text.numpy()}, 0)
    ref, y = torch_gradcam(lambda: net(x, text), net.features, lambda s: s[:, 0])
    for s in range(2):
        assert rel_l2(r.maps[s], ref[s]) < 1e-4, s
    np.testing.assert_allclose(r.scores[:, 0], y, rtol=1e-5, atol=1e-6)
    with pytest.raises(onnxcam.OnnxcamError, match="pass a dict"):
        ex.explain(x.numpy())


def _write_png(path, array):
    Image.fromarray(np.uint8(array)).save(path)
    return path


def test_two_input_model_cli(image_text, tmp_path, capsys):
    import json

    net, _, text, path = image_text
    img = _write_png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 255, (40, 40, 3)))
    np.save(tmp_path / "text.npy", text.numpy()[0])  # one sample, without the batch axis
    code = main(["explain", path, str(img), "-o", str(tmp_path / "out.png"), "--input",
                 f"text={tmp_path / 'text.npy'}", "--preset", "unit", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out)
    ex = onnxcam.Explainer(path)
    pp = ex.preprocessing(preset="unit")
    from onnxcam.images import preprocess

    xi = preprocess.to_tensor(preprocess.load_image(str(img)), pp)
    with torch.no_grad():
        expected = float(net(torch.from_numpy(xi), text[:1])[0, 0])
    assert abs(rec["top"][0]["score"] - expected) < 1e-4 and (tmp_path / "out.png").exists()


def test_cli_input_errors(image_text, tmp_path, capsys):
    _, _, text, path = image_text
    img = _write_png(tmp_path / "img.png", np.zeros((32, 32, 3)))
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 7), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((16,), np.int64))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "several.npz", a=np.zeros(16), b=np.zeros(16))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    cases = [
        ([], "also needs input(s) text"),
        (["--input", "text"], "NAME=FILE.npy"),
        (["--input", "nope=x.npy"], "no such input; inputs: image, text"),
        (["--input", f"image={tmp_path / 'ints.npy'}"], "is the explained image"),
        (["--input", f"text={tmp_path / 'missing.npy'}"], "file not found"),
        (["--input", f"text={tmp_path / 'wrong_shape.npy'}"], "has shape (2, 7); the model expects (N, 16)"),
        (["--input", f"text={tmp_path / 'ints.npy'}"], "has dtype int64; the model expects float32"),
        (["--input", f"text={tmp_path / 'objects.npy'}"], "cannot read"),
        (["--input", f"text={tmp_path / 'several.npz'}"], ".npz"),
        (["--input", f"text={tmp_path / 'garbage.npy'}"], "cannot read"),
    ]
    for args, message in cases:
        code = main(["explain", path, str(img), "-o", str(tmp_path / "o.png"), *args])
        _, err = capsys.readouterr()
        assert code == 2, (args, err)
        assert err.startswith("onnxcam: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err, (message, err)


# -- CLI: regions and boxes ------------------------------------------------------------------------------------
def test_cli_region_and_box(fcn, yolo_cli, tmp_path, capsys):
    import json

    _, _, _, seg_path, seg_ex = fcn
    img = _write_png(tmp_path / "img.png", np.random.default_rng(1).integers(0, 255, (64, 64, 3)))
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 5:40] = 1
    mask_path = _write_png(tmp_path / "mask.png", mask)
    code = main(["explain", seg_path, str(img), "--layer", seg_ex.layer, "--region", f"4:{mask_path}", "-o",
                 str(tmp_path / "seg.png"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out)
    r = seg_ex.explain_image(str(img), RegionTarget(4, mask))  # the same mask, resized the same way
    assert rec["target"] == "region of class 4 (mask)" and (tmp_path / "seg.png").exists()
    assert abs(rec["target_score"] - float(r.target_scores[0])) <= 1e-4 * max(1, abs(rec["target_score"]))

    _, _, yolo_path, yolo_layer = yolo_cli
    code = main(["explain", yolo_path, str(img), "--layer", yolo_layer, "--box", "5", "--field", "class:1",
                 "-o", str(tmp_path / "det.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "box 5 class 1 (score" in out and (tmp_path / "det.png").exists()
    code = main(["explain", yolo_path, str(img), "--layer", yolo_layer, "--target", "5,4", "--json", "-o",
                 str(tmp_path / "idx.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["target"] == "index (5,4)"
    # --output-name: a non-first output, here the pre-sigmoid head (the objectness logit).
    net, x, _, _ = yolo_cli
    code = main(["explain", yolo_path, str(img), "--layer", yolo_layer, "--output-name", "raw", "--box", "5",
                 "--json", "--preset", "unit", "-o", str(tmp_path / "raw.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    from onnxcam.images import preprocess

    xi = preprocess.to_tensor(preprocess.load_image(str(img)), onnxcam.Explainer(yolo_path, layer=yolo_layer).preprocessing(
        preset="unit"))
    with torch.no_grad():
        assert abs(json.loads(out)["target_score"] - float(net(torch.from_numpy(xi))[1][0, 5, 4])) < 1e-5


def test_cli_target_errors(tiny_seg, yolo_cli, tmp_path, capsys):
    seg_path, seg_layer = tiny_seg
    _, _, yolo_path, yolo_layer = yolo_cli
    img = _write_png(tmp_path / "img.png", np.zeros((32, 32, 3)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    seg = ["explain", seg_path, str(img), "--layer", seg_layer, "-o", str(tmp_path / "o.png")]
    det = ["explain", yolo_path, str(img), "--layer", yolo_layer, "-o", str(tmp_path / "o.png")]
    cases = [
        (seg + ["--region", "9"], "region class 9 is out of range"),
        (seg + ["--region", "cat"], "not a class index"),
        (seg + ["--region", "1:"], "CLASS or CLASS:MASK.png"),
        (seg + ["--region", f"1:{tmp_path / 'nope.png'}"], "mask not found"),
        (seg + ["--region", f"1:{tmp_path / 'bad.png'}"], "cannot read mask"),
        (seg + ["--region", f"1:{_write_png(tmp_path / 'empty.png', np.zeros((32, 32)))}"], "region mask is empty"),
        (seg + ["--region", f"1:{_write_png(tmp_path / 'dot.png', _dot(200))}"], "no pixel left on the output grid"),
        (seg + ["--region", "1", "--target", "3"], "--target and --region cannot be combined"),
        (seg + ["--box", "1"], "needs an (N, boxes, fields) output"),
        (det + ["--box", "999"], "box 999 is out of range"),
        (det + ["--box", "-1"], "--box -1 is out of range"),
        (det + ["--box", "1", "--field", "size"], "--field takes objectness, class or class:C"),
        (det + ["--box", "1", "--field", "class:x"], "class:C takes a class index"),
        (det + ["--box", "1", "--field", "class:9"], "class 9 is out of range"),
        (det + ["--field", "class"], "--field goes with --box"),
        (det + ["--box", "1", "--aug-smooth"], "aug_smooth"),
        (det + ["--target", "1,2,3"], "has 3 indices"),
        (det + ["--target", "1,999"], "out of range"),
    ]
    for args, message in cases:
        code = main(args)
        _, err = capsys.readouterr()
        assert code == 2, (args, err)
        assert err.startswith("onnxcam: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err, (message, err)


def _dot(size):
    """A size x size mask with one pixel set where a nearest-neighbour resize to 32x32 samples none."""
    m = np.zeros((size, size))
    m[1, 1] = 255
    return m


def test_cli_predicted_region_a_class_does_not_own_is_noted(tiny_seg, tmp_path, capsys):
    seg_path, seg_layer = tiny_seg
    img = _write_png(tmp_path / "img.png", np.zeros((32, 32, 3)))
    # a region target's result carries the (N, classes, H, W) output (the class path flattens it)
    probs = onnxcam.Explainer(seg_path, layer=seg_layer).explain_image(str(img), [RegionTarget(0)]).scores[0]
    absent = [c for c in range(probs.shape[0]) if not (probs.argmax(0) == c).any()]
    present = int(np.bincount(probs.argmax(0).ravel()).argmax())
    assert absent, "the zero image should leave some class without pixels"
    base = ["explain", seg_path, str(img), "--layer", seg_layer, "-o", str(tmp_path / "o.png"), "--preset", "imagenet",
            "--region"]
    assert main(base + [str(absent[0])]) == 0
    out, err = capsys.readouterr()
    assert "(score 0.0000)" in out
    assert err.strip() == (f"onnxcam: note: {img}: class {absent[0]} owns no pixel of the predicted mask: the region "
                           f"and its map are empty")
    assert main(base + [str(present)]) == 0
    assert capsys.readouterr().err == ""


def _auto_layer(path) -> str:
    from onnxcam.model import select
    from onnxcam.model.graph import infer_shapes, load_model

    return select.resolve(ModelView(infer_shapes(load_model(path))))[2][0]


def test_dense_outputs_default_to_the_head_input(fcn, yolo, tiny_seg):
    # Segmentation / detection scores keep positions; the default layer is the feature map the last
    # (per-position) conv reads: FCN's classifier[2] ReLU (input of the 512->21 1x1 conv), the detector's
    # backbone output, TinySeg's features -- not the output itself, and not a token reading of (N, boxes, fields).
    _, _, _, fcn_path, _ = fcn
    assert _auto_layer(fcn_path) == conv_input(fcn_path, [CLASSES, 512, 1, 1])
    _, _, yolo_path, yolo_layer = yolo
    assert _auto_layer(yolo_path) == yolo_layer
    seg_path, seg_layer = tiny_seg
    assert _auto_layer(seg_path) == seg_layer
