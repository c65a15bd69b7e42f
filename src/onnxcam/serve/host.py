"""The single-process host of `onnxcam serve`: the protocol app (app.py) on uvicorn, with its own micro-batcher
(`Batcher`) and the connection-level limits uvicorn does not have (a deadline for request headers, lingering
close). Hosts of several processes (onnxcam.ray.serve) take the same app and batch with their own engine.
"""
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ..errors import OnnxcamError
from ..run.explainer import Explainer
from .app import model_spec, protocol_app, serving_modules
from .batching import Batcher
from .protocol import Limits, explain_batch


def create_app(explainer_or_model, name: str | None = None, max_batch: int = 16, max_queue: int = 64,
               max_body_bytes: int = 32 * 2**20, batch_wait_ms: float = 5.0, workers: int = 1,
               limits: Limits | None = None, methods: Sequence[str] | None = None, **explainer_kwargs):
    """The FastAPI app serving one model, batching with its own `Batcher` (`app.state.batcher`).
    `explainer_or_model`: an Explainer (shared, thread-safe) or anything Explainer() takes (path, bytes,
    ModelProto), built with `explainer_kwargs`. `limits`: the decoded-pixel budgets, overlay size and body
    timeout (default `Limits()`). `methods`: the other methods a V1 :explain (and the page at `/`) may ask for
    (default: the gradient and Eigen CAM methods, built on first use; `()`: the explainer's own only)."""
    serving_modules()
    if max_body_bytes < 1:  # before the model is loaded: a wrong option costs no load time
        raise OnnxcamError("the body size limit must be positive")
    spec = model_spec(explainer_or_model, name, methods, **explainer_kwargs)
    one_by_one = spec.fixed_batch
    batcher = Batcher(lambda samples: explain_batch(spec.methods, samples, one_by_one),
                      max_batch=1 if one_by_one else max_batch, max_queue=max_queue,
                      wait_s=batch_wait_ms / 1000.0, workers=workers)
    app = protocol_app(spec, batcher.submit, max_body_bytes=max_body_bytes, limits=limits,
                       queued=lambda: batcher.queued, on_start=batcher.start,
                       on_stop=batcher.close)  # on_stop: after uvicorn has finished the requests in flight
    batcher.on_batch = app.state.metrics.observe_batch
    app.state.batcher = batcher
    return app


LINGER_S = 2.0  # how long a closing connection still reads (and drops) what the client sends


class _LingeringTransport:
    """A transport whose close() sends the pending answer and a FIN, then reads and drops what the client
    still sends for up to LINGER_S before closing. Closing a socket with unread input makes the kernel send
    RST, and a RST can destroy an answer the client has not read yet: the 408 or 413 told to a client that
    is still sending its request."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol, self._closing = transport, protocol, False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._protocol.discard_input = True
        transport = self._transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.resume_reading()
        transport.write_eof()
        self._protocol.loop.call_later(LINGER_S, transport.close)


def header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol, plus a deadline for a request's head (request line and headers): `timeout`
    seconds from the connection's opening, or from the first byte of a later request on it. uvicorn itself
    times out only idle keep-alive connections (uvicorn#157), so a client trickling header bytes, or sending
    none, would hold its connection for ever. Past the deadline the client gets 408 and the connection is
    closed; the body has its own deadline in `read_body`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    text = json.dumps({"error": f"request headers not received within {timeout:g} s (--header-timeout)"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(text), text))

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            self._head_timer = None
            self.discard_input = False
            super().connection_made(_LingeringTransport(transport, self))
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            if self.discard_input:
                return
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc):
            self._stop_head_timer()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            # IDLE: no complete request head yet. Between requests the keep-alive timer runs instead, until
            # the next request's first byte (data_received) arms this one.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(timeout, self._head_timed_out)
            else:
                self._stop_head_timer()

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeaderTimeoutProtocol


def run(model, host: str = "127.0.0.1", port: int = 8080, name: str | None = None, max_batch: int = 16,
        max_queue: int = 64, workers: int = 1, max_body_mb: float = 32.0, batch_wait_ms: float = 5.0,
        layer=None, method: str = "gradcam", log_level: str = "info", graceful_timeout: float = 30.0,
        device: str | None = None, limits: Limits | None = None, header_timeout: float = 10.0,
        keep_alive_timeout: float = 5.0, max_connections: int = 256, methods: Sequence[str] | None = None,
        labels: Sequence[str] | None = None, preprocess_overrides: dict | None = None, precision: str | None = None,
        calibration=None) -> None:
    """Serves `model` until SIGTERM/SIGINT; in-flight requests finish first (up to `graceful_timeout` s).
    `header_timeout`: seconds for a request's headers to arrive (else 408); `keep_alive_timeout`: an idle
    connection is closed after that long; `max_connections`: open connections (and running requests) beyond
    which requests get 503. `labels`, `preprocess_overrides` (preset, mean, std, size, layout): for a model that
    carries no (or wrong) metadata. `precision`, `calibration`: the served method's forward arithmetic
    (onnxcam.run.precision; other methods a request names run in float32)."""
    serving_modules()
    import uvicorn

    if not (header_timeout > 0 and keep_alive_timeout > 0 and max_connections >= 1):
        raise OnnxcamError("the timeouts must be positive and the connection limit at least 1")
    if isinstance(model, Explainer):
        explainer = model
    else:
        if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
            raise OnnxcamError(f"model not found: {model}")
        explainer = Explainer(model, layer=layer, method=method, device=device, precision=precision,
                              calibration=calibration)
        if precision is not None:
            print(f"onnxcam: precision: {explainer.precision.reason}", file=sys.stderr, flush=True)
        if name is None and isinstance(model, (str, os.PathLike)):
            name = Path(model).stem
    if labels is not None or preprocess_overrides:
        explainer.use_defaults(labels, **(preprocess_overrides or {}))
    app = create_app(explainer, name=name, max_batch=max_batch, max_queue=max_queue,
                     max_body_bytes=int(max_body_mb * 2**20), batch_wait_ms=batch_wait_ms, workers=workers,
                     limits=limits, methods=methods)
    spec = app.state.spec
    print(f"onnxcam: serving '{spec.name}' (layer {explainer.layer}, {explainer.method}, {explainer.provider}) on http://{host}:{port} "
          f"-- max batch {app.state.batcher.max_batch}, queue {max_queue}", file=sys.stderr, flush=True)
    # uvicorn's limit_concurrency counts the connection asking too, hence the + 1
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, server_header=False,
                            http=header_timeout_protocol(header_timeout), timeout_keep_alive=keep_alive_timeout,
                            limit_concurrency=max_connections + 1)
    uvicorn.Server(config).run()
