"""Sizes that the service, its clients and shard files agree on: content keys and vector responses."""

KEY_BYTES = 32  # a content key is a sha256 digest
HEADROOM = 64 * 1024  # bytes a message keeps free for framing, names and error texts

# What one image adds to a response that carries its vector: the float32 row, its key, its cached flag,
# and a margin for its error text when it failed.
_PER_IMAGE_BYTES = KEY_BYTES + 1 + 256


def vectors_response_bytes(count: int, dim: int) -> int:
    """An upper bound on the bytes of a response with `count` vectors of width `dim`."""
    return HEADROOM + count * (4 * dim + _PER_IMAGE_BYTES)


def vectors_per_response(max_message_bytes: int, dim: int) -> int:
    """The most vectors of width `dim` one response may carry under `max_message_bytes` (at least 1)."""
    return max((max_message_bytes - HEADROOM) // (4 * dim + _PER_IMAGE_BYTES), 1)
