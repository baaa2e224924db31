"""Naming an address in the lab kernel, from the symbols its first run read for us.

Why: a stalled lab is read through QEMU's monitor, which gives each lab CPU's RIP as a
number. Debian ships no real System.map (its System.map file is a placeholder that
points to the -dbg package), so the lab reads its own /proc/kallsyms once per image,
code symbols only (~2 MB, ~2 s under TCG), and the host keeps it in the image
(`save_kallsyms`). The lab boots the kernel as a PVH vmlinux, which never runs the
bzImage's decompressor and so is not relocated: its text is where it was in that first
run. Modules may load elsewhere; every run writes its /proc/modules, and an address in
a module is moved by the difference of the module's two load addresses.

What it is not: a symbolizer for any kernel but the lab's.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from kvmpy.hostsyms import host_kernel_symbol

Symbolizer = Callable[[int], "str | None"]
MODULES_SUFFIX = ".modules"  # beside the kept kallsyms: /proc/modules when it was read


def module_bases(proc_modules: str) -> dict[str, tuple[int, int]]:
    """name -> (start, size) of each module in a /proc/modules text whose address is shown."""
    bases = {}
    for line in proc_modules.splitlines():
        fields = line.split()
        try:  # name size refcount deps state address [taint]
            size, start = int(fields[1]), int(fields[5], 16)
        except (IndexError, ValueError):
            continue
        if start:  # zeros: addresses hidden from whoever read it
            bases[fields[0]] = (start, size)
    return bases


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def lab_symbolizer(kallsyms: Path, proc_modules: Path) -> Symbolizer:
    """name(address): '[module] symbol+0xoff', 'symbol+0xoff', or None, for an address of
    the lab run whose /proc/modules is `proc_modules`."""
    now = module_bases(_read(proc_modules))
    then = module_bases(_read(kallsyms.with_name(kallsyms.name + MODULES_SUFFIX)))

    def name(address: int) -> str | None:
        for module, (start, size) in now.items():
            if start <= address < start + size:
                if module not in then:
                    return f"[{module}]+{address - start:#x}"
                address += then[module][0] - start
                break
        return host_kernel_symbol(address, str(kallsyms)) if kallsyms.exists() else None

    return name


def save_kallsyms(job: Path, kallsyms: Path) -> None:
    """Keep the symbols a lab run read (`job`/kallsyms, with its /proc/modules) as
    `kallsyms`, whole or not at all; a cache we cannot write is left alone."""
    read, modules = job / "kallsyms", job / "modules"
    if kallsyms.exists() or not read.exists() or not modules.exists():
        return  # (the lab writes kallsyms under another name and renames it when whole)
    try:
        shutil.copyfile(modules, kallsyms.with_name(kallsyms.name + MODULES_SUFFIX))
        partial = kallsyms.with_name(kallsyms.name + ".partial")
        shutil.copyfile(read, partial)
        partial.rename(kallsyms)
    except OSError:
        pass
