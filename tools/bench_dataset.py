#!/usr/bin/env python
"""Speed and memory of `onnxcam explain` on a folder of photos (issue #15), against a plain loop.

    python tools/bench_dataset.py                      # 300 photos, 2 rounds
    python tools/bench_dataset.py --images 3000 --rounds 1 --only b,c
    python tools/bench_dataset.py --workdir /tmp/bench --keep   # reuse the generated photos next time

The dataset: N photo-like JPEGs of 1600x1200 (quality 90), made from models/cat.png and models/cat_and_cup.png
with random crops, flips, brightness and sensor-like noise, in three folders (train/cats, train/mixed, val)
where some file names repeat across folders, plus one corrupt file (val/broken.jpg).

Three commands, each in a child process, in interleaved rounds (the order rotating, so background load hits
all alike), all on the same files with the same batch size; wall time from start to exit (Python start-up and
model load included) and peak RSS from the child's own rusage (os.wait4):
  (a) plain   PIL decode + onnxcam.images.preprocess (load_image, to_tensor) + onnxruntime forward of the
              model, batch by batch -- what a hand-written loop that only classifies does
  (b) overlay `onnxcam explain MODEL DIR -o OUT` (PNG overlays)
  (c) maps    `onnxcam explain MODEL DIR --no-overlay --save-maps maps.npz`
Reported: median and minimum wall time, images/s, peak RSS, and the ratios b/a and c/a (of the medians, paired
within a round, and of the minima). Targets: b/a <= 2, c/a <= 1.3, peak RSS < 1 GB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "models" / "cat.png", ROOT / "models" / "cat_and_cup.png"]
FOLDERS = ["train/cats", "train/mixed", "val"]
SIZE = (1600, 1200)


def make_dataset(folder: Path, n: int, seed: int = 0) -> int:
    """Writes n JPEGs (and one corrupt file) below `folder`; returns the number of good images."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    bases = []
    for i in range(12):  # distinct crops with their own noise; each photo then varies one of them cheaply
        src = Image.open(SOURCES[i % len(SOURCES)]).convert("RGB")
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        big = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(SIZE, Image.BICUBIC)
        noisy = np.asarray(big, np.int16) + rng.normal(0, 6, (SIZE[1], SIZE[0], 3)).astype(np.int16)
        bases.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    for sub in FOLDERS:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = FOLDERS[i % len(FOLDERS)]
        # every tenth name repeats in the next folder: the outputs must not collide
        name = f"img_{(i // len(FOLDERS)) if i % 10 == 0 else i:05d}.jpg"
        img = bases[int(rng.integers(len(bases)))]
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        gain = rng.uniform(0.8, 1.2)
        img = img.point(lambda v: min(255, int(v * gain)))
        path = folder / sub / name
        while path.exists():
            path = path.with_name(path.stem + "b.jpg")
        img.save(path, quality=90)
    (folder / "val" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 50)
    (folder / ".count").write_text(str(n))
    return n


# The plain loop, run as `python tools/bench_dataset.py --plain MODEL DIR BATCH`.
def plain_loop(model: str, folder: str, batch_size: int) -> None:
    import onnxruntime as ort

    from onnxcam.images import preprocess

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    pp = preprocess.resolve_preprocess(shape)
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    batch, done = [], 0

    def run():
        nonlocal done
        scores = session.run(None, {name: np.concatenate(batch)})[0]
        done += len(batch)
        batch.clear()
        return scores.argmax(1)

    for f in files:
        try:
            batch.append(preprocess.to_tensor(preprocess.load_image(f), pp))
        except Exception:  # the corrupt file
            continue
        if len(batch) == batch_size:
            run()
    if batch:
        run()
    print(done)


def run_child(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit status) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_maxrss / 1024, proc.returncode


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        plain_loop(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300, help="photos in the dataset [300]")
    ap.add_argument("--model", default=str(ROOT / "models" / "efficientnet_lite0.onnx"))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds [2]")
    ap.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime run, all commands [32]")
    ap.add_argument("--only", default="a,b,c", help="commands to run, e.g. a,c [a,b,c]")
    ap.add_argument("--workdir", help="where the photos go (kept, and reused when the count matches)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--extra", default="", help="more options for both onnxcam commands, e.g. '--format jpg'")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnxcam-bench-"))
    data = work / "data"
    if not (data / ".count").exists() or (data / ".count").read_text() != str(args.images):
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        make_dataset(data, args.images)
        print(f"made {args.images} photos {SIZE[0]}x{SIZE[1]} in {time.perf_counter() - t0:.0f} s: {data}")
    for f in data.rglob("*"):  # the page cache warm for every command alike
        if f.is_file():
            f.read_bytes()

    out, maps = work / "out", work / "maps.npz"
    exe = [sys.executable]
    onnxcam = exe + ["-m", "onnxcam", "explain", args.model, str(data), "--batch-size", str(args.batch_size),
                     *args.extra.split()]
    commands = {
        "a": ("plain loop", exe + [__file__, "--plain", args.model, str(data), str(args.batch_size)]),
        "b": ("explain -o OUT (png)", onnxcam + ["-o", str(out)]),
        "c": ("explain --no-overlay --save-maps", onnxcam + ["--no-overlay", "--save-maps", str(maps)]),
    }
    chosen = [k for k in args.only.split(",") if k in commands]
    times = {k: [] for k in chosen}
    rss = {k: [] for k in chosen}
    for r in range(args.rounds):
        order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
        for key in order:
            shutil.rmtree(out, ignore_errors=True)
            maps.unlink(missing_ok=True)
            wall, peak, status = run_child(commands[key][1])
            if key == "b":
                written = sum(1 for _ in out.rglob("*.png"))
            times[key].append(wall)
            rss[key].append(peak)
            print(f"  round {r + 1}: ({key}) {commands[key][0]:<34} {wall:7.2f} s  peak RSS {peak:7.0f} MB"
                  f"  exit {status}", flush=True)
    if "b" in chosen:
        print(f"  (b) wrote {written} overlays")

    n = args.images
    print(f"\n{n} photos {SIZE[0]}x{SIZE[1]} + 1 corrupt, batch {args.batch_size}, {args.rounds} round(s); "
          f"{os.cpu_count()} CPU cores ({cpu_name()}); model {Path(args.model).name}")
    print(f"{'command':<38} {'median s':>9} {'min s':>8} {'images/s':>9} {'peak RSS MB':>12}")
    for key in chosen:
        med = statistics.median(times[key])
        print(f"({key}) {commands[key][0]:<34} {med:9.2f} {min(times[key]):8.2f} {n / med:9.1f} "
              f"{max(rss[key]):12.0f}")
    if "a" in chosen:
        for key, target in (("b", 2.0), ("c", 1.3)):
            if key not in chosen:
                continue
            medians = statistics.median(times[key]) / statistics.median(times["a"])
            paired = statistics.median(x / y for x, y in zip(times[key], times["a"]))
            minima = min(times[key]) / min(times["a"])
            verdict = "ok" if paired <= target else "OVER"
            print(f"{key}/a: {medians:.2f} (medians), {paired:.2f} (paired), {minima:.2f} (minima); "
                  f"target <= {target}: {verdict}")
    worst = max(max(v) for v in rss.values())
    print(f"peak RSS {worst:.0f} MB; target < 1024 MB: {'ok' if worst < 1024 else 'OVER'}")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
