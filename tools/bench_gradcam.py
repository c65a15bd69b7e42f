#!/usr/bin/env python
"""Grad-CAM speed on the CPU: onnxcam vs plain onnxruntime, Captum and pytorch-grad-cam.

    python tools/bench_gradcam.py                       # ResNet-50, batches 1 and 8, 224x224
    python tools/bench_gradcam.py --batches 1 --repeats 20 --threads 2

Model: torchvision ResNet-50 with RANDOM weights (seeded torchvision init, BatchNorm statistics calibrated on
random data so activations are O(1) -- no denormals; see tests/torch_export.py), exported with the TorchScript
exporter (opset 17, dynamic batch; --exporter dynamo for torch.export). Timing does not depend on the weights.

Methods, all in one process, for the same input and the same (argmax) target per sample:
  ort-forward     plain onnxruntime forward of the exported model, with the same SessionOptions as onnxcam's
                  session (given as `Explainer(..., session_options=)`: ORT_ENABLE_ALL as onnxcam.run.runtime uses, same
                  intra-op thread count, and intra-op spinning off unless --spin: two sessions' spinning thread pools
                  plus torch's OpenMP pool, interleaved on few cores, steal each other's time and inflate whichever
                  runs next)
  onnxcam         `Explainer.explain(x, targets)` (forward + backward to layer4 + CAM + heatmaps, one session run)
  onnxcam-raw     the fused `Explainer.session.run` alone (no input checking / output unpacking)
  captum          `captum.attr.LayerGradCam(model, model.layer4).attribute(x, target, relu_attributions=True)`
  pytorch-grad-cam `GradCAM(model, [model.layer4])(x, [ClassifierOutputTarget(t)])`, heatmaps included
Repetitions are interleaved (warm-up, then rounds of every method in turn, the order rotating) so that
background load hits all methods alike; the table reports medians and minima (the least disturbed runs), and
ratios three ways: of the medians, paired (median over rounds of the ratio within a round) and of the minima, plus
process CPU time. On a shared machine the paired, minimum and CPU-time ratios are the ones to trust.

--profile DIR also runs both onnxruntime sessions with profiling (interleaved, `--repeats` runs each) and prints
which nodes the fused graph adds and how much kernel time they take, by node and by op type.
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per batch (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch (default 2)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads for onnxruntime and torch (default 0: each library's default)")
    ap.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    ap.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    ap.add_argument("--spin", action="store_true",
                    help="leave onnxruntime's intra-op thread spinning on (its default)")
    ap.add_argument("--model", default=None, help="use this ONNX export of torchvision resnet50 instead of exporting")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="also write onnxruntime profiles (JSON) of the forward and the fused session to DIR")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort
    import torch
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import onnxcam
    from onnxcam.cam import build
    from tests import torch_export

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]

    def options(profile_prefix=None):
        so = ort.SessionOptions()  # what onnxcam.run.runtime.make_session uses ...
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if args.threads:  # ... plus the thread count, when given
            so.intra_op_num_threads = args.threads
        if not args.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        return so

    model = torch_export.build("resnet50")
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        path = args.model
    else:
        t0 = time.perf_counter()
        path = torch_export.export(model, torch_export.random_input("resnet50", 2, size=args.size),
                                   os.path.join(tmp.name, "resnet50.onnx"), args.exporter)
        print(f"exported ResNet-50 ({args.exporter}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    t0 = time.perf_counter()
    explainer = onnxcam.Explainer(path, session_options=options())
    build_s = time.perf_counter() - t0
    forward = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
    in_name = forward.get_inputs()[0].name
    lgc = LayerGradCam(model, model.layer4)
    gcam = GradCAM(model=model, target_layers=[model.layer4])

    rows = []
    for n in batches:
        x = torch_export.random_input("resnet50", n, seed=n, size=args.size)
        xn = x.numpy()
        with torch.no_grad():
            targets = [int(t) for t in model(x).argmax(1)]
        t_arr = np.asarray(targets, np.int64)
        raw_feeds = {}
        for i in explainer.session.get_inputs():
            if i.name == explainer.image_input:
                raw_feeds[i.name] = xn
            elif i.name == build.TARGET:
                raw_feeds[i.name] = t_arr
            elif i.name == build.SIGN:
                raw_feeds[i.name] = np.ones((1,), np.float32)
            elif i.name in (build.WEIGHTS, build.SELECT, build.GROUP):  # a class target: no other weights
                raw_feeds[i.name] = np.zeros((1, 1), np.float32 if i.name == build.WEIGHTS else bool)
            else:
                raise SystemExit(f"unexpected input {i.name} of the fused session")
        gc_targets = [ClassifierOutputTarget(t) for t in targets]

        methods = {
            "ort-forward": lambda: forward.run(None, {in_name: xn}),
            "onnxcam": lambda: explainer.explain(xn, targets),
            "onnxcam-raw": lambda: explainer.session.run(None, raw_feeds),
            "captum": lambda: lgc.attribute(x, target=targets, relu_attributions=True),
            "pytorch-grad-cam": lambda: gcam(input_tensor=x, targets=gc_targets),
        }
        # Same answer from every method (else the timing compares different work).
        ours = explainer.explain(xn, targets)
        ref = lgc.attribute(x, target=targets, relu_attributions=True).detach().numpy()[:, 0]
        err = np.linalg.norm(ours.maps - ref) / max(np.linalg.norm(ref), 1e-30)
        heat_err = float(np.abs(ours.heatmaps - gcam(input_tensor=x, targets=gc_targets)).max())
        print(f"batch {n}: onnxcam vs Captum maps rel L2 {err:.1e}; heatmaps vs pytorch-grad-cam max abs "
              f"{heat_err:.1e}", file=sys.stderr)

        times = {k: [] for k in methods}
        cpu = {k: [] for k in methods}  # process CPU time (all threads): insensitive to preemption by other load
        order = list(methods.items())
        for r in range(args.warmup + args.repeats):
            # rotate the order each round: whichever method runs right after torch (whose OpenMP threads are
            # still spinning) or after another session would otherwise always be the same one
            k = r % len(order)
            for name, fn in order[k:] + order[:k]:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if r >= args.warmup:
                    times[name].append(dt * 1e3)
                    cpu[name].append(dc * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}

        def paired(a: str, b: str, t=times) -> float:
            # median over rounds of time(a) / time(b) in the same round: both saw about the same background load
            return statistics.median(x / y for x, y in zip(t[a], t[b]))

        for name in methods:
            ours = name.startswith("onnxcam")
            rows.append((name, n, med[name], min(times[name]), med[name] / med["ort-forward"],
                         paired(name, "ort-forward"), min(times[name]) / min(times["ort-forward"]),
                         statistics.median(cpu[name]), paired(name, "ort-forward", cpu),
                         paired("captum", name) if ours else None,
                         paired("pytorch-grad-cam", name) if ours else None))

        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            prefix = os.path.join(args.profile, f"b{n}_")
            fwd_p = ort.InferenceSession(path, options(prefix + "forward"), providers=["CPUExecutionProvider"])
            cam_p = onnxcam.Explainer(path, session_options=options(prefix + "onnxcam")).session
            for _ in range(args.repeats):
                fwd_p.run(None, {in_name: xn})
                cam_p.run(None, raw_feeds)
            files = fwd_p.end_profiling(), cam_p.end_profiling()
            print(f"profiles: {files[0]} {files[1]}", file=sys.stderr)
            profile_report(*files, title=f"batch {n}")

    gcam.activations_and_grads.release()
    print(f"\nResNet-50 (random weights), {args.size}x{args.size}, CPU, {args.exporter} export; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}; threads: torch {torch.get_num_threads()}, "
          f"onnxruntime {args.threads or 'default'} (spinning {'on' if args.spin else 'off'}); {args.repeats} rounds "
          f"after {args.warmup} warm-up; Explainer build {build_s:.1f} s\n")
    print("Wall-clock: / ort-forward = ratio of the medians; paired = median over rounds of the ratio within a round "
          "(robust to load that changes between rounds); min = ratio of the minima. CPU: median process CPU time "
          "(all threads) and its paired ratio -- unaffected by preemption, but counts torch's OpenMP spin-waiting. "
          "Speed-ups: paired wall-clock.\n")
    print("| method | batch | median ms | min ms | / ort-forward | paired | min | CPU ms | CPU paired "
          "| speed-up vs Captum | speed-up vs pytorch-grad-cam |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, ms, best, ratio, pr, mr, cms, cpr, vs_captum, vs_gc in rows:
        f = (lambda v: f"{v:.2f}x" if v is not None else "")
        print(f"| {name} | {n} | {ms:.1f} | {best:.1f} | {ratio:.3f} | {pr:.3f} | {mr:.3f} | {cms:.1f} | {cpr:.3f} "
              f"| {f(vs_captum)} | {f(vs_gc)} |")
    return 0


def _profile(path: str):
    """Mean kernel time per run (ms) of every node, op type per node, mean model_run time (ms)."""
    import collections
    import json

    with open(path) as f:
        events = json.load(f)
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    times, ops = collections.defaultdict(float), {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name] += e["dur"]
            ops[name] = e.get("args", {}).get("op_name", "?")
    k = max(len(runs), 1)
    return {n: t / k / 1e3 for n, t in times.items()}, ops, sum(runs) / k / 1e3


def profile_report(forward_json: str, fused_json: str, title: str = "", top: int = 8) -> None:
    import collections

    f, fops, frun = _profile(forward_json)
    c, cops, crun = _profile(fused_json)
    added = {n: t for n, t in c.items() if n not in f}
    lost = [n for n in f if n not in c]
    fk, ck = sum(f.values()), sum(c.values())
    print(f"\nonnxruntime profile, {title}: model_run {frun:.1f} ms (forward) vs {crun:.1f} ms (fused); kernel time "
          f"{fk:.1f} vs {ck:.1f} ms. Nodes added by onnxcam: {len(added)}, {sum(added.values()):.2f} ms "
          f"({100 * sum(added.values()) / max(fk, 1e-9):.1f}% of the forward's kernel time); forward nodes missing "
          f"from the fused graph (fusions lost): {len(lost)}; kernel-time change of the shared nodes "
          f"{sum(c[n] - f[n] for n in f if n in c):+.2f} ms (noise unless large)")
    for n, t in sorted(added.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {t:7.3f} ms  {cops[n]:<16} {n}")
    by = collections.defaultdict(float)
    for n, t in added.items():
        by[cops[n]] += t
    print("    added, by op type: " + ", ".join(f"{op} {t:.2f}" for op, t in sorted(by.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    raise SystemExit(main())
