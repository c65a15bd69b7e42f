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


def test_a_model_without_preprocessing_metadata_says_what_it_assumed(tmp_path, capsys):
    from tests.test_batch_and_heads import two_branch_model
    import onnx

    path = tmp_path / "plain.onnx"
    onnx.save(two_branch_model(), str(path))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    assert main(["explain", str(path), str(tmp_path / "i.png"), "--layer", "a", "-o", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "carries no preprocessing metadata; normalising as ImageNet" in err and err.count("\n") == 1
    assert main(["explain", str(path), str(tmp_path / "i.png"), "--layer", "a", "--preset", "unit",
                 "-o", str(tmp_path / "b.png")]) == 0
    assert "note" not in capsys.readouterr().err


def test_metadata_command_makes_the_model_carry_its_preprocessing(tmp_path, capsys):
    from tests.test_batch_and_heads import two_branch_model
    import onnx

    path, tagged = tmp_path / "plain.onnx", tmp_path / "tagged.onnx"
    onnx.save(two_branch_model(), str(path))
    before = path.read_bytes()
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (8, 8, 3), np.uint8)).save(tmp_path / "i.png")
    assert main(["metadata", str(path), "-o", str(tagged), "--labels", str(tmp_path / "labels.txt"),
                 "--preset", "unit"]) == 0
    assert path.read_bytes() == before  # the input is never written
    capsys.readouterr()
    assert main(["explain", str(tagged), str(tmp_path / "i.png"), "--layer", "a", "--target", "two",
                 "-o", str(tmp_path / "t.png"), "--json"]) == 0
    out = capsys.readouterr()
    assert "note" not in out.err
    rec = json.loads(out.out)
    assert rec["target"] == 2 and rec["target_label"] == "two"
    # the stored preprocessing is the preset's: same scores as passing --preset unit to the plain model
    assert main(["explain", str(path), str(tmp_path / "i.png"), "--layer", "a", "--target", "2", "--preset", "unit",
                 "-o", str(tmp_path / "p.png"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert [t["score"] for t in rec["top"]] == [t["score"] for t in plain["top"]]
    assert main(["metadata", str(path), "-o", str(path), "--preset", "unit"]) == 2  # would overwrite the input
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    capsys.readouterr()
    assert main(["metadata", str(path), "-o", str(tmp_path / "y.onnx"), "--labels", str(tmp_path / "three.txt")]) == 2
    assert "3 labels for a score with 4 classes" in capsys.readouterr().err


def test_server_defaults_for_a_model_without_metadata(tmp_path):
    from tests.test_batch_and_heads import two_branch_model
    from onnxcam import serve

    ex = onnxcam.Explainer(two_branch_model(), layer="a")
    ex.use_defaults(["w", "x", "y", "z"], preset="unit")
    app = serve.create_app(ex)
    assert app.state.spec.labels == ["w", "x", "y", "z"]
    assert app.state.spec.pp.source == "preset" and app.state.spec.pp.scale == pytest.approx(1 / 255)
    with pytest.raises(OnnxcamError, match="2 labels given for a score with 4 classes"):
        ex.use_defaults(["a", "b"])


def test_big_photos_are_drawn_at_a_bounded_size(tmp_path, capsys):
    photo = tmp_path / "big.png"
    Image.fromarray(np.zeros((1500, 3000, 3), np.uint8)).save(photo)
    assert main(["explain", MODEL, str(photo), "-o", str(tmp_path / "o.png")]) == 0
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (2048, 1024)
    assert main(["explain", MODEL, str(photo), "--panel", "-o", str(tmp_path / "p.png")]) == 0
    with Image.open(tmp_path / "p.png") as im:
        assert max(im.size) <= 5 * 1024 + 200 and im.height <= 1024 + 200


def test_the_curl_examples_of_docs_serving_run(tmp_path):
    """docs/serving.md's V1 examples, run as written (a base64 photo on the command line exceeded the argument
    limit: the request bodies go through files)."""
    import re
    import shutil
    import subprocess

    from tests.test_serve import Server

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    text = (ROOT / "docs" / "serving.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if ":predict" in b or ":explain" in b][:2]
    assert len(blocks) == 2
    (tmp_path / "models").symlink_to(ROOT / "models")  # the examples run from a clone's root
    server = Server(tmp_path)
    try:
        for block in blocks:
            script = block.replace("localhost:8080", f"127.0.0.1:{server.port}")
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            answer = json.loads(res.stdout)
            assert answer.get("predictions", answer.get("explanations"))[0]["label"] == "Egyptian cat"
        assert json.loads(res.stdout)["explanations"][1]["label"] == "coffee mug"
    finally:
        server.stop()


def test_help_texts_and_the_readme_command_block(capsys):
    from onnxcam.cam.methods import exportable_methods

    with pytest.raises(SystemExit):
        cli.main(["export", "--help"], prog_name="onnxcam")
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(m in help_text for m in exportable_methods()) and "scorecam" not in help_text
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Command line"):readme.index("## Models, exporters, targets")]
    for command in cli.commands:  # every command is in the README's synopsis
        assert f"onnxcam {command} " in block, command
