"""Guest physical memory: one object, every access a checked (gpa, length).

What it is: the host mappings that back guest RAM, and the only way kvmpy
code reads or writes guest memory. Each region is an anonymous `mmap` (or, for
fuzzing and unit tests, any writable buffer) placed at a guest-physical
address. An access that leaves a region, crosses from one region into a gap or
into another region, or has a negative address or length raises
`GuestMemoryError`; no guest-chosen number can reach host memory outside a
region, because every access goes through a bounds-checked memoryview slice.

What it is not: it knows nothing about KVM. The VM registers the regions with
KVM_SET_USER_MEMORY_REGION using `Region.host_address`.

Learned from rust-vmm vm-memory (guest_memory.rs, bytes.rs).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import _cffi_backend

from kvmpy.errors import ConfigError, GuestMemoryError

PAGE = 4096
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Region(NamedTuple):
    """A contiguous run of guest RAM backed by one host buffer."""

    gpa: int
    size: int
    buffer: mmap.mmap | bytearray
    view: memoryview
    offset: int = 0  # where the region starts inside `buffer`

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the first byte (for KVM_SET_USER_MEMORY_REGION)."""
        return _address_of(self.buffer) + self.offset


class GuestMemory:
    """Guest RAM as a sorted list of non-overlapping regions."""

    def __init__(self, regions: Sequence[tuple[int, mmap.mmap | bytearray]],
                 sizes: Sequence[int] | None = None) -> None:
        """`regions` are (gpa, buffer); a region of `sizes[i]` bytes sits at the buffer's
        first 2 MiB boundary when the buffer is larger than that (see `anonymous`)."""
        self.regions: list[Region] = []
        wanted = dict(zip((gpa for gpa, _ in regions), sizes, strict=True)) if sizes else {}
        for gpa, buf in sorted(regions, key=lambda r: r[0]):
            size = wanted.get(gpa, len(buf))
            if gpa < 0 or size <= 0:
                raise ConfigError(f"bad memory region at {gpa:#x} size {size:#x}")
            if self.regions and gpa < self.regions[-1].end:
                raise ConfigError(f"memory region at {gpa:#x} overlaps the one before")
            offset = _huge_page_offset(buf) if size < len(buf) else 0
            view = memoryview(buf)[offset : offset + size]
            self.regions.append(Region(gpa, size, buf, view, offset))
        if not self.regions:
            raise ConfigError("guest memory needs at least one region")
        # (start, end, view, host address of start) per region: the lookup every guest
        # access makes (`view`, `host_address`), kept flat
        self._spans = [(r.gpa, r.gpa + r.size, r.view, r.host_address) for r in self.regions]
        # True when every region is anonymous memory, where a page nobody ever touched
        # reads as zeros (so a snapshot can skip what /proc/self/pagemap says is untouched)
        self.anonymous_backing = False
        # Pages (gpa // PAGE) handed out writable since `track_writes` began, or None:
        # what a fast reset copies back besides the guest's own writes (kvmpy.state.reset)
        self.written: set[int] | None = None

    # -- construction -----------------------------------------------------
    @classmethod
    def anonymous(cls, size: int, hole: tuple[int, int] | None = None) -> GuestMemory:
        """RAM of `size` bytes from gpa 0, skipping the MMIO `hole` [start, end).

        RAM that would fall in the hole is placed above it, as on a PC: the
        guest sees `size` bytes in total.
        """
        spans = ram_spans(size, hole)
        # Each mapping gets 2 MiB of slack so the region can start on a 2 MiB
        # boundary: then the host backs guest RAM with transparent huge pages
        # and a nested hypervisor takes far fewer faults to map it.
        regions = []
        for gpa, length in spans:
            buf = mmap.mmap(-1, length + HUGE_PAGE,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
            if hasattr(buf, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)
            regions.append((gpa, buf))
        memory = cls(regions, sizes=[length for _, length in spans])
        memory.anonymous_backing = True
        return memory

    @classmethod
    def from_buffer(cls, buf: bytearray, gpa: int = 0) -> GuestMemory:
        """One region over a caller's buffer: device tests and fuzzers use this."""
        return cls([(gpa, buf)])

    # -- lookup -----------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest RAM address."""
        return self.regions[-1].end

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if [gpa, gpa+length) lies wholly inside one region."""
        if gpa < 0 or length < 0:
            return False
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return True
        return False

    def track_writes(self, on: bool = True) -> None:
        """Record in `written` every page a writable window or address is taken on
        (`view`, `views`, `host_address`, the write helpers): a device's DMA, which
        KVM's dirty log does not see. Conservative: a window taken only to read counts
        too. Off (None), which is the default, costs one test per window."""
        self.written = set() if on else None

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window on [gpa, gpa+length); it must lie in one region."""
        window = self._view(gpa, length)
        written = self.written  # (read once: `track_writes` may swap it meanwhile)
        if written is not None and length > 0:  # (after the check: a guest's length
            # of 4 GiB must not put a million page numbers in the set before it fails)
            written.update(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
        return window

    def _view(self, gpa: int, length: int) -> memoryview:
        """`view` that records nothing: for reads."""
        view, offset = self.window(gpa, length)
        return view[offset : offset + length]

    def window(self, gpa: int, length: int) -> tuple[memoryview, int]:
        """The region view that holds [gpa, gpa+length), and the offset of `gpa` in it.

        For structures a device reads and writes at fixed places for as long as the
        guest keeps them there (a virtqueue's rings): checked once here, then accessed
        with `struct.unpack_from`/`pack_into` at offsets, with no window made per access.
        No buffer is exported, so `close` still can release the region; an access
        after that raises ValueError. Writes this way are not recorded in `written`:
        the caller records them (`view`) while `written` is not None.
        """
        if gpa >= 0 and length >= 0:
            for start, end, view, _ in self._spans:
                if start <= gpa and gpa + length <= end:
                    return view, gpa - start
        raise GuestMemoryError(f"guest access [{gpa:#x}, +{length:#x}) is outside guest RAM")

    def views(self, gpas: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        """`view` of each (gpas[i], lengths[i]), in order: a scatter list in one call."""
        return [self.view(gpa, n) for gpa, n in zip(gpas, lengths, strict=True)]

    def read_view(self, gpa: int, length: int) -> memoryview:
        """`view`, read-only: a window only read through (nothing is recorded in
        `written`, since nothing can be written through it)."""
        return self._view(gpa, length).toreadonly()

    def read_views(self, gpas: Sequence[int], lengths: Sequence[int]) -> list[memoryview]:
        """`read_view` of each (gpas[i], lengths[i]), in order."""
        _view = self._view
        return [_view(gpa, n).toreadonly() for gpa, n in zip(gpas, lengths, strict=True)]

    def host_address(self, gpa: int, length: int) -> int:
        """The host virtual address of [gpa, gpa+length), checked exactly as `view` is.

        For system calls that take addresses (preadv: kvmpy.virtio.hostio). The address
        is valid while this memory is open: `Machine.close` stops the I/O thread, their
        only user, before it closes the memory.
        """
        if gpa >= 0 and length >= 0:
            for start, end, _, base in self._spans:
                if start <= gpa and gpa + length <= end:
                    written = self.written  # (read once, as in `view`)
                    if written is not None and length > 0:
                        written.update(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
                    return base + gpa - start
        raise GuestMemoryError(f"guest access [{gpa:#x}, +{length:#x}) is outside guest RAM")

    # -- bytes ------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self._view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        v = self.view(gpa, length)
        v[:] = bytes([value]) * length

    def read_u8(self, gpa: int) -> int:
        return self._view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self._view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self._view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self._view(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value & 0xFFFFFFFFFFFFFFFF)

    def close(self) -> None:
        self._spans = []
        for r in self.regions:
            r.view.release()
            if isinstance(r.buffer, mmap.mmap):
                r.buffer.close()


def ram_spans(size: int, hole: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(gpa, length) of each region of `size` bytes of RAM from gpa 0 around `hole`."""
    if size <= 0 or size % mmap.PAGESIZE:
        raise ConfigError(f"memory size {size:#x} must be a positive multiple of 4 KiB")
    if hole is None or size <= hole[0]:
        return [(0, size)]
    return [(0, hole[0]), (hole[1], size - hole[0])]


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
HUGE_PAGE = 2 << 20


def _huge_page_offset(buf: mmap.mmap | bytearray) -> int:
    """Bytes from the start of `buf` to its first 2 MiB-aligned host address."""
    return -_address_of(buf) % HUGE_PAGE


def _address_of(buf: mmap.mmap | bytearray) -> int:
    """Host virtual address of `buf`'s first byte (cffi's, lighter to import than ctypes')."""
    ffi = _cffi_backend.FFI()
    anchor = ffi.from_buffer(buf)
    address = int(ffi.cast("uintptr_t", anchor))
    ffi.release(anchor)  # drop the buffer export so the mapping can be closed later
    return address
