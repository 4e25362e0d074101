"""Keras models converted with tf2onnx (NHWC layout, Transposes, SAME padding, depthwise conv, BatchNorm,
LayerNorm, an Embedding + LSTM text model), for the int8 robustness sweep next to make_models.py.

Needs tensorflow-cpu and tf2onnx (their own venv):
    python bench/arch_sweep/make_keras_models.py bench/out/arch_sweep/models
Keras' gelu is avoided: tf2onnx 1.17 writes it with an 'Erfc' node, which is not an ONNX op (onnxruntime
cannot load that model at all; our calibration then says so and exits 2).
"""

import sys

import keras
import tensorflow as tf
import tf2onnx

out = sys.argv[1]
keras.utils.set_random_seed(0)
inp = keras.Input((32, 32, 3), name="image")
x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
x = keras.layers.Conv2D(32, 1, activation="relu")(x)
x = keras.layers.MaxPooling2D()(x)
y = keras.layers.Conv2D(32, 3, padding="same", strides=2, activation="relu")(x)
y = keras.layers.Conv2D(32, 3, padding="same")(y)
x = keras.layers.Add()([keras.layers.Conv2D(32, 1, strides=2)(x), y])
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dense(64, activation="swish")(x)
x = keras.layers.LayerNormalization()(x)
logits = keras.layers.Dense(10, name="logits")(x)
m = keras.Model(inp, logits)
# give BN non-trivial statistics
bn = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)][0]
g, b, mu, var = bn.get_weights()
bn.set_weights([g * 1.2, b + 0.1, mu + 0.05, var * 0.8])
spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
for opset in (13, 17):
    tf2onnx.convert.from_keras(m, input_signature=spec, opset=opset, output_path=f"{out}/keras_cnn_op{opset}.onnx")
    print("wrote", opset)
# an LSTM text model
ids = keras.Input((None,), dtype="int32", name="ids")
e = keras.layers.Embedding(300, 24)(ids)
h = keras.layers.LSTM(32)(e)
o = keras.layers.Dense(4)(h)
m2 = keras.Model(ids, o)
spec2 = (tf.TensorSpec((None, None), tf.int32, name="ids"),)
tf2onnx.convert.from_keras(m2, input_signature=spec2, opset=13, output_path=f"{out}/keras_lstm_op13.onnx")
print("wrote lstm")
