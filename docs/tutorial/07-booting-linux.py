"""Chapter 7: boot Linux with the Python API and watch it drive chapter 6's device.

What it is: one boot of kvmpy's minimal kernel (its `vmlinux`, entered through
the PVH note in 32-bit protected mode) with the busybox initramfs and
virtio-rng, with a tracer on MMIO exits. /init runs one command from the
kernel command line, which reads 16 bytes from /dev/hwrng; then it powers off.
The console goes to stdout, the trace to stderr.

What it is not: runnable on a PVM /dev/kvm. Run it in the lab:

    .venv/bin/python -m kvmpy lab -- .venv/bin/python docs/tutorial/07-booting-linux.py
"""

from __future__ import annotations

import sys
from typing import TextIO

from kvmpy import assets
from kvmpy.api import Guest
from kvmpy.initramfs import INIT_MARKER
from kvmpy.stop import Stop
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

# Kernel parameters, then `--`, then /init's arguments. The kernel splits the
# line at spaces and honours double quotes only.
APPEND = '-- sh -c "head -c 16 /dev/hwrng | od -An -tx1"'


def boot(trace_out: TextIO, echo: bool = False) -> tuple[Stop | None, str]:
    """Boot, run the command, wait for the guest to halt; (its Stop, the console text)."""
    kernel = assets.kernel_path()  # built by `make guest-kernel`
    tracer = Tracer(TraceFilter.parse("mmio"), trace_out)
    # acpi="off": the MP table and command-line devices, the description this chapter shows
    with Guest(kernel.vmlinux, assets.initramfs_path(), append=APPEND, rng=True,
               acpi="off", echo=echo, trace=tracer) as g:
        g.expect(INIT_MARKER, timeout=180)  # the kernel found the initramfs and ran /init
        g.expect(r"kvmpy-guest: exit status \d+", timeout=60)
        stop = g.wait(timeout=60)  # /init runs `poweroff -f`: without ACPI the CPU halts
        return stop, g.output


def main() -> int:
    stop, _ = boot(sys.stderr, echo=True)
    print(f"host: {stop.reason if stop else 'still running after 60 s'}")
    return 0 if stop is not None else 1


if __name__ == "__main__":
    sys.exit(main())
