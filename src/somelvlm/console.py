"""The console side of every command: logging through tqdm's writer (so log lines never land
inside a progress bar, `4.40s/item]ERROR ...`) and the one error format,
`somelvlm <command>: error: <message>` with exit code 1."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from tqdm.auto import tqdm

FORMAT = "%(levelname)s %(name)s: %(message)s"
# What a user can cause (bad paths, files, options): one line, exit 1. Anything else is a bug: traceback.
USER_ERRORS = (OSError, ValueError)


class TqdmHandler(logging.Handler):
    """Writes each record with `tqdm.write` (above any active bar) to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with `verbose`) through `TqdmHandler`, unless the root logger already has handlers
    (an application or a test harness that configured logging itself)."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand: a user error becomes one line on stderr and exit code 1, Ctrl-C exit 130."""
    try:
        return int(func(args) or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
