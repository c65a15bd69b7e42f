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

from .errors import OnnxcamError

# onnxruntime (1.17 .. 1.32) loads IR versions up to 10 reliably; newer onnx writes 11+ by default.
MAX_IR_VERSION = 10

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

Dim = Union[int, str, None]


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Loads a path, serialized bytes or a ModelProto; always returns a private copy."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as exc:  # protobuf raises several types
            raise OnnxcamError(f"cannot parse ONNX model bytes: {exc}") from None
    path = os.fspath(model)
    if not os.path.exists(path):
        raise OnnxcamError(f"model not found: {path}")
    if os.path.isdir(path):
        raise OnnxcamError(f"model path is a directory: {path}")
    try:
        return onnx.load(path)
    except Exception as exc:
        raise OnnxcamError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that keeps symbolic dims; falls back to plain inference if data propagation fails.
    Returns a copy of `model` with the inferred value_info; `model` itself is left as it was."""
    skeleton = _skeleton(model)
    try:
        inferred = shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:
        try:
            inferred = shape_inference.infer_shapes(skeleton)
        except Exception as exc:
            raise OnnxcamError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    _probe_ranks(out)
    return out


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


def _probe_ranks(model: onnx.ModelProto) -> None:
    """Reshapes to a computed shape (Shape -> Gather -> Concat, as TorchScript exports attention) defeat ONNX
    shape inference: every tensor after them has an unknown rank, and gradient rules need ranks. Ranks do not
    depend on input values, so one onnxruntime pass on zeros (batch 1) recovers them; the dims stay unknown.
    Skipped, leaving ranks unknown, when an input has other dynamic dims (no safe dummy size) or the probe
    fails."""
    g = model.graph
    typed = {vi.name for vi in list(g.value_info) + list(g.input) + list(g.output) if dims_of(vi.type) is not None}
    typed |= {t.name for t in g.initializer}
    missing = [o for n in g.node if n.op_type != "Constant" for o in n.output if o and o not in typed]
    if not missing:
        return
    inits = {t.name for t in g.initializer}
    feeds = {}
    for vi in g.input:
        if vi.name in inits:
            continue
        dims = dims_of(vi.type)
        if dims is None or any(not isinstance(d, int) for d in dims[1:]):
            return
        shape = [d if isinstance(d, int) else 1 for d in dims]
        feeds[vi.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=m) for m in missing if m not in existing)
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        values = session.run(missing, feeds)
    except Exception:
        return
    for name, value in zip(missing, values):
        if isinstance(value, np.ndarray):
            vi = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                               [None] * value.ndim)
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
            out.append(int(d.dim_value))
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
            return numpy_helper.to_array(self.initializers[name])
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


def ancestors(view: ModelView, outputs: Sequence[str]) -> set[str]:
    """Every tensor that `outputs` are computed from (themselves included)."""
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
            for attr in node.attribute:  # subgraphs (If/Loop) may read outer tensors
                if attr.g is not None:
                    for sub in attr.g.node:
                        stack.extend(i for i in sub.input if i)
    return needed


def prune(model: onnx.ModelProto, outputs: Sequence[str]) -> None:
    """Drops nodes, initializers and inputs that do not feed `outputs`."""
    needed = ancestors(ModelView(model), outputs)
    nodes = [n for n in model.graph.node if any(o in needed for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    inputs = [i for i in model.graph.input if i.name in needed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
