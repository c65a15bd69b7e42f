"""Real Keras -> tf2onnx exports for tests/test_foreign_exports.py (random weights, fixed seeds; no download).

Run with a Python that has TensorFlow and tf2onnx, never the main environment (TensorFlow pins its own
numpy/protobuf/onnx), e.g.

    python3 -m venv /work/venvs/tf && /work/venvs/tf/bin/pip install tensorflow-cpu tf2onnx
    /work/venvs/tf/bin/python tools/export_keras.py [--out tests/data]

Writes, for each model NAME below, NAME.onnx (exactly what tf2onnx wrote, only the producer left as is) and
NAME.npz {x: the fixed (2, 64, 64, 3) NHWC input, probs: Keras's own output on it, logits: Keras's
pre-softmax output on it, feature: the output of the Keras layer Grad-CAM should explain (NHWC)} so the tests
can check that the ONNX graph computes what Keras computes and which ONNX tensor is that layer.

  keras_cnn      Sequential-style stack built with the Functional API: Conv2D+BatchNorm+ReLU (stride 2), a
                 residual block (two Conv2D+BN, Add, ReLU), DepthwiseConv2D+BN+ReLU, pointwise Conv2D+BN+ReLU,
                 GlobalAveragePooling2D, Dense(10), a separate Softmax layer. Keeps tf2onnx's NHWC input,
                 the Transposes it puts around the convolutions and its ReduceMean over axes [1, 2] (the last
                 feature map stays channels-last).
  keras_flatten  The classic Keras tutorial CNN: Conv-MaxPool-Conv-MaxPool-Flatten-Dropout-Dense(softmax).
                 Keras's Flatten reshapes to (tf.shape(x)[0], H*W*C), which tf2onnx writes as the
                 Shape -> Cast -> Slice -> Concat -> Reshape pattern of a dynamic-batch flatten.
  keras_flatten_strided  Conv-MaxPool-Conv(stride 2)-Flatten-Dense(softmax): the flatten reads tf2onnx's
                 Transpose of the last conv map back to NHWC.
  keras_pointwise_head   Conv-Conv-Dense(on the 4-D map)-GlobalAveragePooling2D-Dense-Softmax: the last feature
                 map stays channels-last (tf2onnx's Tensordot pattern), pooled by ReduceMean over axes [1, 2].
  keras_convnext Keras's ConvNeXt structure, small: patchify stem, LayerNormalization, blocks of
                 DepthwiseConv2D 7x7 + LayerNormalization + Dense/GELU(tanh)/Dense on the channels-last map +
                 residual, GlobalAveragePooling2D, LayerNormalization, Dense, softmax. The per-position Dense
                 layers (MatMul on the last axis) stop tf2onnx's transpose optimizer, so the last feature map
                 stays channels-last, (N, 8, 8, 48), and is pooled by ReduceMean over axes [1, 2].

BatchNorm statistics and affine parameters are random (a fresh BN is the identity up to eps, which would
hide a wrong BatchNorm treatment); weights come from Keras's seeded initializers.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from tensorflow import keras  # noqa: E402
from tensorflow.keras import layers  # noqa: E402

OPSET = 15
SIZE = 64
CLASSES = 10


def _randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Random BatchNorm statistics and affine parameters, random biases and LayerNorm affines: Keras
    initialises these to identities and zeros, which tf2onnx would fold away (a zero Dense bias disappears)
    and which would hide a wrong treatment of them."""
    for layer in model.layers:
        if isinstance(layer, (layers.Dense, layers.Conv2D, layers.DepthwiseConv2D)) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
        elif isinstance(layer, layers.LayerNormalization):
            gamma, beta = layer.get_weights()
            c = gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32)])
        elif isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            c = gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32),
                               rng.normal(0, 0.3, c).astype(np.float32), rng.uniform(0.5, 2.0, c).astype(np.float32)])


def _conv_bn_relu(x, filters: int, kernel: int, strides: int, name: str):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def keras_cnn() -> tuple[keras.Model, keras.Model]:
    """(model with softmax, the same model cut before the Softmax layer)."""
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = _conv_bn_relu(inp, 16, 3, 2, "stem")  # 32x32
    y = layers.Conv2D(16, 3, padding="same", use_bias=False, name="res_conv1")(x)
    y = layers.BatchNormalization(name="res_bn1")(y)
    y = layers.ReLU(name="res_relu1")(y)
    y = layers.Conv2D(16, 3, padding="same", use_bias=False, name="res_conv2")(y)
    y = layers.BatchNormalization(name="res_bn2")(y)
    x = layers.ReLU(name="res_out")(layers.Add(name="res_add")([x, y]))
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, name="dw_conv")(x)  # 16x16
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(name="dw_relu")(x)
    x = _conv_bn_relu(x, 32, 1, 1, "pw")  # the last feature map: 16x16x32
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    logits = layers.Dense(CLASSES, name="logits")(x)
    probs = layers.Softmax(name="probs")(logits)
    return keras.Model(inp, probs, name="keras_cnn"), keras.Model(inp, logits)


def keras_flatten() -> tuple[keras.Model, keras.Model]:
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Conv2D(8, 3, activation="relu", name="conv1")(inp)  # 62x62
    x = layers.MaxPooling2D(2, name="pool1")(x)  # 31x31
    x = layers.Conv2D(16, 3, activation="relu", name="conv2")(x)  # 29x29: the last feature map
    x = layers.MaxPooling2D(2, name="pool2")(x)  # 14x14
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    dense = layers.Dense(CLASSES, activation="softmax", name="dense")
    probs = dense(x)
    # The pre-softmax output of the same Dense layer, for the reference logits.
    logits = keras.ops.matmul(x, dense.kernel) + dense.bias
    return keras.Model(inp, probs, name="keras_flatten"), keras.Model(inp, logits)


def keras_flatten_strided() -> tuple[keras.Model, keras.Model]:
    """Flatten straight after the last (strided) conv: tf2onnx transposes that conv's output back to NHWC
    for the Reshape, so the last feature map the head reads is a channels-last Transpose output."""
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Conv2D(8, 3, activation="relu", name="conv1")(inp)  # 62x62
    x = layers.MaxPooling2D(2, name="pool1")(x)  # 31x31
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)  # 15x15: the last feature map
    x = layers.Flatten(name="flatten")(x)
    dense = layers.Dense(CLASSES, activation="softmax", name="dense")
    probs = dense(x)
    logits = keras.ops.matmul(x, dense.kernel) + dense.bias
    return keras.Model(inp, probs, name="keras_flatten_strided"), keras.Model(inp, logits)


def keras_pointwise_head() -> tuple[keras.Model, keras.Model]:
    """A Dense layer applied to the 4-D map (a per-position 1x1 projection, as Keras users and Keras's own
    ConvNeXt write pointwise convolutions) right before GlobalAveragePooling2D. tf2onnx writes it as a
    Tensordot (Reshape -> MatMul -> Reshape) on the NHWC map, which its transpose optimizer cannot move
    through: the last feature map stays channels-last, (N, 15, 15, 32), pooled by ReduceMean(axes=[1, 2])."""
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1")(inp)  # 31x31
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2")(x)  # 15x15
    x = layers.Dense(32, activation="relu", name="pw")(x)  # the last feature map, channels last
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    logits = layers.Dense(CLASSES, name="logits")(x)
    probs = layers.Softmax(name="probs")(logits)
    return keras.Model(inp, probs, name="keras_pointwise_head"), keras.Model(inp, logits)


def _convnext_block(x, dim: int, name: str):
    """Keras's own ConvNeXt block (keras.applications.convnext): depthwise 7x7, LayerNormalization over
    channels, pointwise Dense layers on the channels-last map, GELU, layer scale, residual."""
    y = layers.DepthwiseConv2D(7, padding="same", name=f"{name}_dw")(x)
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(y)
    y = layers.Dense(4 * dim, name=f"{name}_pw1")(y)
    # The tanh approximation: Keras 3's exact GELU is written with tf.math.erfc, which tf2onnx 1.17 cannot
    # convert ("Tensorflow op [...Gelu/Erfc: Erfc] is not supported").
    y = layers.Activation(lambda t: keras.activations.gelu(t, approximate=True), name=f"{name}_gelu")(y)
    y = layers.Dense(dim, name=f"{name}_pw2")(y)
    y = layers.Rescaling(0.5, name=f"{name}_scale")(y)  # layer scale (a constant here)
    return layers.Add(name=f"{name}_add")([x, y])


def keras_convnext() -> tuple[keras.Model, keras.Model]:
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Conv2D(24, 4, strides=4, name="stem_conv")(inp)  # 16x16
    x = layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    x = _convnext_block(x, 24, "s1b1")
    x = layers.LayerNormalization(epsilon=1e-6, name="down_ln")(x)
    x = layers.Conv2D(48, 2, strides=2, name="down_conv")(x)  # 8x8
    x = _convnext_block(x, 48, "s2b1")
    x = _convnext_block(x, 48, "s2b2")  # the last feature map: its residual sum, 8x8x48, channels last
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    logits = layers.Dense(CLASSES, name="logits")(x)
    probs = layers.Activation("softmax", name="probs")(logits)
    return keras.Model(inp, probs, name="keras_convnext"), keras.Model(inp, logits)


def export(name: str, build, feature_layer: str, out: Path, rng: np.random.Generator) -> None:
    keras.utils.set_random_seed(0)
    model, logits_model = build()
    _randomize(model, rng)
    x = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    probs = model(x, training=False).numpy()
    logits = logits_model(x, training=False).numpy()
    feature = keras.Model(model.input, model.get_layer(feature_layer).output)(x, training=False).numpy()

    # Keras 3 models are not what tf2onnx.convert.from_keras expects; a tf.function over the inference call
    # is the supported route and gives the same graph tf2onnx makes from a SavedModel.
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
    fn = tf.function(lambda image: {"probs": model(image, training=False)}, input_signature=spec)
    onnx_model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    path = out / f"{name}.onnx"
    path.write_bytes(onnx_model.SerializeToString())
    np.savez(out / f"{name}.npz", x=x, probs=probs, logits=logits, feature=feature)
    ops = sorted({n.op_type for n in onnx_model.graph.node})
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, IR {onnx_model.ir_version}, opset {OPSET}, ops {ops}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, tf2onnx {tf2onnx.__version__}")
    rng = np.random.default_rng(0)
    # The layer Grad-CAM should explain: the last feature map before the spatial collapse.
    export("keras_cnn", keras_cnn, "pw_relu", out, rng)
    export("keras_flatten", keras_flatten, "conv2", out, rng)  # conv2's output includes its ReLU
    export("keras_convnext", keras_convnext, "s2b2_add", out, rng)
    export("keras_flatten_strided", keras_flatten_strided, "conv2", out, rng)
    export("keras_pointwise_head", keras_pointwise_head, "pw", out, rng)


if __name__ == "__main__":
    main()
