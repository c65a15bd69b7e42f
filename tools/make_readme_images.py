"""Regenerates the figures in docs/ that the README shows, from the bundled demo (offline, CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxcam import Explainer
from onnxcam.images.preprocess import load_image, to_tensor
from onnxcam.images.render import overlay, panel, save_png

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ex = Explainer(str(ROOT / "models" / "efficientnet_lite0.onnx"))
    pp = ex.preprocessing()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)

    cat = load_image(ROOT / "models" / "cat.png")
    e = ex.explain(to_tensor(cat, pp))
    save_png(panel([cat, overlay(cat, e.heatmaps[0])], ["cat.png", f"Grad-CAM: {ex.labels[e.targets[0]]}"]),
             docs / "cat_gradcam.png")

    both = load_image(ROOT / "models" / "cat_and_cup.png")
    x = to_tensor(both, pp)
    scores = ex.explain(x).scores[0]
    cat_class = max(range(281, 286), key=lambda c: scores[c])
    cup_class = max((504, 967, 968), key=lambda c: scores[c])
    e = ex.explain(np.concatenate([x, x]), [cat_class, cup_class])
    tiles = [both] + [overlay(both, h) for h in e.heatmaps]
    titles = ["cat_and_cup.png"] + [f"Grad-CAM: {ex.labels[t]}" for t in e.targets]
    save_png(panel(tiles, titles), docs / "cat_and_cup_gradcam.png")
    print("wrote", docs / "cat_gradcam.png", docs / "cat_and_cup_gradcam.png")


if __name__ == "__main__":
    main()
