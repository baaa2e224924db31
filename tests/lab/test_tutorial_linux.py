"""docs/tutorial/07-booting-linux.md: the chapter's boot, run by the chapter's own script.

One boot (docs/tutorial/07-booting-linux.py `boot()`) of kvmpy's minimal kernel
through its PVH entry, with the busybox initramfs, virtio-rng and an MMIO trace.
It checks what the chapter claims: the kernel read the command line kvmpy wrote,
unpacked the initrd kvmpy placed, ran /init, read /dev/hwrng, and drove the
virtio-rng registers in the order chapter 6's guest did, while its queue
notifications never reached the exit loop. Marked `lab`: Linux boots only where
/dev/kvm has hardware virtualization.
"""

from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import pytest

from kvmpy.initramfs import INIT_MARKER
from kvmpy.stop import StopKind

pytestmark = pytest.mark.lab

CHAPTER = Path(__file__).resolve().parents[2] / "docs" / "tutorial" / "07-booting-linux.py"
STATUS_WRITE = re.compile(r"MMIO write addr=0xd0000070 size=4 value=(0x[0-9a-f]+) ")


def test_chapter7_linux_boots_and_reads_virtio_rng() -> None:
    spec = importlib.util.spec_from_file_location("tutorial_07", CHAPTER)
    assert spec is not None and spec.loader is not None
    chapter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chapter)

    trace = io.StringIO()
    stop, log = chapter.boot(trace)
    # poweroff -f without ACPI halts every vCPU with interrupts off
    assert stop is not None and stop.kind is StopKind.HALTED, log[-2000:]
    cmdline = re.search(r"Command line: (.*)", log)
    assert cmdline and "console=ttyS0" in cmdline.group(1)
    assert "virtio_mmio.device=4K@0xd0000000:5" in cmdline.group(1)
    assert "Freeing initrd memory" in log and INIT_MARKER in log
    random = re.search(r"^((?: [0-9a-f]{2}){16})\r?$", log, re.M)
    assert random is not None, log[-2000:]
    assert "kvmpy-guest: exit status 0" in log
    # Linux's virtio_mmio.c took the device through chapter 6's status sequence...
    text = trace.getvalue()
    statuses = [int(v, 16) for v in STATUS_WRITE.findall(text)]
    assert statuses[:5] == [0x0, 0x1, 0x3, 0xB, 0xF], statuses
    # ...its queue notifications went to an ioeventfd, not through the exit loop...
    assert "addr=0xd0000050" not in text
    # ...and every exit's instruction was found through the kernel's page tables
    assert "(not mapped)" not in text and "mov dword ptr [rax + 0x70]" in text
