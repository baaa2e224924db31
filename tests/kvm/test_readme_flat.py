"""The README's flat-guest example, run as a user would type it (tests/readme.py)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import shell_commands

pytestmark = pytest.mark.kvm


def test_flat_guest_commands_run_as_written(guest_dir: Path) -> None:
    commands = shell_commands("flat")
    assert len(commands) == 2
    outputs = []
    for command in commands:
        argv = shlex.split(command.replace("~/.cache/kvmpy", str(guest_dir.parent)))
        assert argv[0] == "kvmpy"
        done = subprocess.run([sys.executable, "-m", "kvmpy", *argv[1:]], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done)
    assert outputs[0].stdout == "Hello from real mode\n"
    assert outputs[1].stdout.startswith("sum=0x")
    # --trace=mmio: one line per MMIO exit, the instruction disassembled
    assert "MMIO" in outputs[1].stderr.upper() and "mov" in outputs[1].stderr
