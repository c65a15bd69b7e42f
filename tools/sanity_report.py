"""Adebayo et al.'s sanity checks for all 16 methods on the two trained models of the repository; writes
docs/sanity_checks.png and the results section of docs/evaluation.md (between the sanity markers).

    python tools/sanity_report.py            # about 14 min on 2 shared CPU cores, most of it Score-CAM and RISE

* models/synthetic/shapes_cnn.onnx: the first 8 images of models/synthetic/eval (their labels), every one of
  the 6 weight-bearing nodes, cascading and independent, and the random-logit test.
* models/efficientnet_lite0.onnx (ImageNet weights): models/cat.png, models/cat_and_cup.png and four photos
  bundled with scikit-image (chelsea, coffee, astronaut, rocket), their top class; cascading at 7 depths of the
  50 weight-bearing nodes spaced geometrically, and the random-logit test. Score-CAM perturbs the 1280
  channels of the last layer (about 20 s an image on a CPU core), so it runs on the first 2 images only.
* RISE runs with 500 masks (7 x 7 cells, p = 0.5, seed 0; the same masks at every step), not its default 4000:
  500 forwards of EfficientNet-Lite0 are still about 8 s an image, so it too runs on the first 2 images only.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from onnxcam import sanity  # noqa: E402
from onnxcam.cam.methods import METHODS  # noqa: E402

DOC = ROOT / "docs" / "evaluation.md"
PLOT = ROOT / "docs" / "sanity_checks.png"
SYNTH = ROOT / "models" / "synthetic" / "shapes_cnn.onnx"
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
SLOW = ("scorecam", "rise")  # on the first 2 images of each model only
RISE = {"masks": 500}  # RISE's options (its default is 4000 masks); cells 7, p 0.5, seed 0 as by default


def synthetic_images(n=8):
    ann = json.loads((ROOT / "models/synthetic/eval/annotations.json").read_text())
    names = sorted(ann)[:n]
    return [ROOT / "models/synthetic/eval" / k for k in names], [ann[k].get("label") for k in names]


def photos(folder: Path):
    from PIL import Image
    from skimage import data

    paths = [ROOT / "models/cat.png", ROOT / "models/cat_and_cup.png"]
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        p = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(p)
        paths.append(p)
    return paths


def run(model, images, mode, steps=None, targets=None, slow_images=2):
    """All methods; the slow ones on the first `slow_images` images. Returns {method: SanityResult}."""
    out = {}
    fast = [m for m in METHODS if m not in SLOW]
    t = time.time()
    kw = dict(seed=0, rise=RISE)
    if mode == "logit":
        out["fast"] = sanity.random_logit(model, images, fast, targets=targets, **kw)
        out["slow"] = sanity.random_logit(model, images[:slow_images], list(SLOW),
                                          targets=None if targets is None else targets[:slow_images], **kw)
    else:
        out["fast"] = sanity.parameter_randomization(model, images, fast, mode=mode, steps=steps, targets=targets,
                                                     **kw)
        out["slow"] = sanity.parameter_randomization(model, images[:slow_images], list(SLOW), mode=mode,
                                                     steps=steps,
                                                     targets=None if targets is None else targets[:slow_images],
                                                     **kw)
    print(f"{Path(model).name} {mode}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    return out


def rows(res, metric="spearman_abs"):
    """{method: (means per step, images)} in METHODS order."""
    table = {}
    for part in res.values():
        means = part.mean(metric)
        for i, m in enumerate(part.methods):
            table[m] = (means[i], part.values[metric].shape[2])
    return {m: table[m] for m in METHODS if m in table}


def md_table(res, metric, title_cols):
    part = res["fast"]
    idx = title_cols
    names = [str(part.depths[j]) for j in idx]
    head = "| method | images | " + " | ".join(f"{n} node{'s' if n != '1' else ''}" for n in names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(idx)]
    for m, (vals, n) in rows(res, metric).items():
        lines.append(f"| `{m}` | {n} | " + " | ".join(f"{vals[j]:.2f}" for j in idx) + " |")
    return "\n".join(lines)


def logit_table(synth, eff):
    lines = ["| method | synthetic: Spearman | synthetic: SSIM | EfficientNet: Spearman | EfficientNet: SSIM |",
             "|---|---:|---:|---:|---:|"]
    s1, s2 = rows(synth, "spearman_abs"), rows(synth, "ssim")
    e1, e2 = rows(eff, "spearman_abs"), rows(eff, "ssim")
    for m in METHODS:
        lines.append(f"| `{m}` | {s1[m][0][0]:.2f} | {s2[m][0][0]:.2f} | {e1[m][0][0]:.2f} | {e2[m][0][0]:.2f} |")
    return "\n".join(lines)


# One style per kind of method, so that 16 lines stay apart: gradient solid, eigen dash-dot, perturbation
# dotted, pixel dashed.
STYLES = {"gradient": "-", "eigen": "-.", "perturbation": ":", "pixel": "--"}
MARKERS = {"gradient": "o", "eigen": "s", "perturbation": "^", "pixel": "D"}


def figure(synth_c, eff_c, eff_example_img):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
    for col, (res, name) in enumerate(((synth_c, "synthetic shapes CNN (8 images)"),
                                       (eff_c, "EfficientNet-Lite0, ImageNet weights (6 photos)"))):
        ax = fig.add_subplot(grid[0, col])
        depths = res["fast"].depths
        x = np.arange(len(depths) + 1)
        colours = plt.get_cmap("tab20").colors
        for i, (m, (vals, n)) in enumerate(rows(res).items()):
            kind = METHODS[m].kind
            key = m in ("gradcam", "guided-backprop")  # drawn on top: hirescam, xgradcam, shapleycam equal gradcam
            note = ", ".join(([f"{RISE['masks']} masks"] if m == "rise" else []) +
                             ([f"{n} img."] if n < len(res["fast"].targets) else []))
            ax.plot(x, np.r_[1.0, vals], marker=MARKERS[kind], ms=3.5, lw=2.5 if key else 1.1,
                    zorder=3 if key else 2, ls=STYLES[kind],
                    color="black" if m == "guided-backprop" else colours[i % len(colours)],
                    label=m + (f" ({note})" if note else ""))
        ax.set_xticks(x, ["trained"] + [str(d) for d in depths])
        ax.set_xlabel(f"weight-bearing nodes randomised, from the score (cascading; {res['fast'].total} in all)")
        ax.set_ylabel("Spearman rank correlation of |map|")
        ax.set_ylim(-0.3, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name)
        if col == 1:
            ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), handlelength=3, title_fontsize=7.5,
                      title="solid: gradient, dash-dot: eigen,\ndotted: perturbation, dashed: pixel")
    # The paper's qualitative row: the cat's maps as the cascade proceeds.
    sub = grid[1, :].subgridspec(2, len(eff_c["fast"].depths) + 2, wspace=0.05, hspace=0.1)
    part = eff_c["fast"]
    for r, m in enumerate(("gradcam", "guided-backprop")):
        shots = part.examples[m]
        ax = fig.add_subplot(sub[r, 0])
        ax.imshow(eff_example_img)
        ax.set_axis_off()
        ax.text(-0.05, 0.5, m, transform=ax.transAxes, ha="right", va="center", fontsize=9)
        for j, shot in enumerate(shots):
            ax = fig.add_subplot(sub[r, j + 1])
            if METHODS[m].kind == "pixel":  # gradients are sparse: clip at the 99th percentile to see them
                ax.imshow(np.clip(shot / max(np.percentile(shot, 99), 1e-12), 0, 1), cmap="gray")
            else:
                ax.imshow(shot, cmap="jet", vmin=0, vmax=1)
            ax.set_axis_off()
            if r == 0:
                ax.set_title("trained" if j == 0 else f"{part.depths[j - 1]} random", fontsize=8)
    fig.suptitle("Sanity checks (Adebayo et al., 2018): cascading randomisation of the weights, from the score "
                 "back to the input")
    fig.savefig(PLOT, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main():
    start = time.time()
    tmp = Path(tempfile.mkdtemp())
    s_images, s_labels = synthetic_images()
    e_images = photos(tmp)
    synth_c = run(SYNTH, s_images, "cascading", targets=s_labels)
    synth_i = run(SYNTH, s_images, "independent", targets=s_labels)
    synth_l = run(SYNTH, s_images, "logit", targets=s_labels)
    eff_c = run(EFFNET, e_images, "cascading", steps=7)
    eff_l = run(EFFNET, e_images, "logit")
    from PIL import Image

    h, w = eff_c["fast"].examples["gradcam"].shape[1:]
    cat = Image.open(e_images[0]).convert("RGB").resize((w, h))
    figure(synth_c, eff_c, cat)
    n_s, n_e = len(synth_c["fast"].depths), len(eff_c["fast"].depths)
    text = "\n\n".join([
        f"Score-CAM and RISE run on the first 2 images of each model only (the images column); RISE with "
        f"{RISE['masks']} masks of 7 x 7 cells, p = 0.5, seed 0 (the same masks at every step and for both "
        f"classes of the random-logit test), not its default 4000.",
        f"Synthetic CNN, cascading (8 images; nodes from the score: "
        f"{', '.join(synth_c['fast'].steps)}): Spearman rank correlation of |map| with the trained model's",
        md_table(synth_c, "spearman_abs", list(range(n_s))),
        "Synthetic CNN, independent (one node randomised, the rest trained; #k = k-th node from the score):",
        md_table(synth_i, "spearman_abs", list(range(n_s))).replace(" nodes |", " |").replace(" node |", " |"),
        f"EfficientNet-Lite0, cascading ({len(e_images)} photos; {eff_c['fast'].total} weight-bearing nodes; "
        f"the last layer explained): Spearman rank correlation of |map|",
        md_table(eff_c, "spearman_abs", list(range(n_e))),
        "EfficientNet-Lite0, cascading: SSIM of the maps",
        md_table(eff_c, "ssim", list(range(n_e))),
        "Random-logit test (the map of the true class against that of a random other class; Spearman of "
        "|map| and SSIM; lower = more class-sensitive):",
        logit_table(synth_l, eff_l),
        f"Generated by `tools/sanity_report.py` in {time.time() - start:.0f} s on 2 shared CPU cores.",
    ])
    doc = DOC.read_text()
    start_m, end_m = "<!-- sanity:start", "<!-- sanity:end -->"
    block = f"{start_m} (written by tools/sanity_report.py; do not edit by hand) -->\n\n{text}\n\n{end_m}"
    if start_m in doc:
        doc = re.sub(re.escape(start_m) + r".*?" + re.escape(end_m), lambda _: block, doc, flags=re.S)
    else:
        doc += "\n" + block + "\n"
    DOC.write_text(doc)
    print(text)


if __name__ == "__main__":
    main()
