"""Whole datasets through `onnxcam explain` (issue #15): which files the PATH arguments name (files, folders,
quoted globs), where each one's outputs go, the pipeline that decodes images in a small thread pool while
onnxruntime runs the previous batch, progress on stderr, and the writers of --save-maps and --results.

Memory stays flat in the number of images: at most about three batches of decoded pictures are alive (one
being decoded, one explained, one written), and maps and results go to disk as each batch finishes."""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import click
import numpy as np

from ..errors import OnnxcamError
from ..images import render

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TENSOR_SUFFIX = ".npy"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Item:
    """One input file of the run."""
    path: str  # as given, or as found below a folder or by a glob
    name: str  # its path below that folder or glob's fixed part (its file name when given directly); unique
    stem: str  # `name` without its suffix, unique: the outputs' path below -o, before the method tag
    index: int  # position in the run: the row of a per-image --input value
    direct: bool  # named on the command line itself (a folder's or glob's files are not)


def is_glob(arg: str) -> bool:
    return bool(_GLOB_CHARS & set(arg)) and not os.path.lexists(arg)


def check_arguments(args: Sequence[str]) -> None:
    """Refuses a PATH that names nothing, before the model loads: a typo is one line, not a minute's wait."""
    for arg in args:
        if not os.path.lexists(arg) and not is_glob(arg):
            raise OnnxcamError(f"image not found: {arg}")


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: the outputs mirror the tree below it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _walk(folder: str, suffixes: tuple[str, ...], skip: set[str]) -> Iterable[str]:
    """Files below `folder` with one of `suffixes` (case-insensitive), in a stable order. Hidden files and
    folders (.DS_Store, macOS's ._cat.jpg resource forks, .ipynb_checkpoints) are left out, and so are the
    run's own output folders: a second run must not read the first one's overlays as photos."""
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) not in skip)
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(suffixes):
                continue
            path = os.path.join(root, name)
            if os.path.isfile(path):  # a FIFO or a dangling link in a folder is not an image
                yield path


def collect(args: Sequence[str], suffixes: tuple[str, ...], skip: Sequence[str] = ()) -> list[tuple[str, str, bool]]:
    """(path, name below its folder or glob, given directly?) for every file the PATH arguments name: files as
    they are, folders recursively and globs (recursive `**`) filtered by `suffixes`. One line when a folder or
    glob yields no file."""
    skipped = {os.path.realpath(s) for s in skip}
    found: list[tuple[str, str, bool]] = []
    for arg in args:
        if os.path.isdir(arg):
            files = [(p, _below(p, arg), False) for p in _walk(arg, suffixes, skipped)]
            if not files:
                raise OnnxcamError(f"no images in folder {arg} (looked for {', '.join(suffixes)}, recursively)")
            found.extend(files)
        elif is_glob(arg):
            base = _glob_base(arg)
            files = []
            for p in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(p):
                    files.extend((f, _below(f, base), False) for f in _walk(p, suffixes, skipped))
                elif p.lower().endswith(suffixes) and os.path.isfile(p) \
                        and not any(os.path.realpath(p).startswith(s + os.sep) for s in skipped):
                    files.append((p, _below(p, base), False))
            if not files:
                raise OnnxcamError(f"no images match '{arg}' (looked for {', '.join(suffixes)})")
            found.extend(files)
        else:
            found.append((arg, Path(arg).name, True))
    return found


def _below(path: str, base: str) -> str:
    """`path` relative to `base`; a glob like 'a/*/../b.jpg' can match outside its fixed part, and outputs must not
    land outside -o: such a file keeps its name only."""
    rel = os.path.relpath(path, base)
    return Path(path).name if rel == ".." or rel.startswith(".." + os.sep) else rel


def make_items(found: Sequence[tuple[str, str, bool]]) -> list[Item]:
    """Unique names: a second cat.jpg (from another folder argument, or given twice) becomes cat_2.jpg, and a
    cat.png next to a cat.jpg writes its overlay as cat_2_gradcam.png -- the rule files given directly had."""
    names: set[str] = set()
    stems: set[str] = set()
    items = []
    for index, (path, rel, direct) in enumerate(found):
        rel = Path(rel).as_posix()
        suffix = Path(rel).suffix
        base = rel[: len(rel) - len(suffix)]
        items.append(Item(path=path, name=_unique(names, base, suffix) + suffix, stem=_unique(stems, base, ""),
                          index=index, direct=direct))
    return items


def _unique(seen: set[str], key: str, suffix: str) -> str:
    candidate, n = key, 1
    while candidate + suffix in seen:
        n += 1
        candidate = f"{key}_{n}"
    seen.add(candidate + suffix)
    return candidate


# -------------------------------------------------------------------------------------------------- outputs
class Folders:
    """Creates output folders on first use, from any thread: nothing exists before the first image is
    written, so a run that fails early leaves no empty folder behind."""

    def __init__(self):
        self._made: set[str] = set()
        self._lock = threading.Lock()

    def ensure(self, folder: Path) -> None:
        key = str(folder)
        if key in self._made:
            return
        with self._lock:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OnnxcamError(f"cannot create output directory {folder}: {exc.strerror or exc}") from None
            self._made.add(key)


class MapsWriter:
    """--save-maps: a .npz written as the run goes (each array streamed into the zip, as np.savez stores it,
    so np.load reads it back), or a folder with one .npy per image. Keys are the images' names below their
    folder argument (`sub/dir/cat.jpg`)."""

    def __init__(self, target: str, dtype, folders: Folders):
        self.target = Path(target)
        self.dtype = np.dtype(dtype)
        self.as_zip = self.target.suffix.lower() == ".npz"
        self.folders = folders
        self._zip: zipfile.ZipFile | None = None
        self._tmp: str | None = None

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if not self.as_zip:
            path = self.target / (name + ".npy")
            self.folders.ensure(path.parent)
            render.atomic_write(path, lambda fh: np.lib.format.write_array(fh, array, allow_pickle=False))
            return
        if self._zip is None:
            parent = self.target.parent if str(self.target.parent) else Path(".")
            fd, self._tmp = tempfile.mkstemp(prefix="." + self.target.name + ".", suffix=".tmp", dir=parent)
            os.close(fd)
            self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        try:
            with self._zip.open(name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
        except OSError as exc:
            raise OnnxcamError(f"cannot write {self.target}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Finishes the zip (also after an error or Ctrl-C: what was explained so far stays readable)."""
        if self._zip is None:
            return
        zf, self._zip = self._zip, None
        try:
            zf.close()
            os.chmod(self._tmp, render.file_mode())
            os.replace(self._tmp, self.target)
        except OSError as exc:
            raise OnnxcamError(f"cannot write {self.target}: {exc.strerror or exc}") from None
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


RESULT_FIELDS = ("path", "k", "target", "label", "score", "probability", "layer", "method")


class ResultsWriter:
    """--results: one row per explained image, .jsonl or .csv, flushed after every batch so that an interrupted
    run keeps what it did."""

    def __init__(self, target: str):
        self.target = Path(target)
        self.as_csv = self.target.suffix.lower() == ".csv"
        self._fh = None
        self._csv = None

    def add(self, row: dict) -> None:
        if self._fh is None:
            try:
                self._fh = open(self.target, "w", newline="" if self.as_csv else None, encoding="utf-8")
            except OSError as exc:
                raise OnnxcamError(f"cannot write {self.target}: {exc.strerror or exc}") from None
            if self.as_csv:
                self._csv = csv.DictWriter(self._fh, fieldnames=RESULT_FIELDS)
                self._csv.writeheader()
        try:
            if self._csv is not None:
                self._csv.writerow({k: "" if row[k] is None else row[k] for k in RESULT_FIELDS})
            else:
                self._fh.write(json.dumps({k: row[k] for k in RESULT_FIELDS}) + "\n")
        except OSError as exc:
            raise OnnxcamError(f"cannot write {self.target}: {exc.strerror or exc}") from None

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def check_save_maps(target: str) -> None:
    p = Path(target)
    if p.suffix.lower() != ".npz" and p.suffix and not p.is_dir():
        raise OnnxcamError(f"--save-maps {target}: give a .npz file or a folder")
    if p.suffix.lower() == ".npz":
        _check_file_target(p, "--save-maps")
    elif p.exists() and not p.is_dir():
        raise OnnxcamError(f"--save-maps {target} exists and is not a folder")


def check_results(target: str) -> None:
    p = Path(target)
    if p.suffix.lower() not in (".jsonl", ".csv"):
        raise OnnxcamError(f"--results {target}: give a .jsonl or .csv file")
    _check_file_target(p, "--results")


def _check_file_target(p: Path, flag: str) -> None:
    if p.is_dir():
        raise OnnxcamError(f"{flag} {p} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxcamError(f"cannot write {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OnnxcamError(f"cannot write {p}: permission denied")


# -------------------------------------------------------------------------------------------------- progress
class Progress:
    """Images done, on stderr. A run of one batch says nothing (its stderr is what it always was); a longer
    one shows click's bar (count, rate, ETA) on a terminal, and elsewhere (a log, CI) one plain line every
    `every` seconds."""

    def __init__(self, total: int, show: bool, every: float = 10.0, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.every = every
        self.bar = None
        self.lines = 0
        self.show = show
        if show and _isatty(self.stream):
            self.bar = click.progressbar(length=total, label="explaining", file=self.stream, show_pos=True,
                                         show_eta=True, item_show_func=lambda _: self._rate_text())
            self.bar.__enter__()

    def _rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _rate_text(self) -> str:
        return f"{self._rate():.1f} images/s"

    def update(self, n: int) -> None:
        self.done += n
        if not self.show:
            return
        if self.bar is not None:
            self.bar.update(n, current_item=True)
            return
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self._rate()
            eta = f", ETA {round((self.total - self.done) / rate)} s" if rate > 0 else ""
            click.echo(f"onnxcam: {self.done}/{self.total} images, {rate:.1f} images/s{eta}", file=self.stream)
            self.lines += 1

    def close(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.__exit__(None, None, None)
        elif self.lines:  # a log that showed progress also shows the end
            click.echo(f"onnxcam: {self.done}/{self.total} images in {time.monotonic() - self.start:.1f} s, "
                       f"{self._rate():.1f} images/s", file=self.stream)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


# -------------------------------------------------------------------------------------------------- pipeline
def workers() -> int:
    """Threads that decode and write: two keep one core decoding while onnxruntime computes; more than four
    only adds pictures in memory."""
    return max(2, min(4, os.cpu_count() or 1))


def stream_batches(items: Sequence[Item], load: Callable, batch_size: int, pool: ThreadPoolExecutor,
                   process: Callable, on_skip: Callable | None) -> None:
    """Runs `process(batch)` on consecutive batches of up to `batch_size` loaded items [(item, loaded)], in
    order. While one batch is processed (onnxruntime, in this thread), the pool decodes the next one -- about
    one batch ahead, no more, so memory does not grow with the number of images -- and writes the previous
    one's outputs. `process` returns a callable that waits for the batch's writes and reports them; it is
    called once the next batch has been processed, so that writing overlaps too.

    An item whose `load` raises OnnxcamError goes to `on_skip(item, error)`; with `on_skip` None the error
    ends the run."""
    source = iter(items)
    pending: deque[tuple[Item, Future]] = deque()

    def fill() -> None:
        while len(pending) < batch_size:
            item = next(source, None)
            if item is None:
                return
            pending.append((item, pool.submit(load, item)))

    fill()
    finishing: deque[Callable] = deque()
    while pending:
        batch = []
        while pending and len(batch) < batch_size:
            item, future = pending.popleft()
            fill()
            try:
                batch.append((item, future.result()))
            except OnnxcamError as exc:
                if on_skip is None:
                    raise
                on_skip(item, exc)
            del future
        if batch:
            finishing.append(process(batch))
        del batch
        while len(finishing) > 1:
            finishing.popleft()()
            _trim()
    while finishing:
        finishing.popleft()()


def _trim() -> None:
    """Hands freed heap memory back after each batch: the decoding threads' malloc arenas keep freed photo
    buffers (5.8 MB each for 1600x1200), which otherwise accumulate over a long run (300 photos with overlays:
    peak 790 MB instead of 820-840 MB, same time)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def skip_reason(path: str, exc: BaseException) -> str:
    """The error without the path the skip line already names ('cannot read image x.jpg: not a supported
    image' -> 'cannot read image: not a supported image')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.replace(f" {path}:", ":").replace(f" {path}", "")
    return text.rstrip(":")


__all__ = ["IMAGE_SUFFIXES", "TENSOR_SUFFIX", "Item", "is_glob", "check_arguments", "collect", "make_items",
           "Folders", "MapsWriter", "ResultsWriter", "RESULT_FIELDS", "check_save_maps", "check_results",
           "Progress", "workers", "stream_batches", "skip_reason"]
