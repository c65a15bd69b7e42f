"""Reading ONNX models and appending nodes to them.

`ModelView` answers questions about an existing graph (who produces a tensor, its inferred shape and
dtype); `Emitter` appends new nodes and constants with names that cannot clash with the model's.
Both work on the model in place; callers copy the user's model before handing it over.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..errors import OnnxcamError
from . import safeio

# onnxruntime (1.17 .. 1.32) loads IR versions up to 10 reliably; newer onnx writes 11+ by default.
MAX_IR_VERSION = 10

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

Dim = Union[int, str, None]


def load_model(model: ModelLike, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Loads a path, serialized bytes or a ModelProto; always returns a private copy.

    External data is read only from inside one folder (see onnxcam.safeio): a path's own folder; for bytes or
    a ModelProto, `base_dir` when given, else none at all. Large external weights stay on disk (sealed
    references that make_session maps), so models over 2 GB load without inlining them. Graphs that are not
    DAGs are refused here: every later walk over them would never end."""
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        source = "the given ModelProto"
    elif isinstance(model, (bytes, bytearray, memoryview)):
        m = _parse_model(bytes(model), "cannot parse ONNX model bytes")
        source = "the given model bytes"
    elif isinstance(model, (str, os.PathLike)):
        if base_dir is not None:
            raise OnnxcamError("base_dir is for models given as bytes or a ModelProto; a model file's external "
                               "data is read from its own folder")
        path = os.fspath(model)
        data = safeio.read_regular_file(path, "model", safeio.MAX_MODEL_BYTES)
        if not data:
            raise OnnxcamError(f"model file {path} is empty")
        m = _parse_model(data, f"cannot read ONNX model {path}")
        base_dir = os.path.dirname(os.path.abspath(path))
        source = f"model {path}"
    else:
        raise OnnxcamError(f"a model is a path, bytes or an onnx.ModelProto, not {type(model).__name__}")
    if not m.HasField("graph") and not m.opset_import:
        raise OnnxcamError(f"{source} is not an ONNX model (no graph and no opset imports)")
    safeio.check_dag(m.graph)
    safeio.resolve_external_data(m, base_dir, source)
    return m


def _parse_model(data: bytes, what: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception as exc:  # protobuf raises several types
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxcamError(f"{what}: {text}") from None
    return m


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that keeps symbolic dims; falls back to plain inference if data propagation fails.
    Returns a copy of `model` with the inferred value_info; `model` itself is left as it was."""
    skeleton = _skeleton(model)
    _unknown_dims_dynamic(skeleton.graph)
    try:
        inferred = shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:
        try:
            inferred = shape_inference.infer_shapes(skeleton)
        except Exception as exc:
            raise OnnxcamError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _unknown_dims_dynamic(out.graph)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    _probe_ranks(out)
    return out


def _unknown_dims_dynamic(g: onnx.GraphProto) -> None:
    """Older paddle2onnx (and some other exporters) write `dim_value: -1` for a dynamic dim, and some write 0
    on graph inputs and outputs. Taken literally, shape inference copies -1 into every shape after it and no
    input can match; cleared, the dim is dynamic as the exporter meant. A 0 inside the graph can be a real
    empty dim, so only the graph's inputs and outputs lose theirs."""
    ends = {vi.name for vi in list(g.input) + list(g.output)}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and (d.dim_value < 0 or (d.dim_value == 0 and vi.name in ends)):
                d.ClearField("dim_value")


def _bulky(t: onnx.TensorProto) -> bool:
    # Shape-carrying constants (Reshape shapes, Slice starts, Resize scales, Pad amounts) are short, and data
    # propagation needs their values; weights are long, and only their shapes matter to inference.
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    integer = t.data_type in (TensorProto.INT64, TensorProto.INT32)
    return n > 4096 or (n > 64 and not integer)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its weights replaced by typed graph inputs of the same shapes. ONNX shape inference
    serialises the whole model twice (into C++ and back); for VGG16 that was 5 of the Explainer's 13 seconds,
    almost all of it spent copying weights the inference never reads."""
    g = model.graph
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    sg = skel.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    sg.sparse_initializer.extend(g.sparse_initializer)
    declared = {vi.name for vi in g.input}
    for t in g.initializer:
        if not _bulky(t):
            sg.initializer.append(t)
        elif t.name not in declared:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skel


# Dummy sizes for dynamic non-batch input dims when probing ranks, most plausible first. Recognisers often
# need a small fixed height (PaddleOCR: 48 or 32, refused at 224 after the first seconds of work), detectors a
# multiple of 32 (FPN upsample-and-add); a size the model refuses is skipped, and so is every size after it
# that is not tried yet when a pass succeeds.
_PROBE_SIZES = (224, 64, 48, 32, 96, 128, 256, 320)


def _probe_ranks(model: onnx.ModelProto) -> None:
    """Reshapes to a computed shape (Shape -> Gather -> Concat, as TorchScript exports attention; Paddle's
    Shape -> Cast -> Slice) defeat ONNX shape inference: every tensor after them has an unknown rank, and
    gradient rules and the layer choice need ranks. Only those tensors gain a shape here; what inference
    found is kept as it was.

    Ranks do not depend on input values, so an onnxruntime pass on zeros (batch 1; dynamic non-batch dims
    get the first of `_PROBE_SIZES` the model runs with) recovers them. Further passes change one thing
    each: the batch (2, random values) and the size (the next size that runs). A dim the same in all passes
    is static (channels, a pooled 1x1); one that follows the batch (1 -> 2) and not the size gets the image
    batch's symbol, so the score's sample axis can be found; any other dim stays unknown. Where some pass
    cannot run, only what it would not have decided is kept (the rank at least)."""
    g = model.graph
    typed = {vi.name for vi in list(g.value_info) + list(g.input) + list(g.output) if dims_of(vi.type) is not None}
    typed |= {t.name for t in g.initializer}
    missing = [o for n in g.node if n.op_type != "Constant" for o in n.output if o and o not in typed]
    if not missing:
        return
    inits = {t.name for t in g.initializer}
    inputs = []
    for vi in g.input:
        if vi.name in inits:
            continue
        dims = dims_of(vi.type)
        if dims is None:
            return
        inputs.append((vi.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))))
    sized = any(not isinstance(d, int) for _, dims, _ in inputs for d in dims[1:])
    batched = [dims[0] for _, dims, _ in inputs if dims and not isinstance(dims[0], int)]
    symbol = batched[0] if batched and isinstance(batched[0], str) else None
    sizes = list(_PROBE_SIZES) if sized else [None]

    def feeds(size, batch, random):
        out, rng = {}, np.random.default_rng(0)
        for name, dims, dtype in inputs:
            shape = [d if isinstance(d, int) else (batch if axis == 0 else size) for axis, d in enumerate(dims)]
            value = np.zeros(shape, dtype)
            if random and dtype.kind == "f":  # integer inputs are often indices: zeros stay valid
                value = rng.uniform(0.0, 1.0, shape).astype(dtype)
            out[name] = value
        return out

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=m) for m in missing if m not in existing)
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a refused dummy size is expected, not worth a red log line
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        from ..run.runtime import inference_session  # large weights stay on disk (mapped), not serialised

        session = inference_session(probe, opts, ["CPUExecutionProvider"])
    except Exception:
        return

    def run(size, batch, random=False):
        try:
            return [(v.shape, v.dtype) if isinstance(v, np.ndarray) else None
                    for v in session.run(missing, feeds(size, batch, random))]
        except Exception:
            return None

    base, used = None, 0
    for used, size in enumerate(sizes):
        base = run(size, 1)
        if base is not None:
            break
    if base is None:
        return
    # Values change in the batch pass (or, with nothing dynamic, a pass of their own): a dim that depends on
    # them (NonZero, NMS counts) must not pass for static.
    by_batch = run(sizes[used], 2 if batched else 1, random=True)
    if by_batch is None and batched:  # a graph pinned to one sample (Reshape to a literal 1) despite its input
        by_batch = run(sizes[used], 1, random=True)
    by_size = None
    if sized:
        for size in sizes[used + 1:]:
            by_size = run(size, 1)
            if by_size is not None:
                break
    outputs = {o.name: o for o in g.output}
    for i, name in enumerate(missing):
        if base[i] is None:
            continue
        shape, dtype = base[i]
        b = by_batch[i][0] if by_batch is not None and by_batch[i] is not None else None
        z = by_size[i][0] if by_size is not None and by_size[i] is not None else None
        b = b if b is not None and len(b) == len(shape) else None
        z = z if z is not None and len(z) == len(shape) else None
        dims: list = [None] * len(shape)
        for axis, d in enumerate(shape):
            same_size = z is not None and z[axis] == d
            if b is not None and b[axis] == d and (same_size or not sized):
                dims[axis] = int(d)
            elif symbol is not None and b is not None and (d, b[axis]) == (1, 2) and (same_size or not sized):
                dims[axis] = symbol
        vi = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), dims)
        if name in outputs:  # a graph output declared without a shape: its declaration is what is read
            outputs[name].type.CopyFrom(vi.type)
        else:
            g.value_info.append(vi)


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise OnnxcamError("model has no default-domain opset import")


def dims_of(type_proto: onnx.TypeProto) -> list[Dim] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            # Negative sizes do not exist: exporters write -1 for "dynamic".
            out.append(int(d.dim_value) if d.dim_value >= 0 else None)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


class ModelView:
    """Producer/consumer maps, shapes and dtypes for a (shape-inferred) model."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._types: dict[str, onnx.TypeProto] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            self._types[vi.name] = vi.type
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in self.graph.output]

    def has_tensor(self, name: str) -> bool:
        return name in self.producer or name in self.initializers or name in self._types

    def shape(self, name: str) -> list[Dim] | None:
        if name in self.initializers:
            return list(self.initializers[name].dims)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = self.constant_value(name)
            if value is not None:
                return list(value.shape)
        tp = self._types.get(name)
        return dims_of(tp) if tp is not None else None

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def elem_type(self, name: str) -> int:
        if name in self.initializers:
            return self.initializers[name].data_type
        tp = self._types.get(name)
        if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.elem_type:
            return tp.tensor_type.elem_type
        return TensorProto.FLOAT

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type(name)))

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if not name:
            return None
        if name in self.initializers:
            t = self.initializers[name]
            if safeio.sealed_location(t) is not None:  # a large weight left on disk by load_model
                return np.array(safeio.sealed_array(t))
            return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
        if node is not None and node.op_type == "Identity":
            return self.constant_value(node.input[0])
        return None

    def topo_index(self) -> dict[int, int]:
        return {id(n): i for i, n in enumerate(self.graph.node)}


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or (node.output[0] if node.output else '?')}'"


@dataclass
class Emitter:
    """Appends nodes/initializers with fresh names. `opset` decides attribute-vs-input forms."""

    opset: int
    taken: set[str]
    prefix: str = "onnxcam"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    # tensor -> (source, axes): the tensor is `source` repeated along `axes`, where source has size 1
    # (a global pool's gradient); a reduction over those axes can read the source instead (broadcast_of).
    broadcasts: dict = field(default_factory=dict)
    _counter: int = 0

    @classmethod
    def for_model(cls, model: onnx.ModelProto, prefix: str = "onnxcam") -> "Emitter":
        taken: set[str] = set()
        g = model.graph
        for n in g.node:
            taken.update(n.output)
            taken.update(n.input)
            if n.name:
                taken.add(n.name)
        taken.update(t.name for t in g.initializer)
        taken.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        return cls(opset=opset_version(model), taken=taken, prefix=prefix)

    def fresh(self, hint: str) -> str:
        hint = hint.replace("/", "_").replace(":", "_").strip("_")[-48:] or "t"
        while True:
            self._counter += 1
            name = f"{self.prefix}/{hint}_{self._counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, hint: str | None = None,
           outputs: Sequence[str] | None = None, **attrs) -> str | list[str]:
        if outputs is None:
            outputs = [self.fresh(f"{hint or op_type}") for _ in range(n_out)]
        else:
            self.taken.update(outputs)
        node = helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(op_type + "_node"),
                                **{k: v for k, v in attrs.items() if v is not None})
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def const(self, value, dtype=None, hint: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, values: Iterable[int], hint: str = "ints") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint=hint)

    # Opset-dependent forms, so rules never branch on the version themselves.
    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: int = 1) -> str:
        axes_as_input = self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13)
        if axes is None:
            return self.op(op_type, [x], keepdims=keepdims)
        if axes_as_input:
            return self.op(op_type, [x, self.ints(axes, "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes, "axes")])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes, "axes")])
        return self.op("Squeeze", [x], axes=list(axes))

    def shape_of(self, x: str) -> str:
        return self.op("Shape", [x], hint="shape")

    def zeros_like(self, x: str, dtype: np.dtype) -> str:
        zero = self.const(np.zeros((), dtype=dtype), hint="zero")
        return self.op("Expand", [zero, self.shape_of(x)], hint="zeros")

    def scalar(self, value: float, dtype: np.dtype, hint: str = "scalar") -> str:
        return self.const(np.asarray(value, dtype=dtype), hint=hint)

    def mark_broadcast(self, t: str, source: str, axes: Iterable[int]) -> None:
        """Records that `t` (emitted here) is `source` expanded along `axes`, where source has size 1."""
        self.broadcasts[t] = (source, tuple(sorted(axes)))

    def broadcast_of(self, t: str) -> tuple[str, tuple[int, ...]] | None:
        """(source, axes) as mark_broadcast recorded for `t`, else None."""
        return self.broadcasts.get(t)

    def if_else(self, cond: str, then_fn, else_fn, elem_type: int, hint: str = "branch") -> str:
        """An If node: `then_fn(emitter)` / `else_fn(emitter)` emit each branch's nodes and return its result
        (of `elem_type`). The branches read outer-scope tensors by name; their constants go to the outer
        graph, and names stay fresh across both."""
        graphs = []
        for fn, label in ((then_fn, "then"), (else_fn, "else")):
            # `taken` is shared: the branch's names stay fresh in the whole graph.
            branch = Emitter(opset=self.opset, taken=self.taken, prefix=self.prefix, initializers=self.initializers)
            result = fn(branch)
            if not any(result in n.output for n in branch.nodes):  # a branch output must be made in the branch
                result = branch.op("Identity", [result])
            graphs.append(helper.make_graph(branch.nodes, self.fresh(label),
                                            [], [helper.make_tensor_value_info(result, elem_type, None)]))
        return self.op("If", [cond], hint=hint, then_branch=graphs[0], else_branch=graphs[1])

    def commit(self, model: onnx.ModelProto) -> None:
        model.graph.node.extend(self.nodes)
        model.graph.initializer.extend(self.initializers)
        self.nodes = []
        self.initializers = []


def ensure_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """Upgrades the default-domain opset when rules need newer operators (e.g. ScatterElements 'add')."""
    current = opset_version(model)
    if current >= minimum:
        return model
    from onnx import version_converter

    ir = model.ir_version
    try:
        converted = version_converter.convert_version(model, minimum)
    except Exception as exc:
        raise OnnxcamError(f"cannot upgrade model from opset {current} to {minimum}: {str(exc).splitlines()[0]}") from None
    # The IR version that introduced this opset (opset 16: IR 8), never lower than the model's own.
    need_ir = helper.find_min_ir_version_for([helper.make_opsetid("", minimum)], ignore_unknown=True)
    converted.ir_version = max(ir, need_ir)
    return converted


def value_info(name: str, elem_type: int, shape: Sequence[Dim] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape))


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors that the bodies of `node` (If branches, Loop / Scan bodies, nested at any depth)
    read by name without them being inputs of `node`."""
    reads: set[str] = set()
    for body in _subgraphs(node):
        defined = {vi.name for vi in body.input} | {t.name for t in body.initializer}
        for sub in body.node:
            reads.update(i for i in sub.input if i and i not in defined)
            reads.update(r for r in subgraph_reads(sub) if r not in defined)
            defined.update(o for o in sub.output if o)
    return reads


def ancestors(view: ModelView, outputs: Sequence[str]) -> set[str]:
    """Every tensor that `outputs` are computed from (themselves included), through the outer-scope reads
    of control-flow bodies too."""
    needed: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = view.producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
            stack.extend(subgraph_reads(node))
    return needed


def head_nodes(view: ModelView, layers: Sequence[str], score: str) -> list[onnx.NodeProto]:
    """The head after `layers`: the nodes downstream of them that `score` needs, in graph order. Refuses a layer
    computed from another of the layers (the head would hold part of the trunk)."""
    needed = ancestors(view, [score])
    downstream: set[str] = set(layers)
    head = []
    for node in view.graph.node:  # topologically sorted (model.safeio checks it)
        if any(i in downstream for i in node.input if i) or (
                node.attribute and any(r in downstream for r in subgraph_reads(node))):
            downstream.update(o for o in node.output if o)
            if any(o in needed for o in node.output):
                head.append(node)
    for layer in layers:
        producer = view.producer.get(layer)
        if producer is not None and any(i in downstream for i in producer.input):
            raise OnnxcamError(f"layer '{layer}' is computed from another explained layer")
    return head


def prune(model: onnx.ModelProto, outputs: Sequence[str], nodes_only: bool = False) -> None:
    """Drops nodes, initializers and inputs that do not feed `outputs` (`nodes_only`: nodes, keeping every
    input and initializer a caller may feed or read by name)."""
    needed = ancestors(ModelView(model), outputs)
    nodes = [n for n in model.graph.node if any(o in needed for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if nodes_only:
        return
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    inputs = [i for i in model.graph.input if i.name in needed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph with large weights replaced by typed inputs, unknown dims written as -1 made dynamic:
    cheap to copy and to shape-infer."""
    skeleton = _skeleton(model)
    _unknown_dims_dynamic(skeleton.graph)
    return skeleton
