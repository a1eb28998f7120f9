"""Native libraries without their own stderr notices: TensorFlow's start-up banners (absl's pre-init warning,
oneDNN's and XNNPACK's notices) and grpc's core messages are printed on file descriptor 2 before or beside
any logging that could filter them."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


@contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null for the block; Python's own stderr is flushed first and restored after."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and Keras now, without the banners; a no-op once imported."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_silenced():
        import keras  # noqa: F401  (imports tensorflow, its backend)
        import tensorflow  # noqa: F401
