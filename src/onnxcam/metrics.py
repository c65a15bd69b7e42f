"""Explanation-quality metrics: plain functions on numpy arrays (numpy only, no scipy, no torch).

Conventions
-----------
* A *map* (CAM, heatmap, saliency) is a float array (H, W); larger means more important. Heatmaps from
  `Explainer.explain` are in [0, 1], which ROAD's least-relevant-first ordering (`1 - map`) assumes.
* An image `x` is ONE sample, channels first (C, H, W), in the model's input space (after normalisation).
* `predict(batch)` takes (N, C, H, W) float32 and returns (N, K) class scores (logits; anything that
  reshapes to (N, K)). Metrics call it with at most `batch_size` images at a time.
* `score="probability"` reads softmax(scores)[target], `score="logit"` reads scores[target].
* Boxes are (x0, y0, x1, y1) in pixel-edge coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1),
  so x1 and y1 are exclusive (like PIL crop boxes) and the area is (x1 - x0) * (y1 - y0).

Where pytorch-grad-cam has the metric (`pytorch_grad_cam/metrics/`), the definition here is the same
(DropInConfidence, IncreaseInConfidence, ROADMostRelevantFirst / LeastRelevantFirst / Combined with the
same noisy linear imputation); tests/test_metrics.py checks this number for number.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]
Box = Sequence[float]

__all__ = [
    "connected_components", "largest_segment_box", "box_iou", "localization", "topk_localization_error",
    "boxes_to_mask", "pointing_game", "perturbation_curve", "deletion", "insertion", "auc", "gaussian_blur",
    "confidence_change", "average_drop", "increase_in_confidence", "noisy_linear_impute", "road_keep",
    "road_perturb",
    "road", "occlusion_sensitivity", "occlusion_map", "faithfulness", "rankdata", "spearman", "resize",
    "random_map", "center_map", "ROAD_PERCENTILES",
]

# ----------------------------------------------------------------------------- localization


def connected_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Labels the connected segments of a boolean (H, W) mask.

    Returns (labels, n): labels is int32 (H, W), 0 for background and 1..n for the segments, numbered in
    raster order of their first pixel (the numbering `scipy.ndimage.label` uses). `connectivity` is 8
    (diagonal neighbours touch) or 4. Run-length union-find: O(pixels) numpy plus O(runs) Python.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    h, w = m.shape
    labels = np.zeros((h, w), np.int32)
    if not m.any():
        return labels, 0
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = m
    d = np.diff(padded, axis=1)
    run_row, run_start = np.nonzero(d == 1)  # row-major order: runs sorted by row, then column
    _, run_end = np.nonzero(d == -1)  # exclusive
    n_runs = run_row.size
    parent = list(range(n_runs))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    slack = 1 if connectivity == 8 else 0
    first = np.searchsorted(run_row, np.arange(h + 1)).tolist()
    starts, ends = run_start.tolist(), run_end.tolist()
    for r in range(1, h):
        i, i_stop, j, j_stop = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_stop and j < j_stop:  # sweep the runs of rows r-1 and r for overlaps
            if starts[i] < ends[j] + slack and starts[j] < ends[i] + slack:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] + slack <= ends[j]:
                i += 1
            else:
                j += 1
    roots = np.fromiter((find(k) for k in range(n_runs)), np.int64, n_runs)
    is_root = roots == np.arange(n_runs)  # a root is the first run (raster order) of its segment
    ids = np.cumsum(is_root).astype(np.int32)
    run_label = ids[roots]
    lengths = run_end - run_start
    flat = np.repeat(run_row * w + run_start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    labels.ravel()[flat] = np.repeat(run_label, lengths)
    return labels, int(ids[-1])


def largest_segment_box(cam: np.ndarray, threshold: float = 0.15) -> tuple[int, int, int, int] | None:
    """The Grad-CAM paper's weakly-supervised box: keep the pixels with cam >= threshold * max(cam), take
    the largest 8-connected segment (ties: the first in raster order), return its bounding box
    (x0, y0, x1, y1), exclusive ends. None when the map has no positive maximum."""
    a = np.asarray(cam, dtype=np.float64)
    peak = a.max() if a.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return None
    labels, n = connected_components(a >= threshold * peak)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def localization(cam: np.ndarray, gt_boxes: Sequence[Box], threshold: float = 0.15):
    """(IoU, box): the box of `largest_segment_box(cam, threshold)` and its best IoU over the ground-truth
    boxes (0 when the map gives no box). Localization is correct when IoU >= 0.5."""
    box = largest_segment_box(cam, threshold)
    if box is None or not len(gt_boxes):
        return 0.0, box
    return max(box_iou(box, g) for g in gt_boxes), box


def topk_localization_error(scores: np.ndarray, label: int, iou: float, k: int = 1,
                            iou_threshold: float = 0.5) -> float:
    """ILSVRC localization error as in the Grad-CAM paper: 1.0 when `label` is not among the k top-scoring
    classes OR the box of the label's map has IoU < iou_threshold with the ground truth, else 0.0.
    (`iou` must come from the map for class `label`; for k=1 and a correct prediction that is the map of
    the predicted class, as the paper uses.)"""
    scores = np.asarray(scores).reshape(-1)
    top = np.argsort(-scores, kind="stable")[:k]
    return 0.0 if (int(label) in top.tolist() and iou >= iou_threshold) else 1.0


def boxes_to_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres lie inside any of the boxes."""
    h, w = shape
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        c0, c1 = max(0, int(np.ceil(x0 - 0.5))), min(w, int(np.ceil(x1 - 0.5)))
        r0, r1 = max(0, int(np.ceil(y0 - 0.5))), min(h, int(np.ceil(y1 - 0.5)))
        if c1 > c0 and r1 > r0:
            m[r0:r1, c0:c1] = True
    return m


def pointing_game(cam: np.ndarray, mask: np.ndarray, tolerance: float = 15.0) -> bool:
    """Pointing game (Zhang et al., 2016): a hit when the map's maximum (the first in raster order when
    several pixels tie) lies within `tolerance` pixels (Euclidean) of an object pixel of `mask`."""
    a = np.asarray(cam)
    m = np.asarray(mask, bool)
    if a.shape != m.shape:
        raise ValueError(f"map {a.shape} and mask {m.shape} differ in shape")
    r, c = np.unravel_index(int(np.argmax(a)), a.shape)
    t = int(np.floor(tolerance))
    r0, c0 = max(0, r - t), max(0, c - t)
    rows, cols = np.nonzero(m[r0:r + t + 1, c0:c + t + 1])
    return bool(rows.size and ((rows + r0 - r) ** 2 + (cols + c0 - c) ** 2 <= tolerance ** 2).any())


# ----------------------------------------------------------------------------- model queries


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _target_scores(predict: Predict, images: Iterable[np.ndarray], target: int, score: str,
                   batch_size: int) -> np.ndarray:
    """Runs the images through `predict` in chunks of batch_size; returns the target's score per image."""
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    out, chunk = [], []

    def flush():
        raw = np.asarray(predict(np.ascontiguousarray(np.stack(chunk), np.float32)), np.float64)
        raw = raw.reshape(len(chunk), -1)
        out.append((_softmax(raw) if score == "probability" else raw)[:, target])
        chunk.clear()

    for img in images:
        chunk.append(img)
        if len(chunk) >= batch_size:
            flush()
    if chunk:
        flush()
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------- deletion / insertion


def gaussian_blur(x: np.ndarray, size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """Separable Gaussian blur of a (C, H, W) image (RISE's insertion start: 11x11, sigma 5), edges
    replicated."""
    r = size // 2
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.asarray(x, np.float64)
    p = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="edge")
    a = sum(k[i] * p[:, i:i + a.shape[1], :] for i in range(size))
    p = np.pad(a, ((0, 0), (0, 0), (r, r)), mode="edge")
    a = sum(k[i] * p[:, :, i:i + a.shape[2]] for i in range(size))
    return a.astype(np.float32)


def auc(y: np.ndarray, x: np.ndarray | None = None) -> float:
    """Area under a curve by the trapezoid rule; x defaults to equal steps over [0, 1] (RISE's
    `(sum(y) - y[0]/2 - y[-1]/2) / (len(y) - 1)`)."""
    y = np.asarray(y, np.float64)
    if y.size < 2:
        return float("nan")
    if x is None:
        return float((y.sum() - y[0] / 2 - y[-1] / 2) / (y.size - 1))
    x = np.asarray(x, np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def perturbation_curve(x: np.ndarray, saliency: np.ndarray, target: int, predict: Predict,
                       mode: str = "deletion", steps: int = 20, substrate: np.ndarray | None = None,
                       score: str = "probability", batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """RISE deletion / insertion curve (Petsiuk et al., 2018).

    Pixels are ranked by saliency (descending, ties in raster order). At step i = 0..steps the first
    round(i/steps * H*W) pixels (all channels) are
      * deletion: replaced by `substrate` (default zeros, i.e. the mean colour of a normalised input),
        starting from the image;
      * insertion: copied from the image into `substrate` (default the image blurred with an 11x11,
        sigma=5 Gaussian), starting from the substrate.
    Returns (fractions, scores): the fraction of pixels changed and the target's score after each step.
    A faithful map gives a low deletion AUC and a high insertion AUC.
    """
    x = np.asarray(x, np.float32)
    c, h, w = x.shape
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if substrate is None:
        substrate = np.zeros_like(x) if mode == "deletion" else gaussian_blur(x)
    substrate = np.broadcast_to(np.asarray(substrate, np.float32), x.shape)
    start, finish = (x, substrate) if mode == "deletion" else (substrate, x)
    order = np.argsort(-np.asarray(saliency, np.float64).reshape(-1), kind="stable")
    if order.size != h * w:
        raise ValueError(f"saliency {np.shape(saliency)} does not match the image {x.shape}")
    counts = np.round(np.arange(steps + 1) * (h * w) / steps).astype(np.int64)
    start_flat, finish_flat = start.reshape(c, -1), finish.reshape(c, -1)

    def images():
        for n in counts:
            img = start_flat.copy()
            idx = order[:n]
            img[:, idx] = finish_flat[:, idx]
            yield img.reshape(c, h, w)

    return counts / (h * w), _target_scores(predict, images(), target, score, batch_size)


def deletion(x, saliency, target, predict, **kwargs) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, fractions, scores) of the deletion curve; lower AUC = more faithful."""
    f, s = perturbation_curve(x, saliency, target, predict, mode="deletion", **kwargs)
    return auc(s, f), f, s


def insertion(x, saliency, target, predict, **kwargs) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, fractions, scores) of the insertion curve; higher AUC = more faithful."""
    f, s = perturbation_curve(x, saliency, target, predict, mode="insertion", **kwargs)
    return auc(s, f), f, s


# ----------------------------------------------------------------------------- Average Drop / Increase


def confidence_change(x: np.ndarray, cam: np.ndarray, target: int, predict: Predict,
                      score: str = "probability", batch_size: int = 32) -> tuple[float, float]:
    """(Y, O): the target's score on the image and on the image multiplied by the map (Grad-CAM++'s
    explanation map E = x * cam, channels broadcast; pytorch-grad-cam's `multiply_tensor_with_cam` on the
    normalised input)."""
    x = np.asarray(x, np.float32)
    masked = x * np.asarray(cam, np.float32)[None]
    y, o = _target_scores(predict, [x, masked], target, score, batch_size)
    return float(y), float(o)


def average_drop(y, o) -> float:
    """Average Drop % (Chattopadhay et al., 2018): 100 * mean(max(0, Y - O) / Y) over images, Y and O as
    in `confidence_change` (defined for positive scores, i.e. probabilities). Lower is better.
    pytorch-grad-cam's DropInConfidence is the un-normalised max(0, Y - O) per image."""
    y, o = np.asarray(y, np.float64), np.asarray(o, np.float64)
    return float(100 * np.mean(np.maximum(0.0, y - o) / y))


def increase_in_confidence(y, o) -> float:
    """Increase in Confidence % (Chattopadhay et al., 2018): 100 * the fraction of images with O > Y
    (pytorch-grad-cam's IncreaseInConfidence per image is float(O - Y > 0)). Higher is better."""
    return float(100 * np.mean(np.asarray(o, np.float64) > np.asarray(y, np.float64)))


# ----------------------------------------------------------------------------- ROAD

# Noisy linear imputation's neighbour weights (Rong et al., 2022; pytorch-grad-cam metrics/road.py).
NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
              ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _neighbour_sum(a: np.ndarray) -> np.ndarray:
    """sum_n w_n a[..., i + di, j + dj] over the 8 neighbours, zero outside the image. The weights are
    ([1 2 1] x [1 2 1] - 4 delta) / 12, so two separable [1 2 1] passes do it."""
    t = 2 * a
    t[..., 1:, :] += a[..., :-1, :]
    t[..., :-1, :] += a[..., 1:, :]
    u = 2 * t
    u[..., 1:] += t[..., :-1]
    u[..., :-1] += t[..., 1:]
    u -= 4 * a
    u /= 12
    return u


def noisy_linear_impute(x: np.ndarray, keep: np.ndarray, noise: float = 0.01,
                        rng: np.random.Generator | None = None, tol: float = 1e-5) -> np.ndarray:
    """ROAD's noisy linear imputation of a (C, H, W) image: every pixel where `keep` is False gets the
    value that makes it the weighted mean of its 8 neighbours (weights 1/6 edge, 1/12 diagonal; neighbours
    outside the image do not count), i.e. the solution of the sparse linear system of pytorch-grad-cam's
    NoisyLinearImputer, plus N(0, noise^2) noise.

    Solved without scipy by Jacobi-preconditioned conjugate gradients (the system is symmetric positive
    definite) to a relative residual of `tol`, on the bounding box of the missing pixels. The default
    tol=1e-5 puts the imputed values within ~1e-3 of an exact sparse solve (well inside the noise); pass
    a smaller tol to match it more closely. When nothing is kept the image is filled with 0 (+ noise).
    """
    x = np.asarray(x, np.float32)
    keep = np.asarray(keep, bool)
    missing = ~keep
    if not missing.any():
        return x.copy()
    h, w = keep.shape
    rows, cols = np.nonzero(missing)
    r0, r1 = max(0, rows.min() - 1), min(h, rows.max() + 2)
    c0, c1 = max(0, cols.min() - 1), min(w, cols.max() + 2)
    v = np.zeros((x.shape[0], h, w))
    if keep.any():
        # The crop's own border only matters where it is the image border: every other border pixel is
        # kept, so the in-image neighbour weights of the missing pixels are unchanged.
        k = keep[r0:r1, c0:c1]
        sub = _solve_missing(np.where(k, x[:, r0:r1, c0:c1], 0).astype(np.float64), k, (r0, h - r1, c0, w - c1), tol)
        v[:, r0:r1, c0:c1] = sub
    out = x.copy()
    rng = rng if rng is not None else np.random.default_rng()
    fill = v + noise * rng.standard_normal(v.shape) if noise else v
    out[:, missing] = fill[:, missing].astype(np.float32)
    return out


def _solve_missing(known: np.ndarray, keep: np.ndarray, margins, tol: float, max_iter: int = 100000) -> np.ndarray:
    """Values at the missing pixels solving `(S - W) v = W known` there (S: in-image neighbour weight)."""
    c, h, w = known.shape
    m = (~keep)[None].astype(np.float64)
    # neighbour weights inside the *image*: pad the crop with ones where the image continues
    top, bottom, left, right = (int(bool(v)) for v in margins)
    ones = np.pad(np.ones((1, h, w)), ((0, 0), (top, bottom), (left, right)))
    diag = _neighbour_sum(ones)[:, top:top + h, left:left + w]
    rhs = _neighbour_sum(known) * m
    # This loop is ROAD's whole cost (hundreds of iterations per perturbed image), so every step writes
    # into preallocated buffers and the stencil is folded into two masked products: with T the separable
    # [1 2 1] x [1 2 1] filter, W p = (T p - 4 p) / 12, hence (S - W) p = (S + 1/3) p - T p / 12.
    # The iterates are the textbook loop's up to rounding.
    dm = m * (diag + 1 / 3)
    m12 = m / 12
    inv_diag = np.broadcast_to(1 / diag, known.shape)

    def dots(a, b):  # per channel, without a temporary; not BLAS, whose threads fight a busy machine
        return np.einsum("chw,chw->c", a, b)

    v = np.zeros_like(known)
    r = rhs
    z = r / diag
    p = z.copy()
    ap, t, u = np.empty_like(known), np.empty_like(known), np.empty_like(known)
    rz = dots(r, z)
    stop = tol * np.sqrt(dots(rhs, rhs)) + 1e-30
    for _ in range(max_iter):
        if np.all(np.sqrt(dots(r, r)) <= stop):
            break
        np.multiply(p, 2, out=t)
        t[:, 1:] += p[:, :-1]
        t[:, :-1] += p[:, 1:]
        np.multiply(t, 2, out=u)
        u[:, :, 1:] += t[:, :, :-1]
        u[:, :, :-1] += t[:, :, 1:]
        np.multiply(u, m12, out=u)
        np.multiply(p, dm, out=ap)
        ap -= u
        alpha = (rz / np.maximum(dots(p, ap), 1e-300))[:, None, None]
        v += np.multiply(p, alpha, out=t)
        r -= np.multiply(ap, alpha, out=t)
        np.multiply(r, inv_diag, out=z)
        rz_new = dots(r, z)
        p *= (rz_new / np.maximum(rz, 1e-300))[:, None, None]
        p += z
        rz = rz_new
    return v


def road_keep(cam: np.ndarray, percentile: float, most_relevant: bool = True) -> np.ndarray:
    """The pixels ROAD keeps at one percentile, as pytorch-grad-cam's RemoveMostRelevantFirst /
    RemoveLeastRelevantFirst: MoRF keeps cam < percentile(cam, p), so the (100-p)% most relevant pixels
    go; LeRF does the same on 1 - cam, so the (100-p)% least relevant go. (float32 throughout, as there.)"""
    m = np.asarray(cam, np.float32)
    if not most_relevant:
        m = np.float32(1) - m
    return m < np.percentile(m, percentile)


def road_perturb(x: np.ndarray, cam: np.ndarray, percentile: float, most_relevant: bool = True,
                 noise: float = 0.01, rng: np.random.Generator | None = None, tol: float = 1e-5) -> np.ndarray:
    """One ROAD input: `x` with the pixels `road_keep` drops filled by `noisy_linear_impute`."""
    return noisy_linear_impute(x, road_keep(cam, percentile, most_relevant), noise=noise, rng=rng, tol=tol)


def road(x: np.ndarray, cam: np.ndarray, target: int, predict: Predict,
         percentiles: Sequence[float] = ROAD_PERCENTILES, noise: float = 0.01,
         rng: np.random.Generator | None = None, score: str = "probability",
         batch_size: int = 32, tol: float = 1e-5) -> dict:
    """ROAD (Rong et al., 2022) as pytorch-grad-cam computes it. For each percentile p the target's score
    change S(perturbed) - S(x) under MoRF and under LeRF removal (`road_perturb`); `morf` and `lerf` are
    their means over the percentiles and `road` = (lerf - morf) / 2 (ROADCombined: higher = more
    faithful; MoRF should fall fast, LeRF stay). Returns {"morf", "lerf", "road", "morf_curve",
    "lerf_curve"} (curves: one change per percentile)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    images = [np.asarray(x, np.float32)]
    for most in (True, False):
        images += [road_perturb(x, cam, p, most, noise, rng, tol) for p in percentiles]
    s = _target_scores(predict, images, target, score, batch_size)
    k = len(percentiles)
    morf, lerf = s[1:1 + k] - s[0], s[1 + k:] - s[0]
    return {"morf": float(morf.mean()), "lerf": float(lerf.mean()), "road": float((lerf.mean() - morf.mean()) / 2),
            "morf_curve": morf, "lerf_curve": lerf}


# ----------------------------------------------------------------------------- occlusion faithfulness


def _positions(size: int, patch: int, stride: int) -> list[int]:
    pos = list(range(0, max(size - patch, 0) + 1, stride))
    if pos[-1] + patch < size:
        pos.append(size - patch)
    return pos


def occlusion_sensitivity(x: np.ndarray, target: int, predict: Predict, patch: int | Sequence[int] | None = None,
                          stride: int | Sequence[int] | None = None, fill=0.0, score: str = "logit",
                          batch_size: int = 32) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Occlusion sensitivity (Zeiler & Fergus, 2014): slide a `patch` (default 1/8 of the image side) with
    `stride` (default half the patch; the last position is flush with the edge) and replace it by `fill`
    (a scalar or one value per channel: grey in input space); the sensitivity of a position is
    S(x) - S(occluded). Returns (drops (rows, cols), boxes (x0, y0, x1, y1) in the same raster order)."""
    x = np.asarray(x, np.float32)
    c, h, w = x.shape
    ph, pw = _pair(patch if patch is not None else max(1, round(min(h, w) / 8)))
    sh, sw = _pair(stride if stride is not None else (max(1, ph // 2), max(1, pw // 2)))
    ph, pw = min(ph, h), min(pw, w)
    fill = np.asarray(fill, np.float32).reshape(-1, 1, 1) * np.ones((c, 1, 1), np.float32)
    ys, xs = _positions(h, ph, sh), _positions(w, pw, sw)
    boxes = [(x0, y0, x0 + pw, y0 + ph) for y0 in ys for x0 in xs]

    def images():
        yield x
        for x0, y0, x1, y1 in boxes:
            img = x.copy()
            img[:, y0:y1, x0:x1] = fill
            yield img

    s = _target_scores(predict, images(), target, score, batch_size)
    return (s[0] - s[1:]).reshape(len(ys), len(xs)), boxes


def occlusion_map(drops: np.ndarray, boxes, shape: tuple[int, int]) -> np.ndarray:
    """Pixel map: each pixel's mean sensitivity over the patches that cover it (for display)."""
    total, count = np.zeros(shape), np.zeros(shape)
    for d, (x0, y0, x1, y1) in zip(np.asarray(drops).reshape(-1), boxes):
        total[y0:y1, x0:x1] += d
        count[y0:y1, x0:x1] += 1
    return total / np.maximum(count, 1)


def faithfulness(cam: np.ndarray, drops: np.ndarray, boxes) -> float:
    """Faithfulness to occlusion: Spearman rank correlation between the map's mean inside each occlusion
    patch and the score drop that occluding that patch causes (`occlusion_sensitivity`). In [-1, 1];
    1 = the map orders the regions exactly as occlusion does. NaN when either side is constant."""
    a = np.asarray(cam, np.float64)
    means = np.array([a[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in boxes])
    return spearman(means, np.asarray(drops).reshape(-1))


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given the mean of their ranks (scipy's method='average')."""
    a = np.asarray(a).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    new = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], a.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(a.size)
    ranks[order] = avg[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average-tie ranks of a and b. NaN when
    either is constant or they have fewer than 2 values."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.size != b.size:
        raise ValueError("spearman needs two arrays of the same size")
    if a.size < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- helpers and controls


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) map, half-pixel centres (align_corners=False, edges clamped) -- the
    ONNX Resize / pytorch-grad-cam upsampling; used to bring heatmaps to the original image size."""
    a = np.asarray(a, np.float64)
    h, w = a.shape
    out_h, out_w = shape
    if (h, w) == (out_h, out_w):
        return a.copy()

    def coords(n_in, n_out):
        c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, c - i0

    r0, r1, fr = coords(h, out_h)
    c0, c1, fc = coords(w, out_w)
    top = a[r0][:, c0] * (1 - fc) + a[r0][:, c1] * fc
    bottom = a[r1][:, c0] * (1 - fc) + a[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return ((a - lo) / (hi - lo)) if hi > lo else np.zeros_like(a)


def random_map(shape: tuple[int, int], rng: np.random.Generator, grid: int = 7) -> np.ndarray:
    """Control: uniform noise on a grid x grid lattice (the scale of a CAM's feature map), bilinearly
    upsampled to `shape`, min-max scaled to [0, 1]."""
    return _minmax(resize(rng.random((grid, grid)), shape)).astype(np.float32)


def center_map(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """Control: an isotropic Gaussian at the image centre, sigma = `sigma` * the shorter side, max 1."""
    h, w = shape
    s = sigma * min(h, w)
    yy = (np.arange(h) + 0.5 - h / 2)[:, None]
    xx = (np.arange(w) + 0.5 - w / 2)[None, :]
    return np.exp(-(yy ** 2 + xx ** 2) / (2 * s * s)).astype(np.float32)
