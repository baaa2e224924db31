"""Package attributes imported on first use (PEP 562).

Why: `kvmpy run` imports `kvmpy.lab` (to register its subcommand) and `kvmpy.acpi` (to
choose a machine description) on every start, and start-up is part of boot time; the
QEMU plumbing and the table builders behind their public names are needed only by the
runs that use them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` giving each name in `exports` from the module it maps to."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
