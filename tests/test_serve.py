"""`onnxcam serve` end to end: the real server (`python -m onnxcam serve` in a subprocess on a loopback port),
driven over HTTP with httpx and raw sockets."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
for _module in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module)

import onnxcam  # noqa: E402
from onnxcam import cli  # noqa: E402
from onnxcam.images import preprocess
from onnxcam.serve import Batcher  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
CAT = ROOT / "models" / "cat.png"
NAME = "efficientnet_lite0"
V1 = f"/v1/models/{NAME}"
V2 = f"/v2/models/{NAME}"
MAX_BODY = 8 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m onnxcam serve MODEL ...` on a free loopback port; output goes to a log file."""

    def __init__(self, folder: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "onnxcam", "serve", str(MODEL), "--port", str(self.port),
                                      *args], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server not ready after 60 s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--max-queue", "8", "--max-body-mb", "8",
               "--batch-wait-ms", "20")
    yield s
    assert s.stop() in (0, -signal.SIGTERM), s.log()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def explainer():
    return onnxcam.Explainer(str(MODEL))


@pytest.fixture(scope="module")
def cat_b64() -> str:
    return base64.b64encode(CAT.read_bytes()).decode()


@pytest.fixture(scope="module")
def cat_x(explainer) -> np.ndarray:
    return preprocess.to_tensor(preprocess.load_image(CAT), explainer.preprocessing())


def v2_body(x: np.ndarray, targets=None, **extra) -> dict:
    inputs = [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    if targets is not None:
        inputs.append({"name": "target", "datatype": "INT64", "shape": [len(targets)], "data": list(targets)})
    return {"inputs": inputs, **extra}


def v2_outputs(response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def metric(source, name: str, labels: str = "") -> float:
    """A sample from /metrics; `source`: a client, or the text of one /metrics answer."""
    text = source if isinstance(source, str) else source.get("/metrics").text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)\n"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def assert_healthy(client, cat_b64):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    r = client.post(f"{V1}:predict", json={"instances": [cat_b64]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["class"] == 285
    assert 'status="500"' not in client.get("/metrics").text


def raw_exchange(port: int, data: bytes, read: bool = True) -> bytes:
    """Sends raw bytes; returns one HTTP response (headers + Content-Length body), or b"" with read=False
    (the socket is closed right after sending: a client that went away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        if not read:
            return b""
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < _response_length(reply):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
        return reply


def _response_length(reply: bytes) -> int:
    head, _, _ = reply.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length: *(\d+)", head)
    return len(head) + 4 + (int(m.group(1)) if m else 0)


# --------------------------------------------------------------------------- the protocols

def test_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "onnxcam"
    meta = client.get(V2).json()
    assert meta["name"] == NAME
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    assert meta["inputs"][1]["name"] == "target" and meta["inputs"][1]["datatype"] == "INT64"
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "scores": [-1, 1000], "heatmap": [-1, 224, 224], "class": [-1]}
    assert client.get(f"{V2}/ready").json()["ready"] is True
    assert client.get("/v1/models").json() == {"models": [NAME]}
    assert client.get(V1).json() == {"name": NAME, "ready": True}


def test_v1_predict_cat_png(client, cat_b64):
    wrapped = base64.encodebytes(CAT.read_bytes()).decode()  # 76-character lines
    for instance in (cat_b64, {"b64": cat_b64}, "data:image/png;base64," + cat_b64, wrapped):
        r = client.post(f"{V1}:predict", json={"instances": [instance]})
        assert r.status_code == 200, r.text
        (p,) = r.json()["predictions"]
        assert (p["class"], p["label"]) == (285, "Egyptian cat")
        assert len(p["scores"]) == 1000 and 0.5 < p["probability"] < 1
    jpeg = io.BytesIO()
    Image.open(CAT).convert("RGB").save(jpeg, format="JPEG", quality=95)
    r = client.post(f"{V1}:predict", json={"instances": [base64.b64encode(jpeg.getvalue()).decode()]})
    assert r.json()["predictions"][0]["class"] == 285


def test_v1_explain_matches_explainer(client, explainer, cat_b64, cat_x):
    r = client.post(f"{V1}:explain", json={"instances": [cat_b64, {"b64": cat_b64, "target": "coffee mug"}],
                                          "overlay": True})
    assert r.status_code == 200, r.text
    cat, mug = r.json()["explanations"]
    assert (cat["class"], cat["label"], mug["class"], mug["label"]) == (285, "Egyptian cat", 504, "coffee mug")
    expected = explainer.explain(np.concatenate([cat_x, cat_x]), [285, 504])
    for e, want, score in zip((cat, mug), expected.heatmaps, expected.scores[:, [285, 504]].diagonal()):
        np.testing.assert_allclose(np.asarray(e["heatmap"]), want, atol=1e-4)  # rounded to 4 decimals
        assert e["score"] == pytest.approx(float(score), abs=1e-4)
        overlay = Image.open(io.BytesIO(base64.b64decode(e["overlay"])))
        assert overlay.format == "PNG" and overlay.size == Image.open(CAT).size


def test_v1_array_instances(client, explainer, cat_x):
    data = cat_x[0].tolist()
    r = client.post(f"{V1}:explain", json={"instances": [data, {"data": data, "target": 281, "overlay": True}]})
    assert r.status_code == 200, r.text
    top, tabby = r.json()["explanations"]
    assert (top["class"], tabby["class"], tabby["label"]) == (285, 281, "tabby")
    assert "overlay" not in top and Image.open(io.BytesIO(base64.b64decode(tabby["overlay"]))).size == (224, 224)
    np.testing.assert_allclose(np.asarray(tabby["heatmap"]), explainer.explain(cat_x, 281).heatmaps[0], atol=1e-4)


def test_v2_infer_equals_explainer(client, explainer, cat_x):
    x = np.concatenate([cat_x, cat_x[:, :, ::-1]])  # the cat and the cat upside down
    got = v2_outputs(client.post(f"{V2}/infer", json=v2_body(x)))
    want = explainer.explain(x)
    assert got["heatmap"].shape == (2, 224, 224) and got["scores"].shape == (2, 1000)
    np.testing.assert_allclose(got["heatmap"], want.heatmaps, atol=1e-5)
    np.testing.assert_allclose(got["scores"], want.scores, atol=1e-4)
    assert got["class"].tolist() == want.targets.tolist()
    r = client.post(f"{V2}/infer", json=v2_body(x, [504, -1], id="req-7", outputs=[{"name": "heatmap"}]))
    assert r.json()["id"] == "req-7" and [o["name"] for o in r.json()["outputs"]] == ["heatmap"]
    heat = v2_outputs(r)["heatmap"]
    np.testing.assert_allclose(heat[0], explainer.explain(x[:1], 504).heatmaps[0], atol=1e-5)
    np.testing.assert_allclose(heat[1], want.heatmaps[1], atol=1e-5)


def test_concurrent_requests_are_batched_and_split_back(client, server, explainer, cat_x):
    targets = [285, 281, 504, None, 282, None, 967, 285]
    flips = [cat_x if i % 2 == 0 else cat_x[:, :, ::-1] for i in range(len(targets))]
    batches_before = metric(client, "onnxcam_batch_size_count")
    samples_before = metric(client, "onnxcam_batch_size_sum")
    bodies = [json.dumps(v2_body(x, None if t is None else [t])) for x, t in zip(flips, targets)]

    def send(body):
        return httpx.post(f"{server.url}{V2}/infer", content=body, timeout=60)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    for x, t, r in zip(flips, targets, responses):
        got = v2_outputs(r)
        want = explainer.explain(x, t)
        np.testing.assert_allclose(got["heatmap"][0], want.heatmaps[0], atol=1e-5)
        assert int(got["class"][0]) == int(want.targets[0])
    batches = metric(client, "onnxcam_batch_size_count") - batches_before
    samples = metric(client, "onnxcam_batch_size_sum") - samples_before
    assert samples == len(targets) and batches < samples  # at least one explain call served several requests


# --------------------------------------------------------------------------- bad input

BAD_V1 = [
    (b"{bad json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[" * 100_000, 400, "malformed JSON"),
    (b'{"instance": []}', 400, "unknown field"),
    (b'{"instances": []}', 400, "at least one instance"),
    (b'{"instances": [42]}', 400, "base64 image string or a nested array"),
    (b'{"instances": ["not base64!!"]}', 400, "not valid base64"),
    (b'{"instances": ["' + base64.b64encode(b"GIF89a not an image at all") + b'"]}', 400, "cannot decode"),
    (b'{"instances": [[[[0.0, 1.0]]]]}', 400, "the model expects [3, 224, 224]"),
    (b'{"instances": [[["a", "b"]]]}', 400, "expected numbers"),
    (b'{"instances": [[[1, 2], [3]]]}', 400, "expected numbers"),
    (b'{"instances": [{"b64": 3}]}', 400, "base64 string"),
    (b'{"instances": [{"target": 3}]}', 400, '"b64"'),
]


@pytest.mark.parametrize("body, status, message", BAD_V1)
def test_bad_v1_requests(client, body, status, message):
    for kind in ("predict", "explain"):
        r = client.post(f"{V1}:{kind}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert message in r.json()["error"]


@pytest.mark.parametrize("target, message", [
    (1000, "target: class 1000 is out of range: the model has 1000 classes (0..999)"), (-3, "out of range"),
    ("no such class", "matches no class label"), (1.5, "class index or label"), (True, "class index or label")])
def test_bad_v1_targets(client, cat_b64, target, message):
    for body in ({"instances": [cat_b64], "target": target}, {"instances": [{"b64": cat_b64, "target": target}]}):
        r = client.post(f"{V1}:explain", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    r = client.post(f"{V1}:explain", json={"instances": [cat_b64], "overlay": "yes"})
    assert r.status_code == 400 and "true or false" in r.json()["error"]


def test_bad_v2_requests(client, cat_b64, cat_x):
    good = v2_body(cat_x)
    image = good["inputs"][0]
    cases = [
        ({}, "inputs"),
        ({"inputs": [{"name": "image"}]}, "name, shape, datatype and data"),
        ({"inputs": [dict(image, name="pixels")]}, "unknown input 'pixels'"),
        ({"inputs": [dict(image, datatype="INT32")]}, "datatype INT32; the model takes FP32"),
        ({"inputs": [dict(image, shape=[1, 3, 224])]}, "shape [1, 3, 224]"),
        ({"inputs": [dict(image, shape=[1, 3, 100, 100], data=[0.0] * 30000)]}, "the model expects [1, 3, 224, 224]"),
        ({"inputs": [dict(image, data=image["data"][:-1])]}, "150527 values for shape"),
        ({"inputs": [dict(image, data=["x"] * 150528)]}, "data must be numbers"),
        ({"inputs": [dict(image, shape=[1, 3, 224, -224])]}, "non-negative integers"),
        ({"inputs": [image, {"name": "target", "datatype": "INT64", "shape": [1], "data": [5000]}]},
         "class 5000 is out of range"),
        ({"inputs": [image, {"name": "target", "datatype": "FP32", "shape": [1], "data": [3.0]}]}, "expected INT64"),
        ({"inputs": [image, {"name": "target", "datatype": "INT64", "shape": [2], "data": [1, 2]}]}, "shape [2]"),
        ({"inputs": [image, image]}, "given twice"),
        (dict(good, outputs=[{"name": "logits"}]), "outputs"),
    ]
    for body, message in cases:
        r = client.post(f"{V2}/infer", json=body)
        assert r.status_code == 400, (message, r.text)
        assert message in r.json()["error"], (message, r.json())


def test_unknown_model_and_route(client, cat_b64, cat_x):
    for method, path, body in [("POST", "/v1/models/resnet:predict", {"instances": [cat_b64]}),
                               ("POST", "/v1/models/resnet:explain", {"instances": [cat_b64]}),
                               ("GET", "/v1/models/resnet", None), ("GET", "/v2/models/resnet", None),
                               ("GET", "/v2/models/resnet/ready", None),
                               ("POST", "/v2/models/resnet/infer", v2_body(cat_x))]:
        r = client.request(method, path, json=body)
        assert r.status_code == 404 and "model 'resnet' not found" in r.json()["error"], r.text
    assert client.get("/nothing/here").status_code == 404 and client.get("/nothing").json() == {"error": "not found"}
    r = client.put("/v2/health/live")
    assert r.status_code == 405 and r.json() == {"error": "method not allowed"}


def test_body_size_limit(client, server, cat_b64):
    head = (f"POST {V1}:explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n").encode()
    # Content-Length over the limit: refused before the body is read
    reply = raw_exchange(server.port, head + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 413") and b'"error"' in reply, reply[:300]
    # no Content-Length (chunked): refused once the bytes received pass the limit
    chunk = b"x" * 2**20
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"10\r\n" + b"y" * 16 + b"\r\n"
    reply = raw_exchange(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than" in reply, reply[:300]
    # too many instances for the queue
    r = client.post(f"{V1}:predict", json={"instances": [cat_b64] * 9})
    assert r.status_code == 413 and "at most 8" in r.json()["error"]
    assert_healthy(client, cat_b64)


def test_client_disconnects(client, server, cat_b64):
    body = json.dumps({"instances": [cat_b64]}).encode()
    head = f"POST {V1}:explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    # headers and part of the body, then gone
    raw_exchange(server.port, head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000], read=False)
    # the whole request, gone before the answer
    for _ in range(3):
        raw_exchange(server.port, head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body, read=False)
    # a client that times out while the server works
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}{V1}:explain", content=body, timeout=0.01)
    time.sleep(0.5)
    assert 'endpoint="/v1/models/{name}:explain",method="POST",status="499"' in client.get("/metrics").text
    assert_healthy(client, cat_b64)


def test_overload_answers_503_and_recovers(client, server, cat_b64):
    body = json.dumps({"instances": [cat_b64] * 4}).encode()

    async def flood():
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*[c.post(f"{V1}:explain", content=body) for _ in range(24)])

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
    for r in responses:
        if r.status_code == 503:
            assert "busy" in r.json()["error"]
        else:
            assert [e["class"] for e in r.json()["explanations"]] == [285] * 4
    assert_healthy(client, cat_b64)


# --------------------------------------------------------------------------- lifecycle

def test_sigterm_finishes_in_flight_request(tmp_path, cat_b64):
    server = Server(tmp_path, "--max-batch", "1", "--max-queue", "64")
    try:
        result = {}

        def send():
            result["r"] = httpx.post(f"{server.url}{V1}:explain", json={"instances": [cat_b64] * 12}, timeout=60)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=server.url) as c:  # wait until the server is working on the request
            while metric(c, "onnxcam_batch_size_count") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            text = c.get("/metrics").text  # --max-batch 1: every explain call had one sample
            assert metric(text, "onnxcam_batch_size_bucket", 'le="1.0"') == metric(text, "onnxcam_batch_size_count")
        server.proc.send_signal(signal.SIGTERM)
        sender.join(60)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert [e["class"] for e in r.json()["explanations"]] == [285] * 12
        assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
        log = server.log()
        assert "Shutting down" in log and "Application shutdown complete" in log and "Traceback" not in log, log
    finally:
        server.stop()


def test_serve_without_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
    assert cli.main(["serve", str(MODEL)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'onnxcam[serve]'" in err[0], err


def test_batcher_batches_in_order_and_drains():
    calls = []

    def run_batch(samples):
        calls.append(list(samples))
        time.sleep(0.02)
        return [s * 10 if s != 13 else ValueError("thirteen") for s in samples]

    async def main():
        b = Batcher(run_batch, max_batch=3, max_queue=100, wait_s=0.05)
        b.start()
        first = asyncio.ensure_future(b.submit(list(range(7))))
        await asyncio.sleep(0)
        single = asyncio.ensure_future(b.submit([7]))
        bad = asyncio.ensure_future(b.submit([12, 13]))
        await asyncio.sleep(0)
        await b.close()  # drains what is queued
        return await first, await single, await asyncio.gather(bad, return_exceptions=True)

    first, single, (bad,) = asyncio.run(main())
    assert first == [0, 10, 20, 30, 40, 50, 60] and single == [70]
    assert isinstance(bad, ValueError)
    assert [len(c) for c in calls] == [3, 3, 3, 1] and sum(calls, []) == list(range(8)) + [12, 13]


def _docker_command(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text()
    entry, cmd = (json.loads(re.search(rf"^{key} (\[.*\])$", text, re.M).group(1)) for key in ("ENTRYPOINT", "CMD"))
    return entry + cmd


def test_the_container_runs_this_server(tmp_path, explainer, cat_b64, cat_x):
    # Images cannot be built here; the command they run can: the Dockerfile's ENTRYPOINT + CMD, with the model
    # mounted where KServe's storage initializer puts it, and loopback instead of 0.0.0.0.
    command = _docker_command(ROOT / "Dockerfile")
    assert _docker_command(ROOT / "Dockerfile.gpu") == command + ["--device", "cuda"]
    assert command[:3] == ["onnxcam", "serve", "/mnt/models/model.onnx"]
    port = _free_port()
    values = {"/mnt/models/model.onnx": str(MODEL), "0.0.0.0": "127.0.0.1", "8080": str(port)}
    script = Path(sys.executable).with_name("onnxcam")  # the console script pip installs into the image
    args = [str(script) if script.exists() else "onnxcam"] + [values.get(a, a) for a in command[1:]]
    with open(tmp_path / "container.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "container.log").read_text()
                try:
                    if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            r = httpx.post(f"{url}/v1/models/model:explain", json={"instances": [cat_b64]}, timeout=60)
            assert r.status_code == 200, r.text
            want = explainer.explain(cat_x)
            got = r.json()["explanations"][0]
            assert got["class"] == int(want.targets[0])
            np.testing.assert_allclose(np.asarray(got["heatmap"]), want.heatmaps[0], atol=0.5e-4 + 1e-6)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert "Traceback" not in (tmp_path / "container.log").read_text()
