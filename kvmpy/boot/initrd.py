"""The initial ramdisk: placed as high as it may go in low RAM, below the MMIO hole.

What it is: the placement rule and the loader. The initrd goes at the highest
`layout.INITRD_ALIGN`-aligned address such that its last byte is at or below
the kernel's `initrd_addr_max` (boot.rst: "the maximum address that may be
occupied by the initial ramdisk/ramfs contents") and it ends inside the RAM
region that starts below the hole, and it must start at or above the end of
the kernel (`kernel_end`, which includes the kernel's decompression space).
High placement keeps it clear of the kernel, as the boot protocol recommends.

What it is not: it writes no boot_params; `params.py` and `pvh.py` record it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from kvmpy import layout
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

NO_LIMIT = 0xFFFF_FFFF  # kernels without a header (vmlinux, PVH): only the hole limits it


class LoadedInitrd(NamedTuple):
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def low_ram(memory: GuestMemory) -> tuple[int, int]:
    """[start, end) of the RAM region holding 1 MiB, its end capped at the MMIO hole."""
    for region in memory:
        if region.gpa <= layout.HIMEM < region.end:
            return region.gpa, min(region.end, layout.MMIO_HOLE)
    raise LoaderError(f"guest RAM does not reach {layout.HIMEM:#x}, where kernels load")


def low_ram_end(memory: GuestMemory) -> int:
    """One past the last byte of low RAM (see `low_ram`)."""
    return low_ram(memory)[1]


def place_initrd(
    memory: GuestMemory, size: int, *, kernel_end: int, addr_max: int | None = None
) -> int:
    """The gpa for an initrd of `size` bytes (see the module docstring); LoaderError if none."""
    if size <= 0:
        raise LoaderError("initrd is empty")
    start, top = low_ram(memory)
    if addr_max is not None:
        top = min(top, addr_max + 1)
    gpa = (top - size) // layout.INITRD_ALIGN * layout.INITRD_ALIGN
    if gpa < max(kernel_end, start):
        raise LoaderError(
            f"initrd of {size:#x} bytes does not fit between the kernel's end {kernel_end:#x} "
            f"and {top:#x}: give the guest more memory"
        )
    return gpa


def load_initrd(
    memory: GuestMemory, path: str | Path, *, kernel_end: int, addr_max: int | None = None
) -> LoadedInitrd:
    """Read the initrd at `path` and place it in `memory` (see `place_initrd`).

    The file is read straight into guest RAM, not into a bytes object first: a
    distribution's initramfs is tens of megabytes, and one copy of it is enough.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                raise LoaderError(f"initrd {path} is empty")
            gpa = place_initrd(memory, size, kernel_end=kernel_end, addr_max=addr_max)
            got = f.readinto(memory.view(gpa, size))
    except OSError as e:
        raise LoaderError(f"cannot read initrd {path}: {e.strerror or e}") from None
    if got != size:
        raise LoaderError(f"initrd {path}: read {got} of its {size} bytes (did it change?)")
    return LoadedInitrd(gpa, size)
