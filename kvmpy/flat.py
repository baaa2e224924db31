"""Load a flat binary (a raw image of code and data) and start a vCPU in it.

Test and tutorial guests are flat binaries linked at `layout.FLAT_LOAD`.
The loader checks the file fits below the EBDA, copies it, and puts the
vCPU in the requested mode at the entry point; there is no boot protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmpy import layout
from kvmpy.cpu.modes import Mode, setup_long, setup_protected, setup_real
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory


def load_flat(memory: GuestMemory, path: Path, gpa: int = layout.FLAT_LOAD) -> int:
    """Copy `path` to `gpa`; returns its size."""
    try:
        image = path.read_bytes()
    except OSError as e:
        raise LoaderError(f"cannot read flat image {path}: {e.strerror}") from None
    if not image:
        raise LoaderError(f"flat image {path} is empty")
    if gpa + len(image) > layout.FLAT_LIMIT:
        raise LoaderError(f"flat image {path} is {len(image)} bytes: it must end below "
                          f"{layout.FLAT_LIMIT:#x} (at most {layout.FLAT_LIMIT - gpa} bytes)")
    memory.write(gpa, image)
    return len(image)


def start_flat(vcpu: Any, memory: GuestMemory, mode: Mode, entry: int, cpl: int = 0,
               **gprs: int) -> None:
    """Point `vcpu` at `entry` in `mode`; the stack starts at the top of the flat area."""
    if cpl and mode is not Mode.LONG:
        raise LoaderError("--cpl 3 needs --mode long (kvmpy only builds user mappings there)")
    if mode is Mode.REAL:
        if entry >= 0x100000:
            raise LoaderError(f"real-mode entry {entry:#x} is above 1 MiB")
        setup_real(vcpu, entry)
        if gprs:
            regs = vcpu.get_regs()
            for name, value in gprs.items():
                setattr(regs, name, value)
            vcpu.set_regs(regs)
    elif mode is Mode.PROTECTED:
        setup_protected(vcpu, memory, entry, layout.FLAT_LIMIT, **gprs)
    else:
        setup_long(vcpu, memory, entry, layout.FLAT_LIMIT, cpl=cpl, **gprs)
