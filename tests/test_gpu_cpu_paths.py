"""The GPU-facing code paths, exercised on the CPU: device -> providers resolution (with onnxruntime's provider
list monkeypatched), `Explainer(device=)` / `.provider`, IO binding (`explain_bound`, numpy and OrtValue inputs,
results identical to `explain`), node placement from an onnxruntime profile, and the CLI's --device / providers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam import Explainer, OnnxcamError
from onnxcam.run import placement as placements, runtime
from onnxcam.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
CAT = ROOT / "models" / "cat.png"
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
CUDA_MESSAGE = ("CUDA was requested but this onnxruntime has no CUDAExecutionProvider (replace onnxruntime "
                "with onnxruntime-gpu: pip uninstall -y onnxruntime && pip install onnxruntime-gpu)")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def demo():
    return Explainer(str(MODEL), device="cpu")


def _fake_providers(monkeypatch, *names, dists=("onnxruntime",)):
    from importlib import metadata

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))

    def version(dist):
        if dist not in dists:
            raise metadata.PackageNotFoundError(dist)
        return "1.0"
    monkeypatch.setattr(metadata, "version", version)


def test_both_onnxruntime_wheels_installed_is_named(monkeypatch):
    # onnxruntime + onnxruntime-gpu share one module; the CPU build shadowing the GPU one must be explained.
    _fake_providers(monkeypatch, CPU, dists=("onnxruntime", "onnxruntime-gpu"))
    with pytest.raises(OnnxcamError, match="onnxruntime 1.0 and onnxruntime-gpu 1.0 are both installed .* "
                                           "pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                                           "onnxruntime-gpu"):
        runtime.resolve_device("cuda")


def test_without_onnxruntime_the_cli_says_what_to_install(tmp_path):
    # A blocked import stands in for an environment installed without the [cpu] / [gpu] extra.
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from onnxcam.cli import main\n"
            f"sys.exit(main(['explain', {str(MODEL)!r}, {str(CAT)!r}, '-o', {str(tmp_path / 'o.png')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == ("onnxcam: error: onnxcam needs onnxruntime: pip install 'onnxcam[cpu]' "
                                     "(or 'onnxcam[gpu]' for onnxruntime-gpu)")
    assert not (tmp_path / "o.png").exists()
    ops = subprocess.run([sys.executable, "-c", "import sys; sys.modules['onnxruntime'] = None\n"
                          "from onnxcam.cli import main; sys.exit(main(['ops']))"], capture_output=True, text=True)
    assert ops.returncode == 0 and "Conv" in ops.stdout.split()


# -- device resolution --------------------------------------------------------------------------
def test_resolve_device_with_and_without_gpu_providers(monkeypatch):
    _fake_providers(monkeypatch, CPU)
    assert runtime.resolve_device("cpu") == [CPU] and runtime.resolve_device(None) == [CPU]
    assert runtime.resolve_device("auto") == [CPU]
    with pytest.raises(OnnxcamError) as err:
        runtime.resolve_device("cuda")
    assert str(err.value) == CUDA_MESSAGE
    with pytest.raises(OnnxcamError, match="TensorRT was requested"):
        runtime.resolve_device("tensorrt")
    with pytest.raises(OnnxcamError, match="unknown device 'tpu'"):
        runtime.resolve_device("tpu")

    _fake_providers(monkeypatch, CUDA, CPU)
    assert runtime.resolve_device("auto") == [CUDA, CPU]
    assert runtime.resolve_device("CUDA") == [CUDA, CPU]
    assert runtime.resolve_device("cpu") == [CPU]
    with pytest.raises(OnnxcamError, match="TensorRT was requested"):
        runtime.resolve_device("tensorrt")

    _fake_providers(monkeypatch, TRT, CUDA, CPU)
    assert runtime.resolve_device("tensorrt") == [TRT, CUDA, CPU]
    assert runtime.resolve_device("auto") == [CUDA, CPU]  # TensorRT only when asked for


def test_explainer_device_and_provider(demo, monkeypatch):
    assert demo.provider == CPU and demo.providers == [CPU]
    assert Explainer(str(MODEL)).provider == CPU  # neither: the CPU
    with pytest.raises(OnnxcamError) as err:
        Explainer(str(MODEL), device="cuda")
    assert str(err.value) == CUDA_MESSAGE
    # providers wins over device: no CUDA lookup at all
    assert Explainer(str(MODEL), providers=[CPU], device="cuda").provider == CPU
    # auto falls back to the CPU on this build
    _fake_providers(monkeypatch, CPU)
    assert Explainer(str(MODEL), device="auto").provider == CPU


def test_session_device_of_a_cpu_session(demo):
    assert runtime.session_device(demo.session) == ("cpu", 0)


# -- IO binding ---------------------------------------------------------------------------------
def _batch(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def _same(a, b):
    for field in ("maps", "heatmaps", "scores", "targets"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert len(a.maps_per_layer) == len(b.maps_per_layer)


def test_explain_bound_numpy_matches_run_path(demo):
    x = _batch()
    _same(demo.explain(x, [285, 504]), demo.explain_bound(x, [285, 504]))
    _same(demo.explain(x), demo.explain_bound(x))
    _same(demo.explain(x, 285, counterfactual=True), demo.explain_bound(x, 285, counterfactual=True))


def test_explain_bound_ortvalues_stay_on_the_device(demo):
    x = _batch(seed=1)
    ref = demo.explain(x, [3, 7])
    xv = ort.OrtValue.ortvalue_from_numpy(x, "cpu", 0)
    tv = ort.OrtValue.ortvalue_from_numpy(np.array([3, 7], np.int64), "cpu", 0)
    outs = demo.explain_bound({"image": xv}, tv, to_numpy=False)
    assert all(isinstance(v, ort.OrtValue) and v.device_name() == "cpu" for v in outs.values())
    assert np.array_equal(outs["onnxcam_heatmaps"].numpy(), ref.heatmaps)
    assert np.array_equal(outs["onnxcam_maps"].numpy(), ref.maps)
    assert np.array_equal(outs["onnxcam_targets"].numpy(), [3, 7])
    # a device-resident OrtValue input, numpy out: same Explanation as explain()
    _same(ref, demo.explain_bound(xv, [3, 7]))
    # the heatmap OrtValue can be handed to torch without a copy (docs/gpu.md)
    torch = pytest.importorskip("torch")
    heat = torch.from_dlpack(outs["onnxcam_heatmaps"])
    assert heat.data_ptr() == outs["onnxcam_heatmaps"].data_ptr() and np.array_equal(heat.numpy(), ref.heatmaps)


def test_explain_bound_checks_its_inputs(demo):
    x = _batch(1)
    with pytest.raises(OnnxcamError, match="dtype float64"):
        demo.explain_bound(ort.OrtValue.ortvalue_from_numpy(x.astype(np.float64), "cpu", 0))
    with pytest.raises(OnnxcamError, match="expects rank 4"):
        demo.explain_bound(ort.OrtValue.ortvalue_from_numpy(x[0], "cpu", 0))
    with pytest.raises(OnnxcamError, match="int64 OrtValue of shape"):
        demo.explain_bound(x, ort.OrtValue.ortvalue_from_numpy(np.array([1, 2], np.int64), "cpu", 0))
    with pytest.raises(OnnxcamError, match="out of range"):
        demo.explain_bound(x, 5000)
    with pytest.raises(OnnxcamError, match="unknown input"):
        demo.explain_bound({"nope": x})


def _conv_pool_model() -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Conv (stride 2) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (dynamic batch).
    The strided conv's gradient is a ConvTranspose; the stride-1 conv's a Conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n) for n, s in
             (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (6, 4, 3, 3)), ("b2", (6,)), ("wf", (5, 6)), ("bf", (5,)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "convpool", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# -- node placement -----------------------------------------------------------------------------
def test_placement_of_the_demo_explain_graph_is_all_cpu(demo):
    placement = placements.node_placement(demo)
    assert list(placement) == [CPU]
    ops = {op for _, op in placement[CPU]}
    # the seed, the backward and the CAM arithmetic are there, not only the forward (Grad-CAM's weights behind
    # the demo's global pool are the pooled gradient itself: no ReduceMean; the channel sum is a ReduceSum)
    assert {"ArgMax", "If", "ReduceSum", "Resize"} <= ops, ops
    assert len(placement[CPU]) > 50


def test_placement_lists_the_gradient_ops_of_guided_backprop():
    model = _conv_pool_model()
    ex = Explainer(model, method="guided-backprop", device="cpu")
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    _same(ex.explain(x), ex.explain_bound(x))
    assert np.array_equal(ex.explain(x).guided, ex.explain_bound(x).guided)
    placement = placements.node_placement(ex)
    assert list(placement) == [CPU]
    ops = {op for _, op in placement[CPU]}
    assert {"ConvTranspose", "ScatterElements"} <= ops, ops
    # the same listing from a ModelProto and from a plain session of the explain graph
    assert {op for _, op in placements.node_placement(ex.model)[CPU]} == ops
    plain = ort.InferenceSession(ex.model.SerializeToString(), providers=[CPU])
    assert {op for _, op in placements.node_placement(plain)[CPU]} == ops
    # ... and of the plain model (no onnxcam inputs)
    assert "ConvTranspose" not in {op for _, op in placements.node_placement(model)[CPU]}


def test_placement_errors(monkeypatch):
    with pytest.raises(OnnxcamError, match="not available"):
        placements.node_placement(_conv_pool_model(), providers=[CUDA])
    with pytest.raises(OnnxcamError, match="node_placement takes"):
        placements.node_placement(42)


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_explain_prints_the_provider(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT, "-o", tmp_path / "a.png", "--device", "cpu")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert "Egyptian cat" in lines[0] and lines[0].endswith(f"[{CPU}]") and len(lines) == 6
    code, stdout, stderr = run_cli(capsys, "explain", MODEL, CAT, "-o", tmp_path / "b.png", "--json",
                                   "--device", "auto")
    assert code == 0, stderr
    assert json.loads(stdout)["provider"] == CPU


@pytest.mark.parametrize("args", [
    ("explain", MODEL, CAT, "--device", "cuda"),
    ("evaluate", MODEL, ROOT / "models", "--device", "cuda"),
    ("serve", MODEL, "--device", "cuda", "--port", "0"),
    ("providers", MODEL, "--device", "cuda"),
])
def test_cli_cuda_without_cuda_is_one_line(args, tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastapi") if args[0] == "serve" else None
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2, (stdout, stderr)
    assert stderr.strip().splitlines() == [f"onnxcam: error: {CUDA_MESSAGE}"]


def test_cli_device_option_is_validated(capsys):
    code, _, stderr = run_cli(capsys, "explain", MODEL, CAT, "--device", "tpu")
    assert code == 2 and "tpu" in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_providers_counts(capsys):
    code, stdout, stderr = run_cli(capsys, "providers", MODEL)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert f"[{CPU}]" in lines[0] and lines[1].strip().startswith(f"{CPU}:")
    assert "Conv" in lines[2] and "fallback" not in stdout  # CPU requested: nothing to flag
    code, stdout, stderr = run_cli(capsys, "providers", MODEL, "--json")
    doc = json.loads(stdout)
    assert list(doc["placement"]) == [CPU] and doc["cpu_fallback"] == [] and doc["provider"] == CPU


def test_cli_providers_flags_cpu_fallback(capsys, monkeypatch):
    """A GPU session whose nodes land on the CPU: simulated by faking the session's providers."""
    import onnxcam.run.explainer as ex_mod

    real = ex_mod.Explainer.__init__

    def fake_init(self, *a, **k):
        k.pop("device", None)
        real(self, *a, **k)
        self.session = _FakeSession(self.session)

    monkeypatch.setattr(ex_mod.Explainer, "__init__", fake_init)
    monkeypatch.setattr(placements, "node_placement",
                        lambda e: {CUDA: [("conv", "Conv")], CPU: [("shape_1", "Shape"), ("scatter", "ScatterND")]})
    code, stdout, stderr = run_cli(capsys, "providers", MODEL, "--device", "cuda")
    assert code == 0, stderr
    assert "CPU fallback: 2 node(s)" in stdout and "! ScatterND" in stdout


class _FakeSession:
    def __init__(self, s):
        self._s = s

    def get_providers(self):
        return [CUDA, CPU]

    def __getattr__(self, name):
        return getattr(self._s, name)


def test_bench_gpu_parses_its_options():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--device" in result.stdout and "--batches" in result.stdout


def test_explicit_cuda_that_cannot_start_is_an_error_not_a_cpu_run(monkeypatch, capfd):
    # What onnxruntime-gpu 1.31.1 does on a machine without the CUDA 13 libraries (seen in a venv here): it lists
    # CUDAExecutionProvider, logs the loader error on fd 2 and gives a CPU session. Replayed with the CPU build.
    real = ort.InferenceSession
    log = ("\x1b[1;31m2026-11-27 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] Failed to load "
           "library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object "
           "file: No such file or directory\n\x1b[m\x1b[0;93m2026-11-27 [W:onnxruntime:Default, "
           "onnxruntime_pybind_state.cc:1295 CreateExecutionProviderFactoryInstance] Failed to create "
           "CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*. Please install all dependencies\x1b[m\n")

    def fake_session(model, options=None, providers=None):
        import os
        os.write(2, log.encode())
        return real(model, options, providers=[CPU])

    _fake_providers(monkeypatch, CUDA, CPU)
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(OnnxcamError) as err:
        Explainer(_conv_pool_model(), device="cuda")
    assert str(err.value) == (
        "CUDAExecutionProvider was requested but onnxruntime could not start it: libcublasLt.so.13: cannot open "
        "shared object file: No such file or directory; Require cuDNN 9.* and CUDA 13.* (--device auto falls "
        "back to the CPU)")
    assert capfd.readouterr().err == ""  # the log became the error, and fd 2 is back
    import os
    os.write(2, b"fd 2 restored\n")
    assert capfd.readouterr().err == "fd 2 restored\n"
    # auto (and explicit provider lists) keep onnxruntime's fallback
    assert Explainer(_conv_pool_model(), device="auto").provider == CPU
    assert "libcublasLt" in capfd.readouterr().err
