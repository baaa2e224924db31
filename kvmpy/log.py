"""kvmpy's loggers: the standard `logging` module, imported only when something is logged.

Why: the modules on the boot path (the command line, the buses, the legacy devices) each
want a logger, and importing `logging` (with `traceback`, `string`, `weakref`...) costs
about 0.1 s of a three-second boot under the lab's emulation, for a run that usually logs
nothing. A `Logger` here holds a name; the first record that would be shown imports
`logging` and goes through `logging.getLogger(name)`, so an application that scripts
kvmpy through its Python API configures kvmpy's messages as it would any library's.
On the command line, a record is its "kvmpy: message" line written directly while
nothing in the process has imported `logging` (so nothing could handle it otherwise):
a restore's one warning costs no import either. `kvmpy fuzz`'s watch on kvmpy's
records (kvmpy.fuzz.oracles) imports it, and gets every record.

What it is not: a logging framework. Levels are the standard numbers; records dropped
by the command line's level (`kvmpy run` without -v shows warnings) import nothing.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

INFO = 20  # logging.INFO
WARNING = 30  # logging.WARNING

_cli_level: int | None = None  # set by `configure_cli`: the command line owns logging


def configure_cli(verbose: bool) -> None:
    """The command line's setup: "kvmpy: message" lines on stderr, INFO with -v."""
    global _cli_level
    _cli_level = INFO if verbose else WARNING
    if verbose:
        _standard_logging()


_cli_lock = threading.Lock()  # (a line at a time from any thread, as logging's handler)


def _cli_write(msg: str, args: tuple[object, ...]) -> None:
    try:
        line = f"kvmpy: {msg % args if args else msg}\n"
        with _cli_lock:
            sys.stderr.write(line)
            sys.stderr.flush()
    except Exception:  # as a logging handler does: a record never raises into
        pass  # its caller (a closed stderr, a broken pipe, bad arguments)


def _standard_logging() -> Any:
    import logging

    if _cli_level is not None and not logging.getLogger().handlers:
        logging.basicConfig(level=_cli_level, format="kvmpy: %(message)s")
    return logging


class Logger:
    """`logging.getLogger(name)`, looked up on the first record that is not dropped."""

    def __init__(self, name: str) -> None:
        self.name = name

    def log(self, level: int, msg: str, *args: object) -> None:
        if _cli_level is not None:
            if level < _cli_level:
                return
            if "logging" not in sys.modules:  # no handler anywhere: the line it would print
                _cli_write(msg, args)
                return
        _standard_logging().getLogger(self.name).log(level, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(INFO, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(WARNING, msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        """An ERROR record with the exception being handled (call it in `except`)."""
        _standard_logging().getLogger(self.name).exception(msg, *args)


def get_logger(name: str) -> Logger:
    return Logger(name)
