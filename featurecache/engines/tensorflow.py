"""Running a Keras model's taps on TensorFlow: the reference engine, and the fallback for a model the
ONNX exporter cannot convert. Same shape as runtimes.py: forward(preprocessed NHWC batch) -> a list
of numpy arrays, one per tap."""

from __future__ import annotations

import numpy as np


def tensorflow_forward(model, taps: list[str]):
    """A compiled `model(x, training=False)` returning the named taps' outputs as numpy arrays."""
    import keras
    import tensorflow as tf

    multi = keras.Model(model.inputs, [model.get_layer(n).output for n in taps])

    # reduce_retracing: batches of any size share one trace after the second size seen.
    @tf.function(reduce_retracing=True, autograph=False)
    def call(x):
        return multi(x, training=False)

    def forward(x):
        out = call(tf.convert_to_tensor(np.asarray(x, dtype=np.float32)))
        return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]

    return forward
