#!/usr/bin/env python
"""onnxcam Grad-CAM at each precision vs fp32, and vs OpenVINO XAI's ReciproCAM and ActivationMap, on one CPU.

    python tools/bench_precision.py --xai-python /tmp/ovxai/bin/python
    python tools/bench_precision.py --models efficientnet_lite0 --batches 1 --repeats 5

OpenVINO XAI (`openvino-xai`) pins an older openvino and numpy < 2, so it lives in a venv of its own:
    python -m venv /tmp/ovxai && /tmp/ovxai/bin/pip install openvino-xai
It runs in a subprocess of that venv's python, driven over a pipe: it loads the same ONNX file, inserts its XAI
branch (`openvino_xai.insert_xai`), compiles for the CPU with OpenVINO's defaults (bf16 where the CPU has it), and
times its own `infer` calls, which the rounds here interleave with onnxcam's. Its ReciproCAM branch computes one
image per call (it tiles the feature map h*w times for batch 1), so a batch of 8 is 8 calls, as its Explainer does.
"reciprocam call" is its public API end to end, as onnxcam's rows are: `openvino_xai.Explainer(model,
CLASSIFICATION, RECIPROCAM)` called per image with onnxcam's top-1 class as target, the map resized to the input's
size (no colour map), the input already preprocessed (its identity preprocess_fn); the model compiled by the
Explainer itself. Without --xai-python those rows are left out (and said so).

Models: models/efficientnet_lite0.onnx (real ImageNet weights) and torchvision ResNet-50 with random, BatchNorm-
calibrated weights (tests/torch_export.py; exported once to a temporary folder).

Accuracy (against onnxcam fp32 on the same inputs, the bundled photos models/cat.png and models/cat_and_cup.png):
logits relative L2, top-1 agreement, Grad-CAM map relative L2 (worst sample), heatmap max abs difference. int8 is
calibrated on images that are *not* the evaluated ones: flipped, shifted and dimmed copies of the photos.

bf16 splits the fused graph (onnxcam.run.precision.SplitSession): the trunk before the layer on OpenVINO, the
head's explain graph on onnxruntime fp32. "whole graph on OpenVINO" is the unsplit session, timed for comparison.

Timing: warm-up, then rounds of every method in turn (the order rotating); medians, and ratios paired within a
round (median over rounds of time(a) / time(b)), which are what to trust on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHOTOS = [REPO / "models" / "cat.png", REPO / "models" / "cat_and_cup.png"]

# The start of every OpenVINO XAI worker script (this one's, tools/compare_ovxai.py's): the compiled config from
# argv, inputs sent as .npy files, and `serve(handlers)`, the request loop: one JSON line in, one out.
WORKER_HEAD = r'''
import json, sys, time
import numpy as np
import openvino as ov
import openvino_xai as xai

core = ov.Core()
config = json.loads(sys.argv[1])
inputs = {}


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(handlers):
    for line in sys.stdin:
        c = json.loads(line)
        try:
            if c["op"] == "input":
                inputs[c["key"]] = np.load(c["path"])
                reply({"ok": True})
            else:
                reply({"ok": True, **handlers[c["op"]](c)})
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
'''

XAI_WORKER = WORKER_HEAD + r'''
requests = {}
explainers = {}


def load(c):
    info = {}
    for method in ("reciprocam", "activationmap"):
        model = core.read_model(c["path"])
        xm = xai.insert_xai(model, task=xai.Task.CLASSIFICATION, explain_method=getattr(xai.Method, method.upper()))
        compiled = core.compile_model(xm, "CPU", config)
        requests[(c["key"], method)] = compiled.create_infer_request()
        info[method] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    # Its public API end to end: Explainer(...)(image, targets) -> the target's map at the input's size
    explainers[c["key"]] = xai.Explainer(model=core.read_model(c["path"]), task=xai.Task.CLASSIFICATION,
                                         explain_method=xai.Method.RECIPROCAM)
    return {"info": info, "openvino": ov.__version__}


def run(c):
    x = inputs[c["input"]]
    if c["method"] == "reciprocam call":
        explainer, size = explainers[c["key"]], tuple(x.shape[2:])
        t0 = time.perf_counter()
        for i in range(len(x)):
            explainer(x[i:i + 1], targets=[c["targets"][i]], resize=True, colormap=False, output_size=size)
        return {"ms": (time.perf_counter() - t0) * 1e3}
    req = requests[(c["key"], c["method"])]
    t0 = time.perf_counter()
    if c["method"] == "reciprocam":  # one image per call: the branch is built for batch 1
        for i in range(len(x)):
            req.infer({0: x[i:i + 1]})
    else:
        req.infer({0: x})
    return {"ms": (time.perf_counter() - t0) * 1e3}


serve({"load": load, "run": run})
'''


class XAI:
    """The OpenVINO XAI subprocess. `worker`: the script it runs (default XAI_WORKER; tools/compare_ovxai.py
    passes one that also returns saliency maps), given the JSON of `config` as its argument."""

    def __init__(self, python: str, config: dict, worker: str = XAI_WORKER):
        self.tmp = tempfile.TemporaryDirectory()
        script = os.path.join(self.tmp.name, "xai_worker.py")
        Path(script).write_text(worker)
        self.proc = subprocess.Popen([python, script, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"ok": false, "error": "worker died"}')
        if not answer.get("ok"):
            raise RuntimeError(f"OpenVINO XAI: {answer.get('error')}")
        return answer

    def send_input(self, key: str, x: np.ndarray) -> None:
        path = os.path.join(self.tmp.name, f"{key}.npy")
        np.save(path, x)
        self.ask(op="input", key=key, path=path)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def xai_compatible(path: str, folder: str) -> str:
    """A copy of the model OpenVINO XAI's ReciproCAM can take. Its branch clones the head after the layer and
    runs it on h*w masked copies of the feature map; a head Reshape whose shape is read from the *image input*
    (torch's `x.view(x.size(0), -1)`, as in the bundled EfficientNet-Lite0) references a parameter the clone
    does not have, and insert_xai fails ("Model references undeclared parameters"). The copy gives such a
    Reshape the constant shape [0, -1] (keep the batch, flatten the rest): the same computation."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    constant = {t.name for t in model.graph.initializer}
    changed = False
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] not in constant:
            name = node.name + "_xai_shape"
            model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), name))
            node.input[1] = name
            changed = True
    if not changed:
        return path
    out = os.path.join(folder, "xai_" + os.path.basename(path))
    onnx.save(model, out)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,efficientnet_lite0")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--precisions", default="fp32,auto,auto+cal,int8",
                    help="onnxcam precisions to time; auto+cal is auto given the calibration images, which lets it "
                         "time the int8 trunk on OpenVINO against bf16 and keep the faster (default "
                         "fp32,auto,auto+cal,int8)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-whole-graph", dest="whole_graph", action="store_false",
                    help="leave out bf16 with the whole fused graph on OpenVINO (the unsplit session)")
    ap.add_argument("--threads", type=int, default=0, help="threads for onnxruntime and OpenVINO (0: their default)")
    ap.add_argument("--xai-python", default=os.environ.get("ONNXCAM_XAI_PYTHON"),
                    help="python of a venv with openvino-xai (default $ONNXCAM_XAI_PYTHON)")
    return ap.parse_args(argv)


def photos(explainer) -> np.ndarray:
    from onnxcam.images import preprocess

    pp = explainer.preprocessing()
    return np.concatenate([preprocess.to_tensor(preprocess.load_image(p), pp) for p in PHOTOS])


def calibration_set(x: np.ndarray) -> np.ndarray:
    # Not the evaluated images: flipped, shifted, dimmed copies, so that int8's ranges are not fitted to them.
    return np.concatenate([x[..., ::-1], np.roll(x, 40, axis=-1), np.roll(x, -30, axis=-2), x * 0.8])


def accuracy(ref, got) -> dict:
    maps = max(float(np.linalg.norm(got.maps[i] - ref.maps[i]) / max(np.linalg.norm(ref.maps[i]), 1e-30))
               for i in range(len(ref.maps)))
    return {"logits rel L2": float(np.linalg.norm(got.scores - ref.scores) / np.linalg.norm(ref.scores)),
            "top-1 agree": f"{int((got.scores.argmax(1) == ref.scores.argmax(1)).sum())}/{len(ref.scores)}",
            "map rel L2": maps, "heatmap max abs": float(np.abs(got.heatmaps - ref.heatmaps).max())}


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    import onnxcam
    from onnxcam.run import precision as precisions

    def options():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if args.threads:
            so.intra_op_num_threads = args.threads
        # Spinning thread pools of one session steal the cores from the next one in the round.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    ov_config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": args.threads} if args.threads else {})}
    xai = None
    if args.xai_python:
        xai = XAI(args.xai_python, ov_config)
    else:
        print("no --xai-python: OpenVINO XAI rows left out", file=sys.stderr)
    try:
        import openvino as ov
    except ImportError:
        ov = None

    tmp = tempfile.TemporaryDirectory()
    batches = [int(b) for b in args.batches.split(",") if b]
    wanted = [p for p in args.precisions.split(",") if p]
    acc_rows, time_rows, notes = [], [], []
    for name in args.models.split(","):
        if name == "efficientnet_lite0":
            path = str(REPO / "models" / "efficientnet_lite0.onnx")
        else:
            from tests import torch_export

            path = os.path.join(tmp.name, f"{name}.onnx")
            torch_export.export(torch_export.build(name), torch_export.random_input(name, 2, size=224), path,
                                "torchscript")
        ref = onnxcam.Explainer(path, session_options=options())
        x = photos(ref)
        cal = calibration_set(x)
        explainers = {}
        for p in wanted:
            t0 = time.perf_counter()
            # auto runs with the options it sets itself (what a user who passes none gets: the onnxruntime head
            # on one thread that does not spin) unless --threads asks for a thread count everywhere.
            own = p.startswith("auto") and not args.threads
            e = ref if p == "fp32" else onnxcam.Explainer(path, session_options=None if own else options(),
                                                           precision=p.replace("+cal", ""),
                                                           calibration=cal if p in ("int8", "auto+cal") else None)
            explainers[f"onnxcam {e.precision.precision}" + {"auto": " (auto)", "auto+cal": " (auto, calibrated)"}
                       .get(p, "")] = e
            notes.append(f"{name} {p}: {e.precision.reason}; providers {e.session.get_providers()}; built in "
                         f"{time.perf_counter() - t0:.1f} s")
            if args.whole_graph and e.precision.engine == "openvino+onnxruntime" and p != "auto+cal":
                # The same Explainer with the whole fused graph on OpenVINO (what runs without the split), so
                # that the split is measured against it in the same rounds. Its outputs are the split's, in the
                # same order (open_session checks), so only the session changes.
                whole = onnxcam.Explainer(path, session_options=options(), precision=p)
                whole.session, _ = precisions.open_session(whole.model, e.precision, options())
                explainers[f"onnxcam {e.precision.precision} whole graph on OpenVINO"] = whole
        r0 = ref.explain(x)
        for label, e in explainers.items():
            if e is not ref:
                acc_rows.append((name, label, accuracy(r0, e.explain(x))))
        forward = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
        in_name = forward.get_inputs()[0].name
        ov_forward = None
        if ov is not None:
            core = ov.Core()
            ov_forward = core.compile_model(core.read_model(path), "CPU", ov_config).create_infer_request()
            notes.append(f"{name} OpenVINO {ov.__version__} forward: "
                         f"{ov_forward.get_compiled_model().get_property('INFERENCE_PRECISION_HINT')}")
        if xai is not None:
            info = xai.ask(op="load", key=name, path=xai_compatible(path, tmp.name))
            notes.append(f"{name} OpenVINO XAI (openvino {info['openvino']}): {info['info']}")

        for n in batches:
            xb = np.concatenate([x] * (n // len(x) + 1))[:n]
            methods = {"ort fp32 forward": lambda xb=xb: forward.run(None, {in_name: xb})}
            if ov_forward is not None:
                methods["openvino forward (default)"] = lambda xb=xb: ov_forward.infer({0: xb})
            for label, e in explainers.items():
                methods[label] = lambda e=e, xb=xb: e.explain(xb)
            if xai is not None:
                xai.send_input(f"{name}-{n}", xb)
                top1 = [int(t) for t in np.concatenate([r0.targets] * (n // len(x) + 1))[:n]]
                for m in ("reciprocam", "reciprocam call", "activationmap"):
                    methods[f"openvino-xai {m}"] = (lambda m=m, n=n, top1=top1: xai.ask(
                        op="run", key=name, method=m, targets=top1, input=f"{name}-{n}")["ms"] / 1e3)
            times = {k: [] for k in methods}
            order = list(methods.items())
            for r in range(args.warmup + args.repeats):
                k = r % len(order)
                for label, fn in order[k:] + order[:k]:
                    t0 = time.perf_counter()
                    inner = fn()
                    dt = inner if isinstance(inner, float) else time.perf_counter() - t0
                    if r >= args.warmup:
                        times[label].append(dt * 1e3)

            against = ("ort fp32 forward", "openvino-xai reciprocam", "openvino-xai reciprocam call",
                       "openvino-xai activationmap")

            def paired(a, b):
                return statistics.median(u / v for u, v in zip(times[a], times[b])) if b in times else None

            for label in methods:
                time_rows.append((name, n, label, statistics.median(times[label]),
                                  *(paired(label, b) for b in against)))
    if xai is not None:
        xai.close()

    flags = precisions.cpu_flags() or frozenset()
    shown = [f for f in sorted(flags) if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "f16c", "fma")]
    print(f"\nCPU: {precisions.cpu_name()} ({os.cpu_count()} logical cores); flags: {' '.join(shown)}")
    print(f"onnxruntime {ort.__version__}" + (f", openvino {ov.__version__}" if ov is not None else ""))
    for line in notes:
        print(f"  {line}")
    print("\nAccuracy against onnxcam fp32 (bundled photos, batch 2):\n")
    print("| model | precision | logits rel L2 | top-1 agree | map rel L2 (worst) | heatmap max abs |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, a in acc_rows:
        print(f"| {name} | {label} | {a['logits rel L2']:.2e} | {a['top-1 agree']} | {a['map rel L2']:.2e} "
              f"| {a['heatmap max abs']:.3f} |")
    print(f"\nTime ({args.repeats} interleaved rounds after {args.warmup} warm-up; ratios paired within a round):\n")
    print("| model | batch | method | median ms | / ort fp32 forward | / xai ReciproCAM | / xai ReciproCAM call "
          "| / xai ActivationMap |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    f = (lambda v: "" if v is None else f"{v:.2f}x")
    for name, n, label, ms, r_fwd, r_rc, r_call, r_am in time_rows:
        print(f"| {name} | {n} | {label} | {ms:.1f} | {f(r_fwd)} | {f(r_rc)} | {f(r_call)} | {f(r_am)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
