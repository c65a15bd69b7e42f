"""onnxcam.metrics on hand-made cases, and against pytorch-grad-cam's metric implementations.

Agreement test: a torchvision ResNet-18 (random weights, seeded, 10 classes) exported to ONNX; the same
inputs and fixed CAMs go through pytorch-grad-cam's metrics (torch model) and onnxcam's (onnxruntime
session). Tolerance: 1e-4 absolute on every score (logits O(1), probabilities) -- the torch/onnxruntime
float32 difference plus our conjugate-gradient imputation (solved to 1e-10 there; ROAD's noise is 0 for
the exact comparison).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from onnxcam import metrics as M

# ----------------------------------------------------------------------------- localization


def test_connected_components_hand_made():
    m = np.array([[1, 1, 0, 0, 0],
                  [0, 1, 0, 0, 1],
                  [0, 0, 1, 0, 1],
                  [1, 0, 0, 0, 0]], bool)
    labels8, n8 = M.connected_components(m, 8)
    assert n8 == 3  # the diagonal step joins (1,1)-(2,2)
    assert labels8[0, 0] == labels8[2, 2] == 1 and labels8[1, 4] == labels8[2, 4] == 2 and labels8[3, 0] == 3
    labels4, n4 = M.connected_components(m, 4)
    assert n4 == 4 and labels4[2, 2] != labels4[1, 1]
    assert M.connected_components(np.zeros((3, 3)), 8)[1] == 0
    # a U shape: two runs that only meet further down
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool)
    assert M.connected_components(u, 4)[1] == 1


def test_connected_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w = rng.integers(1, 30, 2)
        m = rng.random((h, w)) < rng.random()
        for conn, structure in ((8, np.ones((3, 3))), (4, None)):
            ours, n = M.connected_components(m, conn)
            ref, n_ref = ndimage.label(m, structure=structure)
            assert n == n_ref and (ours == ref).all()


def test_largest_segment_box_and_localization():
    cam = np.zeros((20, 30))
    cam[2:6, 3:8] = 1.0      # small, strongest blob
    cam[10:18, 12:27] = 0.5  # the largest segment above 15% of the max
    cam[0:20, 27] = 0.1      # below 0.15 * max: ignored
    assert M.largest_segment_box(cam) == (12, 10, 27, 18)
    assert M.largest_segment_box(cam, threshold=0.05) == (12, 0, 28, 20)  # joined with the 0.1 column
    assert M.largest_segment_box(np.zeros((4, 4))) is None
    iou, box = M.localization(cam, [(0, 0, 5, 5), (12, 10, 27, 14)])
    assert box == (12, 10, 27, 18) and iou == pytest.approx(0.5)
    assert M.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert M.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_topk_localization_error():
    scores = np.array([0.1, 3.0, 2.0, -1.0, 0.5, 0.2, 0.0])
    assert M.topk_localization_error(scores, 1, 0.7, k=1) == 0.0
    assert M.topk_localization_error(scores, 1, 0.3, k=1) == 1.0  # right class, box off
    assert M.topk_localization_error(scores, 2, 0.9, k=1) == 1.0  # wrong class
    assert M.topk_localization_error(scores, 2, 0.9, k=5) == 0.0
    assert M.topk_localization_error(scores, 3, 0.9, k=5) == 1.0  # 3 is ranked last


def test_pointing_game_tolerance():
    mask = M.boxes_to_mask([(40, 40, 50, 50)], (100, 100))
    assert mask.sum() == 100 and mask[40, 40] and not mask[50, 50]
    cam = np.zeros((100, 100))
    cam[45, 45] = 1
    assert M.pointing_game(cam, mask)
    cam[:] = 0
    cam[45, 64] = 1  # 15 px right of column 49: exactly on the tolerance
    assert M.pointing_game(cam, mask, tolerance=15)
    assert not M.pointing_game(cam, mask, tolerance=14.9)
    cam[:] = 0
    cam[60, 60] = 1  # dx = dy = 11: 15.6 px from the corner pixel (49, 49)
    assert not M.pointing_game(cam, mask)
    assert M.pointing_game(cam, mask, tolerance=16)


# ----------------------------------------------------------------------------- perturbation metrics


def linear_model(weights: np.ndarray):
    """Class 0's logit = sum(weights * x); class 1's = 0."""
    def predict(batch):
        s = (batch * weights).reshape(len(batch), -1).sum(1)
        return np.stack([s, np.zeros_like(s)], 1)
    return predict


def test_deletion_insertion_by_hand():
    x = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    predict = linear_model(np.ones_like(x))
    saliency = np.array([[4.0, 3.0], [2.0, 1.0]])  # removes 1, then 2, 3, 4
    auc, f, s = M.deletion(x, saliency, 0, predict, steps=4, score="logit")
    np.testing.assert_allclose(f, [0, .25, .5, .75, 1])
    np.testing.assert_allclose(s, [10, 9, 7, 4, 0])
    assert auc == pytest.approx((10 + 9 + 7 + 4 + 0 - 5 - 0) / 4)
    auc, f, s = M.insertion(x, saliency, 0, predict, steps=4, score="logit", substrate=np.zeros_like(x))
    np.testing.assert_allclose(s, [0, 1, 3, 6, 10])
    assert auc == pytest.approx(3.75)
    # steps that do not divide the pixel count: round(i/steps * n) pixels; batches of 1 change nothing
    _, f, s = M.deletion(x, saliency, 0, predict, steps=3, score="logit", batch_size=1)
    np.testing.assert_allclose(s, [10, 9, 4, 0])  # 0, 1, 3, 4 pixels removed (round(4/3)=1, round(8/3)=3)
    # probability: softmax of (logit, 0)
    _, _, p = M.deletion(x, saliency, 0, predict, steps=4)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([10, 9, 7, 4, 0]))), rtol=1e-6)
    assert M.auc([0, 1, 1], [0, 0.5, 2]) == pytest.approx(0.25 + 1.5)


def test_gaussian_blur_keeps_constants_and_smooths():
    c = np.full((2, 9, 13), 3.0, np.float32)
    np.testing.assert_allclose(M.gaussian_blur(c), c, rtol=1e-6)
    spike = np.zeros((1, 21, 21), np.float32)
    spike[0, 10, 10] = 1
    b = M.gaussian_blur(spike)
    assert b.sum() == pytest.approx(1, rel=1e-5) and b[0, 10, 10] < 0.02 and b[0, 10, 15] > 0


def test_confidence_change_average_drop_increase():
    x = np.ones((1, 2, 2), np.float32)
    cam = np.array([[1.0, 0.5], [0.0, 0.5]])
    y, o = M.confidence_change(x, cam, 0, linear_model(np.ones_like(x)), score="logit")
    assert (y, o) == (4.0, 2.0)
    assert M.average_drop([0.8, 0.5], [0.6, 0.6]) == pytest.approx(100 * (0.25 + 0) / 2)
    assert M.increase_in_confidence([0.8, 0.5], [0.6, 0.6]) == 50.0


def test_noisy_linear_impute_by_hand():
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    keep = np.ones((3, 3), bool)
    keep[1, 1] = False  # the centre: the weighted mean of its 8 neighbours
    out = M.noisy_linear_impute(x, keep, noise=0)
    expected = sum(w * x[0, 1 + di, 1 + dj] for (di, dj), w in M.NEIGHBOURS)
    assert out[0, 1, 1] == pytest.approx(expected) and (out[0][keep] == x[0][keep]).all()
    # a constant image stays constant, wherever the holes are; noise has the stated size
    c = np.full((3, 16, 16), 2.5, np.float32)
    holes = np.random.default_rng(0).random((16, 16)) < 0.7
    np.testing.assert_allclose(M.noisy_linear_impute(c, ~holes, noise=0), c, atol=1e-4)
    noisy = M.noisy_linear_impute(c, ~holes, noise=0.01, rng=np.random.default_rng(1))
    assert 0.005 < (noisy - c)[:, holes].std() < 0.02
    # nothing kept: zeros
    assert (M.noisy_linear_impute(c, np.zeros((16, 16), bool), noise=0) == 0).all()


def _solve_missing_before_issue_16(known, keep, margins, tol, max_iter=100000):
    """The CG loop as it was before it was rewritten for speed (issue #16), kept verbatim as the reference."""
    c, h, w = known.shape
    m = (~keep)[None].astype(np.float64)
    top, bottom, left, right = (int(bool(v)) for v in margins)
    ones = np.pad(np.ones((1, h, w)), ((0, 0), (top, bottom), (left, right)))
    diag = M._neighbour_sum(ones)[:, top:top + h, left:left + w]
    rhs = M._neighbour_sum(known) * m
    v = np.zeros_like(known)
    r = rhs.copy()
    z = r / diag
    p = z.copy()
    rz = (r * z).sum(axis=(1, 2))
    stop = tol * np.sqrt((rhs ** 2).sum(axis=(1, 2))) + 1e-30
    for _ in range(max_iter):
        if np.all(np.sqrt((r ** 2).sum(axis=(1, 2))) <= stop):
            break
        ap = (diag * p - M._neighbour_sum(p)) * m
        alpha = rz / np.maximum((p * ap).sum(axis=(1, 2)), 1e-300)
        v += alpha[:, None, None] * p
        r -= alpha[:, None, None] * ap
        z = r / diag
        rz_new = (r * z).sum(axis=(1, 2))
        p = z + (rz_new / np.maximum(rz, 1e-300))[:, None, None] * p
        rz = rz_new
    return v


def test_road_equals_the_implementation_before_issue_16(monkeypatch):
    """The faster imputation changes rounding only: same imputed pixels, same ROAD scores, noise included.
    Smooth images with a blob of a map, as CAMs are; a softmax head so probabilities move."""
    rng = np.random.default_rng(3)
    size = 40
    yy, xx = np.mgrid[:size, :size] / size
    weights = rng.standard_normal((4, 3 * size * size)).astype(np.float32) / 20

    def predict(batch):
        return batch.reshape(len(batch), -1) @ weights.T

    cases = []
    for i in range(3):
        phase = rng.random((3, 1, 1)) * 6
        x = (np.sin(5 * xx + phase) * np.cos(3 * yy - phase) + 0.2 * rng.standard_normal((3, size, size)))
        cy, cx = rng.random(2) * 0.6 + 0.2
        cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        cases.append((x.astype(np.float32), cam.astype(np.float32), i % 4))
    new = [M.road(x, cam, t, predict, rng=np.random.default_rng(i)) for i, (x, cam, t) in enumerate(cases)]
    keep = M.road_keep(cases[0][1], 30, most_relevant=False)
    new_fill = M.noisy_linear_impute(cases[0][0], keep, noise=0)
    monkeypatch.setattr(M, "_solve_missing", _solve_missing_before_issue_16)
    old = [M.road(x, cam, t, predict, rng=np.random.default_rng(i)) for i, (x, cam, t) in enumerate(cases)]
    old_fill = M.noisy_linear_impute(cases[0][0], keep, noise=0)
    assert (~keep).mean() == pytest.approx(0.7, abs=0.01) and np.abs(old_fill - cases[0][0]).max() > 0.1
    np.testing.assert_allclose(new_fill, old_fill, rtol=0, atol=1e-5)
    for a, b in zip(new, old):
        assert abs(b["road"]) > 1e-3  # the scores really move, so equal numbers mean something
        np.testing.assert_allclose(a["morf_curve"], b["morf_curve"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(a["lerf_curve"], b["lerf_curve"], rtol=0, atol=1e-7)
        assert a["road"] == pytest.approx(b["road"], abs=1e-7)


def test_spearman_and_ranks():
    stats = pytest.importorskip("scipy.stats")
    np.testing.assert_allclose(M.rankdata([3, 1, 4, 1, 5]), [3, 1.5, 4, 1.5, 5])
    assert M.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert np.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, 30).astype(float)  # many ties
        b = a + rng.integers(0, 4, 30)
        assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)


def test_occlusion_sensitivity_and_faithfulness():
    h = w = 16
    weights = np.zeros((1, h, w), np.float32)
    weights[0, :8, :8] = 1  # only the top-left quadrant counts
    x = np.ones((1, h, w), np.float32)
    drops, boxes = M.occlusion_sensitivity(x, 0, linear_model(weights), patch=4, stride=4, fill=0.0)
    assert drops.shape == (4, 4) and len(boxes) == 16 and boxes[1] == (4, 0, 8, 4)
    np.testing.assert_allclose(drops, np.kron([[1, 0], [0, 0]], np.full((2, 2), 16.0)))
    good = weights[0] + 0.01 * np.arange(h * w).reshape(h, w) / (h * w)  # ties broken arbitrarily
    assert M.faithfulness(good, drops, boxes) > 0.7
    assert M.faithfulness(1 - good, drops, boxes) < -0.7
    omap = M.occlusion_map(drops, boxes, (h, w))
    assert omap[0, 0] == 16 and omap[12, 12] == 0
    # default patch 1/8 of the side, stride half of it, last position flush with the edge
    _, boxes = M.occlusion_sensitivity(np.ones((1, 20, 20), np.float32), 0, linear_model(np.ones((1, 20, 20))))
    assert boxes[0] == (0, 0, 2, 2) and boxes[-1] == (18, 18, 20, 20)


def test_controls_and_resize():
    c = M.center_map((32, 48))
    assert c.max() == pytest.approx(1, abs=0.01) and np.unravel_index(c.argmax(), c.shape) in [(15, 23), (16, 24), (15, 24), (16, 23)]
    r = M.random_map((32, 32), np.random.default_rng(0))
    assert r.min() == 0 and r.max() == pytest.approx(1) and not np.allclose(r, M.random_map((32, 32), np.random.default_rng(1)))
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).random((5, 7))
    ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=(12, 20), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(M.resize(a, (12, 20)), ref, atol=1e-12)


# ----------------------------------------------------------------------------- pytorch-grad-cam agreement

TOL = 1e-4


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_grad_cam")
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path_factory.mktemp("metrics") / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 48, 48),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predict = lambda b: sess.run(None, {"input": b})[0]  # noqa: E731
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 48, 48)).astype(np.float32)
    cams = np.stack([M.resize(rng.random((6, 6)), (48, 48)) for _ in range(3)]).astype(np.float32)
    cams[1] = M.center_map((48, 48))
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    targets = [int(t) for t in np.argsort(-logits, axis=1)[:, 1]]  # second-best class: not saturated
    np.testing.assert_allclose(predict(x), logits, atol=1e-4)
    return torch, model, predict, x, cams, targets


def _theirs_targets(targets, probability):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    cls = ClassifierOutputSoftmaxTarget if probability else ClassifierOutputTarget
    return [cls(t) for t in targets]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 on torch tensors, inside pytorch-grad-cam
@pytest.mark.parametrize("probability", [False, True])
def test_drop_and_increase_agree_with_pytorch_grad_cam(resnet, probability):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence

    torch, model, predict, x, cams, targets = resnet
    score = "probability" if probability else "logit"
    theirs_drop = DropInConfidence()(torch.from_numpy(x), cams, _theirs_targets(targets, probability), model)
    theirs_inc = IncreaseInConfidence()(torch.from_numpy(x), cams, _theirs_targets(targets, probability), model)
    for i, t in enumerate(targets):
        y, o = M.confidence_change(x[i], cams[i], t, predict, score=score)
        assert max(y - o, 0) == pytest.approx(float(theirs_drop[i]), abs=TOL)
        assert float(o > y) == float(theirs_inc[i])
        if probability:
            assert M.average_drop([y], [o]) == pytest.approx(100 * float(theirs_drop[i]) / y, abs=100 * TOL / y)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_road_agrees_with_pytorch_grad_cam(resnet, monkeypatch):
    from pytorch_grad_cam.metrics import road as theirs

    torch, model, predict, x, cams, targets = resnet
    # zero noise on their side (NoisyLinearImputer's default), and on ours
    monkeypatch.setattr(theirs.NoisyLinearImputer.__init__, "__defaults__", (0.0, theirs.neighbors_weights))
    percentiles = [30, 70]
    t_targets = _theirs_targets(targets, True)
    xt = torch.from_numpy(x)
    morf = np.stack([theirs.ROADMostRelevantFirst(p)(xt, cams, t_targets, model) for p in percentiles], 1)
    lerf = np.stack([theirs.ROADLeastRelevantFirst(p)(xt, cams, t_targets, model) for p in percentiles], 1)
    combined = theirs.ROADCombined(percentiles=percentiles)(xt, cams, t_targets, model)
    for i, t in enumerate(targets):
        ours = M.road(x[i], cams[i], t, predict, percentiles, noise=0.0, tol=1e-10)
        np.testing.assert_allclose(ours["morf_curve"], morf[i], atol=TOL)
        np.testing.assert_allclose(ours["lerf_curve"], lerf[i], atol=TOL)
        assert ours["road"] == pytest.approx(float(combined[i]), abs=TOL)
    # with ROAD's default noise (0.01, different random draws) the scores still agree closely
    monkeypatch.undo()
    torch.manual_seed(0)
    noisy = theirs.ROADCombined(percentiles=percentiles)(xt, cams, t_targets, model)
    for i, t in enumerate(targets):
        ours = M.road(x[i], cams[i], t, predict, percentiles, rng=np.random.default_rng(i))["road"]
        assert ours == pytest.approx(float(noisy[i]), abs=0.01)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_road_removes_the_same_pixels_as_pytorch_grad_cam(resnet):
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst

    torch, _, _, x, cams, _ = resnet
    seen = {}

    def spy(img, mask):
        seen["keep"] = mask.numpy() > 0.5
        return img

    for most, cls in ((True, RemoveMostRelevantFirst), (False, RemoveLeastRelevantFirst)):
        for p in (10, 35, 90):
            cls(p, spy)(torch.from_numpy(x[0]), torch.from_numpy(cams[0]))
            keep = M.road_keep(cams[0], p, most)
            assert (keep == seen["keep"]).all()
            assert abs((~keep).mean() - (1 - p / 100)) < 0.01
