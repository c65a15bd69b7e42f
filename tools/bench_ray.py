#!/usr/bin/env python
"""Throughput of onnxcam.ray's pipeline on a local Ray cluster against the single-process API loop.

    python tools/bench_ray.py                          # 200 photo-sized JPEGs, EfficientNet-Lite0, 1 and 2 actors
    python tools/bench_ray.py --images DIR --actors 1,2,4

The same folder goes through
  api-loop   one process: preprocess.load_image (the CLI's decoder) + preprocess.to_tensor + Explainer.explain in
             batches of --batch, Explainer built once (its build time excluded, as an actor's is not)
  ray xN     onnxcam.ray.explain_folder with concurrency=N actors (each with 1 CPU and 1 onnxruntime thread when
             N > 1): read_binary_files -> map_batches(ExplainImages) -> write_parquet. The local cluster is started
             before the clock runs (its start-up time is printed apart); the time includes the actors' start
             (each builds its Explainer), the driver's check of the options, and writing parquet.
Everything runs once: a rough figure, not a distribution. With --images absent, --count JPEGs of --width x
--height are generated (smooth colours plus noise, quality 90) in a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "efficientnet_lite0.onnx"))
    ap.add_argument("--images", default=None, help="a folder of images (default: generate --count of them)")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1200)
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts (default 1,2)")
    ap.add_argument("--batch", type=int, default=32, help="images per explain call (default 32)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    return ap.parse_args(argv)


def make_images(folder: Path, count: int, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # One noise field, shifted per image: drawing a fresh one per photo took most of a minute for 200.
    noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    for i in range(count):
        c = rng.uniform(0, 255, (3, 3))
        base = np.stack([c[k, 0] * xx / width + c[k, 1] * yy / height + c[k, 2] for k in range(3)], -1) % 256
        shifted = np.roll(noise, (int(rng.integers(height)), int(rng.integers(width))), (0, 1))
        a = np.clip(base + shifted, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"photo_{i:04d}.jpg", quality=90)


def api_loop(model: str, paths: list[Path], batch: int) -> tuple[float, int]:
    from onnxcam import Explainer
    from onnxcam.images import preprocess

    ex = Explainer(model, batch_size=batch)
    pp = ex.preprocessing()
    ex.explain(preprocess.to_tensor(preprocess.load_image(paths[0]), pp))  # warm-up, as an actor's first batch
    start = time.perf_counter()
    done = 0
    for i in range(0, len(paths), batch):
        tensors = [preprocess.to_tensor(preprocess.load_image(p), pp) for p in paths[i:i + batch]]
        done += len(ex.explain(np.concatenate(tensors)).targets)
    return time.perf_counter() - start, done


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from onnxcam.ray import explain_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.images) if args.images else Path(tmp) / "images"
        if not args.images:
            folder.mkdir()
            t = time.perf_counter()
            make_images(folder, args.count, args.width, args.height)
            print(f"generated {args.count} JPEGs of {args.width}x{args.height} in {time.perf_counter() - t:.1f} s")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        size_mb = sum(p.stat().st_size for p in paths) / 2 ** 20
        print(f"{len(paths)} images, {size_mb:.1f} MB; model {Path(args.model).name}; {os.cpu_count()} CPUs here")

        seconds, n = api_loop(args.model, paths, args.batch)
        rows = [("api-loop (1 process)", n, seconds)]
        print(f"api-loop: {n} images in {seconds:.2f} s = {n / seconds:.1f} images/s")

        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"ray.init (local, {args.cpus} CPUs): {time.perf_counter() - t:.1f} s (not counted below)")
        try:
            for k, actors in enumerate(int(a) for a in args.actors.split(",")):
                # One actor may use every core; several share them, each with one onnxruntime thread, and
                # reserve half a CPU so that the read tasks still find one free.
                per_actor = {} if actors == 1 else {"num_cpus": 0.5, "threads": 1}
                summary = explain_folder(args.model, str(folder), str(Path(tmp) / f"out_{k}"),
                                         concurrency=actors, batch_size=args.batch, **per_actor)
                rows.append((f"ray x{actors} actor(s)", summary["rows"], summary["seconds"]))
                print(f"ray x{actors}: {summary['rows']} rows ({summary['errors']} errors) in "
                      f"{summary['seconds']:.2f} s = {summary['images_per_second']:.1f} images/s")
        finally:
            ray.shutdown()

    print("\n| pipeline | images | seconds | images/s |\n|---|---:|---:|---:|")
    for name, n, s in rows:
        print(f"| {name} | {n} | {s:.2f} | {n / s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
