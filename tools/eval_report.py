"""Explanation quality on the synthetic benchmark (tools/make_synthetic.py): every CAM method against two
controls, written into docs/evaluation.md (between the `results` markers) and docs/deletion_insertion.png.

    python tools/eval_report.py [--road-images 25] [--csv results.csv]

Runs, through onnxcam.evaluate (the same code as `onnxcam evaluate`):
  1. localization, pointing game, deletion/insertion (20 steps), Average Drop / Increase in Confidence and
     faithfulness to occlusion for every method on all images of models/synthetic/eval/;
  2. ROAD (percentiles 20, 40, 60, 80, as pytorch-grad-cam's ARCC) on the first --road-images images
     (the noisy linear imputation costs ~0.1 s per perturbed image on the CPU).
The equivalent command lines are printed. The plot is drawn with PIL (no matplotlib).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcam import metrics as M  # noqa: E402
from onnxcam.images import render  # noqa: E402
from onnxcam.evaluate import Evaluator, load_dataset  # noqa: E402

CAM_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigencam",
               "eigengradcam", "scorecam", "ablationcam"]
CONTROLS = ["random", "center"]
MAIN_METRICS = ["localization", "pointing", "deletion", "insertion", "drop", "occlusion"]
ROAD_PERCENTILES = (20, 40, 60, 80)
STEPS = 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def counter(total: int, label: str):
    state = {"n": 0, "t": time.time()}

    def update(k: int) -> None:
        state["n"] += k
        if state["n"] % 100 == 0 or state["n"] == total:
            log(f"  {label}: {state['n']}/{total}  {time.time() - state['t']:.0f}s")
    return update


# ----------------------------------------------------------------------------- table

COLUMNS = [  # (summary key, title, format)
    ("pointing", "Pointing game % ↑", "{:.1f}"),
    ("top1_loc_error", "Top-1 loc. error % ↓", "{:.1f}"),
    ("top5_loc_error", "Top-5 loc. error % ↓", "{:.1f}"),
    ("gt_known_loc", "GT-known loc. % ↑", "{:.1f}"),
    ("iou", "Mean IoU ↑", "{:.3f}"),
    ("top1_loc_error@50", "Top-1 loc. error % at 50% ↓", "{:.1f}"),
    ("deletion_auc", "Deletion AUC ↓", "{:.3f}"),
    ("insertion_auc", "Insertion AUC ↑", "{:.3f}"),
    ("average_drop", "Average Drop % ↓", "{:.1f}"),
    ("increase_in_confidence", "Increase in Conf. % ↑", "{:.1f}"),
    ("faithfulness", "Occlusion Spearman ↑", "{:.3f}"),
    ("road", "ROAD ↑", "{:.3f}"),
]


def markdown_table(summary: dict, methods: list[str]) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = []
    for m in methods:
        s = summary[m]
        cells = [c[2].format(s[c[0]]) if c[0] in s else "–" for c in COLUMNS]
        name = f"*{m}* (control)" if m in CONTROLS else f"`{m}`"
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule] + rows)


# ----------------------------------------------------------------------------- plot

COLOURS = {"gradcam": (214, 39, 40), "scorecam": (255, 127, 14), "random": (127, 127, 127), "center": (31, 119, 180)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def plot(path: Path, image: Image.Image, heat: np.ndarray, title: str, curves: dict) -> None:
    """image + Grad-CAM overlay on the left; deletion and insertion curves (score vs fraction of pixels)
    on the right. curves: {method: (fractions, deletion scores, insertion scores, del AUC, ins AUC)}."""
    W, H = 1180, 430
    canvas = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(canvas)
    f_title, f_text, f_small = _font(18), _font(14), _font(12)
    d.text((16, 10), title, fill="black", font=f_title)
    side = 180
    canvas.paste(image.resize((side, side), Image.NEAREST), (16, 50))
    canvas.paste(render.overlay(image, heat, alpha=0.5).resize((side, side), Image.NEAREST), (16, 50 + side + 28))
    d.text((16, 50 + side + 4), "input", fill="black", font=f_small)
    d.text((16, 50 + 2 * side + 32), "Grad-CAM", fill="black", font=f_small)
    for k, (name, idx) in enumerate((("Deletion (lower AUC is better)", 1), ("Insertion (higher AUC is better)", 2))):
        x0, y0, pw, ph = 260 + k * 460, 60, 380, 300
        d.text((x0, y0 - 26), name, fill="black", font=f_text)
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        for t in np.linspace(0, 1, 6):
            gx, gy = x0 + t * pw, y0 + ph - t * ph
            d.line([gx, y0 + ph, gx, y0 + ph + 5], fill="black")
            d.text((gx - 10, y0 + ph + 8), f"{t:.1f}", fill="black", font=f_small)
            d.line([x0 - 5, gy, x0, gy], fill="black")
            d.text((x0 - 32, gy - 7), f"{t:.1f}", fill="black", font=f_small)
            if 0 < t < 1:
                d.line([x0 + 1, gy, x0 + pw - 1, gy], fill=(230, 230, 230))
        d.text((x0 + pw / 2 - 90, y0 + ph + 26), "fraction of pixels deleted" if idx == 1 else
               "fraction of pixels inserted", fill="black", font=f_small)
        for j, (method, c) in enumerate(curves.items()):
            fr, ys, auc = c[0], c[idx], c[idx + 2]
            pts = [(x0 + fx * pw, y0 + ph - fy * ph) for fx, fy in zip(fr, ys)]
            colour = COLOURS.get(method, (44, 160, 44))
            d.line(pts, fill=colour, width=3 if method == "gradcam" else 2)
            ly = y0 + 10 + j * 18 if idx == 1 else y0 + ph - 20 - (len(curves) - 1 - j) * 18
            lx = x0 + pw - 170
            d.line([lx, ly + 7, lx + 22, ly + 7], fill=colour, width=3)
            d.text((lx + 28, ly), f"{method}  AUC {auc:.3f}", fill="black", font=f_small)
    d.text((260, H - 26), "y: softmax probability of the true class; pixels ordered by each map, "
           "deleted to the mean colour / inserted into a blurred copy (RISE)", fill=(80, 80, 80), font=f_small)
    canvas.save(path, optimize=True)


def draw_plot(ev: Evaluator, samples, methods, path) -> None:
    """Deletion/insertion curves of Grad-CAM, Score-CAM and the controls on one image: the first one
    classified correctly with probability >= 0.9."""
    pick, x, target = 0, None, None
    for i, sample in enumerate(samples):
        pil, x = ev.load(sample)
        logits = ev.predict(x[None])[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        if sample.label == int(np.argmax(p)) and p[sample.label] >= 0.9:
            pick, target = i, sample.label
            break
    sample = samples[pick]
    pil, x = ev.load(sample)
    target = target if target is not None else int(np.argmax(ev.predict(x[None])[0]))
    curves, heat_gc = {}, None
    for m in ["gradcam", "scorecam", "random", "center"]:
        if m not in methods:
            continue
        heat = ev.maps(m, x[None], np.array([target]), [pick])[0]
        if m == "gradcam":
            heat_gc = heat
        auc_d, fr, sd = M.deletion(x, heat, target, ev.predict, steps=STEPS)
        auc_i, _, si = M.insertion(x, heat, target, ev.predict, steps=STEPS)
        curves[m] = (fr, sd, si, auc_d, auc_i)
    plot(Path(path), pil, heat_gc, f"{sample.name}, class '{ev.labels[target]}': deletion and insertion curves "
         "of Grad-CAM and Score-CAM against the random and centre controls", curves)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "synthetic" / "shapes_cnn.onnx"))
    ap.add_argument("--data", default=str(ROOT / "models" / "synthetic" / "eval"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "evaluation.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "deletion_insertion.png"))
    ap.add_argument("--road-images", type=int, default=25)
    ap.add_argument("--limit", type=int, help="evaluate only the first N images (quick runs)")
    ap.add_argument("--methods", help="comma-separated subset of the CAM methods")
    ap.add_argument("--csv", help="also write the per-image results of step 1 here")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot")
    args = ap.parse_args(argv)
    methods = (args.methods.split(",") if args.methods else CAM_METHODS) + CONTROLS

    t0 = time.time()
    ev = Evaluator(args.model, methods, metrics=MAIN_METRICS, steps=STEPS, batch_size=64,
                   road_percentiles=ROAD_PERCENTILES)
    samples = load_dataset(args.data, ev.labels)[:args.limit]
    if args.plot_only:
        draw_plot(ev, samples, methods, args.plot)
        return 0
    rel = lambda p: Path(p).resolve().relative_to(ROOT) if Path(p).resolve().is_relative_to(ROOT) else p  # noqa: E731
    mflags = " ".join(f"--method {m}" for m in methods)
    log(f"onnxcam evaluate {rel(args.model)} {rel(args.data)} {mflags} --metrics {','.join(MAIN_METRICS)} "
        f"--steps {STEPS} --batch-size 64" + (f" --limit {args.limit}" if args.limit else ""))
    main_result = ev.run(samples, counter(len(samples) * len(methods), "step 1"), log=None)
    t1 = time.time()
    road_samples = samples[:args.road_images]
    log(f"onnxcam evaluate ... {mflags} --metrics road --road-percentiles "
        f"{','.join(map(str, ROAD_PERCENTILES))} --limit {len(road_samples)}")
    ev.metrics = ["road"]
    road_result = ev.run(road_samples, counter(len(road_samples) * len(methods), "step 2"), log=None)
    t2 = time.time()
    log("localization again with the map thresholded at 50% of its maximum")
    ev.metrics, ev.loc_threshold = ["localization"], 0.5
    loc50 = ev.run(samples)
    summary = {m: dict(main_result.summary[m]) for m in methods}
    for m in methods:
        for k in ("road", "road_morf", "road_lerf"):
            if k in road_result.summary[m]:
                summary[m][k] = road_result.summary[m][k]
        summary[m]["top1_loc_error@50"] = loc50.summary[m]["top1_loc_error"]
        summary[m]["gt_known_loc@50"] = loc50.summary[m]["gt_known_loc"]
    if args.csv:
        main_result.write(args.csv)

    table = markdown_table(summary, methods)
    print(table)
    print(main_result.table())

    draw_plot(ev, samples, methods, args.plot)

    acc = main_result.accuracy
    lines = [
        "<!-- results:start (written by tools/eval_report.py; do not edit by hand) -->",
        "",
        f"{len(samples)} held-out images of `models/synthetic/eval/`, classifier top-1 accuracy "
        f"{acc.get('top1', float('nan')):.1f}%. ROAD on the first {len(road_samples)} images "
        f"(percentiles {', '.join(map(str, ROAD_PERCENTILES))}); every other column on all {len(samples)}. "
        "Localization thresholds the map at 15% of its maximum as in the Grad-CAM paper; the column "
        "\"at 50%\" repeats it at 50% (`--loc-threshold 0.5`).",
        "",
        table,
        "",
        f"Step 1 took {t1 - t0:.0f} s and ROAD {t2 - t1:.0f} s on 2 shared CPU cores.",
        "",
        "<!-- results:end -->",
    ]
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join(lines)
    pattern = re.compile(r"<!-- results:start.*?<!-- results:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    doc.write_text(text)
    log(f"wrote {doc} and {args.plot} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
