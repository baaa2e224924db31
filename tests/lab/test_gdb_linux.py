"""The real gdb against kvmpy's minimal kernel: break on `start_kernel` by its symbol.

The vmlinux is entered at its 64-bit entry (`--entry64`) and the stub answers in the
x86-64 register layout; `start_kernel` lives at a high virtual address that the stub
translates through the guest's own page tables once the kernel has built them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import assets
from tests.lab.distress import assert_calm

pytestmark = pytest.mark.lab
GDB = shutil.which("gdb")


@pytest.mark.skipif(GDB is None, reason="gdb is not installed")
def test_gdb_breaks_on_start_kernel_by_symbol(kernel: assets.KernelAssets,
                                               initrd: Path) -> None:
    vm = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", "--kernel", str(kernel.vmlinux),
                           "--initrd", str(initrd), "--append", "-- true", "--entry64",
                           "--gdb", "0"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert vm.stderr is not None
        line = vm.stderr.readline()
        found = re.search(r"gdb stub listening on 127\.0\.0\.1:(\d+)", line)
        assert found, line
        argv = [str(GDB), "-batch", "-nx", "-ex", "set pagination off",
                "-ex", f"target remote 127.0.0.1:{found.group(1)}",
                "-ex", "break start_kernel", "-ex", "continue",
                "-ex", "p/x $pc", "-ex", "info symbol $pc", "-ex", "p/x $cr3",
                "-ex", "delete", "-ex", "continue", str(kernel.vmlinux)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        assert re.search(r"Breakpoint 1.*start_kernel", text), text
        assert re.search(r"\$1 = 0xffffffff8[0-9a-f]+", text), text  # a kernel virtual address
        assert "start_kernel in section .init.text" in text, text
        console, _ = vm.communicate(timeout=120)  # the guest went on to /init and off
        assert "kvmpy-guest: exit status 0" in console, console[-2000:]
        assert_calm(console)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
