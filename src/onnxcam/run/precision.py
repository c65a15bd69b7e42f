"""Reduced-precision execution of the fused explain graph on the CPU (`Explainer(..., precision=)`).

fp32 is onnxruntime, as without `precision`. bf16 and fp16 run on OpenVINO (the `openvino` package, extra
`onnxcam[openvino]`), whose CPU plugin runs convolutions and matrix products in that type where the CPU has units
for it. For gradient and eigen methods the model is cut at the layers (SplitSession): the trunk before them --
nearly all the compute -- is compiled by OpenVINO and hands out the activations; the head after them, its
gradient, the CAM arithmetic and the heatmap run in an onnxruntime fp32 session of the fused graph built on the
head alone. OpenVINO runs those small ops on dynamic shapes slowly (the whole fused graph cost it 1.2-1.45x its
forward) and in bf16 (the heatmap Resize among them); onnxruntime runs them at ~1.05x of its forward, in fp32.
Where the head cannot be cut, or holds too much of the compute, the whole fused graph goes to OpenVINO
(Choice.reason says which). onnxruntime-openvino is not used: it installs its own `onnxruntime` module, which
shadows the CPU or GPU build onnxcam runs on.

`auto` reads the CPU's flags (/proc/cpuinfo) and says what it picked and why (`Choice.reason`). Accuracy and
speed against fp32 are measured by tools/bench_precision.py; docs/precision.md holds the figures."""
from __future__ import annotations

import logging
import os
import platform
import threading
import warnings
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..cam import build, methods
from ..errors import OnnxcamError, first_line
from ..images import preprocess
from ..model import safeio
from ..model.graph import Emitter, ModelView, ancestors, head_nodes, prune, subgraph_reads, value_info
from .runtime import make_session

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
OPENVINO_HINT = "pip install 'onnxcam[openvino]'"

# Flags (Linux /proc/cpuinfo names) of units that compute in each type. avx512_bf16 (Cooper Lake, Zen 4 and
# later) has bf16 dot products; amx_bf16 (Sapphire Rapids and later) tile matrix units. Without one of them
# OpenVINO would not run bf16 at all (or emulate it slower than fp32), so asking for it is refused.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FP16_FLAGS = ("amx_fp16", "avx512_fp16")
# int8 dot products: onnxruntime's int8 convolutions are fast with these, and emulated (slower) without.
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
CPUINFO = "/proc/cpuinfo"


def cpu_flags(path: str = CPUINFO) -> frozenset | None:
    """The CPU's feature flags, as the kernel reports them; None where they cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, arm64
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def cpu_name(path: str = CPUINFO) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class Choice:
    precision: str  # fp32, bf16 or fp16: what runs
    engine: str  # "onnxruntime", "openvino", or "openvino+onnxruntime" (the trunk on one, the head on the other)
    reason: str  # one line: why this precision, for the user to read
    requested: str = "fp32"
    # auto with calibration images on a CPU with int8 units: also try the int8 trunk on OpenVINO, and keep the
    # faster of the two on this model (open_session times both on a calibration image)
    try_int8: bool = False


def openvino_version() -> str | None:
    """The installed openvino's version, without importing it (its import costs ~0.5 s)."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def _units(flags, wanted) -> list:
    return [f for f in wanted if flags and f in flags]


def choose(precision: str | None, providers=None, flags=None, calibrated: bool = False) -> Choice:
    """The precision and engine for a request. `providers`: the onnxruntime providers asked for (None: CPU);
    reduced precision is a CPU feature here, so with a GPU provider `auto` stays fp32 and the others are refused.
    `flags`: the CPU's flags (default: read from /proc/cpuinfo). `calibrated`: calibration images were given,
    which int8 needs (and which `auto` takes as leave to use int8)."""
    name = (precision or "fp32").lower()
    if name not in PRECISIONS:
        raise OnnxcamError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return Choice("fp32", "onnxruntime", "fp32 requested" if precision else "fp32 (the default)", "fp32")
    gpu = [q for q in (p[0] if isinstance(p, tuple) else p for p in (providers or [])) if q != "CPUExecutionProvider"]
    if gpu:
        if name == "auto":
            return Choice("fp32", "onnxruntime", f"auto: fp32 on {gpu[0]} (reduced precision is for the CPU)",
                          name)
        raise OnnxcamError(f"precision {name} runs on the CPU; it cannot be combined with {gpu[0]}")
    flags = cpu_flags() if flags is None else flags
    if name == "int8" and not calibrated:
        raise OnnxcamError("precision int8 needs calibration images (--calibration, or calibration=[arrays or image paths]): the "
                           "activation ranges are measured on them")
    if name == "auto":
        return _auto(flags, calibrated)
    if name == "int8":
        units = _units(flags, INT8_FLAGS)
        if flags is not None and not units:
            raise OnnxcamError(f"precision int8 needs a CPU with int8 dot-product units ({' or '.join(INT8_FLAGS)} "
                               f"among its flags); this one has none (use fp32 or auto)")
        why = f"the CPU has {', '.join(units)}" if units else f"the CPU's flags could not be read from {CPUINFO}"
        return Choice("int8", "onnxruntime", f"int8 requested: onnxruntime, trunk up to the layer quantized ({why})",
                      name)
    wanted = BF16_FLAGS if name == "bf16" else FP16_FLAGS
    units = _units(flags, wanted)
    if flags is not None and not units:
        raise OnnxcamError(f"precision {name} needs a CPU with {name} units ({' or '.join(wanted)} among its "
                           f"flags); this one has neither (use fp32 or auto)")
    ov = openvino_version()
    if ov is None:
        raise OnnxcamError(f"precision {name} runs on OpenVINO, which is not installed: {OPENVINO_HINT}")
    why = f"the CPU has {', '.join(units)}" if units else f"the CPU's flags could not be read from {CPUINFO}"
    return Choice(name, "openvino", f"{name} requested: OpenVINO {ov} ({why})", name)


def _auto(flags, calibrated: bool) -> Choice:
    if flags is None:
        return Choice("fp32", "onnxruntime", f"auto: fp32 (cannot read the CPU's flags from {CPUINFO})", "auto")
    bf16, int8 = _units(flags, BF16_FLAGS), _units(flags, INT8_FLAGS)
    ov = openvino_version()
    if bf16 and ov is not None:
        return Choice("bf16", "openvino", f"auto: bf16 on OpenVINO {ov} (the CPU has {', '.join(bf16)})", "auto",
                      try_int8=bool(calibrated and int8))
    if calibrated and int8:
        return Choice("int8", "onnxruntime", f"auto: int8 trunk on onnxruntime (calibration images given; the CPU "
                      f"has {', '.join(int8)}{'' if not bf16 else ' and ' + bf16[0] + ', but OpenVINO is not installed'})",
                      "auto")
    if bf16:
        return Choice("fp32", "onnxruntime", f"auto: fp32 (the CPU has {bf16[0]}, but bf16 runs on OpenVINO, which is "
                      f"not installed: {OPENVINO_HINT})", "auto")
    why = f"this CPU has no bf16 units (neither {' nor '.join(BF16_FLAGS)} among its flags)"
    if int8:
        why += f"; int8 ({int8[0]}) needs calibration images"
    return Choice("fp32", "onnxruntime", f"auto: fp32 ({why})", "auto")


# -- OpenVINO ------------------------------------------------------------------------------------
STATIC_SHAPES = 4  # input shapes an OpenVINOSession also compiles statically (the first ones it sees)
_OV_TYPES = {"f32": "float", "f16": "float16", "f64": "double", "i64": "int64", "i32": "int32", "i8": "int8",
             "u8": "uint8", "boolean": "bool"}
# Layers whose runtime precision says whether the reduced type was really used: the ones that carry the work.
_HEAVY = ("Convolution", "FullyConnected", "MatMul", "Deconvolution", "GroupConvolution")


@dataclass(frozen=True)
class _Port:
    """What onnxruntime's NodeArg offers and the Explainer reads: name, shape, type."""
    name: str
    shape: list
    type: str


class EngineError(RuntimeError):
    """A run failed inside an engine other than onnxruntime; the message names it ("OpenVINO failed: ...")."""


class OpenVINOSession:
    """The fused graph compiled by OpenVINO for the CPU, behind the part of onnxruntime's InferenceSession the
    Explainer uses: run(None | names, feeds), get_inputs(), get_outputs(), get_providers(). One infer request per
    thread, so that it can be shared across threads as an InferenceSession can. `heavy_layers`: (how many of the
    compute-heavy layers run in the reduced type, how many there are), read from the compiled model."""

    def __init__(self, model: onnx.ModelProto, precision: str, threads: int = 0):
        for t, _top in safeio.model_tensors(model):
            if safeio.is_external(t):
                raise OnnxcamError(f"precision {precision} cannot take a model whose weights are stored as external "
                                   f"data (tensor '{t.name}'); use fp32")
        try:
            import openvino as ov
        except ImportError:
            raise OnnxcamError(f"precision {precision} runs on OpenVINO, which is not installed: "
                               f"{OPENVINO_HINT}") from None
        self.precision = precision
        # int8: the QDQ pairs say what is int8 (OpenVINO's low-precision transformations); the rest stays f32
        config = {"INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp16": "f16", "fp32": "f32", "int8": "f32"}[precision],
                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core, self._config, self._bytes = ov.Core(), config, model.SerializeToString()
        try:
            self._compiled = self._core.compile_model(self._core.read_model(self._bytes, b""), "CPU", config)
        except Exception as exc:
            raise OnnxcamError(f"OpenVINO cannot compile the explain graph: {first_line(exc)}") from None
        self._inputs = [self._port(p) for p in self._compiled.inputs]
        self._outputs = [self._port(p) for p in self._compiled.outputs]
        self._output_index = {p.name: i for i, p in enumerate(self._outputs)}
        self.heavy_layers = self._heavy_layers(precision)
        self._local = threading.local()
        # Compiled for the input shapes of the first STATIC_SHAPES calls too: OpenVINO runs a static-shape model
        # ~10% faster than the dynamic one (3.0 vs 3.4 ms for EfficientNet-Lite0's trunk at batch 1); other
        # shapes run on the dynamic one. None: that shape would not compile statically.
        self._static: dict = {}
        self._static_lock = threading.Lock()

    @staticmethod
    def _port(port) -> _Port:
        # A tensor can hold several names in OpenVINO; the first is not always the ONNX one, so prefer
        # an onnxcam name where there is one, else the sorted first for stability.
        names = sorted(port.get_names())
        name = next((n for n in names if n.startswith("onnxcam_")), names[0] if names else port.get_any_name())
        dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        return _Port(name, dims, f"tensor({_OV_TYPES.get(port.get_element_type().get_type_name(), 'unknown')})")

    def _heavy_layers(self, precision: str) -> tuple[int, int]:
        want = {"bf16": ("bf16",), "fp16": ("f16",), "fp32": ("f32",), "int8": ("u8", "i8")}[precision]
        used = total = 0
        try:
            for op in self._compiled.get_runtime_model().get_ordered_ops():
                info = op.get_rt_info()
                if info["layerType"].astype(str) in _HEAVY:
                    total += 1
                    used += info["runtimePrecision"].astype(str) in want
        except Exception:  # the runtime model's layout is OpenVINO's own: unknown means unknown
            return -1, -1
        return used, total

    def get_inputs(self) -> list:
        return list(self._inputs)

    def get_outputs(self) -> list:
        return list(self._outputs)

    def get_providers(self) -> list:
        return [f"OpenVINO-CPU-{self.precision}"]

    def _for_shapes(self, feeds: dict):
        key = tuple(sorted((k, tuple(np.shape(v))) for k, v in feeds.items()))
        declared = {p.name: p.shape for p in self._inputs}
        for name, shape in key:  # only the dims the model leaves open are fixed; a wrong one is OpenVINO's to refuse
            dims = declared.get(name)
            if dims is None or len(dims) != len(shape) or any(d is not None and d != n for d, n in zip(dims, shape)):
                return self._compiled
        with self._static_lock:
            if key not in self._static and len(self._static) < STATIC_SHAPES:
                try:
                    model = self._core.read_model(self._bytes, b"")
                    model.reshape({k: list(shape) for k, shape in key})
                    self._static[key] = self._core.compile_model(model, "CPU", self._config)
                except Exception:  # a shape computation that needs the dynamic model: keep using it
                    self._static[key] = None
            return self._static.get(key) or self._compiled

    def run(self, output_names, feeds, run_options=None) -> list:
        # The request owns its output buffers and overwrites them on its next run: copies leave with the caller.
        values = [np.array(v, copy=True) for v in self.run_views(feeds)]
        if output_names is None:
            return values
        return [values[self._output_index[n]] for n in output_names]

    def run_views(self, feeds) -> list:
        """All outputs as views of the infer request's own buffers, valid until this thread's next run (the
        split's head reads them at once: no copy of the layer's activations per run)."""
        wanted = {p.name for p in self._inputs}
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in wanted}
        compiled = self._for_shapes(feeds)
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(id(compiled))
        if request is None:
            request = requests[id(compiled)] = compiled.create_infer_request()
        try:
            # Shared both ways: OpenVINO reads the caller's arrays and hands out its own buffers, instead of
            # copying each in and out (0.3 ms of EfficientNet-Lite0's 3 ms trunk at batch 1).
            request.infer(feeds, share_inputs=True, share_outputs=True)
        except Exception as exc:
            raise EngineError(f"OpenVINO failed: {first_line(exc)}") from None
        return [request.get_output_tensor(i).data for i in range(len(self._outputs))]

    def io_binding(self):
        raise OnnxcamError(f"explain_bound needs an onnxruntime session; precision {self.precision} runs on "
                           f"OpenVINO (use explain)")


# -- int8 -------------------------------------------------------------------------------------------
def calibration_inputs(calibration, input_shape, metadata=None) -> list:
    """The calibration images as input tensors, one (1, ...) array each: arrays are taken as preprocessed
    input (one sample, or a batch split into samples); paths and PIL images are preprocessed as the model's
    metadata says (onnxcam.images.preprocess), as explain_image does without overrides."""
    if calibration is None:
        return []
    items = [calibration] if isinstance(calibration, (np.ndarray, str, os.PathLike)) else list(calibration)
    rank = len(input_shape) if input_shape is not None else None
    out, pp = [], None
    for item in items:
        if isinstance(item, np.ndarray):
            a = np.asarray(item, np.float32)
            if rank is not None and a.ndim == rank - 1:
                a = a[None]
            if rank is not None and a.ndim != rank:
                raise OnnxcamError(f"a calibration array has shape {a.shape}; the model's input has {rank} dims")
            out.extend(a[i:i + 1] for i in range(len(a)))
        else:
            if pp is None:
                pp = preprocess.resolve_preprocess(input_shape, metadata=metadata or {})
            out.append(preprocess.to_tensor(preprocess.load_image(item), pp))
    if not out:
        raise OnnxcamError("the calibration images are empty")
    return out


def trunk_nodes(model: onnx.ModelProto, layers) -> list[str]:
    """The names of the nodes the layers are computed from (the forward graph up to them). Only these are
    quantized: the head after the layer, the gradient and the CAM arithmetic never see a QDQ pair, so no
    gradient rule has to know about quantization."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = set(), list(layers)
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name in seen]


def quantize_trunk(model: onnx.ModelProto, image: str, layers, samples: list) -> onnx.ModelProto:
    """The fused graph with its trunk quantized to int8 (static QDQ, per-channel weights, activation ranges
    from `samples` by onnxruntime.quantization's MinMax calibration)."""
    nodes = trunk_nodes(model, layers)
    if not nodes:
        raise OnnxcamError("int8: the layer is the model's input; there is no trunk to quantize")
    return quantize(model, image, samples, nodes)


def quantize(model: onnx.ModelProto, image: str, samples: list, nodes: list[str] | None = None) -> onnx.ModelProto:
    """`model` with `nodes` (None: all) quantized to int8 as quantize_trunk says; a new model."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    extra = [i.name for i in model.graph.input if i.name != image and not i.name.startswith("onnxcam_")]
    if extra:
        raise OnnxcamError(f"int8 calibration feeds the image input only; the model also takes '{extra[0]}'")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(samples)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else _probe_feeds(model, image, x)

    # quantize_static moves its input's weights out to external-data files in place (data_location EXTERNAL,
    # raw_data cleared): it gets a copy, or the caller's fused graph would be left pointing at deleted files.
    model = onnx.load_from_string(model.SerializeToString())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "int8.onnx")
        try:
            # The quantizer's numpy warnings (a zero-range tensor's scale) and its root-logger advice
            # ("consider pre-processing") are its own business, not the user's terminal.
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # U8 activations, S8 per-channel weights: what onnxruntime's x86 int8 kernels (VNNI) take.
                quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_quantize=nodes or None)
        except Exception as exc:
            raise OnnxcamError(f"int8 quantization failed: {first_line(exc)}") from None
        finally:
            logging.disable(previous)
        return onnx.load(out)


# -- the split: trunk on OpenVINO, head on onnxruntime ----------------------------------------------
CUT = "onnxcam_cut_"
# Above this share of the forward's multiply-adds in the head, the split loses: the head then runs in fp32
# (about twice bf16's time on this kind of CPU) together with its backward (about twice its forward), ~6x its
# share of the bf16 forward, which passes the 0.2-0.45x of the forward that the whole fused graph on OpenVINO adds.
HEAD_SHARE_LIMIT = 0.05
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Cut:
    trunk: onnx.ModelProto  # the model's inputs -> `onnxcam_cut_j` = tensors[j]
    head: onnx.ModelProto  # the head alone: tensors (and the model's inputs it reads) -> the score
    tensors: tuple  # what the head reads from the trunk: the layers, then any other tensor it needs
    head_share: float  # of the forward's multiply-adds (those whose shapes are known)


def _macs(view: ModelView, node: onnx.NodeProto) -> int:
    """Multiply-adds per sample of a convolution or matrix product; 0 where a shape is unknown."""
    if node.op_type not in _MAC_OPS:
        return 0
    # The second input's shape (the weight, nearly always known) gives the reduced dim: (C_out, C_in/group,
    # *kernel) for a convolution, whose each output reads C_in/group * kernel; (K, M), or (M, K) under transB.
    out, w = view.shape(node.output[0]), view.shape(node.input[1])
    if not out or not w or not all(isinstance(d, int) for d in [*out[1:], *w]):
        return 0
    if node.op_type.startswith("Conv"):
        k = int(np.prod(w[1:]))
    elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        k = w[-1]
    else:
        k = w[-2] if len(w) >= 2 else w[0]
    return int(np.prod(out[1:])) * k


def cut_at_layers(model: onnx.ModelProto, layers, score: str, image: str) -> Cut:
    """The (shape-inferred) model cut at the layers into the trunk before them and the head after them, as
    onnxcam.cam.build.repeat_layers finds the head: the nodes downstream of the layers that the score needs.
    Whatever else the head reads and is computed from the inputs (a skip connection, a shape read from the
    image) the trunk hands out too; what is computed from constants alone goes with the head. OnnxcamError
    (the reason) where the model cannot be cut there."""
    view = ModelView(model)
    inputs = set(view.graph_inputs)
    if any(layer in inputs for layer in layers):
        raise OnnxcamError("the layer is a model input: there is no trunk before it")
    head = head_nodes(view, layers, score)
    if score not in {o for n in head for o in n.output}:
        raise OnnxcamError(f"the score '{score}' is not computed from the layer")
    produced = {o for n in head for o in n.output}
    reads = dict.fromkeys(i for n in head for i in [*n.input, *sorted(subgraph_reads(n))]
                          if i and i not in produced and i not in layers and i not in view.initializers)
    extra = [t for t in reads if t not in inputs and ancestors(view, [t]) & inputs]
    constant = ancestors(view, [t for t in reads if t not in inputs and t not in extra])
    keep = {id(n) for n in head} | {id(n) for n in view.graph.node if any(o in constant for o in n.output)}
    tensors = (*layers, *extra)
    for t in tensors:
        if view.shape(t) is None and t in layers:
            raise OnnxcamError(f"the shape of layer '{t}' is unknown")

    def typed(name):
        return value_info(name, view.elem_type(name), view.shape(name))

    head_model = onnx.ModelProto()
    head_model.CopyFrom(model)
    g = head_model.graph
    nodes = [c for src, c in zip(view.graph.node, g.node) if id(src) in keep]
    kept = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(kept, nodes):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(kept)
    image_vi = [i for i in model.graph.input if i.name == image]
    originals = list(g.input)
    del g.input[:]
    g.input.extend([typed(t) for t in tensors] + originals)
    del g.output[:]
    g.output.append(typed(score))
    prune(head_model, [score])
    if image not in {i.name for i in g.input}:  # the fused graph reads the heatmap's size from the image
        g.input.extend(image_vi)
    inside = {o for n in g.node for o in n.output}
    infos = [v for v in g.value_info if v.name in inside]
    del g.value_info[:]
    g.value_info.extend(infos)

    total = sum(_macs(view, n) for n in view.graph.node)
    share = sum(_macs(view, n) for n in head) / total if total else 0.0
    return Cut(trunk_of(model, tensors), head_model, tensors, share)


def trunk_of(model: onnx.ModelProto, tensors) -> onnx.ModelProto:
    """The part of the (shape-inferred) model that computes `tensors`, handing them out as `onnxcam_cut_j`:
    cut_at_layers' trunk, and with the score among them the whole forward (score_from_trunk)."""
    view = ModelView(model)
    trunk = onnx.ModelProto()
    trunk.CopyFrom(model)
    outs = [f"{CUT}{j}" for j in range(len(tensors))]
    trunk.graph.node.extend(onnx.helper.make_node("Identity", [t], [o]) for t, o in zip(tensors, outs))
    del trunk.graph.output[:]
    trunk.graph.output.extend(value_info(o, view.elem_type(t), view.shape(t)) for t, o in zip(tensors, outs))
    prune(trunk, outs)
    return trunk


def score_from_trunk(explain: onnx.ModelProto, head: onnx.ModelProto, score: str) -> onnx.ModelProto | None:
    """The head's explain graph `explain` reading the score as an input (handed out by trunk_of) instead of computing it, where that leaves out at least half of the head's multiply-adds: a classifier's
    last matrix, which fp32 here reads whole from memory per run (5 MB for EfficientNet-Lite0's 1000 x 1280,
    a third of the head's time) and the trunk's engine reads in bf16 with its other weights. The backward
    does not need that product (a matrix product's input gradient reads the seed and the weight), so the
    gradient still runs through the head's fp32 weights; the scores, the target they pick and y are the
    trunk engine's, as its own forward gives them. None where too little would be left out."""
    view = ModelView(head)
    total = sum(_macs(view, n) for n in head.graph.node)
    rewired = onnx.ModelProto()
    rewired.CopyFrom(explain)
    g = rewired.graph
    producer = next((n for n in g.node if score in n.output), None)
    if not total or producer is None:
        return None
    producer.output[list(producer.output).index(score)] = Emitter.for_model(rewired).fresh("recomputed_score")
    g.input.append(value_info(score, view.elem_type(score), view.shape(score)))
    prune(rewired, [o.name for o in g.output])
    left = {o for n in g.node for o in n.output}
    saved = sum(_macs(view, n) for n in head.graph.node if not any(o in left for o in n.output if o))
    return rewired if saved * 2 >= total else None


class SplitSession:
    """The fused graph run in two stages behind the session interface the Explainer uses (run(None | names,
    feeds) -> the fused graph's outputs, get_inputs/get_outputs/get_providers): `trunk` (OpenVINOSession)
    computes the tensors the head reads; `head` (onnxruntime) is the fused explain graph of the head alone, with
    the same outputs as the whole one. Shareable across threads as both stages are."""

    def __init__(self, trunk: OpenVINOSession, head, tensors, score: str | None = None):
        self.trunk, self.head = trunk, head
        self.stages = (trunk, head)
        self.score = score  # the score's name where the trunk computes it (score_from_trunk), else None
        self.precision = trunk.precision
        self.heavy_layers = trunk.heavy_layers  # of the trunk: the head is fp32 by design
        names = {p.name for p in trunk.get_outputs()}
        ports = [(f"{CUT}{j}", t) for j, t in enumerate(tensors)]
        missing = [c for c, _ in ports if c not in names]
        if missing:
            raise OnnxcamError(f"OpenVINO's trunk does not hand out '{missing[0]}'")
        # Only what the head reads: one fed the score no longer needs what the score was computed from.
        reads = {i.name for i in head.get_inputs()}
        self._cut = [(c, t) for c, t in ports if t in reads]
        head_inputs = [i for i in head.get_inputs() if i.name not in tensors]
        self._head_inputs = {i.name for i in head_inputs}
        trunk_inputs = trunk.get_inputs()
        seen = {p.name for p in trunk_inputs}
        self._inputs = trunk_inputs + [i for i in head_inputs if i.name not in seen]

    def get_inputs(self) -> list:
        return list(self._inputs)

    def get_outputs(self) -> list:
        return self.head.get_outputs()

    def get_providers(self) -> list:
        # The trunk's engine first: it runs nearly all the compute (Explainer.provider reads the first).
        return [*self.trunk.get_providers(), *self.head.get_providers()]

    def run(self, output_names, feeds, run_options=None) -> list:
        ports = self.trunk.get_outputs()
        acts = dict(zip((p.name for p in ports), self.trunk.run_views(feeds)))
        head_feeds = {k: v for k, v in feeds.items() if k in self._head_inputs}
        head_feeds.update({t: acts[c] for c, t in self._cut})
        try:
            return self.head.run(output_names, head_feeds, run_options)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed (the head after the layer): {first_line(exc)}") from None

    def io_binding(self):
        raise OnnxcamError(f"explain_bound needs an onnxruntime session; precision {self.precision} runs the trunk "
                           f"on OpenVINO (use explain)")


def _head_options(options):
    if options is not None:
        return options
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Not ORT_ENABLE_ALL: its NCHWc layout reorders the head's few small tensors back and forth, which costs
    # more than it saves (0.66 vs 0.71 ms for EfficientNet-Lite0's head after its trunk).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # The head's thread pool would otherwise spin after each run on the cores OpenVINO's next trunk run needs;
    # and the head is a few percent of the work, which one thread runs faster than a pool wakes up (0.49 vs 0.65
    # ms on EfficientNet-Lite0's).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    return so


def _split(model: onnx.ModelProto, choice: Choice, options, source: onnx.ModelProto, spec, samples=None):
    """(SplitSession, None), or (None, why the fused graph is not split). int8 (`samples`: calibration inputs):
    the trunk quantized (QDQ) and compiled by OpenVINO, which runs its convolutions in int8."""
    kind = methods.get_method(spec.method).kind
    if kind == "pixel":
        return None, "its gradient reaches the input, through the whole model"
    if kind == "perturbation":
        return None, "its fused graph is the forward alone"
    try:
        cut = cut_at_layers(source, spec.layers, spec.score, spec.image)
    except OnnxcamError as exc:
        return None, f"the head cannot be cut at the layer: {first_line(exc)}"
    if cut.head_share > HEAD_SHARE_LIMIT:
        return None, (f"the head after the layer holds {cut.head_share:.0%} of the multiply-adds, which fp32 would "
                      f"run slower than OpenVINO runs the whole graph")
    try:
        head = build.build_explain_graph(cut.head, spec)
    except OnnxcamError as exc:
        return None, f"the head's explain graph cannot be built: {first_line(exc)}"
    if [o.name for o in head.graph.output] != [o.name for o in model.graph.output]:
        return None, "the head's explain graph hands out other outputs than the whole one"
    trunk_model = cut.trunk
    if choice.precision == "int8":  # quantize_static would quantize the score's matrix too: kept in fp32 here
        trunk_model = quantize(cut.trunk, spec.image, samples or [])
    else:
        fed = score_from_trunk(head, cut.head, spec.score)
        if fed is not None:
            tensors = (*cut.tensors, spec.score)
            try:
                trunk = _openvino(trunk_of(source, tensors), choice, options, "the forward")
            except OnnxcamError:  # an op after the layer OpenVINO cannot compile: the head keeps the score
                pass
            else:
                return SplitSession(trunk, make_session(fed, None, _head_options(options)), tensors,
                                    spec.score), None
    trunk = _openvino(trunk_model, choice, options, "the trunk before the layer")
    return SplitSession(trunk, make_session(head, None, _head_options(options)), cut.tensors), None


def time_sessions(sessions, feeds: dict, runs: int = 5) -> list[float]:
    """The fastest of `runs` runs of each session on `feeds` (seconds), interleaved after a warm-up run each, so
    that a busy moment of the machine falls on both and the fastest run shows what the session can do."""
    import time

    best = [float("inf")] * len(sessions)
    for session in sessions:
        session.run(None, feeds)
    for _ in range(runs):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


INT8_MARGIN = 0.1


def _faster_of(bf16_session, bf16: Choice, model, options, source, spec, samples):
    """auto with calibration images: the bf16 split and the int8-trunk split on OpenVINO, timed on the first
    calibration image; the faster is kept and the reason gives both times. Which wins depends on the model:
    int8 convolutions (VNNI/AMX) beat bf16 on plain convolutions (ResNet), lose on depthwise ones. int8 must win
    by INT8_MARGIN: it moves the maps several times more than bf16, and a near tie is the machine's noise (a
    timing on a busy machine once picked int8 for EfficientNet-Lite0, which is 15% slower there)."""
    choice = replace(bf16, precision="int8", try_int8=False)
    try:
        session, why = _split(model, choice, options, source, spec, samples)
    except OnnxcamError as exc:
        session, why = None, first_line(exc)
    if session is None:
        return bf16_session, replace(bf16, reason=f"{bf16.reason} (int8 not tried: {why})")
    feeds = _probe_feeds(model, spec.image, samples[0])
    t_bf16, t_int8 = time_sessions([bf16_session, session], feeds)
    times = f"{t_int8 * 1e3:.1f} ms per image with the int8 trunk against {t_bf16 * 1e3:.1f} ms with bf16"
    if t_int8 < t_bf16 * (1 - INT8_MARGIN):
        units = ", ".join(f for f in INT8_FLAGS if f in (cpu_flags() or ()))
        return session, replace(choice, engine="openvino+onnxruntime", reason=(
            f"auto: int8 trunk on OpenVINO {openvino_version()} (calibration images given; the CPU has {units}; "
            f"{times}); the head, gradient and CAM on onnxruntime fp32"))
    return bf16_session, replace(bf16, reason=f"{bf16.reason} ({times})")


def _probe_feeds(model: onnx.ModelProto, image: str, x: np.ndarray) -> dict:
    """Feeds for one timing run of the fused graph: the image and each target input's neutral value."""
    fixed = {build.TARGET: np.full(1, -1, np.int64), build.SIGN: np.ones(1, np.float32),
             build.WEIGHTS: np.zeros((1, 1), np.float32), build.SELECT: np.zeros((1, 1), bool),
             build.GROUP: np.zeros((1, 1), bool)}
    names = {i.name for i in model.graph.input}
    return {image: x, **{k: v for k, v in fixed.items() if k in names}}


def _openvino(model: onnx.ModelProto, choice: Choice, options, what: str) -> OpenVINOSession:
    session = OpenVINOSession(model, choice.precision, getattr(options, "intra_op_num_threads", 0))
    used, total = session.heavy_layers
    if total > 0 and used == 0:
        raise OnnxcamError(f"OpenVINO compiled {what} without any {choice.precision} layer ({total} "
                           f"convolution/matrix layers in f32): this CPU or OpenVINO build does not run "
                           f"{choice.precision}; use fp32")
    return session


def open_session(model: onnx.ModelProto, choice: Choice, options=None, image: str | None = None, layers=(),
                 calibration=None, input_shape=None, metadata=None, source: onnx.ModelProto | None = None,
                 spec=None):
    """The fused graph's session for a reduced-precision Choice (fp32 sessions are runtime.make_session's),
    and the Choice with its reason saying how the graph was placed. int8: onnxruntime on the int8-trunk graph
    (`calibration`: arrays or image paths, calibration_inputs). bf16/fp16: with `source` (the shape-inferred
    model) and `spec` (onnxcam.cam.build.Spec) the trunk on OpenVINO and the head's explain graph on onnxruntime
    fp32 (SplitSession) where the method and model allow it, else the whole fused graph on OpenVINO. OpenVINO's
    thread count follows the SessionOptions' intra_op_num_threads."""
    if choice.precision == "int8":
        samples = calibration_inputs(calibration, input_shape, metadata)
        return make_session(quantize_trunk(model, image, layers, samples), None, options), choice
    why = "no model to cut was given"
    if source is not None and spec is not None:
        session, why = _split(model, choice, options, source, spec)
        if session is not None:
            split = replace(choice, engine="openvino+onnxruntime", reason=(
                f"{choice.reason}; the trunk up to the layer on OpenVINO, the head, gradient and CAM on "
                f"onnxruntime fp32" + ("" if session.score is None else
                                      " (the scores from OpenVINO's forward, which runs the whole model)")))
            if choice.try_int8:
                return _faster_of(session, split, model, options, source, spec,
                                  calibration_inputs(calibration, input_shape, metadata))
            return session, split
    session = _openvino(model, choice, options, "the explain graph")
    return session, replace(choice, reason=f"{choice.reason}; the whole explain graph on OpenVINO ({why})")
