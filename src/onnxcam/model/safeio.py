"""Reading files a hostile user may hand over: models, their external data, images.

Three rules hold here, whatever the onnx / onnxruntime version does on its own:

* Only regular files are read (a FIFO blocks the open forever, /dev/zero never ends), and their size is
  checked before a byte is read.
* A model's external data is read only from inside one folder: the model file's own, or for bytes / a
  ModelProto the `base_dir` the caller names (none: no external data at all). onnxruntime, given a
  serialised model, resolves `location` against the working directory and follows `..`, absolute paths,
  symlinks and hard links; onnx >= 1.2x refuses those when *it* loads, but onnxcam hands models to
  onnxruntime itself, so the rule is enforced here, before anything reads.
* Large external weights are never copied into the ModelProto. They stay on disk, described by an absolute
  path sealed with a per-process key (a model from outside cannot forge the seal); runtime.inference_session
  lets onnxruntime memory-map them from their folder. That keeps a model over protobuf's 2 GB limit
  explainable, with peak memory near the size of the weights.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import OnnxcamError

# protobuf cannot parse a message over 2 GiB; the model file itself must be below that (weights go external).
MAX_MODEL_BYTES = 2 ** 31 - 1
# External tensors up to this size are read into the proto: shape constants and small weights that graph
# rewriting and shape inference may need to see. Larger ones stay on disk.
INLINE_BYTES = 1 << 20

_SEAL_KEY = os.urandom(32)
_SEAL = "onnxcam.seal"


def regular_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> int:
    """The size of `path`, a regular file; an OnnxcamError for anything else (missing, a directory, a FIFO, a
    device, too large). Checked with stat before any open: opening a FIFO for reading blocks."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise OnnxcamError(f"{what} not found: {p}") from None
    except OSError as exc:
        raise OnnxcamError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OnnxcamError(f"{what} path is a directory: {p}")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxcamError(f"{what} {p} is not a regular file (a pipe, socket or device cannot be read)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise OnnxcamError(f"{what} {p} is too large ({st.st_size} bytes; the limit is {max_bytes})")
    return st.st_size


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; re-checked on the open descriptor, so a file swapped
    for a FIFO between the stat and the open cannot block or stream forever."""
    p = os.fspath(path)
    regular_file(p, what, max_bytes)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise OnnxcamError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise OnnxcamError(f"{what} {p} is not a regular file of at most {max_bytes} bytes")
        # st_size + 1, not max_bytes + 1: read() allocates its whole buffer up front.
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:  # grew while being read
        raise OnnxcamError(f"{what} {p} changed while it was read")
    if len(data) > max_bytes:
        raise OnnxcamError(f"{what} {p} is too large (over {max_bytes} bytes)")
    return data


# -- external data --------------------------------------------------------------------------------------------
def _sign(path: str, offset: int, length: int) -> str:
    return hmac.new(_SEAL_KEY, f"{path}\0{offset}\0{length}".encode(), hashlib.sha256).hexdigest()


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def sealed_location(t: TensorProto) -> tuple[str, int, int] | None:
    """(absolute path, offset, length) of a tensor onnxcam itself left on disk after checking it; else None."""
    if not is_external(t):
        return None
    info = external_info(t)
    try:
        path, offset, length = info["location"], int(info["offset"]), int(info["length"])
    except (KeyError, ValueError):
        return None
    if not hmac.compare_digest(info.get(_SEAL, ""), _sign(path, offset, length)):
        return None
    return path, offset, length


def _all_tensors(graph: onnx.GraphProto, top: bool = True) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, is a main-graph initializer) for every tensor that may hold external data."""
    for t in graph.initializer:
        yield t, top
    for s in graph.sparse_initializer:
        yield s.values, False
        yield s.indices, False
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t, False
            for t in a.tensors:
                yield t, False
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values, False
                yield a.sparse_tensor.indices, False
            if a.HasField("g"):
                yield from _all_tensors(a.g, False)
            for g in a.graphs:
                yield from _all_tensors(g, False)


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    yield from _all_tensors(model.graph)
    for f in model.functions:
        for n in f.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t, False
                if a.HasField("g"):
                    yield from _all_tensors(a.g, False)


def _expected_nbytes(t: TensorProto) -> int | None:
    dtype = _np_dtype(t)
    if dtype is None:  # strings, packed and 8-bit float types: no simple size check
        return None
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * dtype.itemsize


def _check_location(folder: str, location: str, name: str) -> str:
    """The real path of `location` inside `folder`, or an OnnxcamError. The rule: a relative path without
    `..`, whose real path (symlinks resolved) lies inside the folder's real path."""
    where = f"tensor '{name}' has external data location {location!r}"
    if not location or "\0" in location:
        raise OnnxcamError(f"{where}: not a file name")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise OnnxcamError(f"{where}: an absolute path; external data must lie in the model's folder")
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise OnnxcamError(f"{where}: '..' leaves the model's folder")
    root = os.path.realpath(folder)
    full = os.path.join(root, location)
    real = os.path.realpath(full)
    if os.path.commonpath([root, real]) != root or real == root:
        raise OnnxcamError(f"{where}: it resolves outside the model's folder {folder}")
    return real


def _open_checked(real: str, location: str, name: str, folder: str):
    """An open binary file for a checked location; refuses what is not a regular file with one link (a hard
    link can point anywhere on the same file system)."""
    where = f"tensor '{name}' has external data location {location!r}"
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise OnnxcamError(f"{where}: no such file in {folder}") from None
    except OSError as exc:
        raise OnnxcamError(f"{where}: cannot open it ({exc.strerror or exc})") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise OnnxcamError(f"{where}: not a regular file")
    if st.st_nlink > 1:
        f.close()
        raise OnnxcamError(f"{where}: the file has {st.st_nlink} hard links, so it may be a file from outside "
                           f"the model's folder")
    return f, st.st_size


def resolve_external_data(model: onnx.ModelProto, base_dir: str | os.PathLike | None, source: str) -> None:
    """Checks every external-data reference of `model` (in place) and reads or seals it.

    base_dir None: any external reference is an error, except ones onnxcam sealed itself (a model it loaded
    earlier, handed back in). Otherwise each location must pass `_check_location` and `_open_checked`, and
    its offset/length must fit the file and the tensor's size. Small tensors (and any outside the main graph's
    initializers) are read into the proto; large main-graph initializers get a sealed absolute location."""
    for t, top in model_tensors(model):
        if not is_external(t) or sealed_location(t) is not None:
            continue
        info = external_info(t)
        location = info.get("location", "")
        if base_dir is None:
            raise OnnxcamError(f"tensor '{t.name}' of {source} stores its data in an external file ({location!r}); "
                               f"a model given as bytes or a ModelProto reads external data only from a folder "
                               f"named with base_dir=")
        folder = os.fspath(base_dir)
        if not os.path.isdir(folder):
            raise OnnxcamError(f"base_dir {folder} is not a directory")
        real = _check_location(folder, location, t.name)
        f, size = _open_checked(real, location, t.name, folder)
        with f:
            try:
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else size - offset
            except ValueError:
                raise OnnxcamError(f"tensor '{t.name}' has a malformed external data offset/length") from None
            if offset < 0 or length < 0 or offset + length > size:
                raise OnnxcamError(f"tensor '{t.name}': external data (offset {offset}, length {length}) does "
                                   f"not fit in {location!r} ({size} bytes)")
            want = _expected_nbytes(t)
            if want is not None and want != length:
                raise OnnxcamError(f"tensor '{t.name}' of shape {list(t.dims)} needs {want} bytes; its external "
                                   f"data holds {length}")
            keep_on_disk = top and length > INLINE_BYTES and want is not None and _np_dtype(t) is not None
            if not keep_on_disk:
                f.seek(offset)
                data = f.read(length)
                if len(data) != length:
                    raise OnnxcamError(f"tensor '{t.name}': external file {location!r} ended early")
                t.raw_data = data
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
                continue
        del t.external_data[:]
        for k, v in (("location", real), ("offset", str(offset)), ("length", str(length)),
                     (_SEAL, _sign(real, offset, length))):
            t.external_data.add(key=k, value=v)


def _np_dtype(t: TensorProto) -> np.dtype | None:
    simple = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
              TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
              TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32, TensorProto.UINT32: np.uint32,
              TensorProto.INT64: np.int64, TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_}
    d = simple.get(t.data_type)
    return None if d is None else np.dtype(d)


def sealed_array(t: TensorProto) -> np.ndarray:
    """A read-only-on-disk (copy-on-write) memory map of a sealed tensor, re-checked at open: the file must
    still be a regular file with one link."""
    loc = sealed_location(t)
    if loc is None:
        raise OnnxcamError(f"tensor '{t.name}' refers to external data onnxcam did not check")
    path, offset, length = loc
    f, size = _open_checked(path, path, t.name, os.path.dirname(path))
    with f:
        if offset + length > size:
            raise OnnxcamError(f"tensor '{t.name}': external file {path} shrank since the model was loaded")
        dtype = _np_dtype(t)
        shape = tuple(int(d) for d in t.dims)
        if length == 0:
            return np.zeros(shape, dtype)
        # mode "c": pages come from the page cache and are never written back to the user's file.
        return np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape)


def inline_sealed(t: TensorProto) -> None:
    """Reads a sealed tensor into the proto (for the few places that need its values)."""
    arr = np.ascontiguousarray(sealed_array(t))
    t.raw_data = arr.tobytes()
    t.data_location = TensorProto.DEFAULT
    del t.external_data[:]


def has_sealed(model: onnx.ModelProto) -> bool:
    return any(sealed_location(t) is not None for t in model.graph.initializer)


# -- graph shape ---------------------------------------------------------------------------------------------
def check_dag(graph: onnx.GraphProto, outer: frozenset = frozenset()) -> None:
    """ONNX requires nodes in topological order; a node reading a tensor produced by a later node (a cycle,
    or just misordered nodes) makes onnxcam's graph walks loop forever. Refused with the cycle's node names
    when there is one."""
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {s.values.name for s in graph.sparse_initializer}
    producer = {}
    for idx, n in enumerate(graph.node):
        for o in n.output:
            if o:
                producer.setdefault(o, idx)
    for idx, n in enumerate(graph.node):
        for i in n.input:
            if i and i not in known and i in producer and producer[i] >= idx:
                cycle = _find_cycle(graph, producer, idx)
                if cycle:
                    names = " -> ".join(_node_name(graph.node[c]) for c in cycle + cycle[:1])
                    raise OnnxcamError(f"the model graph has a cycle: {names}")
                raise OnnxcamError(f"node {_node_name(n)} reads '{i}' before {_node_name(graph.node[producer[i]])} "
                                   f"produces it: the graph's nodes are not in topological order")
        known.update(o for o in n.output if o)
        for a in n.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for g in subs:
                check_dag(g, frozenset(known))


def _node_name(n: onnx.NodeProto) -> str:
    return f"'{n.name}'" if n.name else f"{n.op_type}(-> {n.output[0] if n.output else '?'})"


def _find_cycle(graph: onnx.GraphProto, producer: dict, start: int) -> list[int]:
    """Node indices of a cycle through the edges node -> its inputs' producers, found from `start`."""
    deps = [[producer[i] for i in n.input if i in producer] for n in graph.node]
    color = [0] * len(deps)
    path: list[int] = []
    for root in [start] + list(range(len(deps))):
        if color[root]:
            continue
        stack = [(root, iter(deps[root]))]
        color[root] = 1
        path = [root]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
            elif color[nxt] == 1:
                cycle = path[path.index(nxt):]
                return list(reversed(cycle))
            elif color[nxt] == 0:
                color[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
                path.append(nxt)
    return []
