"""Running a command line and what it shows on the terminal: its results, progress bars and warnings; INFO
goes to a log file (or to the terminal with -v); an expected error is one line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from extractor.errors import ExtractorError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("extractor")


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


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, expected=(ExtractorError,)) -> int:
    """Parse, set up logging, run the chosen command; an expected error is one log line and exit code 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ notices are not for users
    args = parser.parse_args(argv)
    configure_logging(args.verbose, getattr(args, "console_level", logging.WARNING))
    try:
        return args.run(args)
    except expected as exc:
        logging.getLogger(parser.prog.split()[-1]).error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; what was committed is kept, a rerun resumes")
        return 130
