"""Chapter 4: run the interrupts guest on a VM with the in-kernel LAPIC and IO-APIC.

What it is: the chapter's flat guest started in long mode with
`FlatConfig(irqchip=True)`, driven through the Python API (kvmpy/api.py
`Guest`): wait for the guest to say its IO-APIC pin is routed, raise GSI 5
from the host (KVM_IRQ_LINE, through `Machine.irq`), wait for the guest's
handler to say it ran, and wait for the guest to end the run itself through
the debug-exit port.

What it is not: a device. A device would raise the same line through the
`IrqLine` kvmpy hands it (kvmpy/bus.py); here the script plays the device.

    .venv/bin/python docs/tutorial/04-interrupts.py [--trace[=FILTER]]
"""

from __future__ import annotations

import argparse
import sys

from kvmpy.api import Guest
from kvmpy.cachedir import cache_dir
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

GUEST = cache_dir() / "tutorial" / "04-interrupts.bin"
DEVICE_GSI = 5  # the guest routes IO-APIC pin 5 to its vector 0x31


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="?", const="", default=None, metavar="FILTER")
    args = parser.parse_args(argv)
    tracer = Tracer(TraceFilter.parse(args.trace)) if args.trace is not None else None
    # echo=True: the guest's console goes to our stdout as well as to g.output
    with Guest.flat(GUEST, mode="long", irqchip=True, mem="16M", echo=True,
                    trace=tracer) as g:
        g.expect(r"vector 0x30", timeout=10)  # the LAPIC timer fired
        g.expect(r"pin 5 routed", timeout=10)
        print(f"host: raising GSI {DEVICE_GSI}", flush=True)
        g.machine.irq(DEVICE_GSI).pulse()  # KVM_IRQ_LINE level 1, then level 0: an edge
        g.expect(r"vector 0x31", timeout=10)
        stop = g.wait(timeout=10)
        if stop is None:
            print("host: the guest did not stop", file=sys.stderr)
            return 1
        print(f"host: {stop.reason}")
        return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
