"""Where kvmpy keeps what it builds, fetches or unpacks: one directory, `$KVMPY_CACHE`.

Its own module because the boot path needs it (unpacked kernels, `kvmpy.boot.unpack`)
and every module costs start-up under emulation.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$KVMPY_CACHE`, default ~/.cache/kvmpy: everything built or fetched lives here."""
    env = os.environ.get("KVMPY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmpy"
