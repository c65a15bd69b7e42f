"""Real PaddlePaddle -> paddle2onnx export for tests/test_foreign_exports.py (random weights, fixed seed).

Run with a Python that has paddlepaddle and paddle2onnx, never the main environment, e.g.

    python3 -m venv /work/venvs/paddle && /work/venvs/paddle/bin/pip install paddlepaddle paddle2onnx packaging
    /work/venvs/paddle/bin/python tools/export_paddle.py [--out tests/data]

Writes paddle_mbv3.onnx (what paddle2onnx wrote) and paddle_mbv3.npz {x: a fixed (2, 3, 64, 64) input,
probs: Paddle's own output on it, logits: Paddle's pre-softmax output, feature: Paddle's last feature map}.

The model is a MobileNetV3-small in miniature, built the way PaddleClas builds it (ConvBNLayer =
Conv2D(bias_attr=False) + BatchNorm + activation; inverted residual blocks with a squeeze-excitation
gate `x * hardsigmoid(conv(relu(conv(avgpool(x)))))`; last ConvBNLayer with hardswish; AdaptiveAvgPool2D(1);
a 1x1 "last_conv" with bias and hardswish; Dropout; Flatten; Linear), with a softmax appended as
PaddleClas's inference export does. Exported with a dynamic batch and dynamic H/W and opset 13, where
paddle2onnx writes hardswish/hardsigmoid in decomposed form and keeps BatchNormalization nodes un-fused
(both are what deployed PaddleOCR/PaddleClas models look like).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
import paddle2onnx  # noqa: E402

OPSET = 13
CLASSES = 10


class ConvBN(nn.Layer):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.act == "relu":
            x = F.relu(x)
        elif self.act == "hardswish":
            x = F.hardswish(x)
        return x


class SE(nn.Layer):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc1 = nn.Conv2D(c, c // r, 1)
        self.fc2 = nn.Conv2D(c // r, c, 1)

    def forward(self, x):
        s = F.relu(self.fc1(self.pool(x)))
        # PaddleClas: hardsigmoid with slope 0.2, offset 0.5
        return x * F.hardsigmoid(self.fc2(s), slope=0.2, offset=0.5)


class InvertedResidual(nn.Layer):
    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se: bool, act: str):
        super().__init__()
        self.shortcut = stride == 1 and cin == cout
        self.expand = ConvBN(cin, mid, 1, act=act)
        self.dw = ConvBN(mid, mid, k, stride=stride, groups=mid, act=act)
        self.se = SE(mid) if se else None
        self.project = ConvBN(mid, cout, 1)

    def forward(self, x):
        y = self.dw(self.expand(x))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.shortcut else y


class MiniMobileNetV3(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, 3, stride=2, act="hardswish")  # 32x32
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, 3, 2, True, "relu"),  # 16x16
            InvertedResidual(16, 48, 24, 3, 2, False, "relu"),  # 8x8
            InvertedResidual(24, 64, 24, 3, 1, False, "relu"),  # residual
            InvertedResidual(24, 64, 32, 5, 1, True, "hardswish"),
        )
        self.last = ConvBN(32, 96, 1, act="hardswish")  # the last feature map: 96 x 8 x 8
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.last_conv = nn.Conv2D(96, 128, 1)
        self.dropout = nn.Dropout(0.2, mode="downscale_in_infer")
        self.flatten = nn.Flatten(start_axis=1, stop_axis=-1)
        self.fc = nn.Linear(128, CLASSES)

    def features(self, x):
        return self.last(self.blocks(self.stem(x)))

    def logits(self, x):
        x = F.hardswish(self.last_conv(self.pool(self.features(x))))
        return self.fc(self.flatten(self.dropout(x)))

    def forward(self, x):
        return F.softmax(self.logits(x), axis=-1)


def _randomize_bn(model: nn.Layer, rng: np.random.Generator) -> None:
    """A fresh BatchNorm is the identity (up to eps); random statistics make a wrong BN treatment visible."""
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm):
            c = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0, 0.2, c).astype(np.float32))
            layer._mean.set_value(rng.normal(0, 0.3, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"paddlepaddle {paddle.__version__}, paddle2onnx {paddle2onnx.__version__}")

    paddle.seed(0)
    model = MiniMobileNetV3()
    _randomize_bn(model, np.random.default_rng(0))
    model.eval()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    with paddle.no_grad():
        xt = paddle.to_tensor(x)
        probs, logits, feature = (t.numpy() for t in (model(xt), model.logits(xt), model.features(xt)))

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "inference")
        spec = [paddle.static.InputSpec([None, 3, None, None], "float32", name="x")]
        paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), prefix)
        files = sorted(os.listdir(tmp))
        model_file = next(os.path.join(tmp, f) for f in files if f.endswith((".json", ".pdmodel")))
        path = out / "paddle_mbv3.onnx"
        paddle2onnx.export(model_file, prefix + ".pdiparams", str(path), opset_version=OPSET,
                           auto_upgrade_opset=False)
    np.savez(out / "paddle_mbv3.npz", x=x, probs=probs, logits=logits, feature=feature)

    import onnx  # paddle2onnx's own dependency

    m = onnx.load(str(path))
    ops = sorted({n.op_type for n in m.graph.node})
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, IR {m.ir_version}, opset {OPSET}, ops {ops}")


if __name__ == "__main__":
    main()
