"""Benchmark: Grad-CAM of a model whose weights (external data) are larger than protobuf's 2 GB limit.

Generates, in a temporary directory that is removed afterwards, a conv net with a wide MLP head: x (1, 3, S, S)
-> Conv 3->C -> ReLU (the explained layer) -> Flatten -> Gemm -> ReLU -> Gemm -> ... -> logits, with the Gemm
weights (float32, streamed to `model.onnx.data`, never held in memory here) summing to --gb gigabytes. Every
weight is on the path from the score to the layer, so the gradient graph reads all of it.

Each measured step runs in a child process; its peak resident memory is the child's ru_maxrss:

  ort      plain onnxruntime inference of the model file (the reference)
  explain  onnxcam.Explainer(path).explain(x)
  export   onnxcam export (optional, --export): writes the explain graph with external data next to it

    python tools/bench_large_model.py [--gb 2.4] [--export] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

CHUNK = 1 << 24  # floats per generated chunk (64 MB)


def write_model(folder: str, gb: float, size: int = 16, channels: int = 64, classes: int = 1000) -> tuple[str, int]:
    """The model file and the bytes of its external weights."""
    feat = channels * size * size
    total = int(gb * 1e9) // 4
    # Hidden layers of width `feat` until the budget is spent; the last one maps to the classes.
    hidden = max(0, (total - classes * feat) // (feat * feat))
    widths = [feat] * (hidden + 1)
    rest = total - classes * feat - hidden * feat * feat
    if hidden == 0 or rest > 0:  # one more layer takes the remainder, so the total hits --gb
        extra = max(1, rest // feat)
        widths.append(extra)
    widths.append(classes)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes, offset = [], [], 0
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
    inits.append(onnx.numpy_helper.from_array(w1, "conv_w"))
    nodes += [helper.make_node("Conv", ["x", "conv_w"], ["f"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node("Relu", ["f"], ["features"], name="relu"),
              helper.make_node("Flatten", ["features"], ["h0"], name="flatten")]
    with open(os.path.join(folder, data_name), "wb") as f:
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            name = f"fc{i}_w"
            count = n_in * n_out
            scale = np.float32(1.0 / np.sqrt(n_in))
            for start in range(0, count, CHUNK):
                f.write((rng.standard_normal(min(CHUNK, count - start), np.float32) * scale).tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[n_out, n_in])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(count * 4))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            offset += count * 4
            last = i == len(widths) - 2
            out = "logits" if last else f"g{i}"
            nodes.append(helper.make_node("Gemm", [f"h{i}", name], [out], transB=1, name=f"fc{i}"))
            if not last:
                nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"], name=f"fc{i}_relu"))
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path, offset


CHILD = {
    "ort": """
import numpy as np, onnxruntime as ort, time, json, sys
t = time.perf_counter()
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {"x": np.ones((1, 3, %(size)d, %(size)d), np.float32)})
print(json.dumps({"seconds": time.perf_counter() - t}))
""",
    "explain": """
import numpy as np, onnxcam, time, json, sys
t = time.perf_counter()
ex = onnxcam.Explainer(sys.argv[1])
loaded = time.perf_counter() - t
r = ex.explain(np.ones((1, 3, %(size)d, %(size)d), np.float32))
assert np.isfinite(r.heatmaps).all()
print(json.dumps({"seconds": time.perf_counter() - t, "load_seconds": loaded, "target": int(r.targets[0]),
                  "heatmap_max": float(r.heatmaps.max())}))
""",
    "export": """
import json, sys, time
from onnxcam.cli import main
t = time.perf_counter()
code = main(["export", sys.argv[1], "-o", sys.argv[2]])
print(json.dumps({"seconds": time.perf_counter() - t, "exit": code}))
""",
}


def measure(step: str, args: list[str], size: int) -> dict:
    """Runs one step in a fresh child; adds its wall time and peak RSS (ru_maxrss of that child alone)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD[step] % {"size": size}, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"step": step, "wall_seconds": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 2 ** 20, 3),
              "exit": proc.returncode}
    if proc.returncode == 0 and out.strip():
        result.update(json.loads(out.strip().splitlines()[-1]))
    else:
        result["error"] = (err.strip().splitlines() or [""])[-1]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.4, help="Size of the external weights in GB (1e9 bytes).")
    ap.add_argument("--size", type=int, default=16, help="Input height and width.")
    ap.add_argument("--export", action="store_true", help="Also time `onnxcam export` of the model.")
    ap.add_argument("--skip-ort", action="store_true", help="Skip the plain onnxruntime reference run.")
    ap.add_argument("--keep", help="Generate into this directory and keep it (default: a temporary one).")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="onnxcam-large-")
    os.makedirs(folder, exist_ok=True)
    try:
        t = time.perf_counter()
        path, nbytes = write_model(folder, args.gb, size=args.size)
        print(f"generated {path}: {nbytes / 1e9:.2f} GB of external weights in {time.perf_counter() - t:.1f} s",
              flush=True)
        steps = ([] if args.skip_ort else ["ort"]) + ["explain"] + (["export"] if args.export else [])
        for step in steps:
            extra = [os.path.join(folder, "exported.onnx")] if step == "export" else []
            r = measure(step, [path, *extra], args.size)
            r["rss_over_model"] = round(r["peak_rss_gb"] * 2 ** 30 / nbytes, 2)
            print(json.dumps(r), flush=True)
            for name in ("exported.onnx", "exported.onnx.data"):
                p = os.path.join(folder, name)
                if os.path.exists(p):
                    print(f"  {name}: {os.path.getsize(p) / 1e9:.3f} GB")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
