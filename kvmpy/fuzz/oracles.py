"""Oracles: what counts as a bug when a hostile guest's input has run.

"No exception" alone misses most of what makes a VMM unsafe to run a hostile guest:
a device that copies what descriptors claim rather than what RAM holds, one that logs
a line per guest-chosen value, one that goes live after the driver gave up. Each
oracle here watches one class, and a `Finding` names the one that fired:

    exception     an exception escaped a device (through KVM: the vCPU stopped with it)
    hang          one input ran longer than the time limit (SIGALRM)
    memory        the process's peak RSS during one input grew by more than guest RAM
                  plus a fixed slack (a device may copy at most what the guest gave it)
    outside-ram   an access outside guest RAM: a memory window handed out beyond a
                  region, or a change in the guard bytes around each region's mapping
    ro-disk       a read-only disk image changed (checksum)
    log-flood     more than MAX_LOG_LINES warning lines from kvmpy in one input
    vmm-stop      the VMM stopped the guest, or declared a device dead, for a reason a
                  guest cannot cause: a device's internal error caught by the virtio
                  transport's safety net (DEVICE_NEEDS_RESET that no bad ring caused),
                  a power request from a target that has no such device, or the guest
                  stopping (fault, halt) with its code, tables and op list intact
    virtio-state  a virtio transport broke the spec's invariants: live without
                  DRIVER_OK or with FAILED/DEVICE_NEEDS_RESET, FEATURES_OK without
                  VIRTIO_F_VERSION_1, the interrupt line not InterruptStatus != 0

What is not a finding: the guest harming itself. A guest may point a device's DMA at
its own code or page tables; if the interpreter then faults, halts or loops, and its
memory shows the damage, the input just ends (`Integrity`).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvmpy import layout
from kvmpy.memory import GuestMemory
from kvmpy.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FAILED,
    VIRTIO_STATUS_FEATURES_OK,
)
from kvmpy.virtio.mmio import VirtioMmioTransport

ORACLES = ("exception", "hang", "memory", "outside-ram", "ro-disk", "log-flood", "vmm-stop",
           "virtio-state")
MAX_LOG_LINES = 200  # a device logs a complaint a few times at most, however often repeated
MEMORY_SLACK = 16 * layout.MiB  # the interpreter's own heap noise, on top of guest RAM
GUARD = 64 * 1024  # guard bytes watched on each side of each region's mapping
_CANARY = 0xA5


class Finding(BaseException):
    """An oracle fired. A BaseException: the devices' own `except Exception` safety nets
    must not swallow it on its way out of the device that tripped it."""

    def __init__(self, oracle: str, message: str) -> None:
        assert oracle in ORACLES, oracle
        super().__init__(f"{oracle}: {message}")
        self.oracle = oracle
        self.message = message


# -- log lines --------------------------------------------------------------------------
class LogWatch(logging.Handler):
    """Counts kvmpy's warning lines per input (and keeps them from the terminal), and
    notes the ERROR records that carry a traceback: a safety net caught a device bug."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines = 0
        self.caught: list[logging.LogRecord] = []
        self._saved: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        if record.levelno >= logging.ERROR and record.exc_info and len(self.caught) < 4:
            self.caught.append(record)

    def install(self) -> None:
        root = logging.getLogger("kvmpy")
        self._saved = root.level, root.propagate
        root.addHandler(self)
        root.setLevel(logging.WARNING)
        root.propagate = False

    def uninstall(self) -> None:
        root = logging.getLogger("kvmpy")
        root.removeHandler(self)
        if self._saved is not None:
            root.setLevel(self._saved[0])
            root.propagate = self._saved[1]

    def begin(self) -> None:
        self.lines = 0
        self.caught.clear()

    def check(self) -> None:
        if self.caught:
            record = self.caught[0]
            trace = logging.Formatter().formatException(record.exc_info) if record.exc_info \
                else ""
            self.caught.clear()  # (their tracebacks hold frames that hold guest memory)
            last = trace.strip().splitlines()[-1] if trace else ""
            raise Finding("vmm-stop", f"{record.getMessage()} ({last}): the device was "
                          "declared broken for an internal error")
        if self.lines > MAX_LOG_LINES:
            raise Finding("log-flood", f"{self.lines} warning lines from kvmpy in one input "
                          f"(at most {MAX_LOG_LINES})")


# -- host memory ------------------------------------------------------------------------
class MemoryWatch:
    """The process's peak RSS (VmHWM) during each input, against its RSS when the peak
    was last reset (Linux: "5" to /proc/self/clear_refs); the reset only when the peak
    has moved. getrusage's ru_maxrss is never below VmHWM (it is the larger of it and
    the peaks of threads that ended), so while it is under the line nothing can be
    above it: a ~2 us system call per input, and the read of /proc/self/status (~25 us,
    the kernel formats the whole file) only when it is not."""

    def __init__(self, guest_ram: int) -> None:
        self.bound = guest_ram + MEMORY_SLACK
        try:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self._status = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            self._clear = self._status = -1  # (not Linux, or no permission: off)
        self.base = 0
        self.rearm()

    def _field(self, name: bytes) -> int:
        text = os.pread(self._status, 4096, 0)
        at = text.find(name)
        return int(text[at + len(name) : text.find(b"kB", at)]) * 1024

    def rearm(self) -> None:
        if self._status >= 0:
            os.write(self._clear, b"5")
            self.base = self._field(b"VmRSS:")

    def check(self) -> None:
        if self._status < 0:
            return
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= \
                self.base + self.bound // 8:
            return  # (the lower of the two lines below)
        peak = self._field(b"VmHWM:")
        if peak - self.base > self.bound:
            grown = peak - self.base
            self.rearm()
            raise Finding("memory", f"host memory peaked {grown // layout.MiB} MiB above its "
                          f"level before the input (bound: guest RAM + "
                          f"{MEMORY_SLACK // layout.MiB} MiB = {self.bound // layout.MiB} MiB)")
        if peak > self.base + self.bound // 8:
            self.rearm()

    def close(self) -> None:
        for fd in (self._clear, self._status):
            if fd >= 0:
                os.close(fd)


# -- guest RAM's edges ------------------------------------------------------------------
class Guards:
    """Two checks that nothing is read or written outside guest RAM.

    The memory object's window-giving methods (`_view`, which `view` and every read
    and write helper use, and `host_address`) are wrapped with an independent check
    of each window against the regions' bounds as built: a broken bounds check is
    caught at the access, before the data moves. The guard bytes catch what bypasses
    them (a host address used past its window, by preadv or a buffer used directly):
    the unused bytes of each region's mapping on both sides (kvmpy.memory keeps 2 MiB
    of slack per region, to align it) are filled with a pattern and checked after
    every input.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.spans = [(r.gpa, r.end, r.host_address) for r in memory]
        self.guards: list[tuple[Any, int, int]] = []  # (buffer, start, end)
        for r in memory:
            before = min(GUARD, r.offset)
            after = min(GUARD, len(r.buffer) - r.offset - r.size)
            for start, end in ((r.offset - before, r.offset),
                               (r.offset + r.size, r.offset + r.size + after)):
                if end > start:
                    r.buffer[start:end] = bytes([_CANARY]) * (end - start)
                    self.guards.append((r.buffer, start, end))
        self._audit()

    def _audit(self) -> None:
        memory, spans = self.memory, self.spans

        def region(gpa: int, length: int) -> tuple[int, int]:
            for start, end, host in spans:
                if start <= gpa and gpa + length <= end:
                    return start, host
            raise Finding("outside-ram", f"guest memory gave a window on [{gpa:#x}, "
                          f"+{length:#x}), which is not inside guest RAM")

        plain_view, plain_address = memory._view, memory.host_address

        def view(gpa: int, length: int) -> memoryview:
            got = plain_view(gpa, length)  # raises GuestMemoryError when it should
            for start, end, _ in spans:  # `region`, written out: every DMA comes here
                if start <= gpa and gpa + length <= end:
                    break
            else:
                region(gpa, length)  # (raises)
            if len(got) != length:
                raise Finding("outside-ram", f"GuestMemory._view({gpa:#x}, {length:#x}) gave "
                              f"{len(got)} bytes")
            return got

        def host_address(gpa: int, length: int) -> int:
            got = plain_address(gpa, length)
            start, host = region(gpa, length)
            if got != host + gpa - start:
                raise Finding("outside-ram", f"host_address({gpa:#x}) is "
                              f"{got - host - gpa + start:+#x} bytes off its region")
            return got

        # (`view`, the write helpers and `views` all take their windows from `_view`)
        memory._view = view  # type: ignore[method-assign]
        memory.host_address = host_address  # type: ignore[method-assign]

    def check(self) -> None:
        for buffer, start, end in self.guards:
            if buffer[start:end] != bytes([_CANARY]) * (end - start):
                changed = next(i for i in range(start, end) if buffer[i] != _CANARY)
                raise Finding("outside-ram", f"a write landed {changed - start} bytes into "
                              f"the guard at host offset {start:#x} of a RAM mapping")


# -- disks ------------------------------------------------------------------------------
class DiskWatch:
    """A read-only disk's checksum before and after each input; a writable one is put
    back after each input (a reset does not restore disks) so runs stay deterministic.

    The image's modification time is set to a fixed instant in the past (`_UNTOUCHED`)
    when it is watched and whenever it is put back. Every way the kernel lets a
    process change a file's bytes through a descriptor or its path (write, pwritev,
    fallocate, truncate) stamps mtime with the current time, which can never be that
    instant; so an input whose image still has it and its size left the bytes alone,
    and the read and checksum of the whole image are paid only after one that did not.
    """

    def __init__(self) -> None:
        self.disks: list[tuple[Path, bool, bytes, int]] = []

    def watch(self, path: Path, read_only: bool) -> None:
        data = path.read_bytes()
        os.utime(path, ns=(_UNTOUCHED, _UNTOUCHED))
        self.disks.append((path, read_only, data, zlib.crc32(data)))

    def check(self) -> None:
        for path, read_only, data, crc in self.disks:
            st = os.stat(path)
            if st.st_mtime_ns == _UNTOUCHED and st.st_size == len(data):
                continue  # not written since it was put back
            now = path.read_bytes()
            changed = zlib.crc32(now) != crc or len(now) != len(data)
            if changed:
                path.write_bytes(data)  # for the next input (and the next run)
            os.utime(path, ns=(_UNTOUCHED, _UNTOUCHED))
            if changed and read_only:
                raise Finding("ro-disk", f"the read-only disk {path.name} changed "
                              f"({len(data)} -> {len(now)} bytes, checksum differs)")


_UNTOUCHED = 1_000_000_000 * 10**9 + 1  # 2001-09-09, and one ns: no write's timestamp


# -- virtio invariants ------------------------------------------------------------------
def check_virtio(transports: list[VirtioMmioTransport]) -> None:
    for t in transports:
        status = t.status
        live_ok = status & VIRTIO_STATUS_DRIVER_OK and not status & (
            VIRTIO_STATUS_DEVICE_NEEDS_RESET | VIRTIO_STATUS_FAILED)
        if t.device.active and not live_ok:
            raise Finding("virtio-state", f"{t.label} is live with status {status:#x}")
        if status & VIRTIO_STATUS_FEATURES_OK and not t.device.acked_features >> \
                VIRTIO_F_VERSION_1 & 1:
            raise Finding("virtio-state", f"{t.label}: FEATURES_OK without VIRTIO_F_VERSION_1")
        level = getattr(t.irq, "level", None)
        if level is not None and level != (t.interrupt_status != 0):
            raise Finding("virtio-state", f"{t.label}: interrupt line {int(level)} with "
                          f"InterruptStatus {t.interrupt_status:#x}")


# -- the guest's own memory -------------------------------------------------------------
class Integrity:
    """What the interpreter needs intact to run (its code, GDT/TSS, page tables, op list),
    as at the mark: a guest that stopped with these intact was stopped by the VMM."""

    def __init__(self, memory: GuestMemory, image_size: int) -> None:
        self.memory = memory
        self.spans = [(layout.BOOT_GDT, layout.BOOT_TSS + 0x68 - layout.BOOT_GDT),
                      (layout.PML4, layout.PAGE_TABLES_END - layout.PML4),
                      (layout.FLAT_LOAD, image_size)]
        self.pristine = [self._masked(gpa, n) for gpa, n in self.spans]
        self.ops = b""

    def _masked(self, gpa: int, length: int) -> bytes:
        data = bytearray(self.memory.read(gpa, length))
        if gpa == layout.PML4:  # the CPU sets Accessed and Dirty in page-table entries
            for i in range(0, len(data), 8):
                data[i] &= ~0x60
        return bytes(data)

    def intact(self) -> bool:
        return all(self._masked(gpa, n) == p for (gpa, n), p in zip(self.spans, self.pristine,
                                                                    strict=True)) \
            and self.memory.read(layout.FUZZ_OPS, len(self.ops)) == self.ops


# -- time -------------------------------------------------------------------------------
class TimeLimit:
    """`with limit:` raises a `hang` Finding in this (the main) thread if the block runs
    longer than `seconds` (0: no limit). A SIGALRM also takes a vCPU out of KVM_RUN, so
    a guest that never exits is caught too. The handler is installed once (`install`,
    until `uninstall`); each block only arms and disarms the timer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._previous: Any = None

    def _expired(self, _signum: int, _frame: object) -> None:
        raise Finding("hang", f"one input ran longer than {self.seconds:g} s")

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGALRM, self._expired)

    def uninstall(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)

    def __enter__(self) -> None:
        if self.seconds > 0:
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.seconds > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """A `TimeLimit` for one block, its handler installed for that block only."""
    limit = TimeLimit(seconds)
    limit.install()
    try:
        with limit:
            yield
    finally:
        limit.uninstall()
