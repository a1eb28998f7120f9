"""The seeded dropout masks' numbers (see the `classifiers.heads` docstring), shared by the Keras layer and the
fast trainer: splitmix64's constants and the keep threshold."""

import math

MIX_GOLDEN = 0x9E3779B97F4A7C15
MIX_MUL1 = 0xBF58476D1CE4E5B9
MIX_MUL2 = 0x94D049BB133111EB


def dropout_threshold(rate: float) -> int:
    """Units whose 24-bit draw is at least this are kept: ceil(rate * 2**24)."""
    return math.ceil(rate * (1 << 24))
