"""Adjoint (dot-product) checks of gradient rules against central finite differences.

For y = f(x) and a random cotangent gy, the rule's J^T gy must satisfy <gy, J dx> == <J^T gy, dx> for
any direction dx; J dx is measured by central differences of the forward node run in onnxruntime.
Each differentiable input is checked on its own, so errors cannot cancel between inputs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxcam.autodiff import gradient
from onnxcam.model.graph import infer_shapes

NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE,
              np.dtype(np.int64): onnx.TensorProto.INT64, np.dtype(np.int32): onnx.TensorProto.INT32,
              np.dtype(np.bool_): onnx.TensorProto.BOOL}


def single_node_model(op_type: str, inputs: dict[str, np.ndarray], wrt: Sequence[str], attrs: dict,
                      n_outputs: int = 1, opset: int = 17, domain: str = "",
                      input_order: Sequence[str] | None = None,
                      dynamic: dict[str, dict[int, str]] | None = None) -> onnx.ModelProto:
    """One node; `wrt` inputs become graph inputs, all other inputs become initializers.

    An input name that is "" in `input_order` stands for an omitted optional input.
    """
    names = list(input_order) if input_order is not None else list(inputs)
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outputs, domain=domain, **attrs)
    graph_inputs, inits = [], []
    for name in names:
        if not name:
            continue
        arr = inputs[name]
        if name in wrt:
            shape = list(arr.shape)
            for axis, sym in (dynamic or {}).get(name, {}).items():
                shape[axis] = sym
            graph_inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[arr.dtype], shape))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outputs],
                              initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return with_inferred_outputs(model)


def with_inferred_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred, with the output types declared from inference so the forward model itself is runnable."""
    model = infer_shapes(model)
    inferred = {vi.name: vi for vi in model.graph.value_info}
    for out in model.graph.output:
        if out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def vjp_model(model: onnx.ModelProto, wrt: Sequence[str], output: str = "y0", relu_mode: str = "grad",
              one_hot_seed: bool = False):
    """Copy of `model` with a `gy` input (cotangent of `output`) and one gradient output per `wrt`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out_vi = next(o for o in m.graph.output if o.name == output)
    gy = helper.make_tensor_value_info("gy", out_vi.type.tensor_type.elem_type,
                                       [d.dim_value if d.HasField("dim_value") else d.dim_param
                                        for d in out_vi.type.tensor_type.shape.dim])
    m.graph.input.append(gy)
    grads = gradient(m, of=output, wrt=list(wrt), seed="gy", relu_mode=relu_mode, one_hot_seed=one_hot_seed)
    types = {i.name: i.type for i in m.graph.input}
    for w in wrt:
        vi = m.graph.output.add()
        vi.name = grads[w]
        vi.type.CopyFrom(types[w])  # a gradient has its input's type and shape
    onnx.checker.check_model(m)
    return m, [grads[w] for w in wrt]


def check_vjp(op_type: str, inputs: dict[str, np.ndarray], wrt: Sequence[str] | None = None,
              attrs: dict | None = None, *, n_outputs: int = 1, output: int = 0, opset: int = 17,
              eps: float | None = None, rtol: float | None = None, seed: int = 0,
              input_order: Sequence[str] | None = None,
              dynamic: dict[str, dict[int, str]] | None = None) -> None:
    """Asserts <gy, J dx> == <J^T gy, dx> for each input in `wrt` (default: every float input)."""
    attrs = attrs or {}
    if wrt is None:
        wrt = [k for k, v in inputs.items() if v.dtype.kind == "f"]
    model = single_node_model(op_type, inputs, wrt, attrs, n_outputs=n_outputs, opset=opset,
                              input_order=input_order, dynamic=dynamic)
    out_name = f"y{output}"
    feeds = {w: inputs[w] for w in wrt}
    y = run(model, feeds, [out_name])[0]
    rng = np.random.default_rng(seed)
    gy = np.asarray(rng.standard_normal(y.shape), dtype=y.dtype)  # asarray: rank-0 outputs stay arrays
    gmodel, gnames = vjp_model(model, wrt, out_name)
    gxs = run(gmodel, {**feeds, "gy": gy}, gnames)
    is64 = all(inputs[w].dtype == np.float64 for w in wrt)
    eps = eps if eps is not None else (1e-6 if is64 else 1e-2)
    rtol = rtol if rtol is not None else (1e-6 if is64 else 2e-3)
    for w, gx in zip(wrt, gxs):
        x = inputs[w]
        assert gx.shape == x.shape, f"{op_type}: gradient of {w} has shape {gx.shape}, input {x.shape}"
        dx = np.asarray(rng.standard_normal(x.shape), dtype=x.dtype)
        plus = run(model, {**feeds, w: np.asarray(x + eps * dx, dtype=x.dtype)}, [out_name])[0].astype(np.float64)
        minus = run(model, {**feeds, w: np.asarray(x - eps * dx, dtype=x.dtype)}, [out_name])[0].astype(np.float64)
        lhs = float(np.sum(gy.astype(np.float64) * (plus - minus) / (2 * eps)))
        rhs = float(np.sum(gx.astype(np.float64) * dx.astype(np.float64)))
        scale = float(np.sqrt(np.sum(gy.astype(np.float64) ** 2) * np.sum(((plus - minus) / (2 * eps)) ** 2))) + \
            float(np.sqrt(np.sum(gx.astype(np.float64) ** 2) * np.sum(dx.astype(np.float64) ** 2)))
        assert abs(lhs - rhs) <= rtol * max(scale, 1e-12), (
            f"{op_type} d/d{w}: <gy, J dx> = {lhs:.8g} but <J^T gy, dx> = {rhs:.8g} (scale {scale:.3g})")
