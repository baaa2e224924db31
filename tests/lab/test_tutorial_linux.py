"""docs/tutorial/07-booting-linux.md: the chapter's boot, run as the chapter shows it.

One boot of kvmpy's minimal kernel and busybox initramfs through the Python API,
with virtio-rng and an MMIO trace. It checks what the chapter claims: the kernel
read the command line kvmpy wrote, unpacked the initrd kvmpy placed, ran /init,
and drove the virtio-rng registers in the order chapter 6's guest did.
Marked `lab`: Linux boots only where /dev/kvm has hardware virtualization.
"""

from __future__ import annotations

import io
import re

import pytest

from kvmpy import guest_assets
from kvmpy.api import Guest
from kvmpy.initramfs import INIT_MARKER
from kvmpy.machine import LinuxConfig
from kvmpy.stop import StopKind
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

pytestmark = pytest.mark.lab

STATUS_WRITE = re.compile(r"MMIO write addr=0xd0000070 size=4 value=(0x[0-9a-f]+) ")


def test_chapter7_linux_boots_and_reads_virtio_rng() -> None:
    kernel = guest_assets.kernel_path()
    initrd = guest_assets.initramfs_path()
    trace = io.StringIO()
    # the kernel splits its command line at spaces, honouring double quotes only
    append = '-- sh -c "head -c 16 /dev/hwrng | od -An -tx1"'
    with Guest(linux=LinuxConfig(kernel=kernel.bzimage, initrd=initrd, append=append),
               rng=True, trace=Tracer(TraceFilter.parse("mmio"), trace)) as g:
        g.expect(INIT_MARKER, timeout=180)
        random = g.expect(r"((?: [0-9a-f]{2}){16})\r?\n", timeout=60).group(1)
        g.expect(r"kvmpy-guest: exit status 0", timeout=60)
        stop = g.wait(timeout=60)
        log = g.output
    # poweroff -f without ACPI halts every vCPU with interrupts off
    assert stop is not None and stop.kind is StopKind.HALTED, log[-2000:]
    cmdline = re.search(r"Kernel command line: (.*)", log)
    assert cmdline and "console=ttyS0" in cmdline.group(1)
    assert "virtio_mmio.device=4K@0xd0000000:5" in cmdline.group(1)
    assert "Freeing initrd memory" in log
    assert len(bytes.fromhex(random)) == 16
    # Linux's virtio_mmio.c took the device through chapter 6's status sequence
    statuses = [int(v, 16) for v in STATUS_WRITE.findall(trace.getvalue())]
    assert statuses[:5] == [0x0, 0x1, 0x3, 0xB, 0xF], statuses
    # ...but its queue notifications never reached the exit loop: they are ioeventfds
    assert "addr=0xd0000050" not in trace.getvalue()
    assert "Kernel panic" not in log and "BUG:" not in log
