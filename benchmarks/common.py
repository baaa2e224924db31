"""Paths and helpers the benchmarks share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KVMPY_CACHE", Path.home() / ".cache" / "kvmpy"))
GUESTS = CACHE / "guests"


def build_c(name: str) -> Path:
    """Compile benchmarks/<name>.c into the cache (once per source change)."""
    src = ROOT / "benchmarks" / f"{name}.c"
    out = CACHE / "bench" / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], check=True)
    return out


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]
