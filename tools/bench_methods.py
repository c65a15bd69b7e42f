#!/usr/bin/env python
"""Every onnxcam method on the CPU: its cost relative to one onnxruntime forward, and its speed-up over
pytorch-grad-cam / Captum.

    python tools/bench_methods.py                                   # everything, ResNet-50, batch 1, 224x224
    python tools/bench_methods.py --methods gradcam,scorecam --channels 64 --repeats 5
    python tools/bench_methods.py --methods guided-backprop,scorecam --profile /tmp/prof

Model: torchvision ResNet-50 with RANDOM weights (seeded torchvision init; BatchNorm running statistics
calibrated on random batches at the benchmark size so activations and logits are O(1) -- no denormals, no
degenerate maps; see tests/torch_export.py), exported with the TorchScript exporter (opset 17, dynamic
batch). Explained layer: layer4 (onnxcam's auto layer; `target_layers=[model.layer4]` for the references).
Target: the argmax of each sample. Timing does not depend on the weights.

What is timed, all in one process, for the same input and targets (conventions of tools/bench_gradcam.py):
  ort-forward      plain onnxruntime forward of the exported model. Every onnxruntime session (that one and
                   all of onnxcam's, given as `Explainer(..., session_options=)`) has the same SessionOptions:
                   ORT_ENABLE_ALL as onnxcam.run.runtime uses, the intra-op thread count of --threads, and intra-op
                   spinning off unless --spin (spinning pools of several sessions plus torch's OpenMP pool,
                   interleaved on few cores, steal each other's time and inflate whichever runs next)
  torch-forward    `model(x)` under torch.no_grad() (context for the references; the per-channel estimates)
  onnxcam          `Explainer(model, method=..., batch_size=32).explain(x, targets, ...)`: the whole call
                   (input checks, fused session, numpy SVD for the Eigen methods, perturbed batches for
                   Score-CAM / Ablation-CAM, heatmaps). One Explainer per method, built before its group.
  references       gradcam gradcam++ xgradcam layercam hirescam gradcam-elementwise eigencam eigengradcam
                   scorecam ablationcam (and gradcam-aug = gradcam with aug_smooth): pytorch-grad-cam's
                   GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, GradCAMElementWise, EigenCAM,
                   EigenGradCAM, ScoreCAM, AblationCAM at model.layer4 with ClassifierOutputTarget(argmax),
                   through tests/methods_reference.grad_cam_reference (the parity tests' helper: a CAM object
                   is made, called and released per call -- constructing one only registers two hooks; a
                   long-lived one would keep its hooks on layer4 and burden every other torch method's forward).
                   guided-backprop: Captum GuidedBackprop AND pytorch-grad-cam's GuidedBackpropReLUModel (one
                   call per sample: it explains sample 0 only; it backpropagates with loss.backward(), so it
                   also computes the weight gradients, as pytorch-grad-cam's gradient CAMs do); deconvnet:
                   Captum Deconvolution; guided-gradcam: Captum GuidedGradCam(model, model.layer4,
                   interpolate_mode="bilinear").
  gradcam-aug      aug_smooth=True: onnxcam runs the 6 augmented copies (flip x 0.9/1/1.1) as ONE batch of 6N
                   through the fused graph; pytorch-grad-cam runs 6 GradCAM passes. Its "x forward" is still
                   relative to a batch-N forward.
  scorecam, ablationcam  one perturbed pass per (sample, channel): 2048 channels at layer4. By default both
                   sides perturb the same --channels 256 channels (each sample's most contributing ones,
                   tests/methods_reference.top_contributing_channels, as the parity tests choose them; the
                   reference is pytorch-grad-cam's ScoreCAM / AblationCAM restricted to that subset by the
                   parity tests' helper classes). Batch sizes: onnxcam batch_size=32 for both; pytorch-grad-cam
                   keeps its defaults, ScoreCAM 16 and AblationCAM 32. onnxcam's Ablation-CAM runs only the part
                   of the model after layer4 (pool + fc) per ablated channel; pytorch-grad-cam's recomputes
                   everything before layer4 for each batch. Their groups also time both sides with ONE channel
                   (the fixed cost: the explained forward, hooks, batching); a second table gives the time per
                   perturbed channel, median over rounds of (time with the channels - time with one) /
                   (N x (channels - 1)), and the extrapolated cost of all 2048 channels, so the full run need not
                   be waited for.

Rounds: each method is timed in its own group -- ort-forward, the onnxcam method, its reference(s) -- as in
bench_gradcam: --warmup untimed rounds, then --repeats rounds of every member in turn, the order rotating
each round (whichever runs right after torch, whose OpenMP threads may still be spinning, changes); a
gc.collect() (untimed) precedes each call. Score-CAM / Ablation-CAM take seconds to minutes per call, so
their groups use --perturb-repeats rounds (default 3), the checked call below being their warm-up. The table reports
medians and minima (the least disturbed runs) and the ratios three ways: of the medians, paired (median over
rounds of the ratio within a round: both saw about the same background load) and of the minima; plus process
CPU time (all threads; insensitive to preemption, but it counts torch's OpenMP spin-waiting). On a shared
machine trust the paired, minimum and CPU-time ratios. Each method's result is checked once against its
reference before timing (stderr), so the timing compares the same work.

--profile DIR writes onnxruntime profiles of the forward, the guided-backprop fused session (nodes the
backward adds, by op type and the top nodes) and the Score-CAM perturbation session (per masked image,
by op type, next to a batch-32 forward), and times torch's and onnxruntime's forward at Score-CAM's batch
sizes: what dominates Guided Backprop's and Score-CAM's cost.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM / AblationCAM progress bars

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GRADIENT = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise"]
EIGEN = ["eigencam", "eigengradcam"]
PIXEL = ["guided-backprop", "deconvnet", "guided-gradcam"]
PERTURB = ["scorecam", "ablationcam"]
ALL = GRADIENT + EIGEN + ["gradcam-aug"] + PIXEL + PERTURB
AUG = "gradcam-aug"
PGC = "pytorch-grad-cam"
ONNXCAM_PERTURB_BATCH = 32
PGC_PERTURB_BATCH = {"scorecam": 16, "ablationcam": 32}  # pytorch-grad-cam's defaults
PGC_CLASS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
             "hirescam": "HiResCAM", "gradcam-elementwise": "GradCAMElementWise", "eigencam": "EigenCAM",
             "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM",
             AUG: "GradCAM(aug_smooth=True)"}
CAPTUM_CLASS = {"guided-backprop": "GuidedBackprop", "deconvnet": "Deconvolution", "guided-gradcam": "GuidedGradCam"}

# Acceptance (printed, not enforced): gradient CAMs at the last layer, Guided Backprop, Score-CAM speed-up.
GRADIENT_MAX_X_FORWARD = 1.2
GUIDED_MAX_X_FORWARD = 3.0
SCORECAM_MIN_SPEEDUP = 2.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(ALL),
                    help=f"comma-separated subset of: {', '.join(ALL)} (default: all)")
    ap.add_argument("--batch", type=int, default=1, help="batch size N (default 1)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per method group (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per method group (default 2)")
    ap.add_argument("--perturb-repeats", type=int, default=3,
                    help="timed rounds for scorecam / ablationcam (default 3; their warm-up is the one checked "
                         "call before timing)")
    ap.add_argument("--channels", type=int, default=256,
                    help="channels perturbed by scorecam / ablationcam, both sides (default 256 of 2048; "
                         "0 = all)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads for onnxruntime, torch and numpy's BLAS (default 0: each library's "
                         "default)")
    ap.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    ap.add_argument("--spin", action="store_true",
                    help="leave onnxruntime's intra-op thread spinning on (its default)")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="also profile guided-backprop's and scorecam's onnxruntime sessions (JSON to DIR) and "
                         "print what dominates")
    args = ap.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in ALL]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL)}")
    if args.batch < 1 or args.repeats < 1 or args.perturb_repeats < 1 or args.warmup < 0 or args.channels < 0:
        ap.error("--batch, --repeats, --perturb-repeats must be >= 1; --warmup, --channels >= 0")
    return args


# -- timing --------------------------------------------------------------------------------------------------

def timed_rounds(fns: dict[str, Callable], rounds: int, warmup: int):
    """Interleaved rounds, the order rotating: ({name: [ms per round]}, {name: [CPU ms per round]})."""
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}  # process CPU time (all threads)
    order = list(fns.items())
    for r in range(warmup + rounds):
        k = r % len(order)
        for name, fn in order[k:] + order[:k]:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(dt * 1e3)
                cpu[name].append(dc * 1e3)
    return times, cpu


def _busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes of this machine spent busy, seconds stolen by the hypervisor) since boot
    (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / hz, (fields[7] if len(fields) > 7 else 0) / hz


class LoadMeter:
    """Load during the run: the load average, and the cores other processes kept busy on average
    (machine-wide busy CPU time minus this process's, over the wall-clock time)."""

    def __init__(self):
        self.load0 = os.getloadavg()
        self.busy0, self.own0, self.t0 = _busy_seconds(), time.process_time(), time.perf_counter()

    def summary(self) -> str:
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.own0
        text = (f"load average {' '.join(f'{v:.2f}' for v in self.load0)} at the start, "
                f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end (this process included); "
                f"this process used {own / wall:.2f} cores on average")
        now = _busy_seconds()
        if now is not None and self.busy0 is not None:
            others = max(now[0] - self.busy0[0] - own, 0.0)
            text += (f", all other processes {others / wall:.2f} cores, hypervisor steal "
                     f"{(now[1] - self.busy0[1]) / wall:.2f} cores, over {wall:.0f} s")
        return text


def paired(t: dict, a: str, b: str) -> float:
    """Median over rounds of t[a] / t[b] in the same round."""
    return statistics.median(x / y for x, y in zip(t[a], t[b]))


@dataclass
class Result:
    method: str
    times: dict
    cpu: dict
    refs: list  # reference labels, in table order
    notes: list = field(default_factory=list)
    channels: int = 0

    def med(self, k):
        return statistics.median(self.times[k])

    def best(self, k):
        return min(self.times[k])


# -- main ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    meter = LoadMeter()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")  # "requires_grad set", "hooks"
    import onnxruntime as ort
    import torch

    import onnxcam
    from tests import methods_reference as ref
    from tests import torch_export

    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS/LAPACK (pytorch-grad-cam's and onnxcam's SVDs)
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=args.threads)
        except ImportError:  # pragma: no cover
            pass

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

    t0 = time.perf_counter()
    model = torch_export.build("resnet50", calibrate=False)  # seeded torchvision init
    torch_export.calibrate_batchnorm(model, args.size, seed=0)
    layer = model.layer4
    tmp = tempfile.TemporaryDirectory()
    path = torch_export.export(model, torch_export.random_input("resnet50", 2, size=args.size),
                               os.path.join(tmp.name, "resnet50.onnx"), "torchscript")
    print(f"built and exported ResNet-50 in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    forward = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
    in_name = forward.get_inputs()[0].name
    n = args.batch
    x = torch_export.random_input("resnet50", n, seed=n, size=args.size)
    xn = x.numpy()
    with torch.no_grad():
        logits = model(x)
    targets = [int(t) for t in logits.argmax(1)]
    ort_targets = [int(t) for t in forward.run(None, {in_name: xn})[0].argmax(1)]
    if ort_targets != targets:
        print(f"warning: onnxruntime argmax {ort_targets} != torch argmax {targets}", file=sys.stderr)
    n_channels = int(layer[-1].conv3.out_channels)
    chans = (np.arange(n_channels) if args.channels in (0, n_channels) or args.channels > n_channels
             else ref.top_contributing_channels(model, layer, x, targets, args.channels))
    onnxcam_chans = None if len(chans) == n_channels else chans

    def ort_forward():
        return forward.run(None, {in_name: xn})

    def torch_forward():
        with torch.no_grad():
            return model(x)

    def pgc_guided():
        from pytorch_grad_cam import GuidedBackpropReLUModel
        gb = GuidedBackpropReLUModel(model=model, device="cpu")
        # sample by sample (it explains sample 0 only); a fresh leaf each call: it sets requires_grad in place
        return [gb(x[i:i + 1].detach().clone(), target_category=t) for i, t in enumerate(targets)]

    def check(method: str, ours, got_refs: dict) -> str:
        """One line: onnxcam's result vs each reference's."""
        parts = []
        for label, r in got_refs.items():
            if isinstance(r, ref.CamReference):
                parts.append(f"heatmaps vs {label} max abs {float(np.abs(ours.heatmaps - r.heatmaps).max()):.1e}")
                if r.maps is not None:
                    e = np.linalg.norm(ours.maps - r.maps[0]) / max(np.linalg.norm(r.maps[0]), 1e-30)
                    parts.append(f"maps rel L2 {e:.1e}")
            else:
                if isinstance(r, list):  # GuidedBackpropReLUModel: per sample (H, W, C)
                    r = np.stack([np.transpose(s, (2, 0, 1)) for s in r])
                g = ours.guided
                e = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
                parts.append(f"guided vs {label} rel L2 {e:.1e}")
        return f"{method}: " + "; ".join(parts)

    results: list[Result] = []
    # the forward baselines, on their own
    times, cpu = timed_rounds({"ort-forward": ort_forward, "torch-forward": torch_forward}, args.repeats,
                              args.warmup)
    results.append(Result("(forward)", times, cpu, ["torch-forward"]))
    build_s = {}
    for method in args.method_list:
        om = "gradcam" if method == AUG else method
        perturb = method in PERTURB
        t0 = time.perf_counter()
        explainer = onnxcam.Explainer(path, method=om, batch_size=ONNXCAM_PERTURB_BATCH, session_options=options())
        build_s[method] = time.perf_counter() - t0
        kw = {"aug_smooth": True} if method == AUG else {}
        if perturb:
            kw["channels"] = onnxcam_chans

        def ours_fn(explainer=explainer, kw=kw):
            return explainer.explain(xn, targets, **kw)

        fns = {"ort-forward": ort_forward, "onnxcam": ours_fn}
        if method in PIXEL:
            fns[f"Captum {CAPTUM_CLASS[method]}"] = (
                lambda method=method: ref.captum_reference(model, layer, x, targets, method))
            if method == "guided-backprop":
                fns[f"{PGC} GuidedBackpropReLUModel"] = pgc_guided
        else:
            rm = "gradcam" if method == AUG else method
            ref_kw = {"aug_smooth": method == AUG}
            if perturb:
                ref_kw.update(channels=chans, batch_size=PGC_PERTURB_BATCH[method])
            fns[f"{PGC} {PGC_CLASS[method]}"] = (
                lambda rm=rm, ref_kw=ref_kw: ref.grad_cam_reference(model, [layer], x, targets, rm, **ref_kw))
        labels = [k for k in fns if k not in ("ort-forward", "onnxcam")]
        if perturb:  # the same with ONE channel: the fixed cost, for the per-channel estimates
            one = chans[:1]
            fns["onnxcam 1ch"] = lambda explainer=explainer, one=one: explainer.explain(xn, targets, channels=one)
            fns[f"{labels[0]} 1ch"] = (lambda method=method, one=one: ref.grad_cam_reference(
                model, [layer], x, targets, method, channels=one, batch_size=PGC_PERTURB_BATCH[method]))
        t0 = time.perf_counter()
        ours = ours_fn()
        line = check(method, ours, {k: fns[k]() for k in labels})
        print(f"{line} (Explainer build {build_s[method]:.1f} s; check {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)
        rounds = args.perturb_repeats if perturb else args.repeats
        warmup = 0 if perturb else args.warmup  # their check call above is their warm-up
        times, cpu = timed_rounds(fns, rounds, warmup)
        results.append(Result(method, times, cpu, labels, channels=len(chans) if perturb else 0))
        r = results[-1]
        print(f"  {method}: onnxcam {r.med('onnxcam'):.1f} ms ({paired(times, 'onnxcam', 'ort-forward'):.2f}x "
              f"forward, paired); " + "; ".join(f"{k} {r.med(k):.1f} ms" for k in labels), file=sys.stderr,
              flush=True)
        del explainer, ours_fn, fns
        gc.collect()

    report(args, results, n, ort, torch, n_channels, meter)

    if args.profile:
        profile(args, path, options, model, x, xn, targets, onnxcam_chans, ort, torch, onnxcam)
    return 0


# -- report --------------------------------------------------------------------------------------------------

def report(args, results: list[Result], n: int, ort, torch, n_channels: int, meter: LoadMeter) -> None:
    base = results[0]
    chans = next((r.channels for r in results if r.channels), args.channels or n_channels)
    fwd_all = [t for r in results for t in r.times["ort-forward"]]
    print(f"\nResNet-50 (random weights, calibrated BN), {args.size}x{args.size}, batch {n}, CPU ({os.cpu_count()} "
          f"cores), TorchScript export, layer4, argmax targets; onnxruntime {ort.__version__}, torch "
          f"{torch.__version__}; threads: torch {torch.get_num_threads()}, onnxruntime "
          f"{args.threads or 'default'} (spinning {'on' if args.spin else 'off'}); {args.repeats} rounds after "
          f"{args.warmup} warm-up per method ({args.perturb_repeats} after the checked call for "
          f"scorecam/ablationcam); ort-forward median over all groups {statistics.median(fwd_all):.1f} ms "
          f"(min {min(fwd_all):.1f}), torch-forward {base.med('torch-forward'):.1f} ms. Machine: {meter.summary()}\n")
    print("x forward: onnxcam time / one onnxruntime forward of the exported model (batch N), three ways: ratio of "
          "the medians, paired (median over rounds of the within-round ratio), ratio of the minima; CPU: paired "
          "ratio of process CPU time. Speed-up: reference time / onnxcam time, paired wall-clock (and of the "
          f"minima, and paired CPU time). scorecam / ablationcam: {chans} of {n_channels} channels on both sides; onnxcam batch_size {ONNXCAM_PERTURB_BATCH} for both, "
          f"pytorch-grad-cam its defaults (ScoreCAM {PGC_PERTURB_BATCH['scorecam']}, AblationCAM "
          f"{PGC_PERTURB_BATCH['ablationcam']}). gradcam-aug: aug_smooth (6 augmented copies; onnxcam: one batch "
          "of 6N).\n")
    print("| method | onnxcam ms (median) | min ms | x forward (median) | paired | min | CPU paired | reference "
          "| reference ms (median) | min ms | speed-up (paired) | min | CPU paired |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    print(f"| ort-forward | {base.med('ort-forward'):.1f} | {base.best('ort-forward'):.1f} | 1 | 1 | 1 | 1 | "
          f"torch-forward (no_grad) | {base.med('torch-forward'):.1f} | {base.best('torch-forward'):.1f} | "
          f"{paired(base.times, 'torch-forward', 'ort-forward'):.2f}x | "
          f"{base.best('torch-forward') / base.best('ort-forward'):.2f}x | "
          f"{paired(base.cpu, 'torch-forward', 'ort-forward'):.2f}x |")
    for r in results[1:]:
        t, c = r.times, r.cpu
        name = r.method + (f" ({r.channels} ch)" if r.channels else "")
        head = (f"| {name} | {r.med('onnxcam'):.1f} | {r.best('onnxcam'):.1f} | "
                f"{r.med('onnxcam') / r.med('ort-forward'):.2f} | {paired(t, 'onnxcam', 'ort-forward'):.2f} | "
                f"{r.best('onnxcam') / r.best('ort-forward'):.2f} | {paired(c, 'onnxcam', 'ort-forward'):.2f} |")
        for i, label in enumerate(r.refs):
            tail = (f" {label} | {r.med(label):.1f} | {r.best(label):.1f} | {paired(t, label, 'onnxcam'):.2f}x | "
                    f"{r.best(label) / r.best('onnxcam'):.2f}x | {paired(c, label, 'onnxcam'):.2f}x |")
            print((head if i == 0 else f"| {r.method} (cont.) | | | | | | |") + tail)

    pert = [r for r in results if r.channels]
    if pert:
        print(f"\nPer perturbed channel (one masked image / one ablated copy): each group also times both sides "
              f"with ONE channel (the fixed cost: the explained forward, hooks, batching); ms / channel = median over "
              f"rounds of (time with the channels - time with 1) / (N x (channels - 1)); est. all = the measured "
              f"median + the remaining channels of layer4's {n_channels} at that rate.\n")
        print("| method | channels | onnxcam 1-channel call ms | onnxcam ms / channel | onnxcam est. all channels (s) "
              "| reference 1-channel call ms | reference ms / channel | reference est. all channels (s) "
              "| per-channel speed-up | batch sizes (onnxcam / reference) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in pert:
            label = r.refs[0]
            k = n * (r.channels - 1)
            rest = n * (n_channels - r.channels)
            row = [r.method, str(r.channels)]
            pcs = []
            for name in ("onnxcam", label):
                # median over rounds of the within-round difference (k channels - 1 channel)
                pc = statistics.median(a - b for a, b in zip(r.times[name], r.times[f"{name} 1ch"])) / max(k, 1)
                pcs.append(pc)
                row += [f"{r.med(f'{name} 1ch'):.1f}", f"{pc:.2f}", f"{(r.med(name) + rest * pc) / 1e3:.1f}"]
            row += [f"{pcs[1] / pcs[0]:.2f}x" if pcs[0] > 0 else "-",
                    f"{ONNXCAM_PERTURB_BATCH} / {PGC_PERTURB_BATCH[r.method]}"]
            print("| " + " | ".join(row) + " |")

    print("\nAcceptance (paired wall-clock ratios; measured, not enforced):")
    by = {r.method: r for r in results[1:]}
    grads = [m for m in GRADIENT if m in by]
    if grads:
        worst = max(grads, key=lambda m: paired(by[m].times, "onnxcam", "ort-forward"))
        v = paired(by[worst].times, "onnxcam", "ort-forward")
        print(f"  gradient methods at layer4 < {GRADIENT_MAX_X_FORWARD}x a forward: worst {worst} {v:.2f}x "
              f"(min-ratio {by[worst].best('onnxcam') / by[worst].best('ort-forward'):.2f}x) -> "
              f"{'PASS' if v < GRADIENT_MAX_X_FORWARD else 'FAIL'}")
    if "guided-backprop" in by:
        r = by["guided-backprop"]
        v = paired(r.times, "onnxcam", "ort-forward")
        print(f"  guided-backprop < {GUIDED_MAX_X_FORWARD}x a forward: {v:.2f}x (min-ratio "
              f"{r.best('onnxcam') / r.best('ort-forward'):.2f}x) -> {'PASS' if v < GUIDED_MAX_X_FORWARD else 'FAIL'}")
    if "scorecam" in by:
        r = by["scorecam"]
        v = paired(r.times, r.refs[0], "onnxcam")
        print(f"  scorecam >= {SCORECAM_MIN_SPEEDUP}x faster than pytorch-grad-cam: {v:.2f}x (min-ratio "
              f"{r.best(r.refs[0]) / r.best('onnxcam'):.2f}x) -> {'PASS' if v >= SCORECAM_MIN_SPEEDUP else 'FAIL'}")


# -- profiling -----------------------------------------------------------------------------------------------

def _profile(path: str):
    """({node: mean kernel ms per run}, {node: op type}, mean model_run ms, runs), the first run (warm-up:
    allocations, first-touch page faults) left out."""
    with open(path) as f:
        events = json.load(f)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    after = runs[0]["ts"] + runs[0]["dur"] if len(runs) > 1 else -1
    runs = [e["dur"] for e in runs[1:]] if len(runs) > 1 else [e["dur"] for e in runs]
    times, ops = collections.defaultdict(float), {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= after:
            name = e["name"][: -len("_kernel_time")]
            times[name] += e["dur"]
            ops[name] = e.get("args", {}).get("op_name", "?")
    k = max(len(runs), 1)
    return {n: t / k / 1e3 for n, t in times.items()}, ops, sum(runs) / k / 1e3, len(runs)


def _by_op(times: dict, ops: dict, scale: float = 1.0) -> dict:
    by = collections.defaultdict(lambda: [0.0, 0])
    for n, t in times.items():
        by[ops[n]][0] += t * scale
        by[ops[n]][1] += 1
    return dict(sorted(by.items(), key=lambda kv: -kv[1][0]))


def _fmt_ops(by: dict, total: float, top: int = 12) -> str:
    return ", ".join(f"{op} {t:.2f} ms ({100 * t / max(total, 1e-9):.0f}%, {cnt} nodes)"
                     for op, (t, cnt) in list(by.items())[:top])


def profile(args, path, options, model, x, xn, targets, chans, ort, torch, onnxcam) -> None:
    os.makedirs(args.profile, exist_ok=True)
    n = len(targets)
    runs = max(args.repeats, 3)
    print(f"\n## onnxruntime profiles ({runs} runs each after one warm-up run, {args.profile})\n")
    fwd = ort.InferenceSession(path, options(os.path.join(args.profile, "forward")),
                               providers=["CPUExecutionProvider"])
    in_name = fwd.get_inputs()[0].name
    guided = "guided-backprop" in args.method_list
    if guided:
        e = onnxcam.Explainer(path, method="guided-backprop", session_options=options(
            os.path.join(args.profile, "guided")))
    for _ in range(runs + 1):  # interleaved
        fwd.run(None, {in_name: xn})
        if guided:
            e.explain(xn, targets)
    f_t, f_ops, f_run, _ = _profile(fwd.end_profiling())
    f_k = sum(f_t.values())
    print(f"forward, batch {n}: model_run {f_run:.1f} ms, kernel time {f_k:.1f} ms; by op: {_fmt_ops(_by_op(f_t, f_ops), f_k, 6)}")

    if guided:
        g_t, g_ops, g_run, g_n = _profile(e.session.end_profiling())
        g_k = sum(g_t.values())
        # onnxcam names its nodes "onnxcam/..."; the rest is the model's forward (as onnxruntime fused it here)
        # plus the NCHWc layout conversions the optimizer inserts
        back = {k: v for k, v in g_t.items() if k.startswith("onnxcam/")}
        layout = {k: v for k, v in g_t.items() if g_ops[k] in ("ReorderInput", "ReorderOutput") and k not in back}
        fwd_part = {k: v for k, v in g_t.items() if k not in back and k not in layout}
        b_k, l_k, p_k = sum(back.values()), sum(layout.values()), sum(fwd_part.values())
        print(f"\nguided-backprop fused session, batch {n}: model_run {g_run:.1f} ms = {g_run / f_run:.2f}x the "
              f"forward's {f_run:.1f} ms; kernel time {g_k:.1f} ms = forward part {p_k:.1f} ms (plain forward "
              f"{f_k:.1f}) + NCHWc reorders {l_k:.1f} ms ({len(layout)} nodes) + onnxcam's backward/masks/CAM "
              f"{b_k:.1f} ms ({len(back)} nodes, {b_k / f_k:.2f}x the forward's kernel time); outside kernels "
              f"(scheduling, allocation) {g_run - g_k:.1f} ms vs {f_run - f_k:.1f} ms")
        print(f"  forward part by op: {_fmt_ops(_by_op(fwd_part, g_ops), p_k, 8)}")
        print(f"  plain forward by op: {_fmt_ops(_by_op(f_t, f_ops), f_k, 8)}")
        print(f"  onnxcam nodes by op: {_fmt_ops(_by_op(back, g_ops), b_k)}")
        print("  top nodes outside the plain forward:")
        for k, v in sorted(((k, v) for k, v in g_t.items() if k not in f_t), key=lambda kv: -kv[1])[:15]:
            print(f"    {v:7.3f} ms  {g_ops[k]:<18} {k}")
        for s in e._aux.values():  # the heatmap session, if any, is not on this path
            s.end_profiling()

    if "scorecam" in args.method_list:
        b = ONNXCAM_PERTURB_BATCH
        xb = np.repeat(xn[:1], b, axis=0)
        fb = ort.InferenceSession(path, options(os.path.join(args.profile, f"forward_b{b}")),
                                  providers=["CPUExecutionProvider"])
        e = onnxcam.Explainer(path, method="scorecam", batch_size=b, session_options=options(
            os.path.join(args.profile, "scorecam")))
        sub = chans[:2 * b] if chans is not None else np.arange(2 * b)
        for _ in range(3):  # interleaved: 2 batches of masked images, 2 plain forwards
            e.explain(xn[:1], targets[:1], channels=sub)
            fb.run(None, {in_name: xb})
            fb.run(None, {in_name: xb})
        fb_t, fb_ops, fb_run, _ = _profile(fb.end_profiling())
        fb_k = sum(fb_t.values())
        e.session.end_profiling()
        files = {k: s.end_profiling() for k, s in e._aux.items()}
        pkey = next(k for k in files if isinstance(k, tuple) and k[0] == "perturb")
        s_t, s_ops, s_run, s_n = _profile(files[pkey])
        s_k = sum(s_t.values())
        print(f"\nscorecam perturbation session (batches of {b} masked images): model_run {s_run / b:.2f} ms per "
              f"image, kernel {s_k / b:.2f} ms per image; plain forward at batch {b}: model_run {fb_run / b:.2f} ms "
              f"per image, kernel {fb_k / b:.2f}; forward at batch {n}: {f_run / n:.2f} ms per image")
        masking = {k: v for k, v in s_t.items() if k not in fb_t}
        print(f"  masking prefix (nodes not in the forward): {sum(masking.values()) / b:.3f} ms per image; by op: "
              f"{_fmt_ops(_by_op(masking, s_ops, 1 / b), s_k / b, 6)}")
        print(f"  whole session by op, per image: {_fmt_ops(_by_op(s_t, s_ops, 1 / b), s_k / b, 8)}")
        print(f"  forward batch {b} by op, per image: {_fmt_ops(_by_op(fb_t, fb_ops, 1 / b), fb_k / b, 8)}")
        # the same forward in torch, at pytorch-grad-cam's Score-CAM batch and at onnxcam's
        x1 = x[:1]
        for tb in sorted({PGC_PERTURB_BATCH["scorecam"], b}):
            xt = x1.repeat(tb, 1, 1, 1)
            ts, os_ = [], []
            for r in range(4):
                gc.collect()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(xt)
                t1 = time.perf_counter()
                fwd.run(None, {in_name: xt.numpy()})
                t2 = time.perf_counter()
                if r:
                    ts.append(t1 - t0)
                    os_.append(t2 - t1)
            print(f"  plain forward per image at batch {tb}: torch {1e3 * statistics.median(ts) / tb:.2f} ms, "
                  f"onnxruntime {1e3 * statistics.median(os_) / tb:.2f} ms "
                  f"(ratio {statistics.median(ts) / statistics.median(os_):.2f})")


if __name__ == "__main__":
    raise SystemExit(main())
