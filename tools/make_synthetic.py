"""A synthetic localization benchmark with known boxes and masks, and a small CNN trained on it; no download.

    python tools/make_synthetic.py [--out models/synthetic] [--steps 400] [--eval-images 100]

Writes
  models/synthetic/shapes_cnn.onnx   the CNN (input `image` (N, 3, 128, 128) NCHW RGB, output `logits`
                                     (N, 4)), with `onnxcam.images.labels` and `onnxcam.preprocess` metadata
  models/synthetic/eval/             held-out images shape_000.png ..., masks shape_000_mask.png and
                                     annotations.json {"shape_000.png": {"label": k, "boxes": [[x0, y0,
                                     x1, y1]], "mask": "shape_000_mask.png"}, ...} (boxes: pixel edges,
                                     x1/y1 exclusive)
  models/synthetic/README.md         what the files are, with the held-out accuracy

Each image is 128x128: a background of low-frequency colour noise with fine grain and clutter (thin
lines, single dots) and ONE object pasted at a random place: an ellipse, a rotated square or a random
polygon, 24..44 px across, filled with a two-colour texture in random colours. The class is the texture
only: striped, checkered, dotted, grid (period 6..9 px, random phase); silhouette, colours and position
carry no class information, so the model has to look at the object. The CNN (four 3x3 convolutions,
three of stride 2, and a 1x1 one, each with BatchNorm and ReLU, global average pooling, one linear
layer; 26k parameters; receptive field 31 px at the explained layer) trains on
freshly generated images with Adam on the CPU in a few minutes (400 steps of 32 images).
Everything is seeded: rerunning gives the same data (the weights can differ in the last bits between
torch builds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
CLASSES = ["striped", "checkered", "dotted", "grid"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ----------------------------------------------------------------------------- images


def _background(rng: np.random.Generator) -> Image.Image:
    """Low-frequency colour noise, fine grain, and clutter (thin lines, single dots): no periodic texture."""
    low = rng.uniform(50, 205, (4, 4, 3)).astype(np.uint8)
    a = np.asarray(Image.fromarray(low).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
    a += rng.normal(0, 4, a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 7)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            p = rng.uniform(0, SIZE, 4)
            draw.line([tuple(p[:2]), tuple(p[2:])], fill=colour, width=int(rng.integers(1, 3)))
        else:
            cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(1.5, 4)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return img


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE) pattern in {0, 1}: the class of an object is its texture."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    p = rng.uniform(6, 9)  # period in pixels
    oy, ox = rng.uniform(0, p, 2)
    fy, fx = ((yy + oy) % p) / p, ((xx + ox) % p) / p
    if kind == "striped":    # horizontal bands
        return (fy < 0.5).astype(np.float32)
    if kind == "checkered":
        return ((fy < 0.5) ^ (fx < 0.5)).astype(np.float32)
    if kind == "dotted":     # round dots on a plain ground
        return (((fy - 0.5) ** 2 + (fx - 0.5) ** 2) < 0.09).astype(np.float32)
    if kind == "grid":       # thin lines both ways
        return ((fy < 0.25) | (fx < 0.25)).astype(np.float32)
    raise ValueError(kind)


def _outline(rng: np.random.Generator, cx: float, cy: float, s: float) -> Image.Image:
    """The object's silhouette: an ellipse, a (rotated) rectangle or a random convex-ish polygon."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    kind = rng.integers(3)
    if kind == 0:
        ry = s / 2 * rng.uniform(0.75, 1.0)
        d.ellipse([cx - s / 2, cy - ry, cx + s / 2, cy + ry], fill=255)
    else:
        n = 4 if kind == 1 else int(rng.integers(5, 8))
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.sort(rng.uniform(0, 2 * math.pi, n)) if kind == 2 else start + np.arange(4) * math.pi / 2
        radii = s / 2 * (rng.uniform(0.8, 1.0, n) if kind == 2 else np.full(n, 1.0))
        d.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)], fill=255)
    return m


def make_sample(rng: np.random.Generator):
    """(RGB uint8 (H, W, 3), mask bool (H, W), label, box [x0, y0, x1, y1])."""
    img = _background(rng)
    label = int(rng.integers(len(CLASSES)))
    s = rng.uniform(24, 44)
    while True:  # an object well inside the image, not too thin
        cx, cy = rng.uniform(s * 0.55 + 2, SIZE - s * 0.55 - 2, 2)
        mask = np.asarray(_outline(rng, cx, cy, s)) > 0
        edge = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
        if mask.sum() > 0.3 * s * s and not edge:
            break
    a = np.asarray(img, np.float32)
    bg_mean = a[mask].mean(axis=0)
    while True:  # two colours that differ from each other and from the background under the object
        c1, c2 = rng.uniform(0, 255, (2, 3))
        if np.abs(c1 - c2).sum() > 180 and min(np.abs(c1 - bg_mean).sum(), np.abs(c2 - bg_mean).sum()) > 60:
            break
    t = _texture(CLASSES[label], rng)[..., None]
    obj = c1 * t + c2 * (1 - t) + rng.normal(0, 3, (SIZE, SIZE, 3))
    a[mask] = obj[mask]
    rows, cols = np.nonzero(mask)
    box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
    return np.clip(a, 0, 255).astype(np.uint8), mask, label, box


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), as the ONNX metadata says."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def batch(rng: np.random.Generator, n: int):
    samples = [make_sample(rng) for _ in range(n)]
    return np.stack([s[0] for s in samples]), np.array([s[2] for s in samples])


# ----------------------------------------------------------------------------- model


def build_model():
    import torch
    from torch import nn

    def block(cin, cout, stride, k=3):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    torch.manual_seed(0)
    return nn.Sequential(
        *block(3, 12, 2),    # 64x64
        *block(12, 24, 2),   # 32x32
        *block(24, 32, 2),   # 16x16
        *block(32, 48, 1),
        *block(48, 48, 1, k=1),  # the layer Grad-CAM explains (receptive field 31 px)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, len(CLASSES)),
    )


def train(model, steps: int, batch_size: int, seed: int, log) -> None:
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start, running = time.time(), None
    for step in range(steps):
        imgs, labels = batch(rng, batch_size)
        x = torch.from_numpy(normalise(imgs)).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {running:.3f}  {time.time() - start:.0f}s")
    model.eval().to(memory_format=torch.contiguous_format)


def export(model, path: Path) -> None:
    import onnx
    import torch

    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    m = onnx.load(str(tmp))
    tmp.unlink()
    m.ir_version = min(m.ir_version, 8)
    meta = {
        "onnxcam.labels": json.dumps(CLASSES),
        "onnxcam.preprocess": json.dumps({"mean": list(MEAN), "std": list(STD), "size": [SIZE, SIZE],
                                          "layout": "NCHW", "channel_order": "RGB", "resize": "squash"}),
        "description": "onnxcam synthetic shapes classifier (tools/make_synthetic.py); classes: "
                       + ", ".join(CLASSES),
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "onnxcam tools/make_synthetic.py"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def write_eval(folder: Path, n: int, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shape_*.png"):
        old.unlink()
    rng = np.random.default_rng(seed)
    ann, images, labels = {}, [], []
    for i in range(n):
        img, mask, label, box = make_sample(rng)
        name = f"shape_{i:03d}.png"
        Image.fromarray(img).save(folder / name, optimize=True)
        Image.fromarray(mask).convert("1").save(folder / f"shape_{i:03d}_mask.png", optimize=True)
        ann[name] = {"label": label, "boxes": [box], "mask": f"shape_{i:03d}_mask.png"}
        images.append(img)
        labels.append(label)
    (folder / "annotations.json").write_text(json.dumps(ann, indent=1) + "\n")
    return np.stack(images), np.array(labels)


def accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"image": normalise(images[i:i + 50])})[0]
                             for i in range(0, len(images), 50)])
    return float((logits.argmax(1) == labels).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models" / "synthetic"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    model = build_model()
    train(model, args.steps, args.batch_size, seed=1, log=log)
    train_s = time.time() - t0
    model_path = out / "shapes_cnn.onnx"
    export(model, model_path)
    images, labels = write_eval(out / "eval", args.eval_images, seed=12345)
    acc = accuracy(model_path, images, labels)
    test_images, test_labels = batch(np.random.default_rng(999), 500)
    acc_test = accuracy(model_path, test_images, test_labels)
    log(f"trained {args.steps} steps x {args.batch_size} in {train_s:.0f}s; accuracy on eval/ {acc:.3f}, "
        f"on 500 more held-out images {acc_test:.3f}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {model_path} and {out / 'eval'} ({size / 1e6:.2f} MB in all)")
    (out / "README.md").write_text(README.format(steps=args.steps, batch=args.batch_size, train_s=train_s,
                                                 n=args.eval_images, acc=100 * acc, acc_test=100 * acc_test,
                                                 classes=", ".join(f"{i} {c}" for i, c in enumerate(CLASSES)),
                                                 mb=size / 1e6))
    return 0


README = """# Synthetic texture-object benchmark

Generated by `python tools/make_synthetic.py` (no download; seeded). Used by `tools/eval_report.py` and
`docs/evaluation.md` to measure explanation quality against known object boxes and masks.

* `shapes_cnn.onnx`: a small CNN (four 3x3 convolutions, three of stride 2, and a 1x1 one, each with
  BatchNorm and ReLU; global average pooling; linear). Input `image` float32 (N, 3, 128, 128) NCHW RGB,
  `(pixel / 255 - 0.5) / 0.25`; output `logits` (N, 4) for the classes {classes} (the texture of the
  object). Metadata: `onnxcam.labels`, `onnxcam.preprocess`. Trained for {steps} steps of {batch}
  freshly generated images ({train_s:.0f} s on 2 shared CPU cores).
* `eval/`: {n} held-out 128x128 images `shape_NNN.png`, one textured object each (24..44 px, anywhere)
  on a cluttered background, with `shape_NNN_mask.png` (nonzero = object) and `annotations.json`
  (`label`, `boxes` [[x0, y0, x1, y1]] with exclusive x1/y1, `mask`).

Held-out accuracy: {acc:.1f}% on `eval/`, {acc_test:.1f}% on 500 further generated images.
Total size {mb:.2f} MB.
"""

if __name__ == "__main__":
    sys.exit(main())
