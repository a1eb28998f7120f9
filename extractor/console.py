"""What a command shows on the terminal: its results, progress bars and warnings; INFO goes to a log file
(or to the terminal with -v)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool, console_level: int = logging.WARNING) -> None:
    """Messages at `console_level` and above on stderr (everything with `verbose`)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if verbose else console_level)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)


def log_to_file(path: Path) -> Path:
    """Also write every INFO (and, verbose, DEBUG) message to `path`: a run's own log."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.getLogger().level)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return path
