"""Chapter 5: a device of your own on kvmpy's MMIO bus, and a guest that uses it.

What it is: `Crc32Device`, a complete kvmpy device in a dozen lines (a
CRC-32 engine: the guest writes bytes, reads the checksum back), and `main()`,
which builds a `Machine` for the chapter's flat guest, puts the device on the
MMIO bus at `DEVICE_GPA` and runs the guest.

What it is not: real hardware. It follows the bus's device protocol
(kvmpy/bus.py `Device`): `read(offset, size) -> bytes` and
`write(offset, data)`, offsets relative to its own base, no KVM anywhere, so
a unit test drives it with plain calls.

    .venv/bin/python docs/tutorial/05-mmio-device.py [--trace[=FILTER]] [--stats]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib

from kvmpy.cachedir import cache_dir
from kvmpy.cpu.modes import Mode
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.stats import format_table
from kvmpy.trace.tracer import Tracer

GUEST = cache_dir() / "tutorial" / "05-mmio-device.bin"
# A free page in the 32-bit MMIO hole, right after kvmpy's test device
# (kvmpy/layout.py names every address kvmpy itself uses; this one is ours).
DEVICE_GPA = 0xE000_1000
DEVICE_SIZE = 0x1000


class Crc32Device:
    """A CRC-32 engine (the zlib/Ethernet polynomial). Registers, from DEVICE_GPA:

        0x00  IDENT  read, 4 bytes: "CR32"
        0x04  DATA   write, 1-8 bytes: each byte is fed in, lowest address first
        0x08  VALUE  read, 4 bytes: the CRC-32 of every byte fed since the reset
        0x0c  RESET  write, any value: start again

    Anything else reads as all-ones and is ignored when written, as an empty bus
    slot would be; the device never raises on what a guest does.
    """

    IDENT, DATA, VALUE, RESET = 0x00, 0x04, 0x08, 0x0C

    def __init__(self) -> None:
        self.crc = 0
        self.fed = 0  # bytes fed since the reset

    def read(self, offset: int, size: int) -> bytes:
        if offset == self.IDENT and size == 4:
            return b"CR32"
        if offset == self.VALUE and size == 4:
            return struct.pack("<I", self.crc)
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == self.DATA:
            self.crc = zlib.crc32(data, self.crc)
            self.fed += len(data)
        elif offset == self.RESET:
            self.crc = self.fed = 0


def build(trace: Tracer | None = None, stats: bool = False) -> tuple[Machine, Crc32Device]:
    """The chapter's machine: the flat guest in long mode, our device on the MMIO bus."""
    machine = Machine(MachineConfig(mem_size=16 << 20, flat=FlatConfig(GUEST, mode=Mode.LONG),
                                    trace=trace, stats=stats))
    device = Crc32Device()
    machine.mmio.insert(DEVICE_GPA, DEVICE_SIZE, device, "crc32")  # the one new line
    return machine, device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="?", const="", default=None, metavar="FILTER")
    parser.add_argument("--stats", action="store_true")
    args = parser.parse_args(argv)
    tracer = Tracer(TraceFilter.parse(args.trace)) if args.trace is not None else None
    machine, device = build(tracer, args.stats)
    try:
        stop = machine.run()
        print(f"kvmpy: {stop.reason}; the device was fed {device.fed} bytes", file=sys.stderr)
        if args.stats:
            stats = machine.stats()
            print(format_table(stats), file=sys.stderr)
            print(json.dumps(stats), file=sys.stderr)
        return stop.exit_status
    finally:
        machine.close()


if __name__ == "__main__":
    sys.exit(main())
