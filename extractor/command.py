"""Running a command line: parse, set up logging, run; an expected error is one line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os

from extractor.errors import ExtractorError

log = logging.getLogger("extractor")


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, expected=(ExtractorError,)) -> int:
    """Parse, set up logging, run the chosen command; an expected error is one log line and exit code 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ start-up notices are not for users
    from extractor.console import configure_logging

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
