"""`kvmpy sandbox` on a machine whose /dev/kvm cannot boot Linux: it runs in the lab.

Marked `labhost`: boots the lab itself (skipped inside the lab and where /dev/kvm boots
Linux, where tests/lab/test_sandbox_commands.py covers the same command).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.lab import can_boot_linux

pytestmark = [pytest.mark.labhost,
              pytest.mark.skipif(can_boot_linux(), reason="/dev/kvm boots Linux here")]


def test_sandbox_goes_through_the_lab_and_keeps_status_output_and_rw_share(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "sandbox", "--share", str(out), "--", "sh", "-c",
         "echo to-stdout; echo to-stderr >&2; echo kept > out/result; exit 7"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 7, done.stderr
    assert done.stdout == "to-stdout\n"
    assert done.stderr == "to-stderr\n"
    assert (out / "result").read_text() == "kept\n"
