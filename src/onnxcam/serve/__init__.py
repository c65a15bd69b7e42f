"""`onnxcam serve`: an HTTP server for predictions and CAM explanations of one ONNX model.

Protocols (FastAPI/Starlette on uvicorn):

* KServe V1: `POST /v1/models/{name}:predict` and `:explain` take `{"instances": [...]}`; an instance is a
  base64 PNG/JPEG string (or `{"b64": ...}`), preprocessed with the model's preprocessing, or a nested
  array already in the model's input shape without the batch dimension (or `{"data": ...}`). Optional
  `"target"` (class index or label) and `"overlay": true`, per request or per object instance; per request,
  `"method"` (one of the server's methods, `GET /ui/info`) and `"counterfactual": true` (:explain).
  `GET /v1/models/{name}` says whether the model is ready.
* Open Inference Protocol (v2): `GET /v2/health/live|ready`, `GET /v2/models/{name}` (metadata),
  `POST /v2/models/{name}/infer` with the image tensor and an optional INT64 `target` (-1 = argmax),
  answering `scores`, `heatmap` and `class` tensors.
* `GET /metrics`: Prometheus text format.
* `GET /`: a page to explore the model in a browser (onnxcam/ui: plain HTML/CSS/JS, nothing fetched from
  elsewhere), using the V1 endpoints and `GET /ui/info` (labels, methods, limits).

Samples of concurrent requests are gathered into micro-batches (`Batcher`) and explained by one
`Explainer.explain` call in a worker thread. Errors are JSON `{"error": "..."}`: 400 bad input, 404 unknown
model, 408 request not received in time, 413 body or decoded pixels too large, 503 queue or pixel budget
full. The limits on hostile input are in `Limits` (docs/serving.md, "Security"). FastAPI, uvicorn and
prometheus-client are imported only when a server is built: `pip install 'onnxcam[serve]' (from a clone: pip install -e '.[serve]')`.

Layout: `protocol` (parsing, explaining groups of samples, encoding; no server), `app` (the FastAPI app, whoever
hosts it), `batching` (the micro-batcher) and `host` (uvicorn: `create_app`, `run`). `onnxcam.ray.serve` hosts the
same app on Ray Serve replicas.
"""
from .app import INSTALL_HINT, model_spec, protocol_app
from .batching import Batcher
from .host import create_app, header_timeout_protocol, run
from .protocol import (HEATMAP_DECIMALS, OUTPUTS, TARGET, ApiError, Held, Limits, MethodSet, ModelSpec, Output,
                       PixelBudget, QueueFull, Sample, explain_batch, parse_v1, parse_v2, v1_response, v2_metadata,
                       v2_response)

__all__ = ["INSTALL_HINT", "HEATMAP_DECIMALS", "OUTPUTS", "TARGET", "ApiError", "Batcher", "Held", "Limits",
           "MethodSet", "ModelSpec", "Output", "PixelBudget", "QueueFull", "Sample", "create_app", "explain_batch",
           "header_timeout_protocol", "model_spec", "parse_v1", "parse_v2", "protocol_app", "run", "v1_response",
           "v2_metadata", "v2_response"]
