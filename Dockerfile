# onnxcam serve in a container (CPU): KServe V1 + Open Inference Protocol v2 on port 8080, for a KServe
# InferenceService (docs/serving.md, "KServe") or any container platform. GPU: Dockerfile.gpu.
#
#   docker build -t onnxcam-serve .
#   docker run --rm -p 8080:8080 -v $PWD/models:/mnt/models onnxcam-serve /mnt/models/efficientnet_lite0.onnx \
#       --host 0.0.0.0 --port 8080 --name efficientnet_lite0
#
# /mnt/models is where KServe's storage initializer puts the files of `storageUri`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/onnxcam
# Only what the package build reads: the image does not carry the tests, tools or demo models.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[cpu,serve]" && rm -rf /opt/onnxcam/src /root/.cache

# Not root: the server needs no privilege (port 8080, read-only model files).
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin onnxcam
USER 1000
EXPOSE 8080
# The same command line as `onnxcam serve` anywhere else (tests/test_serve.py runs this ENTRYPOINT + CMD).
# --host 0.0.0.0: inside a container the server must listen beyond loopback; access control is the
# platform's (KServe's ingress / a NetworkPolicy), as the server has no authentication.
ENTRYPOINT ["onnxcam", "serve"]
CMD ["/mnt/models/model.onnx", "--host", "0.0.0.0", "--port", "8080", "--name", "model"]
