"""The HTTP face of `onnxcam serve`: one FastAPI app with the KServe V1 and Open Inference Protocol (v2) endpoints,
request limits, JSON errors, Prometheus metrics and the page at `/`, whoever hosts it. The host gives it a
`submit(samples) -> outputs` coroutine (the uvicorn host: its `Batcher`; Ray Serve: a `@serve.batch` method) and
starts it with the app's lifespan; the app itself neither batches nor knows about processes.
"""
import asyncio
import contextlib
import importlib.resources
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from .. import __version__
from ..errors import OnnxcamError
from ..run.explainer import Explainer
from .protocol import (TARGET, ApiError, Held, Limits, MethodSet, ModelSpec, Output, PixelBudget, QueueFull, Sample,
                       parse_v1, parse_v2, v1_response, v2_metadata, v2_response)

INSTALL_HINT = "onnxcam serve needs FastAPI, uvicorn and prometheus-client: pip install 'onnxcam[serve]' (from a clone: pip install -e '.[serve]')"
CODEC_THREADS = 4  # threads decoding requests and encoding responses

Submit = Callable[[Sequence[Sample]], Awaitable[Sequence[Output]]]


def serving_modules() -> None:
    """Says what to install (OnnxcamError) when the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise OnnxcamError(INSTALL_HINT) from None


def model_spec(explainer_or_model, name: str | None = None, methods: Sequence[str] | None = None,
               **explainer_kwargs) -> ModelSpec:
    """The model as the protocols see it. `explainer_or_model`: an Explainer (shared, thread-safe) or anything
    Explainer() takes (path, bytes, ModelProto), built with `explainer_kwargs`; `name` defaults to the file's
    stem. `methods`: the other methods a V1 :explain may ask for (default: the gradient and Eigen CAM methods,
    built on first use; `()`: the explainer's own only)."""
    if isinstance(explainer_or_model, Explainer):
        explainer = explainer_or_model
    else:
        explainer = Explainer(explainer_or_model, **explainer_kwargs)
        if name is None and isinstance(explainer_or_model, (str, os.PathLike)):
            name = Path(explainer_or_model).stem
    spec = ModelSpec.of(explainer, name or "model")
    if spec.image_input == TARGET:
        raise OnnxcamError(f"the model's input is named '{TARGET}', which the v2 protocol uses for the class")
    spec.methods = MethodSet(explainer, methods)
    return spec


class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self, queued: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        self.requests = Counter("onnxcam_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("onnxcam_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.batch_size = Histogram("onnxcam_batch_size", "Samples per explain call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram("onnxcam_batch_duration_seconds", "Time per explain call",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                       registry=self.registry)
        Gauge("onnxcam_queue_samples", "Samples waiting for a batch",
              registry=self.registry).set_function(queued)
        ProcessCollector(registry=self.registry)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _MetricsMiddleware:
    """Pure ASGI: counts every HTTP request by route template and status, and times it."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.observe_request(endpoint, scope["method"], status[0], time.perf_counter() - start)


async def read_body(request, limit: int, timeout: float = 60.0) -> bytes:
    """The request body, refused with 413 as soon as Content-Length or the bytes received pass `limit`, and
    with 408 when it has not all arrived `timeout` seconds after the headers (a client trickling bytes)."""
    from starlette.requests import ClientDisconnect

    too_large = f"request body larger than {limit} bytes (--max-body-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, too_large, close=True)
    chunks: list[bytes] = []

    async def receive():
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_large, close=True)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s (--body-timeout)", close=True) from None
    except ClientDisconnect:
        raise ApiError(499, "client closed the connection") from None
    return b"".join(chunks)


async def unless_disconnected(request, work: Awaitable):
    """Awaits `work`, or cancels it (its queued samples are then skipped) when the client goes away."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(499, "client closed the connection")
    return task.result()


def protocol_app(spec: ModelSpec, submit: Submit, max_body_bytes: int = 32 * 2**20, limits: Limits | None = None,
                 queued: Callable[[], int] = lambda: 0, on_start: Callable[[], None] | None = None,
                 on_stop: Callable[[], Awaitable[None]] | None = None):
    """The FastAPI app for `spec`. `submit(samples)` explains the samples of one request and returns one Output
    each (raising ApiError or QueueFull to refuse them); `queued()` is the queue gauge of /metrics; `on_start`
    runs in the app's lifespan before it says it is ready (on the event loop), `on_stop` when it stops, after the
    host has finished the requests in flight. `app.state.metrics.observe_batch(size, seconds)` is for the host
    to call after each batch."""
    serving_modules()
    from fastapi import FastAPI, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if max_body_bytes < 1:
        raise OnnxcamError("the body size limit must be positive")
    limits = Limits() if limits is None else limits
    pixels = PixelBudget(limits.inflight_pixels)
    explainer = spec.explainer
    ui_files = {asset: (importlib.resources.files("onnxcam") / "ui" / asset).read_bytes() for asset in UI_ASSETS}
    # Decoding, preprocessing and JSON encoding hold the GIL mostly: a few threads keep them off the event
    # loop; more would only add malloc arenas (memory) without adding speed.
    codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="onnxcam-codec")
    metrics = Metrics(queued)
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_start is not None:
            on_start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            if on_stop is not None:
                await on_stop()
            codec.shutdown(wait=True)

    app = FastAPI(title="onnxcam", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.spec, app.state.metrics, app.state.pixels = spec, metrics, pixels
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        response = error(exc.status, exc.message)
        if exc.close:
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc: QueueFull):
        return error(503, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(400, "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}")

    def model(requested: str) -> ModelSpec:
        if requested != spec.name:
            raise ApiError(404, f"model '{requested}' not found; this server serves '{spec.name}'")
        return spec

    async def handle(request: Request, parse, encode):
        body = await read_body(request, max_body_bytes, limits.body_timeout)
        loop = asyncio.get_running_loop()
        held = Held(pixels)
        parsing = loop.run_in_executor(codec, parse, body, spec, limits, held)
        try:
            parsed = await parsing
            del body
            outputs = await unless_disconnected(request, submit(parsed.samples))
            return Response(await loop.run_in_executor(codec, encode, parsed, outputs, spec),
                            media_type="application/json")
        finally:
            if parsing.done():
                held.release()
            else:  # cancelled while a codec thread still decodes: it gives back once it is done
                parsing.add_done_callback(lambda _: held.release())

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "onnxcam", "version": __version__, "extensions": []}

    @app.get("/v2/models/{name}")
    async def v2_model(name: str):
        return v2_metadata(model(name))

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str):
        model(name)
        return JSONResponse({"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request):
        model(name)
        return await handle(request, parse_v2, v2_response)

    @app.get("/v1/models")
    async def v1_models():
        return {"models": [spec.name]}

    @app.get("/v1/models/{name}")
    async def v1_model(name: str):
        model(name)
        return {"name": name, "ready": state["ready"]}

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request):
        model(name)
        return await handle(request, parse_v1, lambda req, outs, s: v1_response("predict", req, outs, s, limits))

    @app.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request):
        model(name)
        return await handle(request, parse_v1, lambda req, outs, s: v1_response("explain", req, outs, s, limits))

    def ui_asset(asset: str):
        return Response(ui_files[asset], media_type=UI_ASSETS[asset], headers=UI_HEADERS)

    @app.get("/")
    async def ui_page():
        return ui_asset("index.html")

    @app.get("/ui/info")
    async def ui_info():
        # What the page needs to draw its controls; everything else it asks through the V1 endpoints.
        return {"name": spec.name, "method": explainer.method, "methods": spec.methods.info(),
                "layer": explainer.layer, "provider": explainer.provider, "labels": spec.labels,
                "num_classes": explainer.num_classes, "images": spec.pp is not None, "images_error": spec.pp_error,
                "input_size": list(spec.pp.size) if spec.pp is not None else None,
                "max_body_bytes": max_body_bytes, "overlay_side": limits.overlay_side}

    @app.get("/ui/{asset}")
    async def ui_static(asset: str):
        if asset not in UI_ASSETS or asset == "index.html":
            raise ApiError(404, "not found")
        return ui_asset(asset)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# The page at `/` (onnxcam/ui): plain files, no build step, nothing fetched from elsewhere -- the policy below
# lets the browser load scripts, styles and data from this server only.
UI_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8"}
UI_HEADERS = {"content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                         "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                         "form-action 'none'; frame-ancestors 'none'",
              "x-content-type-options": "nosniff", "cache-control": "no-cache"}

