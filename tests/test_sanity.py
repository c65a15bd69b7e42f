"""onnxcam.sanity: Adebayo et al.'s model-parameter randomisation and random-logit tests, and
`onnxcam evaluate --sanity`."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from scipy.stats import spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from onnxcam import Explainer, sanity
from onnxcam import metrics as M
from onnxcam.cli import main
from onnxcam.errors import OnnxcamError

SIZE = 32
CLASSES = 5


def tiny_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> Relu -> (x scale) -> GAP -> Flatten -> Gemm: every kind of
    initializer sanity checks must tell apart (weights, a bias, BN parameters and statistics, a constant)."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [init("w1", (8, 3, 3, 3)), init("b1", (8,), 0.1), init("bn_scale", (8,), 0.2),
             init("bn_bias", (8,), 0.1), numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bn_mean"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_var"),
             init("w2", (6, 8, 3, 3)), numpy_helper.from_array(np.float32([2.0]), "gain"),
             init("w3", (CLASSES, 6)), init("b3", (CLASSES,), 0.1)]
    inits[2] = numpy_helper.from_array((1 + rng.normal(0, 0.2, 8)).astype(np.float32), "bn_scale")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"],
                              name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Mul", ["r2", "gain"], ["g2"], name="gain"),
             helper.make_node("GlobalAveragePool", ["g2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return rng.normal(0, 1, (3, 3, SIZE, SIZE)).astype(np.float32)


def _inits(m) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_steps_go_from_the_score_back_and_take_only_learnt_parameters(model):
    steps = sanity.weight_steps(model)
    assert [(s.node, s.op) for s in steps] == [("fc", "Gemm"), ("conv2", "Conv"), ("bn1", "BatchNormalization"),
                                               ("conv1", "Conv")]
    assert [s.initializers for s in steps] == [("w3", "b3"), ("w2",), ("bn_scale", "bn_bias"), ("w1", "b1")]


def test_randomize_replaces_exactly_the_intended_initializers(model):
    before = model.SerializeToString()
    steps = sanity.weight_steps(model)
    out = sanity.randomize(model, steps[:2], seed=3)
    assert model.SerializeToString() == before  # the caller's model is untouched
    old, new = _inits(model), _inits(out)
    changed = {n for n in old if not np.array_equal(old[n], new[n])}
    assert changed == {"w3", "b3", "w2"}
    for n in changed:
        assert new[n].shape == old[n].shape and new[n].dtype == old[n].dtype
    # N(0, s^2) with the original's s: the 144-element w2 lands within 25% of it
    assert abs(new["w2"].std() / old["w2"].std() - 1) < 0.25 and abs(new["w2"].mean()) < 0.1
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]
    # a node draws the same weights alone (independent) as within a cascade
    alone = _inits(sanity.randomize(model, [steps[1]], seed=3, order=steps))
    assert np.array_equal(alone["w2"], new["w2"]) and np.array_equal(alone["w3"], old["w3"])
    # a constant tensor keeps its scale: a BN scale of ones becomes N(0, 1)
    ones = numpy_helper.from_array(np.ones(1000, np.float32), "s")
    drawn = numpy_helper.to_array(sanity.random_like(ones, np.random.default_rng(0)))
    assert abs(drawn.std() - 1) < 0.1


def test_similarities_equal_scipy_and_skimage():
    rng = np.random.default_rng(0)
    a = rng.random((40, 48))
    b = 0.5 * a + rng.random((40, 48))
    assert sanity.rank_correlation(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert sanity.rank_correlation(a, b) == pytest.approx(M.spearman(a, b), abs=1e-9)  # numpy ranks + Pearson
    scale = (lambda v: (v - v.min()) / (v.max() - v.min()))
    assert sanity.ssim(a, 3 * b + 1) == pytest.approx(structural_similarity(scale(a), scale(b), data_range=1.0))
    ha, hb = hog(scale(a)), hog(scale(b))  # skimage defaults: 9 orientations, 8 px cells, 3x3 blocks
    assert sanity.hog_similarity(a, b) == pytest.approx(np.corrcoef(ha, hb)[0, 1])
    assert sanity.rank_correlation(a, a) == pytest.approx(1) and sanity.hog_similarity(a, a) == pytest.approx(1)
    flat = np.zeros_like(a)  # a map with no ranking shares none
    assert sanity.rank_correlation(a, flat) == 0 and sanity.hog_similarity(a, flat) == 0
    assert np.isnan(sanity.hog_similarity(a[:20, :20], b[:20, :20]))


def test_cascading_steps_match_an_explainer_on_the_randomised_model(model, images):
    r = sanity.parameter_randomization(model, images, ["gradcam"], mode="cascading", seed=5)
    order = sanity.weight_steps(model)
    assert r.depths == [1, 2, 3, 4] and r.steps == [s.label() for s in order] and r.total == 4
    trained = Explainer(model, method="gradcam").explain(images)
    assert np.array_equal(r.targets, trained.targets)
    for j in (0, 3):
        rand = Explainer(sanity.randomize(model, order[:j + 1], 5), layer=trained.layer, method="gradcam")
        other = rand.explain(images, trained.targets)
        for k in range(len(images)):
            want = spearmanr(trained.heatmaps[k].ravel(), other.heatmaps[k].ravel()).statistic
            if np.ptp(other.heatmaps[k]) == 0:
                want = 0.0
            assert r.values["spearman"][0, j, k] == pytest.approx(want, abs=1e-6)
            assert r.values["ssim"][0, j, k] == pytest.approx(
                structural_similarity(trained.heatmaps[k].astype(np.float64) / np.ptp(trained.heatmaps[k]),
                                      other.heatmaps[k] / max(np.ptp(other.heatmaps[k]), 1e-30), data_range=1.0),
                abs=1e-5)
    sub = sanity.parameter_randomization(model, images, ["gradcam"], mode="cascading", seed=5, steps=2)
    assert sub.depths == [1, 4]
    np.testing.assert_allclose(sub.values["spearman"][0], r.values["spearman"][0, [0, 3]])


def test_weight_independent_map_stays_while_gradcam_changes(model, images):
    # Eigen-CAM reads only the activations of the explained layer: randomising the layers after it (the score's
    # Gemm) leaves its map exactly as it was; Grad-CAM's channel weights come from that Gemm and change.
    r = sanity.parameter_randomization(model, images, ["eigencam", "gradcam", "guided-backprop"],
                                       mode="independent", seed=0)
    assert r.mode == "independent" and r.depths == [1, 2, 3, 4]
    eigen, grad = r.mean("spearman")[0], r.mean("spearman")[1]
    assert eigen[0] == pytest.approx(1.0) and r.mean("ssim")[0, 0] == pytest.approx(1.0)
    assert grad[0] < 0.95
    assert eigen[1] < 0.99  # conv2 feeds the explained layer: now Eigen-CAM changes too
    assert r.examples["gradcam"].shape == (5, SIZE, SIZE)


def test_random_logit(model, images):
    r = sanity.random_logit(model, images, ["eigencam", "gradcam"], seed=0, targets=[0, 1, None])
    top = Explainer(model).explain(images[2:]).targets[0]
    assert r.targets.tolist() == [0, 1, top]
    assert all(0 <= o < CLASSES and o != t for o, t in zip(r.other_targets, r.targets))
    assert r.mean("spearman")[0, 0] == pytest.approx(1.0)  # class-agnostic
    assert r.mean("spearman")[1, 0] < 0.9
    assert "random-logit" in r.table()


def test_result_table_markdown_and_plot(model, images, tmp_path):
    r = sanity.parameter_randomization(model, images, ["gradcam"], steps=2)
    text = r.table()
    assert "Spearman |map|" in text and "HOG Pearson" in text and "4: conv1 (Conv)" in text
    assert r.markdown().splitlines()[2].startswith("| `gradcam` | ")
    r.plot(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size[0] > 100
    with pytest.raises(OnnxcamError, match="png"):
        r.plot(tmp_path / "p.jpg")
    r.write(tmp_path / "r.csv")
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 2 * len(images)


def test_errors_are_onnxcam_errors(model, images):
    with pytest.raises(OnnxcamError, match="mode"):
        sanity.parameter_randomization(model, images, ["gradcam"], mode="sideways")
    with pytest.raises(OnnxcamError, match="control"):
        sanity.parameter_randomization(model, images, ["center"])
    with pytest.raises(OnnxcamError, match="unknown method"):
        sanity.random_logit(model, images, ["gradkam"])
    weightless = onnx.ModelProto()
    weightless.CopyFrom(model)
    del weightless.graph.initializer[:]
    weightless.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                  for t in model.graph.initializer)
    with pytest.raises(OnnxcamError, match="nothing to randomise"):
        sanity.weight_steps(weightless)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, model, images):
    d = tmp_path_factory.mktemp("sanity")
    onnx.save(model, d / "tiny.onnx")
    data = d / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / f"im{i}.png")
    return d / "tiny.onnx", data


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_sanity(on_disk, capsys, tmp_path):
    path, data = on_disk
    code, out, err = run_cli(capsys, "evaluate", path, data, "--sanity", "cascading", "--method", "gradcam",
                             "--method", "guided-backprop", "--sanity-steps", "2", "--plot", tmp_path / "s.png",
                             "-o", tmp_path / "s.json")
    assert code == 0, err
    assert "sanity checks (cascading)" in err  # the progress bar, on stderr
    assert "model parameter randomisation (cascading, 4 weight-bearing nodes, 2 image(s))" in out
    assert "  1: fc (Gemm)" in out and "  4: conv1 (Conv)" in out
    assert (tmp_path / "s.png").is_file() and '"results"' in (tmp_path / "s.json").read_text()
    api = sanity.parameter_randomization(path, sorted(data.iterdir()), ["gradcam", "guided-backprop"], steps=2)
    row = next(ln for ln in out.splitlines() if ln.startswith("gradcam"))
    assert row.split()[1:] == [f"{v:.2f}" for v in api.mean("spearman")[0]]
    code, out, err = run_cli(capsys, "evaluate", path, data, "--sanity", "logit")
    assert code == 0 and "random-logit test on 2 image(s)" in out


@pytest.mark.parametrize("args, message", [
    (["--sanity", "logit", "--method", "random"], "control"),
    (["--sanity", "sideways"], "'sideways' is not one of"),
    (["--sanity-steps", "3"], "belong to --sanity"),
    (["--sanity", "cascading", "--plot", "x.jpg"], "must be a .png"),
    (["--sanity", "cascading", "--plot", "/nonexistent/x.png"], "does not exist"),
    (["--sanity", "cascading", "--controls"], "--controls"),
])
def test_cli_sanity_errors_are_one_line(on_disk, capsys, args, message):
    path, data = on_disk
    code, out, err = run_cli(capsys, "evaluate", path, data, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_matmul_bias_and_shared_weights_belong_to_the_first_node_from_the_score():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 1, (4, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.int64([1, 4]), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y0"], name="mm2"),  # the same weight, tied
             helper.make_node("Reshape", ["y0", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, b, shape])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    steps = sanity.weight_steps(m)
    assert [(s.node, s.initializers) for s in steps] == [("mm2", ("w",)), ("mm1", ("b",))]
    out = _inits(sanity.randomize(m, steps[:1]))
    assert not np.array_equal(out["w"], _inits(m)["w"]) and np.array_equal(out["shape"], [1, 4])
