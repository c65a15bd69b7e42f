"""Hostile models, images and paths (issue #13): each case runs in a child process under a hard memory cap
(RLIMIT_AS) and a timeout, and must end in one clear line (CLI: exit 2, `onnxcam: error: ...` on stderr, no
traceback; API: OnnxcamError) or a correct result. Inputs are never changed (sha256 before/after), and no file
outside the model's folder is read: a secret placed next to the folder must not reach a score.

Fixtures are generated in tmp_path: a tiny Conv-ReLU-GAP-Gemm classifier and variants of it."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam

MEM_MB = 1536
TIMEOUT = 60
# A distinctive float32 payload: if it were ever read as weights, the scores would be multiples of it.
SECRET_VALUE = 31337.0


# -- fixtures -------------------------------------------------------------------------------------------------
def tiny_cnn(size=8, classes=4, c=8, seed=0, head_bias=None) -> onnx.ModelProto:
    """x (N, 3, size, size) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y (N, classes)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = rng.standard_normal((classes, c)).astype(np.float32)
    b2 = np.zeros(classes, np.float32) if head_bias is None else np.asarray(head_bias, np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["f"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["fl"], name="flat"),
             helper.make_node("Gemm", ["fl", "W2", "b2"], ["y"], transB=1, name="head")]
    dims = ["N", 3, size, size] if size else ["N", 3, "H", "W"]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
                          initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                                       numpy_helper.from_array(b2, "b2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def externalize(model: onnx.ModelProto, name: str, location: str) -> onnx.ModelProto:
    """`model` with initializer `name` pointing at external data `location` (its bytes are not written)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(t for t in m.graph.initializer if t.name == name)
    length = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value=str(length))
    return m


def secret_bytes(n: int) -> bytes:
    return np.full(n // 4, SECRET_VALUE, np.float32).tobytes()


def png(path: Path, size=(8, 8)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


def digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str]) -> None:
    for path, digest in before.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, f"{path} was changed"


# -- children -------------------------------------------------------------------------------------------------
def _cap(mb: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))
    return limit


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli(*args, cwd: Path, mem_mb: int = MEM_MB, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcam", *map(str, args)], cwd=cwd, preexec_fn=_cap(mem_mb),
                          capture_output=True, text=True, timeout=timeout, env=_env(), stdin=subprocess.DEVNULL)


def api(code: str, cwd: Path, mem_mb: int = MEM_MB, timeout: int = TIMEOUT) -> dict:
    """Runs `code` in a child; it calls `case(name, fn)` for each check. Returns {name: ("ok", value) or
    ("error", message)}, plus "opened": every path Python opened (an audit hook)."""
    prelude = textwrap.dedent("""
        import json, sys, warnings
        import numpy as np, onnx, onnxcam
        from onnxcam.errors import OnnxcamError
        opened = []
        sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" and args else None)
        results = {}
        def case(name, fn):
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    value = fn()
                results[name] = ["ok", value, [str(x.message) for x in w]]
            except OnnxcamError as exc:
                results[name] = ["error", str(exc)]
    """)
    epilogue = "\nresults['opened'] = opened\nprint('RESULTS' + json.dumps(results))\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd=cwd,
                          preexec_fn=_cap(mem_mb), capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("onnxcam: error: "), proc.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# -- 4: external data ------------------------------------------------------------------------------------------
def test_bytes_and_protos_read_no_external_data_without_base_dir(tmp_path):
    """Before: Explainer(bytes/ModelProto) resolved `location` against the working directory and returned the
    secret file's bytes as weights."""
    run = tmp_path / "a" / "b"
    run.mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(secret_bytes(4 * 8 * 4))
    model = externalize(tiny_cnn(), "W2", "../../secret.bin")
    save(model, tmp_path / "m.onnx")
    before = digests(tmp_path)
    r = api(f"""
        m = onnx.load({str(tmp_path / 'm.onnx')!r}, load_external_data=False)
        x = np.ones((1, 3, 8, 8), np.float32)
        case("proto", lambda: onnxcam.Explainer(m).explain(x).scores.tolist())
        case("bytes", lambda: onnxcam.Explainer(m.SerializeToString()).explain(x).scores.tolist())
        case("base_dir", lambda: onnxcam.Explainer(m, base_dir=".").explain(x).scores.tolist())
    """, cwd=run)
    assert r["proto"][0] == "error" and "base_dir" in r["proto"][1]
    assert r["bytes"][0] == "error" and "base_dir" in r["bytes"][1]
    assert r["base_dir"][0] == "error" and "'..'" in r["base_dir"][1]
    assert str(secret) not in r["opened"] and not any(p.endswith("secret.bin") for p in r["opened"])
    assert_unchanged(before)


def _escapes(tmp_path: Path) -> dict[str, str]:
    """Model folder tmp/m/ and a secret outside it; location values that reach the secret."""
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(secret_bytes(4 * 8 * 4))
    os.symlink(secret, folder / "soft.bin")
    os.symlink(tmp_path, folder / "sub" / "up")
    os.link(secret, folder / "hard.bin")
    return {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "soft.bin",
            "symlinked_dir": "sub/up/secret.bin", "hardlink": "hard.bin", "inner_dotdot": "sub/../../secret.bin"}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked_dir", "hardlink"])
def test_model_file_external_data_stays_in_its_folder(tmp_path, kind):
    location = _escapes(tmp_path)[kind]
    model = save(externalize(tiny_cnn(), "W2", location), tmp_path / "m" / "model.onnx")
    before = digests(tmp_path)
    proc = cli("explain", model, png(tmp_path / "cat.png"), "-o", tmp_path / "out", cwd=tmp_path / "m")
    line = assert_one_line_error(proc, "W2", "external data")
    assert str(SECRET_VALUE).split(".")[0] not in proc.stdout + proc.stderr
    assert ("hard links" in line) if kind == "hardlink" else True
    assert_unchanged(before)


def test_location_checks_api_and_good_external_data(tmp_path):
    """Every escaping location is refused with base_dir too; one inside the folder gives the inline model's
    scores, from a path and from bytes + base_dir."""
    escapes = _escapes(tmp_path)
    folder = tmp_path / "m"
    ref = tiny_cnn()
    w2 = next(t for t in ref.graph.initializer if t.name == "W2")
    (folder / "w2.bin").write_bytes(w2.raw_data)
    good = save(externalize(ref, "W2", "w2.bin"), folder / "good.onnx")
    protos = {k: externalize(ref, "W2", v).SerializeToString().hex() for k, v in escapes.items()}
    before = digests(tmp_path)
    r = api(f"""
        x = np.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
        for kind, hexed in {protos!r}.items():
            case(kind, lambda: onnxcam.Explainer(bytes.fromhex(hexed), base_dir={str(folder)!r}).explain(x).scores.tolist())
        case("path", lambda: onnxcam.Explainer({str(good)!r}).explain(x).scores.tolist())
        raw = open({str(good)!r}, "rb").read()
        case("bytes", lambda: onnxcam.Explainer(raw, base_dir={str(folder)!r}).explain(x).scores.tolist())
    """, cwd=tmp_path)
    for kind in escapes:
        assert r[kind][0] == "error" and "W2" in r[kind][1], (kind, r[kind])
    x = np.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    want = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for kind in ("path", "bytes"):
        assert r[kind][0] == "ok", r[kind]
        np.testing.assert_allclose(np.array(r[kind][1]), want, rtol=1e-5, atol=1e-5)
    assert not any(p.endswith("secret.bin") for p in r["opened"])
    assert_unchanged(before)


# -- 5: cycles -------------------------------------------------------------------------------------------------
def cyclic() -> onnx.ModelProto:
    """relu reads add_cycle's output, which reads ident_cycle's, which reads relu's: a loop."""
    m = tiny_cnn()
    conv, relu, *rest = list(m.graph.node)
    relu.input[0] = "fa"
    add = helper.make_node("Add", ["f", "fb"], ["fa"], name="add_cycle")
    ident = helper.make_node("Identity", ["r"], ["fb"], name="ident_cycle")
    del m.graph.node[:]
    m.graph.node.extend([conv, add, relu, ident, *rest])
    return m


@pytest.mark.parametrize("command", ["explain", "layers", "serve"])
def test_cyclic_graph_is_refused_naming_the_cycle(tmp_path, command):
    """Before: explain, layers and serve looped forever in the graph walks."""
    model = save(cyclic(), tmp_path / "cyclic.onnx")
    args = {"explain": [png(tmp_path / "cat.png"), "-o", tmp_path / "out"], "layers": [],
            "serve": ["--port", "0"]}[command]
    proc = cli(command, model, *args, cwd=tmp_path, timeout=30)
    assert_one_line_error(proc, "cycle", "'relu'", "'add_cycle'", "'ident_cycle'")


def test_cyclic_graph_api(tmp_path):
    r = api(f"""
        m = onnx.load({str(save(cyclic(), tmp_path / 'c.onnx'))!r})
        case("explainer", lambda: onnxcam.Explainer(m).layer)
        rev = onnx.load({str(save(tiny_cnn(), tmp_path / 't.onnx'))!r})
        nodes = list(rev.graph.node)[::-1]
        del rev.graph.node[:]
        rev.graph.node.extend(nodes)
        case("misordered", lambda: onnxcam.Explainer(rev).layer)
    """, cwd=tmp_path, timeout=30)
    assert r["explainer"][0] == "error" and "cycle" in r["explainer"][1] and "'ident_cycle'" in r["explainer"][1]
    assert r["misordered"][0] == "error" and "topological order" in r["misordered"][1]


# -- 6: outputs over inputs -------------------------------------------------------------------------------------
def _dataset(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for i in range(2):
        png(d / f"im{i}.png")
    (d / "data.csv").write_text("image,label,x0,y0,x1,y1\nim0.png,1,0,0,4,4\nim1.png,2,2,2,8,8\n")
    (d / "annotations.json").write_text(json.dumps({"im0.png": {"label": 1, "boxes": [[0, 0, 4, 4]]}}))
    return d


@pytest.mark.parametrize("case", ["evaluate_csv", "evaluate_annotations", "evaluate_hardlink", "export_weights",
                                  "export_hardlink", "export_triton", "explain_weights"])
def test_outputs_never_overwrite_inputs(tmp_path, case):
    """Before: evaluate -o data.csv / DIR/annotations.json and export -o <the model's external data> wrote over
    them (the model then loaded garbage weights with no error)."""
    d = _dataset(tmp_path)
    ref = tiny_cnn()
    w2 = next(t for t in ref.graph.initializer if t.name == "W2")
    (tmp_path / "weights.data").write_bytes(w2.raw_data)
    model = save(externalize(ref, "W2", "weights.data"), tmp_path / "m.onnx")
    os.link(d / "data.csv", tmp_path / "link.csv")
    os.link(model, tmp_path / "link.onnx")
    args = {
        "evaluate_csv": ["evaluate", model, d / "data.csv", "-o", d / "data.csv"],
        "evaluate_annotations": ["evaluate", model, d, "-o", d / "annotations.json"],
        "evaluate_hardlink": ["evaluate", model, d / "data.csv", "-o", tmp_path / "link.csv"],
        "export_weights": ["export", model, "-o", tmp_path / "weights.data"],
        "export_hardlink": ["export", model, "-o", tmp_path / "link.onnx"],
        "export_triton": ["export", model, "-o", tmp_path / "e.onnx", "--triton", tmp_path / "repo",
                          "--triton-name", "x"],
        "explain_weights": ["explain", model, d / "im0.png", "-o", tmp_path / "weights.data.png"],
    }[case]
    if case == "export_triton":  # the repository's model file is a link to the model's weights
        (tmp_path / "repo" / "x" / "1").mkdir(parents=True)
        os.symlink(tmp_path / "weights.data", tmp_path / "repo" / "x" / "1" / "model.onnx.data")
    if case == "explain_weights":  # the overlay path is a symlink to the weights
        os.symlink(tmp_path / "weights.data", tmp_path / "weights.data.png")
    before = digests(tmp_path)
    proc = cli(*args, cwd=tmp_path)
    assert_one_line_error(proc, "overwrite")
    assert_unchanged(before)


# -- 7: non-finite numbers --------------------------------------------------------------------------------------
def test_non_finite_inputs_scores_and_ablation(tmp_path):
    """Before: NaN/Inf inputs gave all-NaN heatmaps and target 0; a NaN bias gave NaN scores silently;
    Ablation-CAM divided by a zero score."""
    good = save(tiny_cnn(), tmp_path / "good.onnx")
    nan_bias = save(tiny_cnn(head_bias=[0, np.nan, 0, 0]), tmp_path / "nan.onnx")
    # Class 3's row of W2 zeroed: its score is exactly 0, whatever the input.
    zero = tiny_cnn()
    w2 = next(t for t in zero.graph.initializer if t.name == "W2")
    arr = numpy_helper.to_array(w2).copy()
    arr[3] = 0
    w2.CopyFrom(numpy_helper.from_array(arr, "W2"))
    zero = save(zero, tmp_path / "zero.onnx")
    r = api(f"""
        ex = onnxcam.Explainer({str(good)!r})
        x = np.ones((2, 3, 8, 8), np.float32)
        bad = x.copy(); bad[1, 0, 0, 0] = np.nan
        case("nan", lambda: ex.explain(bad).targets.tolist())
        inf = x.copy(); inf[0, 2, 3, 3] = -np.inf
        case("inf", lambda: ex.explain(inf).targets.tolist())
        case("overflow", lambda: ex.explain(np.full((1, 3, 8, 8), 1e39)).targets.tolist())
        case("finite", lambda: ex.explain(x.astype(np.float64)).targets.tolist())
        case("nan_model", lambda: onnxcam.Explainer({str(nan_bias)!r}).explain(x).targets.tolist())
        abl = onnxcam.Explainer({str(zero)!r}, method="ablationcam")
        case("ablation", lambda: [bool(np.isfinite(abl.explain(x, targets=3).heatmaps).all()),
                                  float(abl.explain(x, targets=3).maps.max())])
    """, cwd=tmp_path)
    assert r["nan"][0] == "error" and "input 'x'" in r["nan"][1] and "NaN" in r["nan"][1] and "sample 1" in r["nan"][1]
    assert r["inf"][0] == "error" and "Inf" in r["inf"][1] and "sample 0" in r["inf"][1]
    assert r["overflow"][0] == "error" and "Inf" in r["overflow"][1]
    assert r["finite"][0] == "ok"
    assert r["nan_model"][0] == "error" and "output 'y'" in r["nan_model"][1]
    assert r["ablation"][0] == "ok" and r["ablation"][1] == [True, 0.0], r["ablation"]
    assert any("exactly 0" in w for w in r["ablation"][2]), r["ablation"]


def with_metadata(model: onnx.ModelProto, **props: str) -> onnx.ModelProto:
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    return model


@pytest.mark.parametrize("case", ["scale", "std", "mean_nan"])
def test_preprocessing_values_are_validated(tmp_path, case):
    """Before: metadata scale 1e300 or --std 1e-300 gave NaN scores with exit status 0."""
    extra = []
    if case == "scale":
        model = with_metadata(tiny_cnn(), **{"onnxcam.preprocess": json.dumps({"scale": 1e300})})
    elif case == "std":
        model, extra = tiny_cnn(), ["--std", "1e-300"]
    else:
        model = with_metadata(tiny_cnn(), **{"onnxcam.preprocess": '{"mean": [NaN, 0, 0]}'})
    proc = cli("explain", save(model, tmp_path / "m.onnx"), png(tmp_path / "cat.png"), "-o", tmp_path / "o",
               *extra, cwd=tmp_path)
    assert_one_line_error(proc, {"scale": "float32 range", "std": "float32 range", "mean_nan": "finite"}[case])


# -- 8: clear messages instead of internal errors, hangs and memory blow-ups -----------------------------------
def big_png(path: Path, side: int = 12000) -> Path:
    """A valid greyscale PNG of side x side (144 Mpx at 12000) that compresses to ~150 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    row = bytes(side + 1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


CASES_8 = ["nested_metadata", "nested_metadata_serve", "size_1e400", "size_flag", "dims_1e9", "big_image",
           "empty_model", "fifo_model", "fifo_image", "devzero_model", "devzero_image", "fifo_npy", "fifo_data",
           "devzero_labels", "score_rank1"]


@pytest.mark.parametrize("case", CASES_8)
def test_clear_errors(tmp_path, case):
    image = png(tmp_path / "cat.png")
    out = ["-o", tmp_path / "out"]
    model = tmp_path / "m.onnx"
    command = "explain"
    expect = []
    if case.startswith("nested_metadata"):
        save(with_metadata(tiny_cnn(), **{"onnxcam.labels": "[" * 200000 + "]" * 200000}), model)
        expect = ["nested too deeply"]
        if case.endswith("serve"):
            command, image, out = "serve", None, ["--port", "0"]
    elif case == "size_1e400":
        save(with_metadata(tiny_cnn(size=0), **{"onnxcam.preprocess": '{"size": [1e400, 8]}'}), model)
        expect = ["invalid size"]
    elif case == "size_flag":
        save(tiny_cnn(size=0), model)
        out += ["--size", "100000"]
        expect = ["too large"]
    elif case == "dims_1e9":
        m = tiny_cnn()
        for axis in (2, 3):
            m.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = 10 ** 9
        save(m, model)
        expect = ["too large"]
    elif case == "big_image":
        save(tiny_cnn(), model)
        image = big_png(tmp_path / "big.png")
        expect = ["12000x12000", "limit"]
    elif case == "empty_model":
        model.write_bytes(b"")
        expect = ["empty"]
    elif case == "fifo_model":
        os.mkfifo(model)
        expect = ["not a regular file"]
    elif case == "fifo_image":
        save(tiny_cnn(), model)
        image = tmp_path / "pipe.png"
        os.mkfifo(image)
        expect = ["not a regular file"]
    elif case == "devzero_model":
        model = Path("/dev/zero")
        expect = ["not a regular file"]
    elif case == "devzero_image":
        save(tiny_cnn(), model)
        image = Path("/dev/zero")
        expect = ["not a regular file"]
    elif case == "fifo_npy":
        save(tiny_cnn(), model)
        image = tmp_path / "pipe.npy"
        os.mkfifo(image)
        expect = ["not a regular file"]
    elif case == "fifo_data":
        save(tiny_cnn(), model)
        command, image, out = "evaluate", tmp_path / "pipe", []
        os.mkfifo(image)
        expect = ["not a regular file"]
    elif case == "devzero_labels":
        save(tiny_cnn(), model)
        out += ["--labels", "/dev/zero"]
        expect = ["not a regular file"]
    elif case == "score_rank1":
        m = tiny_cnn()
        m.graph.node.append(helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0, name="sum"))
        m.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        del m.graph.output[:]
        m.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"]))
        save(m, model)
    before = digests(tmp_path)
    args = [command, model, *([image] if image is not None else []), *out]
    proc = cli(*args, cwd=tmp_path, mem_mb=1024 if case == "big_image" else MEM_MB, timeout=30)
    if case == "score_rank1":  # a scalar score per sample is explainable: a correct result, exit 0
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out" / "cat_gradcam.png").is_file()
    else:
        assert_one_line_error(proc, *expect)
    assert_unchanged(before)


# -- 9: external-data models stay out of the proto --------------------------------------------------------------
def wide_model(folder: Path, classes: int = 3072, c: int = 64, h: int = 8) -> tuple[Path, onnx.ModelProto]:
    """A conv net whose Gemm head holds classes x (c*h*h) float32 weights: 50 MB at the defaults, saved as
    external data next to the model."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((classes, c * h * h)) * 0.01).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["f"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["fl"], name="flat"),
             helper.make_node("Gemm", ["fl", "W2"], ["y"], transB=1, name="head")]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, h, h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
                          initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / "wide.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="wide.onnx.data", size_threshold=1024)
    return path, m


def test_external_weights_are_mapped_not_inlined_and_exported_alongside(tmp_path, monkeypatch):
    """Before: the weights were inlined into the proto and serialised for onnxruntime (a 2.4 GB model failed
    with "Failed to serialize proto" after 14.5 GB); export wrote one file."""
    from onnxcam.run import runtime
    from onnxcam.cli import main

    folder = tmp_path / "m"
    folder.mkdir()
    path, inline = wide_model(folder)
    before = digests(tmp_path)
    ex = onnxcam.Explainer(path)
    # The 50 MB of weights stay on disk: the fused graph handed to onnxruntime is a few kB of proto.
    assert ex.model.ByteSize() < 1 << 20
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    r = ex.explain(x)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(r.scores, want, rtol=1e-4, atol=1e-4)
    assert np.isfinite(r.heatmaps).all() and r.heatmaps.max() > 0
    # onnxruntime < 1.21 cannot be told the folder of a model from memory: the weights go over as OrtValues.
    monkeypatch.setattr(runtime, "_EXTERNAL_FOLDER_OPTION", False)
    np.testing.assert_allclose(onnxcam.Explainer(path).explain(x).scores, want, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()

    out = tmp_path / "export" / "wide_cam.onnx"
    out.parent.mkdir()
    assert main(["export", str(path), "-o", str(out)]) == 0
    data = out.with_name(out.name + ".data")
    assert data.is_file() and data.stat().st_size >= 3072 * 4096 * 4 and out.stat().st_size < 1 << 20
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    scores, heat = s.run(["y", "heatmap"], {"x": x})
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(heat, r.heatmaps, atol=1e-4)
    assert_unchanged(before)
