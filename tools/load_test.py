"""Load test for `onnxcam serve`, on loopback only, bounded in request count and time.

For each mode it starts `python -m onnxcam serve MODEL` itself (a subprocess on a free 127.0.0.1 port), warms
it up (4 x CONCURRENCY requests), sends REQUESTS KServe V1 `:explain` requests (one base64 PNG each) from CONCURRENCY concurrent
clients (httpx.AsyncClient), then stops it with SIGTERM. It reports throughput, p50/p99 latency, errors
(any answer other than 200, or a transport error) and the server's resident memory (VmRSS from
/proc/<pid>/status) after warm-up, at the half-way point and at the end, as a markdown table.

    python tools/load_test.py                              # 2,000 requests x 2 modes, concurrency 16
    python tools/load_test.py --requests 200 --modes batched

Exit status 1 when a request failed or the run hit --max-seconds.
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

ROOT = Path(__file__).resolve().parents[1]
MODES = {"batched": 16, "unbatched": 1}  # mode -> --max-batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model: Path, max_batch: int, max_queue: int, wait_ms: float, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "onnxcam", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--batch-wait-ms", str(wait_ms)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready after 120 s; see {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def drive(url: str, path: str, body: bytes, requests: int, concurrency: int, max_seconds: float,
                on_half) -> dict:
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


def run_mode(mode: str, args, body: bytes, path: str, log) -> dict:
    max_batch = MODES[mode]
    proc, url = start_server(args.model, max_batch, max(64, 2 * args.concurrency), args.batch_wait_ms, log)
    try:
        # warm-up at full concurrency: onnxruntime sizes its buffers for the largest batches on the first runs
        warm = asyncio.run(drive(url, path, body, 4 * args.concurrency, args.concurrency, args.max_seconds,
                                 lambda: None))
        if warm["errors"]:
            raise SystemExit(f"warm-up failed: {warm['errors']}; see {log.name}")
        rss = {"start": rss_mb(proc.pid)}
        load_before = os.getloadavg()[0]
        result = asyncio.run(drive(url, path, body, args.requests, args.concurrency, args.max_seconds,
                                   lambda: rss.__setitem__("middle", rss_mb(proc.pid))))
        rss["end"] = rss_mb(proc.pid)
        load = (load_before, os.getloadavg()[0])
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        stop_server(proc)
    batches = _metric(metrics, "onnxcam_batch_size_count")
    samples = _metric(metrics, "onnxcam_batch_size_sum")
    lat = result["latencies"]
    done = len(lat) + sum(result["errors"].values())
    return {"mode": mode, "max_batch": max_batch, "requests": done, "ok": len(lat), "errors": result["errors"],
            "timed_out": result["timed_out"], "throughput": len(lat) / result["elapsed"],
            "p50": percentile(lat, 50) * 1000, "p99": percentile(lat, 99) * 1000,
            "mean_batch": samples / batches if batches else float("nan"), "rss": rss, "load": load}


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
    rows = ["| mode | --max-batch | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch "
            "| server RSS start / middle / end (MB) | host load avg before / after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        errors = sum(r["errors"].values())
        rss = r["rss"]
        rows.append(f"| {r['mode']} | {r['max_batch']} | {r['requests']} | {errors} | {r['throughput']:.1f} | "
                    f"{r['p50']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.1f} | "
                    f"{rss['start']:.0f} / {rss.get('middle', float('nan')):.0f} / {rss['end']:.0f} | "
                    f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    return (f"`{args.endpoint}` requests ({args.image.name}, base64 PNG), concurrency {args.concurrency}, "
            f"--batch-wait-ms {args.batch_wait_ms}; {machine()}.\n\n" + "\n".join(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet_lite0.onnx")
    p.add_argument("--image", type=Path, default=ROOT / "models" / "cat.png")
    p.add_argument("--requests", type=int, default=2000, help="requests per mode (at most 100,000)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (at most 256)")
    p.add_argument("--modes", default="batched,unbatched", help="comma-separated: batched (--max-batch 16), "
                                                                 "unbatched (--max-batch 1)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--endpoint", choices=["explain"], default="explain")
    p.add_argument("--max-seconds", type=float, default=900, help="time limit per mode")
    p.add_argument("--log", type=Path, help="server log file [default: a temporary file]")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes {', '.join(MODES)}")
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        p.error("--requests must be in 1..100000 and --concurrency in 1..256")
    body = json.dumps({"instances": [base64.b64encode(args.image.read_bytes()).decode()]}).encode()
    path = f"/v1/models/{args.model.stem}:{args.endpoint}"
    log_path = args.log or Path(tempfile.mkstemp(prefix="onnxcam-load-", suffix=".log")[1])
    results = []
    with open(log_path, "wb") as log:
        for mode in modes:
            print(f"{mode}: {args.requests} requests at concurrency {args.concurrency} ...", file=sys.stderr,
                  flush=True)
            results.append(run_mode(mode, args, body, path, log))
    print(table(results, args))
    failed = [r for r in results if r["errors"] or r["timed_out"]]
    for r in failed:
        print(f"{r['mode']}: errors {r['errors']}{' (hit --max-seconds)' if r['timed_out'] else ''}; "
              f"server log {log_path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
