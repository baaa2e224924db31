"""Chapter 6: run the hand-written virtio-rng driver against kvmpy's virtio-mmio device.

What it is: a `Machine` for the chapter's flat guest with one virtio device,
kvmpy's entropy source (`MachineConfig(rng=True)`: kvmpy/virtio/rng.py behind
the transport in kvmpy/virtio/mmio.py, at layout.VIRTIO_MMIO_BASE). After the
guest halts it prints what the host sees: the transport's status register,
the queue's cursors and the buffer in guest RAM, which must hold the bytes
the guest printed.

What it is not: the way Linux gets there. With the in-kernel irqchip kvmpy
also wires the queue notification to an ioeventfd and the interrupt to an
irqfd (kvmpy/virtio/iothread.py); here there is no irqchip, so the
notification is an ordinary MMIO exit and the guest polls.

    .venv/bin/python docs/tutorial/06-virtqueue.py [--trace[=FILTER]]
"""

from __future__ import annotations

import argparse
import sys

from kvmpy.cachedir import cache_dir
from kvmpy.cpu.modes import Mode
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

GUEST = cache_dir() / "tutorial" / "06-virtqueue.bin"
BUFFER, BUFFER_LEN = 0x83000, 16  # where the guest's driver put its one buffer


def build(trace: Tracer | None = None) -> Machine:
    return Machine(MachineConfig(mem_size=16 << 20, flat=FlatConfig(GUEST, mode=Mode.LONG),
                                 rng=True, trace=trace))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="?", const="", default=None, metavar="FILTER")
    args = parser.parse_args(argv)
    tracer = Tracer(TraceFilter.parse(args.trace)) if args.trace is not None else None
    machine = build(tracer)
    try:
        stop = machine.run()
        transport, gpa, _gsi = machine.virtio[0]
        queue = transport.queues[0]
        print(f"host: {stop.reason}")
        print(f"host: {transport.device.name} at {gpa:#x}: status {transport.status:#x}, "
              f"queue 0 size {queue.size}, desc {queue.desc_table:#x}, "
              f"avail {queue.avail_ring:#x}, used {queue.used_ring:#x}")
        print(f"host: device popped {queue.next_avail} chain(s), used {queue.next_used}")
        print(f"host: guest RAM at {BUFFER:#x}: {machine.memory.read(BUFFER, BUFFER_LEN).hex()}")
        return stop.exit_status
    finally:
        machine.close()


if __name__ == "__main__":
    sys.exit(main())
