"""Keras pieces whose randomness is a function of a seed: the step-keyed dropout layer and ordered batches.

The formulas live in `classifiers.heads` (its module docstring); the fast trainer reproduces them.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from classifiers.dropout import MIX_GOLDEN, MIX_MUL1, MIX_MUL2, dropout_threshold


def _scramble(z: tf.Tensor) -> tf.Tensor:
    """splitmix64's finaliser of z + golden gamma, on uint64 tensors (wrapping arithmetic)."""
    z = z + tf.constant(MIX_GOLDEN, tf.uint64)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64))) * tf.constant(
        MIX_MUL1, tf.uint64
    )
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64))) * tf.constant(
        MIX_MUL2, tf.uint64
    )
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


@keras.saving.register_keras_serializable(package="classifiers")
class StepDropout(keras.layers.Layer):
    """Inverted dropout whose mask is a function of (seed, layer index, training step, row, unit).

    Identity at inference. In training, unit k of batch row r is kept iff
    `scramble(key ^ (r * width + k)) >> 40 >= ceil(rate * 2**24)` with
    `key = scramble(scramble(scramble(seed) ^ index) ^ step)`, and kept values are multiplied by
    `float32(1 / (1 - rate))`. `step` counts this layer's training calls (one per optimizer step).
    """

    def __init__(self, rate: float, seed: int, index: int, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed, self.index = float(rate), int(seed), int(index)

    def build(self, input_shape):
        self.step = self.add_weight(shape=(), initializer="zeros", dtype="int64", trainable=False, name="step")

    def call(self, inputs, training=False):
        if not training or self.rate == 0.0:
            return inputs
        key = _scramble(tf.constant(self.seed, tf.uint64))
        key = _scramble(tf.bitwise.bitwise_xor(key, tf.constant(self.index, tf.uint64)))
        key = _scramble(tf.bitwise.bitwise_xor(key, tf.cast(self.step, tf.uint64)))
        shape = tf.shape(inputs, out_type=tf.int64)
        index = tf.reshape(tf.range(shape[0] * shape[1], dtype=tf.int64), shape)
        bits = tf.bitwise.right_shift(
            _scramble(tf.bitwise.bitwise_xor(key, tf.cast(index, tf.uint64))), tf.constant(40, tf.uint64)
        )
        keep = bits >= tf.constant(dropout_threshold(self.rate), tf.uint64)
        self.step.assign_add(1)
        scale = tf.constant(np.float32(1.0 / (1.0 - self.rate)), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed, "index": self.index}


def ordered_batches(x: np.ndarray, y: np.ndarray, permutations: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """All epochs' batches of (x, y) in one stream: epoch e visits rows `permutations[e]`, its last batch partial.

    One stream, read with `steps_per_epoch`, so that Keras never restarts or prefetches across an epoch's end.
    """
    x, y = tf.constant(x), tf.constant(y)
    rows = tf.data.Dataset.from_tensor_slices(permutations).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
    )
    return rows.map(lambda batch: (tf.gather(x, batch), tf.gather(y, batch)))
