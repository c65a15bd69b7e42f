"""`onnxcam serve` on Ray Serve: the same FastAPI app (onnxcam.serve.app) in N replicas, each with its own
onnxruntime session, batched by `@serve.batch` instead of onnxcam's own Batcher (docs/serving.md, "Ray Serve").

    from onnxcam.ray.serve import run
    run("model.onnx", replicas=2, port=8080)           # blocks until SIGTERM/SIGINT, like onnxcam.serve.run

    from onnxcam.ray.serve import application
    serve.run(application("model.onnx", replicas=2), route_prefix="/")   # inside an existing Ray Serve setup

Ray Serve is imported with this module: pip install 'onnxcam[ray]' (from a clone: pip install -e '.[ray]').
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ..errors import OnnxcamError, first_line
from ..run.explainer import Explainer
from ..run.runtime import ort
from ..serve.app import model_spec, protocol_app, serving_modules
from ..serve.protocol import ApiError, Limits, Sample, explain_batch

INSTALL_HINT = ("onnxcam serve --ray needs Ray Serve: pip install 'onnxcam[ray]' "
                "(from a clone: pip install -e '.[ray]')")
RAY_SERVE_MIN = (2, 56)  # the first with late-bound ingress apps (`__serve_build_asgi_app__`)
try:
    import ray
    from ray import serve
except ImportError:  # ray without its serve extra fails here too (grpc, aiorwlock, ...)
    raise OnnxcamError(INSTALL_HINT) from None
if tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit()) < RAY_SERVE_MIN:
    raise OnnxcamError(f"onnxcam serve --ray needs Ray {'.'.join(map(str, RAY_SERVE_MIN))} or newer; this is "
                       f"Ray {ray.__version__}: pip install -U 'ray[serve]'")


@serve.deployment(name="onnxcam")
@serve.ingress()
class OnnxcamDeployment:
    """One replica: an Explainer built here (its own session), the protocol app (`__serve_build_asgi_app__`,
    which Ray calls after this constructor) and a `@serve.batch` method that explains the samples of all
    requests in flight on this replica together. Arguments as for onnxcam.serve.create_app; `threads`:
    onnxruntime's intra-op threads (None: onnxruntime's default, every core of the node)."""

    def __init__(self, model, name: str | None = None, max_batch: int = 16, max_queue: int = 64,
                 max_body_bytes: int = 32 * 2**20, batch_wait_ms: float = 5.0, limits: Limits | None = None,
                 methods: Sequence[str] | None = None, layer=None, method: str = "gradcam",
                 device: str | None = None, labels: Sequence[str] | None = None,
                 preprocess_overrides: dict | None = None, threads: int | None = None, precision: str | None = None,
                 calibration=None):
        options = None
        if threads is not None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
        explainer = Explainer(model, layer=layer, method=method, device=device, session_options=options,
                              precision=precision, calibration=calibration)
        if labels is not None or preprocess_overrides:
            explainer.use_defaults(labels, **(preprocess_overrides or {}))
        if name is None and isinstance(model, (str, os.PathLike)):
            name = Path(model).stem
        self.spec = model_spec(explainer, name, methods)
        self.max_queue, self.max_body_bytes, self.limits = max_queue, max_body_bytes, limits
        # A fixed-batch graph computes one sample per run: Explainer would split a batch anyway.
        self.explain_samples.set_max_batch_size(1 if self.spec.fixed_batch else max_batch)
        self.explain_samples.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        # One thread: explain calls of one replica run one after the other, as with `onnxcam serve --workers 1`;
        # more parallelism comes from more replicas.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="onnxcam-batch")
        self.metrics = None
        self.pending = 0  # samples submitted and not answered yet: the queue gauge of /metrics

    def __serve_build_asgi_app__(self):
        # `@serve.batch` does not expose its queue: the gauge counts this replica's samples in the batch queue
        # or in the running batch.
        app = protocol_app(self.spec, self.submit, max_body_bytes=self.max_body_bytes, limits=self.limits,
                           queued=lambda: self.pending, on_stop=self.stop)
        self.metrics = app.state.metrics
        return app

    async def submit(self, samples: Sequence[Sample]) -> list:
        if len(samples) > self.max_queue:
            raise ApiError(413, f"{len(samples)} instances in one request; at most {self.max_queue} (--max-queue)")
        self.pending += len(samples)
        try:
            results = await asyncio.gather(*(self.explain_samples(s) for s in samples))
        finally:
            self.pending -= len(samples)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def explain_samples(self, samples: list[Sample]) -> list:
        start = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self.executor, explain_batch, self.spec.methods, samples, self.spec.fixed_batch)
        if self.metrics is not None:
            self.metrics.observe_batch(len(samples), time.perf_counter() - start)
        return results  # an ApiError per refused sample: submit raises it for its own request only

    async def stop(self) -> None:
        self.executor.shutdown(wait=True)


GPU_DEVICES = ("cuda", "tensorrt")


def application(model, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float | None = None,
                threads: int | None = None, max_queue: int = 64, **kwargs: Any):
    """The bound deployment for `serve.run(app, route_prefix="/")`: `replicas` replicas of `num_cpus` CPUs and
    `num_gpus` GPUs each (a fraction shares a GPU; default: 1 with device="cuda" or "tensorrt", else 0: Ray
    gives a replica the GPUs it reserved, through CUDA_VISIBLE_DEVICES). `threads`: onnxruntime's intra-op
    threads per replica (default: its CPUs, at least 1). Each replica takes `max_queue` requests at a time;
    Ray's proxy queues as many more and answers 503 beyond. The other keyword arguments go to
    OnnxcamDeployment."""
    serving_modules()
    if num_gpus is None:
        num_gpus = 1.0 if str(kwargs.get("device") or "").lower() in GPU_DEVICES else 0.0
    if replicas < 1 or num_cpus < 0 or num_gpus < 0 or max_queue < 1:
        raise OnnxcamError("replicas and the queue must be at least 1, num_cpus and num_gpus not negative")
    if threads is None:
        threads = max(1, math.ceil(num_cpus))
    if isinstance(model, (str, os.PathLike)):
        model = os.path.abspath(model)  # replicas start in other working directories
    deployment = OnnxcamDeployment.options(
        num_replicas=replicas, max_ongoing_requests=max_queue, max_queued_requests=max_queue,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return deployment.bind(model, max_queue=max_queue, threads=threads, **kwargs)


def run(model, replicas: int = 1, host: str = "127.0.0.1", port: int = 8080, name: str | None = None,
        max_batch: int = 16, max_queue: int = 64, max_body_mb: float = 32.0, batch_wait_ms: float = 5.0,
        layer=None, method: str = "gradcam", device: str | None = None, limits: Limits | None = None,
        methods: Sequence[str] | None = None, labels: Sequence[str] | None = None,
        preprocess_overrides: dict | None = None, num_cpus: float = 1.0, num_gpus: float | None = None,
        threads: int | None = None, address: str | None = None, keep_alive_timeout: float = 5.0,
        precision: str | None = None, calibration=None) -> None:
    """Serves `model` from `replicas` Ray Serve replicas on http://host:port until SIGTERM/SIGINT, then shuts
    Ray Serve down. `address`: a running Ray cluster ("auto", host:port or ray://...), where only this
    application is deleted at the end (and where Serve runs already, its HTTP host and port stay); None (or
    "local") starts a new local Ray instance with this machine's cores, and stops it at the end. Same endpoints and answers as onnxcam.serve.run; the connection limits of the
    single-process server (header timeout, max connections) are not there: Ray's proxy is a plain uvicorn."""
    serving_modules()
    if isinstance(model, (str, os.PathLike)):
        if not os.path.exists(model):
            raise OnnxcamError(f"model not found: {model}")
        name = name or Path(model).stem
    # The model, layer, labels and preprocessing are checked here, on the CPU, so that a mistake is one line
    # now rather than a replica's traceback after Ray has started.
    checked = Explainer(model, layer=layer, method=method, precision=precision, calibration=calibration)
    if precision is not None:
        print(f"onnxcam: precision: {checked.precision.reason}", file=sys.stderr, flush=True)
    if labels is not None or preprocess_overrides:
        checked.use_defaults(labels, **(preprocess_overrides or {}))
    model_spec(checked, name, methods)
    layer_name = checked.layer
    del checked
    app = application(model, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus, threads=threads,
                      max_queue=max_queue, name=name, max_batch=max_batch, max_body_bytes=int(max_body_mb * 2**20),
                      batch_wait_ms=batch_wait_ms, limits=limits, methods=methods, layer=layer, method=method,
                      device=device, labels=labels, preprocess_overrides=preprocess_overrides, precision=precision,
                      calibration=calibration)
    stop = threading.Event()
    previous: dict = {}
    started_ray = not ray.is_initialized()
    own_cluster = started_ray and address in (None, "local")  # started here, so stopped here
    try:
        if started_ray:
            # "local": a new instance even where RAY_ADDRESS or `ray start` names another one
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     logging_level="warning", configure_logging=True)
        # After ray.init: it installs a C-level handler that dumps a stack trace on SIGTERM; this one replaces
        # it with a clean stop (Ray Serve shut down, then Ray).
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the line below says where it serves
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": keep_alive_timeout})
        try:
            serve.run(app, name=name or "model", route_prefix="/")
        except Exception as exc:  # a replica failed to start: Ray's message carries its traceback
            raise OnnxcamError(f"Ray Serve could not start the deployment: {first_line(exc)}") from None
        print(f"onnxcam: serving '{name or 'model'}' (layer {layer_name}, {method}) on http://{host}:{port} from "
              f"{replicas} Ray Serve replica(s), max batch {max_batch}, queue {max_queue} per replica",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ray.is_initialized():
            if own_cluster:
                serve.shutdown()
                ray.shutdown()
            else:  # a cluster others may serve from: only this application goes
                with contextlib.suppress(Exception):
                    serve.delete(name or "model")
                if started_ray:
                    ray.shutdown()  # disconnects this driver; the cluster stays
