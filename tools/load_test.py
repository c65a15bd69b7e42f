"""Load test for `onnxcam serve` and its Ray Serve deployment, on loopback only, bounded in request count and time.

For each mode it starts the server itself (a subprocess on a free 127.0.0.1 port): `python -m onnxcam serve MODEL`
(modes batched, unbatched) or `onnxcam.ray.serve.run(MODEL, replicas=N)` on a local Ray instance with this
machine's cores, shared out among the replicas (modes ray1, ray2, ...). It warms the server up (4 x CONCURRENCY
requests), sends REQUESTS KServe V1 `:explain` requests (one base64 PNG each) from CONCURRENCY concurrent clients
(httpx.AsyncClient), checks the answers against the Python API (`Explainer.explain`: the same class, V1 heatmaps
within their rounding to 4 decimals, then 2 x CONCURRENCY v2 `infer` requests whose exact heatmaps must be within
1e-6), then stops it with SIGTERM. It reports throughput, p50/p99 latency, errors (any answer other than 200 or
a wrong answer, or a transport error) and the memory of the server's whole process tree (all Ray processes for
the Ray modes): summed RSS after warm-up, at the half-way point and at the end, and summed PSS at the end (RSS
counts shared libraries once per process), as a markdown table.

    python tools/load_test.py                                   # 2,000 requests x 2 modes, concurrency 16
    python tools/load_test.py --requests 600 --modes batched,ray1,ray2

Exit status 1 when a request failed, an answer differed from the API's or the run hit --max-seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = {"batched": 16, "unbatched": 1}  # mode -> --max-batch; "rayN": Ray Serve, N replicas, --max-batch 16
HEATMAP_ROUNDING = 0.5e-4  # V1 heatmaps have 4 decimals
EXACT = 1e-6  # v2 heatmaps against the API's
RAY_RUN = ("import sys; from onnxcam.ray.serve import run; "
           "run(sys.argv[1], port=int(sys.argv[2]), replicas=int(sys.argv[3]), max_batch=int(sys.argv[4]), "
           "max_queue=int(sys.argv[5]), batch_wait_ms=float(sys.argv[6]), num_cpus=float(sys.argv[7]))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def tree(pid: int) -> list[int]:
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def memory_mb(pid: int, field: str = "Rss") -> float:
    """Summed `field` (Rss or Pss, from /proc/<pid>/smaps_rollup) of the process and all its descendants."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
        except (OSError, StopIteration):
            continue  # exited meanwhile
    return total / 1024


def ray_replicas(mode: str) -> int:
    return int(mode[3:]) if mode.startswith("ray") and mode[3:].isdigit() and int(mode[3:]) >= 1 else 0


def start_server(model: Path, mode: str, max_batch: int, max_queue: int, wait_ms: float,
                 log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    replicas = ray_replicas(mode)
    if replicas:
        cmd = [sys.executable, "-c", RAY_RUN, str(model), str(port), str(replicas), str(max_batch), str(max_queue),
               str(wait_ms), str((os.cpu_count() or 1) / replicas)]
    else:
        cmd = [sys.executable, "-m", "onnxcam", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--batch-wait-ms", str(wait_ms)]
    # its own process group: SIGTERM reaches the Ray processes too if the driver dies first
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"server not ready after 180 s; see {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever the server left behind (Ray workers whose driver is gone)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


async def drive(url: str, path: str, body: bytes, requests: int, concurrency: int, max_seconds: float,
                on_half, answers: set | None = None) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    half_done = False
    deadline = time.monotonic() + max_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued, half_done
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                ok = r.status_code == 200 and r.content.startswith(b'{"explanations":[{"class":')
                key = None if ok else f"HTTP {r.status_code}"
                if ok and answers is not None and len(answers) < 64:  # identical answers are checked once
                    answers.add(r.content)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            if key is None:
                latencies.append(time.perf_counter() - start)
            else:
                errors[key] = errors.get(key, 0) + 1
            if not half_done and len(latencies) + sum(errors.values()) >= requests // 2:
                half_done = True
                on_half()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return {"latencies": sorted(latencies), "errors": errors, "elapsed": elapsed,
            "timed_out": issued < requests}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))]


class Reference:
    """What the Python API answers for the test image: the V1 answers and v2 heatmaps are checked against it."""

    def __init__(self, model: Path, image: Path):
        import onnxcam
        from onnxcam.images import preprocess

        explainer = onnxcam.Explainer(str(model))
        self.x = preprocess.to_tensor(preprocess.load_image(image), explainer.preprocessing())
        r = explainer.explain(self.x)
        self.target, self.heatmap, self.scores = int(r.targets[0]), r.heatmaps[0], r.scores[0].ravel()

    def v1_errors(self, answers: set) -> int:
        wrong = 0
        for body in answers:
            e = json.loads(body)["explanations"][0]
            diff = np.abs(np.asarray(e["heatmap"]) - self.heatmap).max()
            wrong += e["class"] != self.target or not diff <= HEATMAP_ROUNDING + EXACT
        return wrong

    async def v2_check(self, url: str, name: str, n: int) -> tuple[int, float]:
        """n concurrent v2 requests (batched together by the server): (wrong answers, largest heatmap error)."""
        body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(self.x.shape),
                                       "data": self.x.ravel().tolist()}]}).encode()

        async def one(client):
            r = await client.post(f"/v2/models/{name}/infer", content=body, headers={"content-type": "application/json"})
            if r.status_code != 200:
                return float("inf")
            out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
            if int(out["class"][0]) != self.target:
                return float("inf")
            return float(np.abs(out["heatmap"][0] - self.heatmap).max())

        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            diffs = await asyncio.gather(*[one(client) for _ in range(n)])
        return sum(not d <= EXACT for d in diffs), max(diffs)


def run_mode(mode: str, args, body: bytes, path: str, log, reference: Reference) -> dict:
    replicas = ray_replicas(mode)
    max_batch = 16 if replicas else MODES[mode]
    proc, url = start_server(args.model, mode, max_batch, max(64, 2 * args.concurrency), args.batch_wait_ms, log)
    answers: set = set()
    try:
        # warm-up at full concurrency: onnxruntime sizes its buffers for the largest batches on the first runs
        warm = asyncio.run(drive(url, path, body, 4 * args.concurrency, args.concurrency, args.max_seconds,
                                 lambda: None))
        if warm["errors"]:
            raise SystemExit(f"warm-up failed: {warm['errors']}; see {log.name}")
        memory = {"start": memory_mb(proc.pid)}
        load_before = os.getloadavg()[0]
        result = asyncio.run(drive(url, path, body, args.requests, args.concurrency, args.max_seconds,
                                   lambda: memory.__setitem__("middle", memory_mb(proc.pid)), answers))
        memory["end"], memory["pss"] = memory_mb(proc.pid), memory_mb(proc.pid, "Pss")
        load = (load_before, os.getloadavg()[0])
        metrics = httpx.get(url + "/metrics", timeout=30).text  # Ray: one replica's
        v2_wrong, v2_max = asyncio.run(reference.v2_check(url, args.model.stem, 2 * args.concurrency))
    finally:
        stop_server(proc)
    batches = _metric(metrics, "onnxcam_batch_size_count")
    samples = _metric(metrics, "onnxcam_batch_size_sum")
    lat = result["latencies"]
    done = len(lat) + sum(result["errors"].values())
    wrong = reference.v1_errors(answers)
    if wrong:
        result["errors"]["answer differs from the API's"] = wrong
    if v2_wrong:
        result["errors"]["v2 answer differs from the API's"] = v2_wrong
    label = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}" if replicas else f"onnxcam serve ({mode})"
    return {"mode": label, "max_batch": max_batch, "requests": done, "ok": len(lat), "errors": result["errors"],
            "timed_out": result["timed_out"], "throughput": len(lat) / result["elapsed"],
            "p50": percentile(lat, 50) * 1000, "p99": percentile(lat, 99) * 1000,
            "mean_batch": samples / batches if batches else float("nan"), "memory": memory, "load": load,
            "distinct": len(answers), "v2_max": v2_max}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def machine() -> str:
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU (onnxruntime {onnxruntime.__version__} "
            f"CPUExecutionProvider), Python {platform.python_version()}, client and server on the same cores; "
            f"the 1-minute load average shows what else ran on the host")


def table(results: list[dict], args) -> str:
    rows = ["| server | --max-batch | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch "
            "| memory RSS start / middle / end (MB) | PSS end (MB) | max v2 heatmap error | host load before / after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in results:
        errors = sum(r["errors"].values())
        mem = r["memory"]
        rows.append(f"| {r['mode']} | {r['max_batch']} | {r['requests']} | {errors} | {r['throughput']:.1f} | "
                    f"{r['p50']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.1f} | "
                    f"{mem['start']:.0f} / {mem.get('middle', float('nan')):.0f} / {mem['end']:.0f} | "
                    f"{mem['pss']:.0f} | {r['v2_max']:.1e} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    return (f"`{args.endpoint}` requests ({args.image.name}, base64 PNG), concurrency {args.concurrency}, "
            f"--batch-wait-ms {args.batch_wait_ms}; memory: the server's whole process tree (for Ray: every Ray "
            f"process, with the object store); mean batch: for Ray, one replica's; {machine()}.\n\n" + "\n".join(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet_lite0.onnx")
    p.add_argument("--image", type=Path, default=ROOT / "models" / "cat.png")
    p.add_argument("--requests", type=int, default=2000, help="requests per mode (at most 100,000)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (at most 256)")
    p.add_argument("--modes", default="batched,unbatched", help="comma-separated: batched (--max-batch 16), "
                                                                 "unbatched (--max-batch 1), rayN (Ray Serve, N "
                                                                 "replicas, at most 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--endpoint", choices=["explain"], default="explain")
    p.add_argument("--max-seconds", type=float, default=900, help="time limit per mode")
    p.add_argument("--log", type=Path, help="server log file [default: a temporary file]")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES and not 1 <= ray_replicas(m) <= 8 for m in modes):
        p.error(f"--modes takes {', '.join(MODES)}, ray1 .. ray8")
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        p.error("--requests must be in 1..100000 and --concurrency in 1..256")
    body = json.dumps({"instances": [base64.b64encode(args.image.read_bytes()).decode()]}).encode()
    path = f"/v1/models/{args.model.stem}:{args.endpoint}"
    log_path = args.log or Path(tempfile.mkstemp(prefix="onnxcam-load-", suffix=".log")[1])
    results = []
    reference = Reference(args.model, args.image)
    with open(log_path, "wb") as log:
        for mode in modes:
            print(f"{mode}: {args.requests} requests at concurrency {args.concurrency} ...", file=sys.stderr,
                  flush=True)
            results.append(run_mode(mode, args, body, path, log, reference))
    print(table(results, args))
    failed = [r for r in results if r["errors"] or r["timed_out"]]
    for r in failed:
        print(f"{r['mode']}: errors {r['errors']}{' (hit --max-seconds)' if r['timed_out'] else ''}; "
              f"server log {log_path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
