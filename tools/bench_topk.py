#!/usr/bin/env python
"""K classes per image: one onnxcam call vs K separate calls vs pytorch-grad-cam vs one plain forward.

    python tools/bench_topk.py                  # ResNet-50, batch 8, K = 5, 224x224
    python tools/bench_topk.py --k 3 --batch 1 --repeats 20

Model: torchvision ResNet-50 with random weights (BatchNorm calibrated, tests/torch_export.py), TorchScript export;
timing does not depend on the weights. For each image, its K highest classes:
  ort-forward        plain onnxruntime forward of the model (the same SessionOptions as onnxcam's session)
  onnxcam-topk       `Explainer.explain(x, onnxcam.top_classes(K))`: the trunk once, the head and its backward on
                     N*K rows (onnxcam.cam.build.repeat_layers), in one session run
  onnxcam-K-calls    K `Explainer.explain(x, targets_k)` calls, one class per sample each
  pytorch-grad-cam   K `GradCAM(model, [model.layer4])(x, [ClassifierOutputTarget(c)])` calls (a forward and a
                     backward each, which is how the library explains several classes)
The answers are checked equal first (onnxcam's two ways: max abs; vs pytorch-grad-cam: heatmaps max abs). Rounds
are interleaved with a rotating order; the table gives medians and the paired ratio (median over rounds of the
ratio within a round), the one to trust on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import onnxcam
    from tests import torch_export

    so = ort.SessionOptions()  # as onnxcam.run.runtime.make_session, spinning off (see bench_gradcam.py)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = torch_export.build("resnet50")
    tmp = tempfile.TemporaryDirectory()
    path = torch_export.export(model, torch_export.random_input("resnet50", 2, size=args.size),
                               os.path.join(tmp.name, "resnet50.onnx"), "torchscript")
    explainer = onnxcam.Explainer(path, session_options=so)
    forward = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    in_name = forward.get_inputs()[0].name
    gcam = GradCAM(model=model, target_layers=[model.layer4])

    x = torch_export.random_input("resnet50", args.batch, seed=1, size=args.size)
    xn = x.numpy()
    top = onnxcam.top_classes(args.k)
    one = explainer.explain(xn, top)
    if explainer.multi_target_session() is None:
        raise SystemExit(f"no multi-target session: {explainer.multi_target_note}")
    classes = one.targets  # (N, K)
    per_k = [[int(c) for c in classes[:, k]] for k in range(args.k)]
    gc_targets = [[ClassifierOutputTarget(c) for c in cs] for cs in per_k]
    separate = [explainer.explain(xn, cs) for cs in per_k]
    same = max(float(np.abs(one.heatmaps[:, k] - separate[k].heatmaps).max()) for k in range(args.k))
    vs_gc = max(float(np.abs(one.heatmaps[:, k] - gcam(input_tensor=x, targets=gc_targets[k])).max())
                for k in range(args.k))
    print(f"top-{args.k} in one call vs {args.k} calls: heatmaps max abs {same:.1e}; vs pytorch-grad-cam "
          f"{vs_gc:.1e}", file=sys.stderr)

    methods = {
        "ort-forward": lambda: forward.run(None, {in_name: xn}),
        "onnxcam-topk": lambda: explainer.explain(xn, top),
        "onnxcam-K-calls": lambda: [explainer.explain(xn, cs) for cs in per_k],
        "pytorch-grad-cam": lambda: [gcam(input_tensor=x, targets=t) for t in gc_targets],
    }
    times = {k: [] for k in methods}
    order = list(methods.items())
    for r in range(args.warmup + args.repeats):
        k = r % len(order)
        for name, fn in order[k:] + order[:k]:
            t0 = time.perf_counter()
            fn()
            if r >= args.warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    gcam.activations_and_grads.release()

    def paired(a: str, b: str) -> float:
        return statistics.median(p / q for p, q in zip(times[a], times[b]))

    print(f"\nResNet-50 (random weights), {args.size}x{args.size}, batch {args.batch}, K = {args.k}, CPU; onnxruntime "
          f"{ort.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); {os.cpu_count()} "
          f"cores; {args.repeats} rounds after {args.warmup} warm-up\n")
    print("| method | median ms | / ort-forward (paired) | onnxcam-topk speed-up (paired) |")
    print("|---|---:|---:|---:|")
    for name in methods:
        speed = f"{paired(name, 'onnxcam-topk'):.2f}x" if name != "onnxcam-topk" else ""
        print(f"| {name} | {statistics.median(times[name]):.1f} | {paired(name, 'ort-forward'):.3f} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
