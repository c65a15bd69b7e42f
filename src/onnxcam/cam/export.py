"""`onnxcam export`: one self-contained, servable ONNX graph = the model + a `heatmap` output.

The exported graph keeps the model's inputs and outputs, adds an optional int64 `target` input (N,) whose
default (-1, or the input left out) means "the argmax class", and a `heatmap` output (N, H, W) in [0, 1].
Only standard ONNX operators: it runs on stock onnxruntime with any execution provider, and in Triton's
onnxruntime backend (see `triton_config`).

`target` is optional in one of two forms (`TARGET_FORMS`):

* "optional" (`onnxcam export -o`): an ONNX optional-typed input, optional(tensor(int64)), read through
  OptionalHasElement/If/OptionalGetElement. onnxruntime loads it silently and takes a plain int64 array for it
  or nothing. It needs opset 15: an older model is upgraded (onnx's version converter) and, where that fails,
  gets the other form.
* "initializer" (the Triton entry, `write_triton_repository`): a plain tensor input with an initializer of the
  same name holding the default [-1]. Triton's onnxruntime backend refuses any input that is not a tensor
  ("Unsupported ONNX Type ... expected ONNX_TYPE_TENSOR") but feeds overridable initializers, and its config
  marks the input `optional: true`. The price: onnxruntime prints "Initializer target appears in graph inputs"
  on every load. Plain tensors are also the form other runtimes (OpenVINO, TensorRT's parser) are known to take.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxcamError
from ..model import layouts, safeio, select
from ..model.graph import Emitter, ModelLike, ModelView, ensure_opset, infer_shapes, load_model, opset_version, prune
from . import build, methods

_TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.DOUBLE: "TYPE_FP64",
                 TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32", TensorProto.UINT8: "TYPE_UINT8",
                 TensorProto.INT8: "TYPE_INT8", TensorProto.BOOL: "TYPE_BOOL", TensorProto.BFLOAT16: "TYPE_BF16"}
TARGET_FORMS = ("optional", "initializer")
OPTIONAL_OPSET = 15  # OptionalHasElement, OptionalGetElement


def export_model(model: ModelLike, layer=None, method: str = "gradcam", heatmap_size: str = "input",
                 output: str | None = None, layout: str | None = None, target_name: str = "target",
                 heatmap_name: str = "heatmap", inline_weights: bool = True,
                 target_form: str = "optional") -> onnx.ModelProto:
    """The explainable graph; `target_form`: how its `target` input is optional (TARGET_FORMS, module doc). A model loaded with external data keeps its large weights on disk (references
    only onnxcam can read) when `inline_weights` is False or they exceed 2 GB: write it with save_model, which
    puts them in `<output>.data`. Otherwise the result is a self-contained ModelProto for onnx.save."""
    if methods.get_method(method).kind != "gradient":
        raise OnnxcamError(f"method '{method}' cannot be exported as one graph (it needs numpy or many forward "
                           f"passes); exportable: {', '.join(methods.exportable_methods())}")
    if heatmap_size not in ("input", "layer"):
        raise OnnxcamError(f"--heatmap-size must be 'input' or 'layer', got '{heatmap_size}'")
    if target_form not in TARGET_FORMS:
        raise OnnxcamError(f"target_form must be one of {', '.join(TARGET_FORMS)}, got '{target_form}'")
    source = load_model(model)
    working = source
    if target_form == "optional" and opset_version(source) < OPTIONAL_OPSET:
        try:
            working = ensure_opset(source, OPTIONAL_OPSET)
        except OnnxcamError:  # the version converter lacks an adapter for one of the model's operators
            target_form = "initializer"
    inferred = infer_shapes(working)
    view = ModelView(inferred)
    image, score, layers = select.resolve(view, layer, output)
    for name in (target_name, heatmap_name):
        if view.has_tensor(name) or name in view.graph_inputs:
            raise OnnxcamError(f"the model already has a tensor named '{name}'")
    shape = view.shape(image)
    layout = layout or layouts.guess_image_layout(shape)
    layer_layouts = tuple(layouts.layer_layout(view, name, image, layout) for name in layers)
    spec = build.Spec(image=image, layers=layers, score=score, method=method, layout=layout,
                      layer_layouts=layer_layouts)
    m = build.build_explain_graph(inferred, spec, sign_input=False, keep_outputs=True)
    build.weights_as_constants(m, view.rank(score) or 1)

    emit = Emitter.for_model(m)
    if heatmap_size == "input":
        heat = build.HEATMAPS
    else:
        heat = methods.normalize(emit, build.MAPS, layouts.effective_rank(layer_layouts[0], view.rank(layers[0])) - 1)
    emit.op("Identity", [heat], outputs=[heatmap_name])
    emit.commit(m)

    _optional_target(m, target_name)
    if target_form == "initializer":
        _initializer_target(m, target_name)

    originals = [o.name for o in source.graph.output]
    kept = [o for o in m.graph.output if o.name in originals]
    if heatmap_size == "input":
        source_shape = view.shape(image)
        spatial = source_shape[1:-1] if layout == "NHWC" else source_shape[2:]
    else:
        source_shape = view.shape(layers[0])
        spatial = layouts.spatial_dims(layer_layouts[0], source_shape)
    heat_dims = [source_shape[0] if isinstance(source_shape[0], int) else "N",
                 *[d if isinstance(d, int) else f"H{i}" for i, d in enumerate(spatial)]]
    del m.graph.output[:]
    m.graph.output.extend(kept)
    m.graph.output.append(helper.make_tensor_value_info(heatmap_name, TensorProto.FLOAT, heat_dims))
    prune(m, [o.name for o in m.graph.output])
    m.producer_name = "onnxcam"
    checked = m
    if any(safeio.sealed_location(t) is not None for t in m.graph.initializer):
        # Weights left on disk carry absolute locations, which the checker refuses (and it would look for them
        # relative to the working directory): it checks them as typed graph inputs of the same shape instead.
        checked = onnx.ModelProto()
        checked.CopyFrom(m)
        inits = list(checked.graph.initializer)
        del checked.graph.initializer[:]
        declared = {i.name for i in checked.graph.input}
        for t in inits:
            if safeio.sealed_location(t) is None:
                checked.graph.initializer.append(t)
            elif t.name not in declared:
                checked.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        onnx.checker.check_model(checked, full_check=True)
    except Exception as exc:
        raise OnnxcamError(f"exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    sealed = [t for t in m.graph.initializer if safeio.sealed_location(t) is not None]
    if sealed and inline_weights and m.ByteSize() + sum(safeio.sealed_location(t)[2] for t in sealed) < 2_000_000_000:
        # Small enough for one file: a self-contained proto, as onnx.save and onnxruntime expect. Larger models
        # keep their weights on disk; save_model writes them next to the output.
        for t in sealed:
            safeio.inline_sealed(t)
    return m


def _optional_target(m: onnx.ModelProto, target_name: str) -> None:
    """Replaces the graph input build.TARGET with an optional-typed input `target_name`, in place: the graph
    reads build.TARGET from an If that takes the input's tensor when one is given and [-1] (the argmax) else."""
    for inp in m.graph.input:
        if inp.name == build.TARGET:
            inp.CopyFrom(helper.make_value_info(target_name, helper.make_optional_type_proto(
                helper.make_tensor_type_proto(TensorProto.INT64, ["N"]))))
    given, default, has = (f"{build.TARGET}_{suffix}" for suffix in ("given", "default", "present"))
    then_branch = helper.make_graph([helper.make_node("OptionalGetElement", [target_name], [given])], "target_given",
                                    [], [helper.make_tensor_value_info(given, TensorProto.INT64, ["N"])])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], [default], value=numpy_helper.from_array(np.array([-1], np.int64)))],
        "target_default", [], [helper.make_tensor_value_info(default, TensorProto.INT64, [1])])
    nodes = [helper.make_node("OptionalHasElement", [target_name], [has], name=has),
             helper.make_node("If", [has], [build.TARGET], name=f"{build.TARGET}_or_argmax",
                              then_branch=then_branch, else_branch=else_branch)]
    for node in reversed(nodes):
        m.graph.node.insert(0, node)


def is_optional_target(model: onnx.ModelProto, target_name: str = "target") -> bool:
    return any(i.name == target_name and i.type.HasField("optional_type") for i in model.graph.input)


def _initializer_target(m: onnx.ModelProto, target_name: str) -> None:
    """The optional-typed `target_name` of _optional_target as a plain int64 (N,) input whose initializer holds
    the default [-1], in place."""
    for inp in m.graph.input:
        if inp.name == target_name:
            inp.CopyFrom(helper.make_tensor_value_info(target_name, TensorProto.INT64, ["N"]))
    kept = []
    for node in m.graph.node:
        if node.op_type == "OptionalHasElement" and list(node.input) == [target_name]:
            continue
        if node.op_type == "If" and list(node.output) == [build.TARGET]:
            node = helper.make_node("Identity", [target_name], [build.TARGET], name=node.name)
        kept.append(node)
    del m.graph.node[:]
    m.graph.node.extend(kept)
    # An initializer with the input's name makes the input optional: absent means [-1], i.e. the argmax.
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), target_name))


def triton_model(model: onnx.ModelProto, target_name: str = "target") -> onnx.ModelProto:
    """`model` (an export) with its `target` in the form Triton's onnxruntime backend loads ("initializer"); the
    model itself when it has that form already."""
    if not is_optional_target(model, target_name):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _initializer_target(out, target_name)
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike,
               inputs: "list[str | os.PathLike] | tuple" = ()) -> None:
    """Writes `model` to `path`; with weights onnxcam left on disk (a model loaded with external data), or a
    proto over protobuf's 2 GB limit, the weights go to `<path>.data` next to it, streamed from their source
    files rather than gathered in memory. `inputs`: files the command read; neither written file may be one
    of them (or a link to one). `model` itself is not changed."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxcamError(f"cannot write {path}: directory {path.parent} does not exist")
    external = any(safeio.sealed_location(t) is not None for t in model.graph.initializer) or \
        model.ByteSize() > 2_000_000_000
    data_path = path.with_name(path.name + ".data")
    guard_outputs([path, data_path] if external else [path], inputs)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp_data = data_path.with_name(f".{data_path.name}.tmp")
    try:
        if external:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            _write_external(out, tmp_data, data_path.name)
        else:
            out = model
        with open(tmp, "wb") as f:
            f.write(out.SerializeToString())
        if external:
            os.replace(tmp_data, data_path)
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxcamError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OnnxcamError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None
    finally:
        for t in (tmp, tmp_data):
            if t.exists():
                t.unlink()


def _write_external(model: onnx.ModelProto, data_file: Path, location: str) -> None:
    """Moves every large main-graph initializer of `model` (in place) into `data_file`, referenced as
    `location` relative to the model: sealed ones are copied from their source in chunks."""
    align = 4096  # page-aligned offsets: onnxruntime can map them
    with open(data_file, "wb") as f:
        for t in model.graph.initializer:
            sealed = safeio.sealed_location(t)
            if sealed is None and (safeio.is_external(t) or len(t.raw_data) <= safeio.INLINE_BYTES):
                continue
            pad = (-f.tell()) % align
            f.write(b"\0" * pad)
            offset = f.tell()
            if sealed is not None:
                arr = safeio.sealed_array(t)
                flat = arr.reshape(-1).view(np.uint8)
                for start in range(0, flat.size, 64 << 20):
                    f.write(flat[start:start + (64 << 20)].tobytes())
                length = flat.size
                del arr, flat
            else:
                f.write(t.raw_data)
                length = len(t.raw_data)
                t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)


def guard_outputs(outputs, inputs) -> None:
    """Refuses to write any of `outputs` over a file in `inputs` (the same file by path, link or symlink)."""
    for out in outputs:
        out = os.fspath(out)
        for src in inputs:
            src = os.fspath(src)
            same = os.path.realpath(out) == os.path.realpath(src)
            if not same and os.path.exists(out) and os.path.exists(src):
                try:
                    same = os.path.samefile(out, src)
                except OSError:
                    same = False
            if same:
                raise OnnxcamError(f"output {out} would overwrite the input {src}")


def model_files(model, loaded: onnx.ModelProto | None = None) -> list[str]:
    """The files a model given as `model` is read from: the model file and its external-data files."""
    files = [os.fspath(model)] if isinstance(model, (str, os.PathLike)) else []
    if loaded is not None:
        for t in loaded.graph.initializer:
            sealed = safeio.sealed_location(t)
            if sealed is not None and sealed[0] not in files:
                files.append(sealed[0])
    if isinstance(model, (str, os.PathLike)):
        # Small external tensors were read into the proto; their files count as inputs all the same.
        folder = os.path.dirname(os.path.abspath(os.fspath(model)))
        try:
            safeio.regular_file(model, "model", safeio.MAX_MODEL_BYTES)  # a FIFO would block the load
            raw = onnx.load(os.fspath(model), load_external_data=False)
        except Exception:
            return files
        for t, _ in safeio.model_tensors(raw):
            if safeio.is_external(t):
                loc = safeio.external_info(t).get("location", "")
                if loc and not os.path.isabs(loc):
                    files.append(os.path.join(folder, loc))
    return files


def triton_config(model: onnx.ModelProto, name: str, max_batch_size: int = 8,
                  target_name: str = "target") -> str:
    """config.pbtxt for Triton's onnxruntime backend, with dynamic batching when the batch dim is dynamic."""
    view = ModelView(model)

    def dims(shape) -> str:
        return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"

    inputs = [i for i in model.graph.input if i.name not in view.initializers or i.name == target_name]
    first = view.shape(inputs[0].name) or [None]
    batched = max_batch_size > 0 and not isinstance(first[0], int)
    mbs = max_batch_size if batched else 0

    def entry(vi: onnx.ValueInfoProto, optional: bool = False) -> str:
        shape = view.shape(vi.name) or []
        if vi.name == target_name:
            body = (f'    name: "{vi.name}"\n    data_type: TYPE_INT64\n'
                    + ('    dims: [ 1 ]\n    reshape: { shape: [ ] }\n' if batched else '    dims: [ -1 ]\n')
                    + "    optional: true\n")
        else:
            ttype = _TRITON_TYPES.get(vi.type.tensor_type.elem_type, "TYPE_FP32")
            body = f'    name: "{vi.name}"\n    data_type: {ttype}\n    dims: {dims(shape[1:] if batched else shape)}\n'
        return "  {\n" + body + "  }"

    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {mbs}",
             "input [\n" + ",\n".join(entry(i) for i in inputs) + "\n]",
             "output [\n" + ",\n".join(entry(o) for o in model.graph.output) + "\n]"]
    if batched:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}")
    return "\n".join(lines) + "\n"


def write_triton_repository(model: onnx.ModelProto, directory: str | os.PathLike, name: str,
                            max_batch_size: int = 8, inputs=()) -> Path:
    """DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx, with `target` in the form Triton loads (module doc)."""
    root = Path(directory) / name
    guard_outputs([root / "1" / "model.onnx", root / "1" / "model.onnx.data", root / "config.pbtxt"], inputs)
    try:
        (root / "1").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxcamError(f"cannot create {root}: {exc.strerror or exc}") from None
    model = triton_model(model)
    save_model(model, root / "1" / "model.onnx", inputs)
    try:
        (root / "config.pbtxt").write_text(triton_config(model, name, max_batch_size))
    except OSError as exc:
        raise OnnxcamError(f"cannot write {root / 'config.pbtxt'}: {exc.strerror or exc}") from None
    return root
