"""Fuzz harness for kvmpy's virtio devices: raw bytes in, one hostile guest out.

What it is: `TestOneInput(data)`, the entry point atheris (libFuzzer) calls,
and `run_one(kind, data)`, which decodes the bytes into one guest's life with
one device (blk, net, console or rng) behind the virtio-mmio transport, with
guest memory in a bytearray (`GuestMemory.from_buffer`):

    byte 0 (TestOneInput only)  device: blk, net, console, rng, 9p, vsock (unless
                                KVMPY_FUZZ_DEVICE)
    byte 1                      bit 0 clear: run the driver init sequence first
    byte 2, 3                   features the driver drops (half the time none);
                                queue size 2^(n % 9)
    then, until the bytes run out, operations:
      hostile chain   descriptors with guest-chosen addr/len/flags/next (in RAM, near
                      its edge, far outside it, 2^64-1...), optional indirect table,
                      published in the available ring (sometimes with a wild idx) + notify
      valid request   a well-formed request for the device (blk I/O on a real file,
                      net rx/tx, console in/out, rng, a 9p message on a small tree,
                      a vsock packet or receive buffer) via the test driver
      register write  any offset/size/value in the 4 KiB window (mostly real registers)
      register read, ioeventfd-style notify, interrupt ack, reset and re-init,
      a burst (one register written up to 4,096 times, the value counting up),
      a repeated chain (an indirect table of up to 1,024 descriptors naming one buffer),
      raw memory write over the rings or buffers, backend input (net frame, console
      bytes)

What is checked, after every operation: no exception leaves the transport or
a device entry point; no error is logged by the transport's safety net (an
internal bug that it caught counts as a failure); the interrupt line equals
InterruptStatus != 0; a live device has DRIVER_OK and neither DEVICE_NEEDS_RESET
nor FAILED; FEATURES_OK implies VIRTIO_F_VERSION_1 was accepted; the disk image
keeps its size; the virtio code logged at most MAX_LOG_LINES lines for the input
(log flooding); the input's host allocations peaked below MAX_HOST_MEMORY, a bound
tied to guest RAM (tracemalloc, on one input in KVMPY_FUZZ_MEMORY_EVERY, 8 by
default: memory amplification). Out-of-bounds access is
excluded by construction: every guest access goes through GuestMemory's checked
views, so an access outside the bytearray is an exception the device must handle,
which the first check catches if it does not.

Run it (see mk/fuzz.mk):

    .venv/bin/python fuzz/virtio_fuzz.py --engine hypothesis --device blk --runs 100000
    KVMPY_FUZZ_DEVICE=net .venv/bin/python fuzz/virtio_fuzz.py -runs=100000   # atheris
    make fuzz-harness HARNESS_RUNS=100000 [FUZZ_ENGINE=atheris]

What it is not: a fuzzer of the KVM layer, or of the tap (net uses an
in-memory backend). The 9p server's messages have their own, deeper harness
(fuzz/ninep_fuzz.py); here 9p is fuzzed through its transport.
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvmpy.bus import NullIrq  # noqa: E402
from kvmpy.fuzz.ops import NINEP_REQUESTS as _NINEP  # noqa: E402
from kvmpy.fuzz.ops import Stream as Input  # noqa: E402
from kvmpy.memory import GuestMemory  # noqa: E402
from kvmpy.virtio import mmio  # noqa: E402
from kvmpy.virtio.blk import Block  # noqa: E402
from kvmpy.virtio.console import Console  # noqa: E402
from kvmpy.virtio.device import (  # noqa: E402
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FAILED,
    VIRTIO_STATUS_FEATURES_OK,
    VirtioDevice,
)
from kvmpy.virtio.driver import DriverQueue, GuestDriver, MemoryBackend  # noqa: E402
from kvmpy.virtio.net import Net  # noqa: E402
from kvmpy.virtio.ninep import NinePDevice  # noqa: E402
from kvmpy.virtio.queue import (  # noqa: E402
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from kvmpy.virtio.rng import Rng  # noqa: E402
from kvmpy.virtio.vsock import HDR as VSOCK_HDR  # noqa: E402
from kvmpy.virtio.vsock import Vsock  # noqa: E402

DEVICES = ("blk", "net", "console", "rng", "9p", "vsock")
MEM_SIZE = 0x20000
# Oracles beyond "no exception": the lines the virtio code may log for one input (a
# device logs each complaint a few times at most, however often the guest repeats it,
# and `op_burst` repeats one 4,096 times), and the host memory one input may allocate
# at its peak (tracemalloc), tied to guest RAM: a device that copies what the guest's
# descriptors claim, rather than what its RAM holds, goes past it.
# tracemalloc slows an input about five times, so one input in MEMORY_EVERY runs under
# it (0: none); an amplifying input a coverage-guided fuzzer found is run again and
# again as it is mutated, so it meets the oracle soon.
MAX_LOG_LINES = 200
MAX_HOST_MEMORY = 32 * MEM_SIZE
MEMORY_EVERY = int(os.environ.get("KVMPY_FUZZ_MEMORY_EVERY", "8"))
DISK_SECTORS = 64
MAX_OPS = 64
_DESC = struct.Struct("<QIHH")
REGISTERS = (0x000, 0x004, 0x008, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
             0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC,
             0x0C0, 0x0FC, 0x100, 0x104, 0x108, 0x10C)
WILD_ADDRESSES = (MEM_SIZE - 1, MEM_SIZE, MEM_SIZE - 8, MEM_SIZE - 16, 2**64 - 1, 2**63,
                  2**32, 0xFFFFFFF0, 0xD0000000, 0)
WILD_LENGTHS = (0, 1, 15, 16, 17, 512, 513, 2**31, 2**32 - 1, MEM_SIZE, MEM_SIZE + 1)


class Failure(AssertionError):
    """An invariant broke: this input found a bug."""


class _ErrorTrap(logging.Handler):
    """Turns an ERROR log from the virtio code (the transport's safety net) into a failure,
    and counts the lines the virtio code logs (`check` bounds them per input)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        if record.levelno >= logging.ERROR:
            self.records.append(record)


_trap = _ErrorTrap()
# the devices' loggers, and the 9p server's (its "bug" path logs at ERROR)
_logs = [logging.getLogger("kvmpy.virtio"), logging.getLogger("kvmpy.ninep")]


def install_trap() -> None:
    """Catch ERROR logs from kvmpy.virtio and kvmpy.ninep and count their lines; silence
    their (expected) guest-misbehaviour warnings."""
    for log in _logs:
        if _trap not in log.handlers:
            log.addHandler(_trap)
            log.setLevel(logging.INFO)
            log.propagate = False


def uninstall_trap() -> None:
    """Give their logging back (for test suites that import this harness)."""
    for log in _logs:
        log.removeHandler(_trap)
        log.setLevel(logging.NOTSET)
        log.propagate = True
    _trap.records.clear()
    _trap.lines = 0

stats: Counter[str] = Counter()


_disk_path: str | None = None
_share_path: str | None = None


def _share() -> str:
    """A small directory tree for 9p (and a place for vsock's socket), one per run."""
    global _share_path
    if _share_path is None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _share_path = tempfile.mkdtemp(prefix="kvmpy-fuzz-9p-", dir=folder)
        os.mkdir(os.path.join(_share_path, "sub"))
        with open(os.path.join(_share_path, "file"), "wb") as f:
            f.write(bytes(range(256)))
    return _share_path


def _ninep_message(inp: Input) -> bytes:
    msg = inp.choice(tuple(range(len(_NINEP))))
    data = bytearray(_NINEP[msg])
    if inp.u8() >= 200:  # a byte changed: a lying size, a wild fid, a long string...
        data[inp.u8() % len(data)] = inp.u8()
    return bytes(data)


def _disk() -> str:
    """One small image for the whole run, on tmpfs when there is one; inputs scribble on it.

    The file is unlinked at once and reopened through /proc/self/fd, so nothing
    is left behind however the fuzzer exits (libFuzzer ends with exit()).
    """
    global _disk_path
    if _disk_path is None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="kvmpy-fuzz-", suffix=".img", dir=folder)
        os.unlink(path)
        os.write(fd, bytes(range(256)) * (DISK_SECTORS * 2))
        _disk_path = f"/proc/self/fd/{fd}"
    return _disk_path


@dataclass
class Env:
    kind: str
    device: VirtioDevice
    transport: mmio.VirtioMmioTransport
    driver: GuestDriver
    mem: GuestMemory
    irq: NullIrq
    backend: MemoryBackend | None = None
    traced: bool = False  # this input runs under tracemalloc (see MEMORY_EVERY)
    memory_baseline: int = 0  # tracemalloc's count when the input began (see `check`)
    tainted: bool = False  # hostile ops ran: the driver's bookkeeping no longer describes memory


def make_env(kind: str, read_only: bool) -> Env:
    backend = None
    device: VirtioDevice
    if kind == "blk":
        device = Block(_disk(), read_only=read_only)
    elif kind == "net":
        backend = MemoryBackend()
        device = Net(backend, "52:54:00:00:00:01", mrg_rxbuf=not read_only)
    elif kind == "console":
        device = Console(lambda data: None)
    elif kind == "9p":
        device = NinePDevice(_share(), "fuzz", read_only=read_only)
    elif kind == "vsock":
        device = Vsock(3, os.path.join(_share(), "vsock.sock"))
    else:
        device = Rng()
    mem = GuestMemory.from_buffer(bytearray(MEM_SIZE))
    irq = NullIrq()
    t = mmio.VirtioMmioTransport(device, mem, irq)
    return Env(kind, device, t, GuestDriver(t, mem), mem, irq, backend)


def _driver_init(env: Env, inp: Input) -> None:
    """The init sequence, usually accepting every feature; sometimes dropping some."""
    drop = inp.u8()
    size = 1 << (inp.u8() % 9)
    offered = env.driver.device_features()
    dropped = 0
    if drop < 128:  # EVENT_IDX, INDIRECT_DESC, MRG_RXBUF, GUEST_CSUM, CSUM, GUEST_TSO4
        for i, feature in enumerate((29, 28, 15, 1, 0, 7)):
            if drop & (1 << i):
                dropped |= 1 << feature
        if drop == 127:  # rarely: a legacy driver, which FEATURES_OK must refuse
            dropped |= 1 << VIRTIO_F_VERSION_1
    if env.driver.init(offered & ~dropped, [size] * 4):
        stats["init-ok"] += 1
        env.tainted = False  # fresh, zeroed rings: the driver's view is exact again


def _addr(inp: Input) -> int:
    b = inp.u8()
    if b < 170:
        return inp.u16() % MEM_SIZE + (MEM_SIZE // 2 if b & 1 else 0)
    if b < 200:
        return inp.u8()
    return inp.choice(WILD_ADDRESSES)


def _length(inp: Input) -> int:
    b = inp.u8()
    if b < 128:
        return inp.u8()
    if b < 200:
        return inp.u16() % 4096
    if b < 230:
        return inp.u16()
    return inp.choice(WILD_LENGTHS)


def _flags(inp: Input) -> int:
    b = inp.u8()
    return b & 7 if b < 240 else inp.u16()


def _next(inp: Input, size: int) -> int:
    b = inp.u8()
    return b % size if b < 240 else inp.u16()


def _descriptor(inp: Input, size: int) -> bytes:
    return _DESC.pack(_addr(inp) % 2**64, _length(inp) % 2**32, _flags(inp), _next(inp, size))


def _hostile_head(env: Env, inp: Input) -> tuple[DriverQueue, int] | None:
    """A queue the driver set up and a descriptor index in it, chosen by the input."""
    if not env.driver.queues:
        return None
    env.tainted = True
    q = env.driver.queues[inp.u8() % len(env.driver.queues)]
    return q, inp.u8() % q.size


def _publish(env: Env, q: DriverQueue, head: int, step: int) -> None:
    """`head` in the available ring, avail.idx moved on by `step`, and a notify."""
    env.mem.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), head)
    q.avail_idx = (q.avail_idx + step) & 0xFFFF
    env.mem.write_u16(q.avail + 2, q.avail_idx)
    env.driver.kick(q.index)


def op_hostile_chain(env: Env, inp: Input) -> None:
    if (picked := _hostile_head(env, inp)) is None:
        return
    q, head = picked
    for i in range(1 + inp.u8() % 6):
        index = (head + i) % q.size if inp.u8() < 200 else inp.u8() % q.size
        raw = _descriptor(inp, q.size)
        env.mem.write(q.desc + 16 * index, raw)
        flags = _DESC.unpack(raw)[2]
        if flags & VIRTQ_DESC_F_INDIRECT and inp.u8() & 1:
            # Put a (hostile) indirect table where the descriptor points, if in RAM.
            addr, length = _DESC.unpack(raw)[:2]
            entries = 1 + inp.u8() % 4
            table = b"".join(_descriptor(inp, entries) for _ in range(entries))
            if env.mem.contains(addr, len(table)):
                env.mem.write(addr, table)
    _publish(env, q, head, 1 if inp.u8() < 230 else inp.u16())


def op_repeat_chain(env: Env, inp: Input) -> None:
    """An indirect table of up to 1,024 descriptors that all name one buffer of up to
    64 KiB: a chain that claims far more bytes than guest RAM holds."""
    if (picked := _hostile_head(env, inp)) is None:
        return
    q, head = picked
    entries = inp.u16() % 1024 + 1
    length = inp.u16() % (MEM_SIZE // 2) + 1
    flags = VIRTQ_DESC_F_WRITE if inp.u8() & 1 else 0
    table = MEM_SIZE - 16 * entries
    env.mem.write(table, b"".join(
        _DESC.pack(0, length, flags | (VIRTQ_DESC_F_NEXT if i + 1 < entries else 0), i + 1)
        for i in range(entries)))
    env.mem.write(q.desc + 16 * head, _DESC.pack(table, 16 * entries, VIRTQ_DESC_F_INDIRECT, 0))
    _publish(env, q, head, 1)


def op_valid_request(env: Env, inp: Input) -> None:
    d = env.driver
    if not d.queues:
        return
    indirect = bool(inp.u8() & 1)
    out: list[bytes]
    ins: list[int]
    if env.kind == "blk":
        rtype = inp.choice((0, 0, 1, 1, 4, 8, 11, 13, 2, 99))
        sector = inp.u8() % (DISK_SECTORS + 4)
        n = inp.u8() % 5
        out = [struct.pack("<IIQ", rtype, 0, sector)]
        if rtype == 1:
            out.append(inp.take(512 * n))
        elif rtype in (11, 13):
            out.append(struct.pack("<QII", inp.u8(), inp.u8() % 16, inp.u8() % 3))
        ins = [512 * n + 1] if rtype == 0 else ([21] if rtype == 8 else [1])
        qi = 0
    elif env.kind == "net":
        qi = inp.u8() % 2
        if qi == 0:
            out, ins = [], [12 + inp.u16() % 3000]
        else:
            out, ins = [bytes(12), inp.take(inp.u8() + 1)], []
    elif env.kind == "console":
        qi = inp.u8() % 2
        out, ins = ([], [1 + inp.u8()]) if qi == 0 else ([inp.take(1 + inp.u8() % 64)], [])
    elif env.kind == "9p":
        qi, out, ins = 0, [_ninep_message(inp)], [inp.choice((8192, 8192, 11, 4, 64))]
    elif env.kind == "vsock":
        qi = inp.u8() % 3
        if qi == 1:  # a packet from the guest: mostly to the host, ops 0..8
            out = [VSOCK_HDR.pack(3 if inp.u8() < 230 else inp.u8(), 2, inp.u8(),
                                  inp.u8() % 4, inp.u8(), 1 if inp.u8() < 230 else 2,
                                  inp.u8() % 9, inp.u8() % 4, inp.u32(), inp.u32())]
            out.append(inp.take(inp.u8()))
            ins = []
        else:
            out, ins = [], [inp.choice((4096, 44, 4, 1))]
    else:
        qi, out, ins = 0, [], [1 + inp.u8()]
    if qi >= len(d.queues) or len(d.queues[qi].free) < len(out) + len(ins):
        return
    try:
        head = d.add_chain(qi, out, ins, indirect=indirect)
    except MemoryError:
        d.reset_heap()
        return
    # (untainted, a used id the driver did not offer, or got back twice, is a bug)
    used = d.used(qi, strict=not env.tainted)
    for _, length, bufs in used:
        stats["used"] += 1
        if not env.tainted and length > sum(len(b) for b in bufs):
            raise Failure(f"used length {length} larger than the writable buffers")
    # A well-formed request to a live device that consumes it at once must come back.
    consumes_now = env.kind in ("blk", "rng", "9p") or qi == 1
    if (consumes_now and not env.tainted and env.device.active
            and head not in [h for h, _, _ in used]):
        raise Failure(f"request {head} on queue {qi} was not completed")


def op_register_write(env: Env, inp: Input) -> None:
    env.tainted = True
    offset = inp.choice(REGISTERS) if inp.u8() < 220 else inp.u16() % 0x1000
    size = inp.choice((4, 4, 4, 4, 4, 1, 2, 8, 3))
    value = inp.u8() if inp.u8() < 128 else inp.u64()
    env.transport.write(offset, (value % (1 << (8 * size))).to_bytes(size, "little"))


def op_register_read(env: Env, inp: Input) -> None:
    offset = inp.choice(REGISTERS) if inp.u8() < 220 else inp.u16() % 0x1000
    size = inp.choice((4, 4, 4, 1, 2, 8))
    if len(env.transport.read(offset, size)) != size:
        raise Failure("read returned the wrong number of bytes")


def op_notify(env: Env, inp: Input) -> None:
    index = inp.u8() % 4 if inp.u8() < 240 else inp.u32()
    env.transport.handle_notify(index)


def op_burst(env: Env, inp: Input) -> None:
    """A guest loop: one register written up to 4,096 times, the value counting up."""
    env.tainted = True
    offset = inp.choice(REGISTERS)
    count, value = inp.u16() % 4096 + 1, inp.u32()
    for i in range(count):
        env.transport.write(offset, ((value + i) & 0xFFFFFFFF).to_bytes(4, "little"))


def op_ack(env: Env, inp: Input) -> None:
    env.driver.ack_interrupt()


def op_reset(env: Env, inp: Input) -> None:
    env.driver.w32(mmio.STATUS, 0)
    if inp.u8() & 1:
        _driver_init(env, inp)


def op_memory_write(env: Env, inp: Input) -> None:
    env.tainted = True
    d = env.driver
    bases = [0]
    for q in d.queues:
        bases += [q.desc, q.avail, q.used]
    start = (bases[inp.u8() % len(bases)] + inp.u16() % 512) % MEM_SIZE
    data = inp.take(inp.u8() % 64)
    env.mem.write(start, data[: MEM_SIZE - start])


def op_backend(env: Env, inp: Input) -> None:
    if env.kind == "net" and env.backend is not None:
        env.backend.inbox.append(inp.take(inp.u16() % 3000))
        env.device.on_backend_readable()  # type: ignore[attr-defined]
    elif env.kind == "console":
        env.device.enqueue_input(inp.take(inp.u8()))  # type: ignore[attr-defined]
    else:
        op_notify(env, inp)


OPS = (op_hostile_chain, op_hostile_chain, op_valid_request, op_valid_request,
       op_register_write, op_register_read, op_notify, op_ack, op_reset, op_memory_write,
       op_backend, op_burst, op_repeat_chain)


def check(env: Env) -> None:
    t = env.transport
    if _trap.records:
        record = _trap.records[0]
        _trap.records.clear()
        trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        raise Failure(f"the transport caught an internal error: {record.getMessage()}\n{trace}")
    if _trap.lines > MAX_LOG_LINES:
        raise Failure(f"log flooding: {_trap.lines} lines from the virtio code in one input")
    peak = tracemalloc.get_traced_memory()[1] - env.memory_baseline if env.traced else 0
    if peak > MAX_HOST_MEMORY:
        raise Failure(f"host memory: one input allocated {peak} bytes at its peak, for "
                      f"{MEM_SIZE} bytes of guest RAM")
    if env.irq.level != (t.interrupt_status != 0):
        raise Failure("interrupt line does not match InterruptStatus")
    live_ok = t.status & VIRTIO_STATUS_DRIVER_OK and not t.status & (
        VIRTIO_STATUS_DEVICE_NEEDS_RESET | VIRTIO_STATUS_FAILED)
    if env.device.active and not live_ok:
        raise Failure(f"device live with status {t.status:#x}")
    version_1 = env.device.acked_features >> VIRTIO_F_VERSION_1 & 1
    if t.status & VIRTIO_STATUS_FEATURES_OK and not version_1:
        raise Failure("FEATURES_OK without VIRTIO_F_VERSION_1")
    if isinstance(env.device, Block) and os.fstat(env.device.fd).st_size != DISK_SECTORS * 512:
        raise Failure("the disk image changed size")


def run_one(kind: str, data: bytes) -> None:
    """One input against one fresh device; raises on a bug, returns otherwise."""
    install_trap()
    _trap.lines = 0
    inp = Input(data)
    mode = inp.u8()
    env = make_env(kind, read_only=bool(mode & 2))
    stats["runs"] += 1
    start_tracing = MEMORY_EVERY > 0 and stats["runs"] % MEMORY_EVERY == 0 \
        and not tracemalloc.is_tracing()
    if start_tracing:
        tracemalloc.start()
    env.traced = tracemalloc.is_tracing()
    if env.traced:
        tracemalloc.reset_peak()
        env.memory_baseline = tracemalloc.get_traced_memory()[0]
    try:
        if not mode & 1:
            _driver_init(env, inp)
        check(env)
        for _ in range(MAX_OPS):
            if inp.exhausted:
                break
            OPS[inp.u8() % len(OPS)](env, inp)
            check(env)
        stats["inputs"] += 1
        if env.transport.broken:
            stats["needs-reset"] += 1
    finally:
        if start_tracing:
            tracemalloc.stop()
        env.device.close()
        if env.backend is not None:
            env.backend.close()


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris looks for)
    kind = os.environ.get("KVMPY_FUZZ_DEVICE")
    if kind is None:
        if not data:
            return
        kind, data = DEVICES[data[0] % len(DEVICES)], data[1:]
    run_one(kind, data)


def run_hypothesis(kind: str, runs: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=runs, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=8, max_size=2048))
    def prop(data: bytes) -> None:
        run_one(kind, data)

    prop()


def run_atheris(argv: list[str]) -> None:
    import atheris  # type: ignore[import-not-found]

    atheris.instrument_all()
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default="atheris")
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--runs", type=int, default=100_000)
    args, rest = parser.parse_known_args()
    if args.device:
        os.environ["KVMPY_FUZZ_DEVICE"] = args.device
    start = time.monotonic()
    if args.engine == "atheris":
        run_atheris([sys.argv[0], f"-runs={args.runs}", *rest])  # libFuzzer prints its summary
        return
    for kind in [args.device] if args.device else list(DEVICES):
        run_hypothesis(kind, args.runs)
    print(f"virtio fuzz (hypothesis, {args.device or 'all devices'}): "
          f"{stats['inputs']} inputs in {time.monotonic() - start:.0f} s without a failure; "
          f"{stats['init-ok']} driver inits, {stats['used']} requests completed, "
          f"{stats['needs-reset']} ended in DEVICE_NEEDS_RESET", flush=True)


if __name__ == "__main__":
    main()
