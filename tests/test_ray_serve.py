"""onnxcam on Ray Serve (onnxcam.ray.serve, issue #18): the protocol app in two replicas of a local Ray instance,
answering as the Python API does, refusing malformed requests, and surviving a replica killed under load."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
for _module in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module)
pytest.importorskip("ray.serve")  # ray without its serve extra fails on import (grpc)

import ray  # noqa: E402
from ray import serve  # noqa: E402

from onnxcam.ray.serve import application  # noqa: E402
from onnxcam.serve import HEATMAP_DECIMALS  # noqa: E402
from tests.test_serve import MODEL, V1, V2, v2_body  # noqa: E402
from tests.test_serve import cat_b64, cat_x, explainer  # noqa: E402,F401 -- the same fixtures

APP = "onnxcam-test"
REPLICAS = 2
ROUNDING = 0.5 * 10 ** -HEATMAP_DECIMALS  # V1 heatmaps are rounded to 4 decimals; v2 ones are exact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_from_the_command_line_and_stopped_by_sigterm(tmp_path, explainer, cat_b64, cat_x):
    # `onnxcam serve MODEL --ray --replicas N`. First in this module: its own local Ray instance runs before the
    # module's one starts.
    port = _free_port()
    cmd = [sys.executable, "-m", "onnxcam", "serve", str(MODEL), "--ray", "--replicas", "1", "--port", str(port)]
    log_path = tmp_path / "ray-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = httpx.post(f"http://127.0.0.1:{port}{V1}:explain", json={"instances": [cat_b64]}, timeout=60)
            assert r.status_code == 200, r.text
            _check_v1(r.json()["explanations"][0], explainer.explain(cat_x))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(60)
            finally:
                try:  # Ray processes left behind by a driver that did not stop cleanly
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    text = log_path.read_text()
    assert status == 0, text
    assert "onnxcam: serving 'efficientnet_lite0'" in text and "1 Ray Serve replica(s)" in text, text
    assert "Traceback" not in text and "SIGTERM received" not in text, text


@pytest.fixture(scope="module")
def url():
    if ray.is_initialized():  # another test module's instance: this one needs its own, with Serve in it
        ray.shutdown()
    # "local": never another user's cluster (RAY_ADDRESS, `ray start`), whose Serve this module would shut down
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(MODEL), replicas=REPLICAS, max_batch=4, batch_wait_ms=20, max_queue=16),
                  name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def _check_v1(explanation: dict, want, k: int = 0) -> None:
    assert explanation["class"] == int(want.targets[k])
    assert explanation["score"] == pytest.approx(float(want.scores[k].ravel()[want.targets[k]]), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(np.asarray(explanation["heatmap"]), want.heatmaps[k], atol=ROUNDING + 1e-6, rtol=0)


def test_v1_explain_and_predict_equal_the_api(client, explainer, cat_b64, cat_x):
    r = client.post(f"{V1}:explain", json={"instances": [cat_b64, {"b64": cat_b64, "target": 281}]})
    assert r.status_code == 200, r.text
    got = r.json()["explanations"]
    _check_v1(got[0], explainer.explain(cat_x))
    _check_v1(got[1], explainer.explain(cat_x, 281))
    r = client.post(f"{V1}:predict", json={"instances": [cat_b64]})
    assert r.status_code == 200, r.text
    scores = np.asarray(r.json()["predictions"][0]["scores"])
    np.testing.assert_allclose(scores, explainer.explain(cat_x).scores[0], rtol=1e-6, atol=1e-6)
    assert client.get(f"{V1}").json() == {"name": MODEL.stem, "ready": True}


def test_v2_infer_equals_the_api_exactly(client, explainer, cat_x):
    x = np.concatenate([cat_x, np.random.default_rng(18).standard_normal(cat_x.shape).astype(np.float32)])
    r = client.post(f"{V2}/infer", json=v2_body(x, [504, -1], id="r1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "r1" and body["model_name"] == MODEL.stem
    got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    first, second = explainer.explain(x[:1], 504), explainer.explain(x[1:])
    np.testing.assert_allclose(got["heatmap"], np.concatenate([first.heatmaps, second.heatmaps]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["scores"], np.concatenate([first.scores, second.scores]), rtol=1e-6, atol=1e-6)
    assert got["class"].tolist() == [504, int(second.targets[0])]
    meta = client.get(V2).json()
    assert [i["name"] for i in meta["inputs"]] == ["image", "target"]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"instances": []}', 400, "at least one instance"),
    (b'{"instances": ["bm90IGFuIGltYWdl"]}', 400, "cannot decode the image"),
])
def test_malformed_requests_are_one_line_json_errors(client, body, status, message):
    r = client.post(f"{V1}:explain", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert message in r.json()["error"] and "\n" not in r.json()["error"]
    r = client.post(f"{V2}/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "\n" not in r.json()["error"]
    r = client.post("/v1/models/other:explain", content=body)
    assert r.status_code == 404 and r.json()["error"].startswith("model 'other' not found")


def _replicas() -> dict:
    status = serve.status().applications[APP].deployments["onnxcam"]
    return dict(status.replica_states)


def test_a_replica_killed_under_load_is_replaced(client, url, explainer, cat_b64, cat_x):
    want = explainer.explain(cat_x)
    body = json.dumps({"instances": [cat_b64]}).encode()
    total, concurrency = 48, 4
    lock = threading.Lock()
    counts = {"started": 0, "done": 0, "in_flight_at_kill": None}
    failures: list[str] = []
    answers: list[bytes] = []
    killed = threading.Event()

    def one(_):
        with lock:
            counts["started"] += 1
        sent = time.monotonic()
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post(f"{V1}:explain", content=body, headers={"content-type": "application/json"})
            if r.status_code == 200:
                answers.append(r.content)
            else:
                failures.append((sent, f"HTTP {r.status_code}: {r.text[:200]}"))
        except httpx.HTTPError as exc:
            failures.append((sent, type(exc).__name__))
        with lock:
            counts["done"] += 1

    def killer():
        while counts["done"] < 8:
            time.sleep(0.05)
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))
        with lock:
            counts["in_flight_at_kill"] = counts["started"] - counts["done"]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        counts["killed_at"] = time.monotonic()
        killed.set()

    threading.Thread(target=killer, daemon=True).start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    assert killed.is_set(), "the load ended before a replica was killed"
    print(f"\nkilled one of {REPLICAS} replicas with {counts['in_flight_at_kill']} requests in flight (all replicas); "
          f"{len(failures)} of {total} requests failed, {sum(t < counts['killed_at'] for t, _ in failures)} of them "
          f"sent before the kill: {[f for _, f in failures]}")
    assert len(failures) <= counts["in_flight_at_kill"], failures
    assert all(sent < counts["killed_at"] for sent, _ in failures), "a request sent after the kill failed"
    assert len(answers) == total - len(failures)
    for answer in set(answers):  # identical bodies are checked once
        _check_v1(json.loads(answer)["explanations"][0], want)
    deadline = time.monotonic() + 60
    while _replicas().get("RUNNING", 0) < REPLICAS:
        assert time.monotonic() < deadline, f"no replacement replica after 60 s: {_replicas()}"
        time.sleep(0.5)
    print(f"{REPLICAS} replicas running again {time.monotonic() - counts['killed_at']:.0f} s after the kill")
    for _ in range(2 * REPLICAS):  # the replacement answers too (the router spreads requests over both)
        r = client.post(f"{V1}:explain", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_without_ray_serve_the_import_says_what_to_install():
    code = ("import sys\nsys.modules['ray'] = None\ntry:\n    import onnxcam.ray.serve\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip() == "OnnxcamError onnxcam serve --ray needs Ray Serve: pip install 'onnxcam[ray]' " \
                                 "(from a clone: pip install -e '.[ray]')"


def test_ray_options_are_checked_in_one_line(capsys):
    from onnxcam.cli import main

    assert main(["serve", str(MODEL), "--replicas", "2"]) == 2
    assert capsys.readouterr().err.strip() == "onnxcam: error: --replicas go with --ray"
    assert main(["serve", str(MODEL), "--ray", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers belong to the single-process server" in err
