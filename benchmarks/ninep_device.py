"""virtio-9p without KVM: the device's own cost per message, for profiling.

Replays what the lab benchmark's guest sends (benchmarks/ninep.py) through the whole
device path that runs on kvmpy's I/O thread and vCPU thread, with no VM: a chain laid
out in guest memory as Linux's net/9p/trans_virtio.c lays it (one indirect table per
request, the message in one buffer; a large Tread "zero-copy", its 11-byte reply header
in its own buffer and the data in 4 KiB pages), `handle_notify` as the ioeventfd's
callback calls it, the used ring and EVENT_IDX suppression, and the interrupt
handler's InterruptStatus read and InterruptACK write through the transport as the
vCPU thread makes them.

- walk: Twalk of one name from a directory fid, Tgetattr, Tclunk, per file, over
  5,000 files (what each `stat` of a path costs Linux's client per component);
- read: Tread of a 128 MiB file in messages of msize 512000, into the same pages
  each time (dd's buffer).

Prints JSON: microseconds per message for each, and the read's MB/s. With `--profile`
it runs the workload under cProfile and prints the top functions by own time.

    .venv/bin/python benchmarks/ninep_device.py [--profile walk|read] [--files N]

Not part of `make bench` (no reference to compare with): it is the measure of the
Python path a lab round spends its time in, for changing that path.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmpy.bus import NullIrq  # noqa: E402
from kvmpy.memory import GuestMemory  # noqa: E402
from kvmpy.ninep import wire  # noqa: E402
from kvmpy.ninep.client import pack, tmessage  # noqa: E402
from kvmpy.virtio import mmio  # noqa: E402
from kvmpy.virtio.driver import GuestDriver  # noqa: E402
from kvmpy.virtio.mmio import VirtioMmioTransport  # noqa: E402
from kvmpy.virtio.ninep import NinePDevice  # noqa: E402
from kvmpy.virtio.queue import (  # noqa: E402
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

MSIZE = 512000
PAGE = 4096
ROOT_FID = 1
_DESC = struct.Struct("<QIHH")
_ACK = struct.pack("<I", 1)


class CountingIrq(NullIrq):
    def __init__(self) -> None:
        self.pulses = 0

    def set_level(self, level: bool) -> None:
        self.pulses += level


class Guest:
    """A guest-side 9p transport over one queue: fixed buffers, reused per request."""

    def __init__(self, share: str) -> None:
        self.irq = CountingIrq()
        self.mem = GuestMemory.anonymous(64 << 20)
        self.dev = NinePDevice(share, "bench")
        self.t = VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.d = GuestDriver(self.t, self.mem)
        assert self.d.init()
        q = self.d.queues[0]
        self.q = q
        self.table = self.d.alloc(DESC_SIZE * 130, 16)
        self.request = self.d.alloc(8192, 8)
        self.reply = self.d.alloc(8192, 8)
        self.header = self.d.alloc(16, 8)
        self.pages = [self.d.alloc(PAGE, PAGE) for _ in range(MSIZE // PAGE + 1)]
        self.tag = 0
        # per message type: seconds in the device's and transport's code, per message
        self.device_times: dict[int, list[float]] = collections.defaultdict(list)

    def _submit(self, msg: bytes, writable: list[tuple[int, int]]) -> int:
        """One request as an indirect chain; returns the used length."""
        mem, q = self.mem, self.q
        mem.write(self.request, msg)
        bufs = [(self.request, len(msg), 0)] + [(g, n, VIRTQ_DESC_F_WRITE) for g, n in writable]
        table = b"".join(_DESC.pack(g, n, f | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0),
                                    i + 1) for i, (g, n, f) in enumerate(bufs))
        mem.write(self.table, table)
        mem.write(q.desc, _DESC.pack(self.table, len(table), VIRTQ_DESC_F_INDIRECT, 0))
        mem.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), 0)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        mem.write_u16(q.avail + 2, q.avail_idx)
        mem.write_u16(q.avail + 4 + 2 * q.size, q.last_used)  # used_event: the next one
        started = time.perf_counter()
        self.t.handle_notify(0)  # what the I/O thread does for the ioeventfd
        # the guest's interrupt handler (vm_interrupt), through the vCPU thread's path
        if self.t.read(mmio.INTERRUPT_STATUS, 4) != bytes(4):
            self.t.write(mmio.INTERRUPT_ACK, _ACK)
        self.device_times[msg[4]].append(time.perf_counter() - started)
        slot = q.last_used % q.size
        _head, length = struct.unpack("<II", mem.read(q.used + 4 + 8 * slot, 8))
        q.last_used = (q.last_used + 1) & 0xFFFF
        return length

    def rpc(self, mtype: int, fmt: str, *values: object) -> bytes:
        self.tag = (self.tag + 1) % wire.NOTAG
        length = self._submit(tmessage(mtype, self.tag, pack(fmt, *values)),
                              [(self.reply, 8192)])
        reply = self.mem.read(self.reply, length)
        if reply[4] != mtype + 1:
            raise RuntimeError(f"reply {reply[4]} to {mtype}: {reply[:16]!r}")
        return reply

    def read(self, fid: int, offset: int, count: int) -> int:
        self.tag = (self.tag + 1) % wire.NOTAG
        pages = (count + PAGE - 1) // PAGE
        length = self._submit(tmessage(wire.TREAD, self.tag, pack("dqd", fid, offset, count)),
                              [(self.header, 11)] + [(p, PAGE) for p in self.pages[:pages]])
        return length - 11

    def mount(self) -> None:
        self.rpc(wire.TVERSION, "ds", MSIZE, b"9P2000.L")
        self.rpc(wire.TATTACH, "ddssd", ROOT_FID, wire.NOFID, b"", b"", 0)


def make_tree(root: Path, dirs: int, per_dir: int, big_mib: int) -> None:
    with open(root / "big", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(big_mib):
            f.write(block)
    for d in range(dirs):
        sub = root / "meta" / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(per_dir):
            (sub / f"f{i:03d}").write_bytes(b"x" * (i % 7))


def walk(g: Guest, dirs: int, per_dir: int) -> int:
    """Per file: Twalk one name from its directory's fid, Tgetattr, Tclunk."""
    messages = 0
    g.rpc(wire.TWALK, "ddws", ROOT_FID, 2, 1, b"meta")
    for d in range(dirs):
        g.rpc(wire.TWALK, "ddws", 2, 3, 1, f"d{d:02d}".encode())
        for i in range(per_dir):
            g.rpc(wire.TWALK, "ddws", 3, 4, 1, f"f{i:03d}".encode())
            g.rpc(wire.TGETATTR, "dq", 4, 0x7FF)
            g.rpc(wire.TCLUNK, "d", 4)
            messages += 3
        g.rpc(wire.TCLUNK, "d", 3)
    g.rpc(wire.TCLUNK, "d", 2)
    return messages


def read(g: Guest, size: int) -> int:
    g.rpc(wire.TWALK, "ddws", ROOT_FID, 5, 1, b"big")
    g.rpc(wire.TLOPEN, "dd", 5, 0)
    offset = messages = 0
    count = MSIZE - 11
    while offset < size:
        n = g.read(5, offset, count)
        if n <= 0:
            raise RuntimeError(f"Tread at {offset}: {n}")
        offset += n
        messages += 1
    g.rpc(wire.TCLUNK, "d", 5)
    return messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=("walk", "read"))
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dirs, per_dir = max(1, args.files // 100), min(100, args.files)
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        make_tree(Path(tmp), dirs, per_dir, args.mib)
        g = Guest(tmp)
        g.mount()
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            walk(g, dirs, per_dir) if args.profile == "walk" else read(g, args.mib << 20)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
            return 0
        result: dict[str, float] = {}
        for name, work, unit in (("walk", lambda: walk(g, dirs, per_dir), dirs * per_dir),
                                 ("read", lambda: read(g, args.mib << 20), args.mib << 20)):
            best = None
            g.device_times.clear()
            for _ in range(args.repeat):
                started = time.perf_counter()
                work()
                took = time.perf_counter() - started
                best = took if best is None else min(best, took)
            assert best is not None
            # medians: the machine's other load only ever adds time
            med = {t: statistics.median(v) * 1e6 for t, v in g.device_times.items()}
            if name == "walk":
                result["walk_device_us_per_file"] = round(
                    med[wire.TWALK] + med[wire.TGETATTR] + med[wire.TCLUNK], 2)
                for t, label in ((wire.TWALK, "twalk"), (wire.TGETATTR, "tgetattr"),
                                 (wire.TCLUNK, "tclunk")):
                    result[f"{label}_device_us"] = round(med[t], 2)
                result["walk_files_s"] = round(unit / best)
            else:
                result["tread_device_us"] = round(med[wire.TREAD], 2)
                result["read_mb_s"] = round(unit / best / 1e6, 1)
        result["interrupts"] = g.irq.pulses
        print(json.dumps(result))
        g.dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
