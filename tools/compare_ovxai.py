#!/usr/bin/env python
"""onnxcam against OpenVINO XAI (`openvino-xai`), side by side: time per image and explanation quality, written
into docs/ovxai_comparison.md (between the `results` markers) and printed.

    python tools/compare_ovxai.py --xai-python /tmp/ovxai/bin/python
    python tools/compare_ovxai.py --synthetic-images 20 --repeats 3          # a quick run

OpenVINO XAI 1.1.0 pins openvino 2024.4 and numpy < 2, so it lives in a venv of its own
(`python -m venv /tmp/ovxai && /tmp/ovxai/bin/pip install openvino-xai`) and runs in a subprocess of that
venv's python, driven over a pipe by tools/bench_precision.py's `XAI` class with the worker below (arrays travel
as .npy files in a temporary folder). Without it (`--no-xai`, or no such python) only onnxcam's rows are made.

Models and data:
  * `synthetic`: models/synthetic/shapes_cnn.onnx on models/synthetic/eval/ (object masks and boxes): pointing
    game, localisation, deletion/insertion, Average Drop, occlusion agreement; the explained class is each
    image's ground-truth label (as tools/eval_report.py and `onnxcam evaluate`);
  * `efficientnet_lite0`: models/efficientnet_lite0.onnx on the photos models/cat.png and models/cat_and_cup.png
    (no masks: deletion/insertion, Average Drop and occlusion only); the explained class is onnxruntime fp32's
    top-1;
  * `resnet50` (only if asked for): torchvision ResNet-50 with random BatchNorm-calibrated weights, exported by
    tests/torch_export.py: time only (its maps mean nothing).
Every map is scored by onnxcam.evaluate's Evaluator, the code of `onnxcam evaluate` and tools/eval_report.py, with
the same settings (20 deletion/insertion steps, localisation at 15% and 50% of the map's maximum). OpenVINO XAI's
maps are fed to it through `CompareEvaluator`, which takes maps computed elsewhere: they come as uint8 at the
layer's resolution (0..255 per class), and are brought to onnxcam's heatmap convention by `ov_heatmap` (min-max,
bilinear half-pixel upsampling to the input size, min-max: onnxcam.cam.methods.heatmap).

Methods: onnxcam gradcam, gradcam++, layercam, scorecam, ablationcam, eigencam and, where this onnxcam has them,
reciprocam and rise; OpenVINO XAI ReciproCAM and ActivationMap (white box: `insert_xai` on the same ONNX file,
auto-detected layer) and RISE (black box, on probabilities); both RISEs with --rise-masks masks (0: left out).
ActivationMap is class-agnostic (the mean of the layer's channels): the same map for every class.

Time: per image at batch 1, as a ratio to a plain forward *in the same engine* (onnxcam: onnxruntime fp32;
OpenVINO XAI: OpenVINO's forward of the same model compiled with OpenVINO's defaults, bf16 where the CPU has it,
inside the worker, timing only `infer` / `generate_saliency_map`). One warm-up round, then --repeats rounds of
every method in turn, the order rotating (tools/bench_precision.py's pattern); medians, and ratios paired within
a round. A method whose warm-up call took more than --slow seconds gets --slow-repeats timed calls only.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
try:
    import onnxcam  # noqa: F401
except ImportError:  # a checkout whose editable install points elsewhere
    sys.path.insert(0, str(ROOT / "src"))

import bench_precision as bp  # noqa: E402
import eval_report as er  # noqa: E402
from onnxcam import metrics as M  # noqa: E402
from onnxcam.cam import methods as methods_mod  # noqa: E402
from onnxcam.errors import OnnxcamError  # noqa: E402
from onnxcam.evaluate import Evaluator, Sample, load_dataset  # noqa: E402

METHODS = ["gradcam", "gradcam++", "layercam", "scorecam", "ablationcam", "eigencam"]
OPTIONAL = ["reciprocam", "rise"]  # taken when onnxcam.cam.methods.METHODS has them
XAI_METHODS = {"reciprocam": "ReciproCAM", "activationmap": "ActivationMap", "rise": "RISE"}
SYNTHETIC_METRICS = ["localization", "pointing", "deletion", "insertion", "drop", "occlusion"]
PHOTO_METRICS = ["deletion", "insertion", "drop", "occlusion"]
SYNTHETIC_COLUMNS = ["pointing", "top1_loc_error", "top1_loc_error@50", "gt_known_loc", "iou", "deletion_auc",
                     "insertion_auc", "average_drop", "faithfulness"]
PHOTO_COLUMNS = ["deletion_auc", "insertion_auc", "average_drop", "faithfulness"]
MODELS = {
    "synthetic": ROOT / "models" / "synthetic" / "shapes_cnn.onnx",
    "efficientnet_lite0": ROOT / "models" / "efficientnet_lite0.onnx",
    "resnet50": None,  # exported on the fly; time only
}
TITLES = {"synthetic": "Synthetic benchmark (`models/synthetic/shapes_cnn.onnx`, 128x128)",
          "efficientnet_lite0": "EfficientNet-Lite0 (`models/efficientnet_lite0.onnx`, 224x224, real ImageNet "
                                "weights), the two bundled photos",
          "resnet50": "ResNet-50 (torchvision, random BatchNorm-calibrated weights, 224x224): time only"}
FORWARD_ORT, FORWARD_OV = "onnxruntime forward", "OpenVINO forward"
MARK_START = "<!-- results:start (written by tools/compare_ovxai.py; do not edit by hand) -->"
MARK_END = "<!-- results:end -->"

WORKER = bp.WORKER_HEAD + r'''
from openvino_xai.inserter.model_parser import IRParserCls, ModelType

runners = {}


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def output_names(compiled):
    names = [o.get_names() for o in compiled.outputs]
    sal = [i for i, n in enumerate(names) if "saliency_map" in n]
    return (sal[0] if sal else None), [i for i in range(len(names)) if i not in sal][0]


class WhiteBox:  # forward (no branch), reciprocam, activationmap
    def __init__(self, path, method):
        model = core.read_model(path)
        self.layer = None
        if method != "forward":
            node = IRParserCls.get_target_node(model, ModelType.CNN)
            self.layer = f"{node.get_friendly_name()} {node.get_output_partial_shape(0)}"
            model = xai.insert_xai(model, task=xai.Task.CLASSIFICATION,
                                   explain_method=getattr(xai.Method, method.upper()))
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.saliency, self.logits = output_names(self.compiled)

    def __call__(self, x, target):
        res = self.request.infer({0: x})
        logits = np.asarray(res[self.compiled.outputs[self.logits]]).reshape(1, -1)[0]
        if self.saliency is None:
            return None, logits
        sal = np.asarray(res[self.compiled.outputs[self.saliency]])[0]
        return (sal[target] if sal.ndim == 3 else sal), logits  # per class (K, h, w), or one map (h, w)


class BlackBoxRise:
    def __init__(self, path, masks, cells, seed):
        model = core.read_model(path)
        self.method = xai.methods.RISE(model, postprocess_fn=lambda out: softmax(np.asarray(out[0]).reshape(1, -1)),
                                       prepare_model=False)
        self.compiled = self.method._model_compiled = core.compile_model(model, "CPU", config)
        self.masks, self.cells, self.seed = masks, cells, seed
        self.layer = f"input (RISE, {masks} masks, {cells}x{cells} cells)"

    def __call__(self, x, target):
        sal = self.method.generate_saliency_map(x, [int(target)], num_masks=self.masks, num_cells=self.cells,
                                                seed=self.seed)[int(target)]
        return sal, np.full(1, np.nan)


def load(c):
    m = c["method"]
    r = runners[(c["key"], m)] = BlackBoxRise(c["path"], **c["rise"]) if m == "rise" else WhiteBox(c["path"], m)
    return {"precision": str(r.compiled.get_property("INFERENCE_PRECISION_HINT")), "layer": r.layer,
            "openvino": ov.__version__, "numpy": np.__version__,
            "openvino_xai": getattr(xai, "__version__", None)
            or __import__("importlib.metadata").metadata.version("openvino-xai")}


def run(c):  # one image per call (batch 1), timed; maps and logits saved when "out" is given
    runner, x = runners[(c["key"], c["method"])], inputs[c["input"]]
    targets = c.get("targets") or [0] * len(x)
    maps, logits, ms = [], [], 0.0
    for i in range(len(x)):
        t0 = time.perf_counter()
        sal, lg = runner(x[i:i + 1], int(targets[i]))
        ms += (time.perf_counter() - t0) * 1e3
        if c.get("out"):
            maps.append(sal)
            logits.append(lg)
    if c.get("out"):
        np.save(c["out"] + ".maps.npy", np.stack(maps) if maps[0] is not None else np.zeros((len(x), 0)))
        np.save(c["out"] + ".logits.npy", np.stack(logits).astype(np.float32))
    return {"ms": ms}


serve({"load": load, "run": run})
'''


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- maps


def _minmax(a: np.ndarray) -> np.ndarray:
    """onnxcam.cam.methods.normalize in numpy: (a - min) / (max - min + 1e-7)."""
    a = np.asarray(a, np.float64)
    lo = a.min()
    return (a - lo) / (a.max() - lo + 1e-7)


def ov_heatmap(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An OpenVINO XAI map (h, w) (uint8 0..255 at the layer's resolution, or RISE's at the input's) -> an onnxcam
    heatmap (H, W) in [0, 1]: min-max, bilinear upsampling with half-pixel centres (metrics.resize, the ONNX
    Resize onnxcam's graph uses), min-max again; onnxcam.cam.methods.heatmap's steps."""
    return _minmax(M.resize(_minmax(raw), tuple(size))).astype(np.float32)


class CompareEvaluator(Evaluator):
    """onnxcam's Evaluator, also scoring maps computed elsewhere: `external` maps a method name to
    `fn(xs, targets, indices) -> (N, H, W)` heatmaps in [0, 1] at input resolution, for a (N, C, H, W) batch in
    the model's input space (the arguments of Evaluator.maps). Every map is kept, so that a second `run` (the
    localisation at another threshold) scores the same maps without computing them again."""

    def __init__(self, model, methods: Sequence[str], external: dict[str, Callable] | None = None, **kw):
        super().__init__(model, methods, **kw)
        self.external = dict(external or {})
        clash = [m for m in self.external if m in self.methods]
        if clash:
            raise OnnxcamError(f"external method names clash with onnxcam's: {', '.join(clash)}")
        self.methods += list(self.external)
        self.cache: dict = {}

    def maps(self, method, xs, targets, indices):
        key = (method, tuple(int(i) for i in indices), tuple(int(t) for t in targets))
        if key not in self.cache:
            if method in self.external:
                out = np.asarray(self.external[method](xs, np.asarray(targets), list(indices)), np.float32)
                if out.shape != (len(xs), *xs.shape[2:]):
                    raise OnnxcamError(f"{method}: maps of shape {out.shape} for a batch {xs.shape}")
                self.cache[key] = out
            else:
                self.cache[key] = super().maps(method, xs, targets, indices)
        return self.cache[key]


# ----------------------------------------------------------------------------- OpenVINO XAI


class OVXAI:
    """OpenVINO XAI in its venv (bench_precision.XAI running WORKER)."""

    def __init__(self, python: str, config: dict):
        self.worker = bp.XAI(python, config, worker=WORKER)
        self.n = 0

    def load(self, key: str, path: str, method: str, rise: dict | None = None) -> dict:
        info = self.worker.ask(op="load", key=key, path=path, method=method, rise=rise or {})
        info["precision"] = re.sub(r"<Type: '(\w+)'>", r"\1", info["precision"])  # "<Type: 'bfloat16'>"
        return info

    def run(self, key: str, method: str, x: np.ndarray, targets: Sequence[int] | None = None,
            keep: bool = False):
        """Runs one method on every image of x, one at a time. Returns (ms over all images, maps, logits); maps
        and logits (None unless `keep`) as the worker gives them: (N, h, w) and (N, K)."""
        self.n += 1
        tag = f"x{self.n}"
        self.worker.send_input(tag, np.ascontiguousarray(x, np.float32))
        out = os.path.join(self.worker.tmp.name, tag) if keep else None
        ms = self.worker.ask(op="run", key=key, method=method, input=tag, out=out,
                             targets=None if targets is None else [int(t) for t in targets])["ms"]
        os.remove(os.path.join(self.worker.tmp.name, f"{tag}.npy"))
        if not keep:
            return ms, None, None
        maps, logits = np.load(out + ".maps.npy"), np.load(out + ".logits.npy")
        os.remove(out + ".maps.npy")
        os.remove(out + ".logits.npy")
        return ms, maps, logits

    def timer(self, key: str, method: str, x1: np.ndarray, target: int):
        """fn() -> seconds of one batch-1 call, as the worker measured it. The input is sent once."""
        self.n += 1
        tag = f"t{self.n}"
        self.worker.send_input(tag, np.ascontiguousarray(x1, np.float32))
        return lambda: self.worker.ask(op="run", key=key, method=method, input=tag, targets=[target])["ms"] / 1e3

    def close(self):
        self.worker.close()


def xai_external(xai: OVXAI, key: str, method: str, top1: dict) -> Callable:
    """fn(xs, targets, indices, layout) -> OpenVINO XAI's heatmaps (N, H, W) for the targets, through
    ov_heatmap: an external method for `score`. OpenVINO's own top-1 per sample index goes into `top1`
    (white-box methods: from the same call)."""

    def fn(xs, targets, indices, layout="NCHW"):
        feed = xs.transpose(0, 2, 3, 1) if layout == "NHWC" else xs
        _, maps, logits = xai.run(key, method, feed, targets, keep=True)
        if logits.size and np.isfinite(logits).all():
            top1.update({int(i): int(np.argmax(row)) for i, row in zip(indices, logits)})
        return np.stack([ov_heatmap(m, xs.shape[2:]) for m in maps])
    return fn


def score(path: str, samples: Sequence[Sample], methods: Sequence[str], external: dict[str, Callable],
          synthetic: bool, explainer: Callable | None = None) -> tuple[dict, float | None, dict, list | None]:
    """Scores onnxcam's `methods` and the `external` ones (name -> fn(xs, targets, indices, layout), as
    xai_external makes) on `samples` as tools/eval_report.py does. `explainer(path, "rise", batch_size=...)`
    makes the RISE explainer (its number of masks). Returns (summary per method, classifier top-1 accuracy %
    or None, {sample index: onnxruntime's top-1}, the model's labels)."""
    ev = CompareEvaluator(path, list(methods) or er.CONTROLS[:1], metrics=SYNTHETIC_METRICS if synthetic
                          else PHOTO_METRICS, steps=er.STEPS, batch_size=64,
                          external={k: (lambda xs, t, i, fn=fn: fn(xs, t, i, ev.layout)) for k, fn in external.items()})
    if not methods:  # external methods only: the placeholder control is not scored
        ev.methods.remove(er.CONTROLS[0])
    if "rise" in ev.explainers and explainer is not None:
        ev.explainers["rise"] = explainer(path, "rise", batch_size=64)
    log(f"  quality: {len(samples)} images x {len(ev.methods)} methods ({', '.join(ev.methods)})")
    result = ev.run(samples, er.counter(len(samples) * len(ev.methods), "  scored"), log=None)
    summary = {m: dict(result.summary[m]) for m in ev.methods}
    if synthetic:
        ev.metrics, ev.loc_threshold = ["localization"], 0.5
        loc50 = ev.run(samples)
        for m in ev.methods:
            if "top1_loc_error" in loc50.summary[m]:
                summary[m]["top1_loc_error@50"] = loc50.summary[m]["top1_loc_error"]
    index = {s.name: i for i, s in enumerate(samples)}
    top1 = {index[r["image"]]: r["predicted"] for r in result.records if r["method"] == ev.methods[0]}
    return summary, result.accuracy.get("top1"), top1, ev.labels


# ----------------------------------------------------------------------------- timing


def time_rounds(fns: dict[str, Callable], warmup: int = 1, repeats: int = 5, slow: float = 2.0,
                slow_repeats: int = 1, progress: Callable[[str], None] | None = None) -> dict[str, dict[int, float]]:
    """{label: {round: ms}}. Every fn runs once per round, the order rotating by one each round; warm-up rounds
    are not kept. fn() returns None (timed here) or the seconds it measured itself. A method whose (last) warm-up
    call took more than `slow` seconds runs in the first `slow_repeats` timed rounds only."""
    order = list(fns.items())
    times: dict[str, dict[int, float]] = {k: {} for k in fns}
    first: dict[str, float] = {}
    for r in range(warmup + repeats):
        k = r % len(order)
        for label, fn in order[k:] + order[:k]:
            if r >= warmup and r - warmup >= slow_repeats and first.get(label, 0.0) > slow:
                continue
            t0 = time.perf_counter()
            inner = fn()
            dt = inner if isinstance(inner, float) else time.perf_counter() - t0
            if r < warmup:
                first[label] = dt
            else:
                times[label][r] = dt * 1e3
        if progress is not None:
            progress(f"round {r + 1}/{warmup + repeats}")
    return times


def paired_ratio(times: dict[str, dict[int, float]], a: str, b: str) -> float | None:
    """Median over the rounds that timed both of time(a) / time(b)."""
    if a not in times or b not in times:
        return None
    common = [r for r in times[a] if r in times[b]]
    return statistics.median(times[a][r] / times[b][r] for r in common) if common else None


# ----------------------------------------------------------------------------- tables

COLUMN = {c[0]: c for c in er.COLUMNS}


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x" if v < 100 else f"{v:,.0f}x"


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    """rows: {"method", "engine", "ms", "ratio", "n" (timed calls), "summary"}; columns: eval_report.COLUMNS keys."""
    head = ("| method | engine | ms / image | × forward (same engine) | "
            + " | ".join(COLUMN[c][1] for c in columns) + " |")
    rule = "|---|---|---:|---:|" + "---:|" * len(columns)
    lines = [head, rule]
    for r in rows:
        s = r.get("summary") or {}
        cells = [COLUMN[c][2].format(s[c]) if s.get(c) is not None else "–" for c in columns]
        ms = _fmt_ms(r.get("ms")) + (f" ({r['n']})" if r.get("n") and r["n"] < 3 else "")
        lines.append(f"| {r['method']} | {r['engine']} | {ms} | {_fmt_ratio(r.get('ratio'))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else INTRO
    pattern = re.compile(r"<!-- results:start.*?<!-- results:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


INTRO = """# onnxcam and OpenVINO XAI, side by side

[OpenVINO XAI](https://github.com/openvinotoolkit/openvino_xai) (`openvino-xai` on PyPI) explains OpenVINO and
ONNX models without gradients: ReciproCAM and ActivationMap as a branch inserted into the model (white box), RISE
by masking the input (black box). Here its maps and onnxcam's are scored by the same metric code (onnxcam.evaluate,
as in [evaluation.md](evaluation.md)) on the synthetic benchmark (object masks: pointing game, localisation,
deletion/insertion) and on EfficientNet-Lite0 with the two bundled photos (no masks: deletion/insertion,
Average Drop and occlusion agreement only),
and timed per image at batch 1 against a plain forward in each one's own engine (onnxcam: onnxruntime fp32;
OpenVINO XAI: OpenVINO at its default precision). OpenVINO XAI's maps (uint8 at the layer's resolution) are
upsampled to the input size as onnxcam's heatmaps are (min-max, bilinear with half-pixel centres, min-max) before
they are scored. The explained class is the ground-truth label on the synthetic set and onnxruntime's top-1 on
the photos, for both libraries.

Rerun (about 7 minutes on 2 shared cores; the tables below are replaced):

    python -m venv /tmp/ovxai && /tmp/ovxai/bin/pip install openvino-xai   # once: it pins openvino 2024.4, numpy < 2
    python tools/compare_ovxai.py --xai-python /tmp/ovxai/bin/python

`--synthetic-images N`, `--repeats N`, `--rise-masks N` and `--models` shorten a run; `--help` lists the rest.
"""


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="synthetic,efficientnet_lite0",
                    help="comma-separated: synthetic, efficientnet_lite0, resnet50 (time only)")
    ap.add_argument("--methods", default=",".join(METHODS), help="onnxcam methods (reciprocam and rise are added "
                    "when onnxcam has them, unless --no-optional)")
    ap.add_argument("--no-optional", dest="optional", action="store_false", help="leave out onnxcam's "
                    + " and ".join(OPTIONAL))
    ap.add_argument("--synthetic-images", type=int, default=100, help="first N images of models/synthetic/eval")
    ap.add_argument("--rise-masks", type=int, default=1000, help="masks for both RISEs (0: leave RISE out)")
    ap.add_argument("--rise-images", type=int, default=25, help="score the RISEs on the first N synthetic images "
                    "only (0: all)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slow", type=float, default=2.0, help="seconds: a slower warm-up call gets --slow-repeats")
    ap.add_argument("--slow-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="threads for onnxruntime and OpenVINO (0: default)")
    ap.add_argument("--xai-python", default=os.environ.get("ONNXCAM_XAI_PYTHON") or
                    ("/tmp/ovxai/bin/python" if os.path.exists("/tmp/ovxai/bin/python") else None),
                    help="python of a venv with openvino-xai (default $ONNXCAM_XAI_PYTHON, else /tmp/ovxai)")
    ap.add_argument("--no-xai", dest="xai", action="store_false", help="onnxcam rows only")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ovxai_comparison.md"))
    ap.add_argument("--no-doc", dest="write", action="store_false", help="print only")
    return ap.parse_args(argv)


def pick_methods(names: Sequence[str], optional: bool) -> tuple[list[str], list[str]]:
    """(onnxcam methods to run, notes): the named ones plus OPTIONAL where onnxcam has them."""
    out, notes = [], []
    for name in list(names) + (OPTIONAL if optional else []):
        try:
            m = methods_mod.get_method(name).name
        except OnnxcamError:
            if name in OPTIONAL:
                notes.append(f"onnxcam has no `{name}` method here: left out")
                continue
            raise
        if m not in out:
            out.append(m)
    return out, notes


def model_path(name: str, tmp: str) -> str:
    if MODELS.get(name) is not None:
        return str(MODELS[name])
    if name != "resnet50":
        raise SystemExit(f"unknown model {name}; use {', '.join(MODELS)}")
    from tests import torch_export

    path = os.path.join(tmp, "resnet50.onnx")
    torch_export.export(torch_export.build(name), torch_export.random_input(name, 2, size=224), path, "torchscript")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    from onnxcam.run import precision as precisions

    t_start = time.time()
    wanted, notes = pick_methods([m for m in args.methods.split(",") if m], args.optional)
    rise_opts = {"masks": args.rise_masks}
    if args.rise_masks <= 0:
        wanted = [m for m in wanted if m != "rise"]

    def options():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if args.threads:
            so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as bench_precision
        return so

    def explainer(path, m, **kw):
        if m == "rise":
            try:
                return onnxcam.Explainer(path, method=m, rise=rise_opts, **kw)
            except TypeError:  # an onnxcam whose Explainer takes no RISE options: its default
                notes.append("onnxcam's Explainer takes no `rise` options here: its default number of masks")
        return onnxcam.Explainer(path, method=m, **kw)

    xai, versions = None, {}
    if args.xai and args.xai_python and os.path.exists(args.xai_python):
        xai = OVXAI(args.xai_python, {"PERFORMANCE_HINT": "LATENCY",
                                      **({"INFERENCE_NUM_THREADS": args.threads} if args.threads else {})})
    else:
        notes.append("OpenVINO XAI left out (--no-xai, or no --xai-python venv)")
    tmp = tempfile.TemporaryDirectory()
    sections = []
    try:
        for name in [m for m in args.models.split(",") if m]:
            t_model = time.time()
            log(f"== {name}")
            path = model_path(name, tmp.name)
            mnotes: list[str] = []
            x1, target = first_input(path, name, explainer)
            # onnxcam methods that work on this model (the optional ones may be half-built: tried once)
            methods = []
            for m in wanted:
                try:
                    e = explainer(path, m)
                    if m in OPTIONAL:
                        e.explain(x1, np.array([target]))
                    methods.append(m)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    mnotes.append(f"onnxcam `{m}` fails on this model ({type(exc).__name__}: {exc}): left out")
            ov_methods: dict[str, dict] = {}
            if xai is not None:
                xpath = bp.xai_compatible(path, tmp.name)
                if xpath != path:
                    mnotes.append("OpenVINO XAI gets a copy whose head Reshape has a constant shape "
                                  "(bench_precision.xai_compatible; the same computation)")
                for m in ["forward"] + [k for k in XAI_METHODS if k != "rise" or args.rise_masks > 0]:
                    try:
                        info = xai.load(name, xpath, m, {"masks": args.rise_masks, "cells": 8, "seed": 0}
                                        if m == "rise" else None)
                        ov_methods[m] = info
                        versions.update(openvino=info["openvino"], openvino_xai=info["openvino_xai"],
                                        xai_numpy=info["numpy"])
                    except RuntimeError as exc:
                        mnotes.append(f"OpenVINO XAI {XAI_METHODS.get(m, m)} fails on this model: {exc}")

            # ---- quality
            summary, n_images, rise_n = {}, 0, None
            if name in ("synthetic", "efficientnet_lite0"):
                synthetic = name == "synthetic"
                if synthetic:
                    samples = load_dataset(ROOT / "models" / "synthetic" / "eval")[:args.synthetic_images]
                else:
                    samples = [Sample(p, name=p.name) for p in bp.PHOTOS]
                n_images = len(samples)
                top1: dict[int, int] = {}
                external = {f"ovxai:{m}": xai_external(xai, name, m, top1 if m == "reciprocam" else {})
                            for m in XAI_METHODS if m in ov_methods}
                slow = [m for m in list(methods) + list(external) if m in ("rise", "ovxai:rise")]
                rise_n = min(args.rise_images or n_images, n_images) if slow else None
                groups = [([m for m in methods if m not in slow] + (er.CONTROLS if synthetic else []),
                           {k: v for k, v in external.items() if k not in slow}, samples)]
                if slow:
                    groups.append(([m for m in slow if m in methods], {k: external[k] for k in slow if k in external},
                                   samples[:rise_n]))
                for own, ext, subset in groups:
                    got, accuracy, ort_top1, labels = score(path, subset, own, ext, synthetic, explainer)
                    summary.update(got)
                    if accuracy is not None and own is groups[0][0]:
                        mnotes.append(f"classifier top-1 accuracy {accuracy:.1f}% (onnxruntime fp32) on these images")
                    if own is groups[0][0] and not synthetic:
                        names = ", ".join(f"{s.name}: {labels[ort_top1[i]] if labels else ort_top1[i]}"
                                          for i, s in enumerate(samples))
                        mnotes.append(f"explained class (onnxruntime fp32's top-1): {names}")
                    if own is groups[0][0] and top1:
                        same = sum(top1[i] == ort_top1.get(i) for i in top1)
                        mnotes.append(f"OpenVINO ({ov_methods['reciprocam']['precision']})'s top-1 agrees with "
                                      f"onnxruntime fp32's on {same} of {len(top1)} images")
                if rise_n is not None and rise_n < n_images:
                    mnotes.append(f"† RISE (both) is scored on the first {rise_n} images only (--rise-images): "
                                  f"{args.rise_masks} forwards per image")

            # ---- time
            log("  time")
            ref = ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
            in_name = ref.get_inputs()[0].name
            fns: dict[str, Callable] = {FORWARD_ORT: lambda: ref.run(None, {in_name: x1})}
            timed_explainers = {}
            for m in methods:
                e = explainer(path, m, session_options=options())
                timed_explainers[m] = e
                fns[f"onnxcam {m}"] = (lambda e=e: e.explain(x1, np.array([target])))
            if xai is not None:
                for m in ov_methods:
                    fns[FORWARD_OV if m == "forward" else f"ovxai:{m}"] = xai.timer(name, m, x1, target)
            times = time_rounds(fns, args.warmup, args.repeats, args.slow, args.slow_repeats,
                                progress=lambda s: log(f"    {s}"))

            # ---- rows
            ort_engine = "onnxruntime fp32"
            ov_engine = (f"OpenVINO {ov_methods['forward']['precision']}" if "forward" in ov_methods
                         else "OpenVINO")
            rows = []

            def row(label, method, engine, ref_label, key=None):
                t = times.get(label, {})
                if key in ("rise", "ovxai:rise") and rise_n is not None and rise_n < n_images:
                    method += " †"
                rows.append({"method": method, "engine": engine,
                             "ms": statistics.median(t.values()) if t else None, "n": len(t),
                             "ratio": paired_ratio(times, label, ref_label) if t else None,
                             "summary": summary.get(key) if key else None})

            row(FORWARD_ORT, "*forward*", ort_engine, FORWARD_ORT)
            for m in methods:
                row(f"onnxcam {m}", f"onnxcam `{m}`", ort_engine, FORWARD_ORT, m)
            if "forward" in ov_methods:
                row(FORWARD_OV, "*forward*", ov_engine, FORWARD_OV)
            for m in XAI_METHODS:
                if m in ov_methods:
                    row(f"ovxai:{m}", f"OpenVINO XAI {XAI_METHODS[m]}", ov_engine, FORWARD_OV, f"ovxai:{m}")
            for c in (er.CONTROLS if name == "synthetic" else []):
                rows.append({"method": f"*{c}* (control)", "engine": "–", "summary": summary.get(c)})
            columns = SYNTHETIC_COLUMNS if name == "synthetic" else PHOTO_COLUMNS if summary else []
            layer = next(iter(timed_explainers.values())).layer if timed_explainers else None
            if layer is not None:
                mnotes.append(f"onnxcam's layer `{layer}`" + "".join(
                    f"; OpenVINO XAI's {XAI_METHODS[m]} layer `{ov_methods[m]['layer']}`"
                    for m in ("reciprocam", "activationmap") if m in ov_methods))
            mnotes.append(f"{time.time() - t_model:.0f} s for this model")
            sections.append((name, n_images, markdown_table(rows, columns), mnotes))
            del timed_explainers, fns
    finally:
        if xai is not None:
            xai.close()

    flags = precisions.cpu_flags() or frozenset()
    shown = [f for f in sorted(flags) if f.startswith(("avx512_bf16", "amx")) or f in ("avx2", "avx512f")]
    ver = lambda p: _version(p)  # noqa: E731
    head = [f"Machine: {precisions.cpu_name()}, {os.cpu_count()} logical cores (flags {' '.join(shown)}), "
            f"shared with other work; load average at the end {os.getloadavg()[0]:.1f}. onnxcam {onnxcam.__version__}, "
            f"onnxruntime {ort.__version__}, onnx {ver('onnx')}, numpy {np.__version__}"
            + (f"; OpenVINO XAI {versions.get('openvino_xai')} with openvino {versions.get('openvino')} and numpy "
               f"{versions.get('xai_numpy')} (its own venv)" if versions else "")
            + f". {time.strftime('%Y-%m-%d')}, whole run {time.time() - t_start:.0f} s.",
            "",
            f"Time: batch 1, {args.warmup} warm-up round then {args.repeats} interleaved rounds, median ms per image; "
            "\"× forward\" is the median of time / forward paired within a round, the forward of the same model in "
            f"the same engine. A count in brackets after the ms: a method slower than {args.slow:g} s got only that "
            "many timed calls. OpenVINO XAI's time is its `infer` call (ReciproCAM, ActivationMap: the map at the "
            "layer's resolution, not upsampled) or `generate_saliency_map` (RISE, "
            f"{args.rise_masks} masks of 8x8 cells); onnxcam's is `Explainer.explain` (heatmap at input resolution). "
            f"Both RISEs use {args.rise_masks} masks (OpenVINO XAI's of 8x8 cells, onnxcam's of its default "
            f"{rise_cells()}x{rise_cells()}), fewer than either library's default (5000 / 4000).",
            "",
            "Quality: onnxcam.evaluate's Evaluator (the code of tools/eval_report.py), 20 deletion/insertion steps, "
            "localisation with the map thresholded at 15% (and 50%) of its maximum. OpenVINO XAI's maps are "
            "uint8 at the layer's resolution; they are upsampled to the input size like onnxcam's heatmaps "
            "(min-max, bilinear with half-pixel centres, min-max). ActivationMap has no class: one map for all."]
    head += [f"Note: {n}" for n in notes]
    parts = [MARK_START, "", *head]
    for name, n, table, mnotes in sections:
        parts += ["", f"### {TITLES.get(name, name)}" + (f" — {n} images" if n else ""), "", table, ""]
        parts += [f"* {n}" for n in mnotes]
    parts += ["", MARK_END]
    block = "\n".join(parts)
    print(block)
    if args.write:
        write_doc(Path(args.doc), block)
        log(f"wrote {args.doc}")
    return 0


def rise_cells() -> str:
    try:
        from onnxcam.cam.perturb import RiseOptions

        return str(RiseOptions().cells)
    except (ImportError, AttributeError):
        return "?"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def first_input(path: str, name: str, explainer) -> tuple[np.ndarray, int]:
    """The image timed at batch 1, and its class (the label; else onnxruntime's top-1)."""
    from onnxcam.images import preprocess

    e = explainer(path, "gradcam")
    pp = e.preprocessing()
    if name == "synthetic":
        sample = load_dataset(ROOT / "models" / "synthetic" / "eval")[0]
        x = preprocess.to_tensor(preprocess.load_image(sample.image), pp)
        return np.ascontiguousarray(x, np.float32), int(sample.label)
    if name == "efficientnet_lite0":
        x = preprocess.to_tensor(preprocess.load_image(bp.PHOTOS[0]), pp)
    else:
        x = preprocess.to_tensor(preprocess.load_image(bp.PHOTOS[0]).resize((224, 224)), pp)
    x = np.ascontiguousarray(x, np.float32)
    return x, int(np.argmax(e.explain(x).scores[0]))


if __name__ == "__main__":
    sys.exit(main())
