"""docs/quickstart.ipynb runs from top to bottom in a real kernel (nbclient + ipykernel), in a temporary copy:
the repository's notebook keeps no outputs, and running it never writes any into it."""
from __future__ import annotations

import base64
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import onnxcam  # noqa: E402
from PIL import Image  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"


def test_repository_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(tmp_path):
    before = hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest()
    copy = tmp_path / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    # The kernel runs in tmp_path: the notebook's own files (its save()) land there, not in the repository.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest() == before

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    pngs = [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))) for o in outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]

    # The printed top five are the model's, computed here separately.
    ex = onnxcam.Explainer(str(MODEL))
    r = ex.explain_image(ROOT / "models" / "cat.png")
    p = np.exp(r.scores[0] - r.scores[0].max())
    p /= p.sum()
    for k in np.argsort(-p)[:5]:
        assert f"{ex.labels[k]:<16} class {k:>4}  p={p[k]:.4f}" in text
    assert ex.labels[int(np.argmax(p))] == "Egyptian cat"
    assert "'cofee mug' matches no class label; did you mean 'coffee mug'" in text

    # Every explanation displayed as a picture: the overlay of cat.png (its size plus a title strip), the
    # overlay() call, two classes, another method, the counterfactual, a batch of three as one grid.
    assert len(pngs) == 7
    cat_png = pngs[0]
    assert cat_png.width == 451 and cat_png.height > 300
    # The shown picture is the overlay of the explained map (under the title strip).
    strip = cat_png.height - 300
    shown = np.asarray(cat_png.convert("RGB"), np.int16)[strip:]
    assert np.abs(shown - np.asarray(r.overlay(), np.int16)).max() == 0
    assert (tmp_path / "cat_gradcam.png").exists()
    assert pngs[-1].width > 3 * 224  # the batch: three tiles side by side


# --------------------------------------------------------------------------- what the notebook relies on

@pytest.fixture(scope="module")
def explainer():
    return onnxcam.Explainer(str(MODEL))


def test_dir_lists_the_lazy_names():
    assert {"Explainer", "Explanation", "OnnxcamError"} <= set(dir(onnxcam))


def test_label_targets_are_the_class_indices(explainer):
    photo = ROOT / "models" / "cat_and_cup.png"
    by_index = explainer.explain_image(photo, 504)
    for label in ("coffee mug", "Coffee Mug", "  coffee mug "):
        r = explainer.explain_image(photo, label)
        assert r.targets.tolist() == [504]
        np.testing.assert_array_equal(r.heatmaps, by_index.heatmaps)
    x = r.extras["input"]
    batch = explainer.explain(np.concatenate([x, x]), ["Egyptian cat", 504])
    assert batch.targets.tolist() == [285, 504]
    np.testing.assert_allclose(batch.heatmaps[1], by_index.heatmaps[0], atol=1e-6)  # batch 2 vs 1: float rounding
    assert explainer.explain(x, np.array(["tabby"])).targets.tolist() == [281]


@pytest.mark.parametrize("label, message", [
    ("cofee mug", "target 'cofee mug' matches no class label; did you mean 'coffee mug'?"),
    ("cat", "did you mean 'tiger cat', 'Persian cat', 'Siamese cat'"),
    ("qqqqqq", "target 'qqqqqq' matches no class label (the model has 1000 labels)"),
])
def test_unknown_labels_say_what_comes_close(explainer, label, message):
    with pytest.raises(onnxcam.OnnxcamError, match=None) as info:
        explainer.explain_image(ROOT / "models" / "cat.png", label)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_labels_naming_several_classes_or_none(explainer, monkeypatch):
    monkeypatch.setattr(explainer, "labels", ["a", "b", "A", "b"])
    assert explainer.class_index("a") == 0 and explainer.class_index("A") == 2  # exact match first
    with pytest.raises(onnxcam.OnnxcamError, match=r"'b' names 2 classes \(1, 3\); pass the class index"):
        explainer.class_index("b")
    monkeypatch.setattr(explainer, "labels", None)
    with pytest.raises(onnxcam.OnnxcamError, match="the model has no class labels"):
        explainer.class_index("a")


def test_unknown_keywords_of_explain_image(explainer):
    cat = ROOT / "models" / "cat.png"
    with pytest.raises(onnxcam.OnnxcamError, match=r"unknown keyword\(s\) 'target' \(did you mean 'targets'\?\); "
                                                   r"it accepts targets, counterfactual, pp, aug_smooth"):
        explainer.explain_image(cat, target=504)
    with pytest.raises(onnxcam.OnnxcamError, match=r"unknown keyword\(s\) 'colour'; it accepts"):
        explainer.explain_image(cat, colour="red", size=224)


def test_overlay_save_and_display(explainer, tmp_path):
    from onnxcam.images import preprocess, render

    photo = preprocess.load_image(ROOT / "models" / "cat.png")
    r = explainer.explain_image(photo)
    np.testing.assert_array_equal(np.asarray(r.overlay(alpha=0.3)), np.asarray(render.overlay(photo, r.heatmaps[0],
                                                                                               alpha=0.3)))
    assert r.save(tmp_path / "o.png") == tmp_path / "o.png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(r.overlay()))
    # explain(x): drawn on the input tensor, min-max scaled
    x = r.extras["input"]
    batch = explainer.explain(np.concatenate([x, x[:, :, ::-1]]), [285, 504])
    want = render.overlay(render.tensor_image(x[0, :, ::-1]), batch.heatmaps[1])
    np.testing.assert_array_equal(np.asarray(batch.overlay(1)), np.asarray(want))
    assert batch.title(1) == "coffee mug (504) - gradcam"
    grid = Image.open(io.BytesIO(batch._repr_png_()))
    assert grid.width == 2 * 224 + 6 and grid.height > 224
    for bad in (2, -3, 1.0):
        with pytest.raises(onnxcam.OnnxcamError, match="out of range: the explanation has 2 sample"):
            batch.overlay(bad)
    with pytest.raises(onnxcam.OnnxcamError, match="overlay alpha must be between 0 and 1"):
        batch.overlay(0, alpha=2)
