"""Fast reset: a machine put back, many times, to a state kept in this process.

What it is: `mark(machine)` keeps a `ResetPoint` of a machine that is not running
(built and not started, paused, or stopped): every part's state as `capture_state`
gives it (vCPUs with their LAPICs, the irqchip and PIT, every device) and a copy of
guest RAM. From then on two logs say which pages change: KVM's dirty log
(KVM_MEM_LOG_DIRTY_PAGES) for the guest's own writes, and `GuestMemory.written` for
the pages kvmpy's devices take writable windows on (their DMA, which KVM never
sees). `ResetPoint.reset()` copies back only those pages and gives every part its
kept state through the restore code a snapshot uses (`Machine.restore_state`), so a
reset costs what the guest changed since the mark, not how much RAM it has: this is
what a fuzzer does between two inputs (Nyx and kAFL's snapshot reset, QEMU
generic-fuzz's fork), without a new process or a new VM.

KVM_GET_DIRTY_LOG reads a slot's whole bitmap (a bit per 4 KiB page: 32 KiB for
1 GiB), which is the one part of a reset that grows with RAM; the set bits are found
with a C-speed scan of it.

What it is not: a snapshot (nothing leaves the process; kvmpy.state.snapshot writes
those). Disks are not put back (a writable disk keeps what the guest wrote since the
mark: targets that must not change use read-only disks), nor is anything outside
the process (a tap's peer, the console's reader, bytes already printed). A marked
machine's guest RAM is held twice (the copy keeps only pages that were in use).
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any

from kvmpy.errors import KvmpyError
from kvmpy.memory import PAGE, GuestMemory
from kvmpy.state.ram import used_runs

if TYPE_CHECKING:
    from kvmpy.machine import Machine

_ANY = bytes([0] + [1] * 255)  # translate table: 1 for a byte with any bit set


class ResetPoint:
    """A machine's state kept in memory, to go back to with `reset()`."""

    def __init__(self, machine: Machine, sections: dict[str, Any],
                 copies: list[mmap.mmap]) -> None:
        self.machine = machine
        self.sections = sections
        self.restore = machine.restorer(sections)  # checks once, puts back many times
        self.copies = copies  # per region of guest RAM, its contents at the mark
        self.resets = 0
        self.pages_copied = 0  # by the last reset

    def dirty_pages(self) -> list[list[int]]:
        """Per region of guest RAM, the pages (offsets) changed since the mark or the
        last reset."""
        return dirty_pages(self.machine)

    def reset(self) -> int:
        """Put the machine back as it was at the mark; returns the pages copied. The
        machine must not be running (stopped, paused, or never started)."""
        machine = self.machine
        _check_not_running(machine, "reset")
        if _ended(machine):
            machine.settle()  # a read's data still to land in a register (see there)
        copied = 0
        for region, copy, offsets in zip(machine.memory, self.copies, self.dirty_pages(),
                                         strict=True):
            view = region.view
            for offset in offsets:
                view[offset : offset + PAGE] = copy[offset : offset + PAGE]
            copied += len(offsets)
        self.restore()
        if _ended(machine):
            machine.rearm()
        self.resets += 1
        self.pages_copied = copied
        return copied

    def close(self) -> None:
        """Stop logging writes (KVM's log and the devices') and drop the copy of RAM."""
        stop_logging_writes(self.machine, self)
        for copy in self.copies:
            copy.close()
        self.copies = []


def dirty_pages(machine: Machine) -> list[list[int]]:
    """Per region of guest RAM, the pages (offsets) changed since the log was last read,
    by the guest (KVM's dirty log, read and cleared) or by a device (`memory.written`).
    Shared with incremental snapshots (kvmpy.state.diff), which read the same log."""
    memory = machine.memory
    written: set[int] = set()
    if memory.written is not None:  # (swapped, not cleared: an I/O thread may add)
        written, memory.written = memory.written, set()
    out: list[list[int]] = []
    for (slot, gpa, size, _), region in zip(machine.vm.memory_slots, memory, strict=True):
        pages = set(set_bits(machine.vm.dirty_log(slot, size // PAGE)))
        first, last = gpa // PAGE, (gpa + size) // PAGE
        pages.update(p - first for p in written if first <= p < last)
        out.append(sorted(p * PAGE for p in pages if p * PAGE < region.size))
    return out


def mark(machine: Machine) -> ResetPoint:
    """Keep `machine`'s state now (it must not be running) and start logging what
    changes; `ResetPoint.reset()` goes back to it."""
    _check_not_running(machine, "mark")
    if _ended(machine):
        machine.settle()
    sections = machine.capture_state()
    copies = [_copy(machine.memory, region) for region in machine.memory]
    # incremental snapshots counting pages: they end here (a stand-in for a Machine, as
    # kvmpy.fuzz's bus rig is, has none)
    owner = getattr(machine, "dirty_log_owner", None)
    if owner is not None and not isinstance(owner, ResetPoint):
        owner.close()
    point = ResetPoint(machine, sections, copies)
    log_writes(machine, point)
    return point


def log_writes(machine: Machine, owner: object) -> None:
    """Make `owner` the one reader of the pages written from now on: KVM's dirty log (for
    the guest's writes) and `memory.written` (for its devices'), both from clean."""
    machine.dirty_log_owner = owner
    machine.vm.log_dirty_pages(True)
    dirty_pages(machine)  # (KVM's log starts with every page set)
    machine.memory.track_writes(True)


def stop_logging_writes(machine: Machine, owner: object, kvm: bool = True) -> None:
    """Stop the logs `log_writes` started, if `owner` still reads them (`kvm` False:
    `owner` lets go of them, KVM's left on)."""
    if getattr(machine, "dirty_log_owner", None) is not owner:
        return
    machine.dirty_log_owner = None
    if kvm and machine.vm.fd >= 0:
        machine.vm.log_dirty_pages(False)
    machine.memory.track_writes(False)


def _check_not_running(machine: Machine, what: str) -> None:
    threads = machine.threads
    if threads is not None and not threads.done.is_set() and not machine.paused:
        raise KvmpyError(f"{what}: the machine is running (pause it first)")


def set_bits(bitmap: bytes) -> list[int]:
    """The numbers of the bits set in a little-endian bitmap; the zero bytes are
    skipped at C speed (translate, then find), so the cost is the bitmap's length
    in C and the set bits in Python."""
    flags = bitmap.translate(_ANY)
    out: list[int] = []
    pos = flags.find(1)
    while pos >= 0:
        byte = bitmap[pos]
        out.extend(pos * 8 + bit for bit in range(8) if byte >> bit & 1)
        pos = flags.find(1, pos + 1)
    return out


def _ended(machine: Machine) -> bool:
    """Not started, or its run over: no vCPU thread holds a vCPU (a paused one does)."""
    return machine.threads is None or machine.threads.done.is_set()


def _copy(memory: GuestMemory, region: Any) -> mmap.mmap:
    """A private anonymous copy of `region`: only its pages in use are written, the
    rest stay untouched zero pages (no host memory)."""
    copy = mmap.mmap(-1, region.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = region.offset
    for start, length in used_runs(memory, region):
        copy[start - base : start - base + length] = region.view[start - base :
                                                                 start - base + length]
    return copy
