"""Rough edges a new user meets on the CLI (issue #16): label and method spellings, output names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import onnxcam
from onnxcam.cli import cli, main
from onnxcam.errors import OnnxcamError
from onnxcam.images.labels import match_label
from onnxcam.cam.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "efficientnet_lite0.onnx")
CAT = str(ROOT / "models" / "cat.png")


@pytest.fixture(scope="module")
def labels():
    return onnxcam.Explainer(MODEL).labels


def test_labels_exact_match_before_case_insensitive(labels):
    # ImageNet has both: 264 "Cardigan" (the dog) and 474 "cardigan" (the sweater).
    assert labels[264] == "Cardigan" and labels[474] == "cardigan"
    assert match_label("cardigan", labels) == 474
    assert match_label("Cardigan", labels) == 264
    assert match_label("egyptian CAT", labels) == labels.index("Egyptian cat")


def test_labels_a_word_of_one_label_and_suggestions(labels):
    assert match_label("mug", labels) == labels.index("coffee mug")
    with pytest.raises(OnnxcamError, match="did you mean 'tiger cat', 'Persian cat'"):
        match_label("cat", labels)


@pytest.mark.parametrize("spelling", ["GradCAM", "grad-cam", "Grad_CAM", "gradcam"])
def test_method_names_any_case(spelling):
    assert get_method(spelling).name == "gradcam"
    assert get_method("GradCAM++").name == "gradcam++"
    assert get_method("Guided_Backprop").name == "guided-backprop"


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(OnnxcamError, match=r"did you mean gradcam"):
        get_method("gradcm")


def _explain(args):
    return CliRunner().invoke(cli, ["explain", MODEL, *args])


def test_cli_label_and_method_spellings(tmp_path):
    res = _explain([CAT, "--target", "mug", "--method", "GradCAM", "-o", str(tmp_path / "o.png"), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["target"] == 504 and rec["method"] == "gradcam"


@pytest.mark.parametrize("name,fmt", [("o.webp", "WEBP"), ("o.jpg", "JPEG"), ("o.png", "PNG")])
def test_overlay_format_from_the_extension(tmp_path, name, fmt):
    res = _explain([CAT, "-o", str(tmp_path / name)])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / name) as im:
        assert im.format == fmt


@pytest.mark.parametrize("args,message", [
    (lambda t: [CAT, "-o", str(t / "x.npy")], "is not an image format"),
    (lambda t: [CAT, CAT, "-o", str(t / "two.png")], "names one file but 2 images"),
])
def test_output_names_that_are_errors(tmp_path, capsys, args, message):
    assert main(["explain", MODEL, *args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxcam: error:") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made


def test_folder_with_a_dot_still_works(tmp_path):
    folder = tmp_path / "run.v2"
    folder.mkdir()
    res = _explain([CAT, CAT, "-o", str(folder)])
    assert res.exit_code == 0, res.output
    assert len(list(folder.iterdir())) == 2
    np.testing.assert_array_equal(*[np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])


def test_layers_lists_layouts_and_no_1x1_maps(capsys):
    assert main(["layers", MODEL]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines and all(line.rstrip().endswith("]") for line in lines)  # every row names its layout
    assert "[channels-first]" in lines[0]
    assert not any("spatial 1x1" in line for line in lines)


def test_status_line_names_the_options_and_what_was_used(tmp_path, capsys):
    assert main(["explain", MODEL, CAT, "--counterfactual", "--eigen-smooth", "-o", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "gradcam (counterfactual) (eigen-smooth) for class" in out
    assert main(["explain", MODEL, CAT, "--method", "guided-backprop", "-o", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert "from the input gradient" in out and "at layer" not in out


def test_counterfactual_needs_a_gradient_method(tmp_path, capsys):
    assert main(["explain", MODEL, CAT, "--counterfactual", "--method", "eigencam", "-o", str(tmp_path / "c.png")]) == 2
    assert "counterfactual" in capsys.readouterr().err
    with pytest.raises(OnnxcamError, match="counterfactual maps need gradients"):
        onnxcam.Explainer(MODEL, method="eigencam").explain_image(CAT, counterfactual=True)


def test_layer_lists_may_be_comma_separated(tmp_path, capsys):
    layer = onnxcam.Explainer(MODEL).layer
    assert main(["explain", MODEL, CAT, "--layer", f"{layer},{layer}", "-o", str(tmp_path / "d.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [layer, layer]
