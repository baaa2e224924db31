"""Which machine description a kernel gets: ACPI tables, or an MP table and the command line.

What it is: `choose_acpi(requested, kernel, modules)` turns `--acpi auto|on|off`
into a decision and a one-line reason. kvmpy can describe the machine two ways
(`kvmpy.boot.linux`):

- ACPI tables (`kvmpy.acpi.tables`): RSDP, FADT (hardware-reduced, with sleep and reset
  registers), MADT and a DSDT listing COM1, the i8042, the RTC and each virtio-mmio
  window as LNRO0005. A kernel with ACPI can then power itself off (`poweroff` writes
  the FADT's sleep register: the VMM ends with status 0), and sees the machine as
  distributions and QEMU's microvm describe it. A distribution kernel such as Debian's
  cloud kernel has neither option below, and only this works for it.
- MP table + `virtio_mmio.device=`: the kernel needs CONFIG_X86_MPPARSE to see more
  than one CPU and CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES to find the virtio devices. It
  cannot power off: `poweroff` halts every CPU with interrupts disabled, which kvmpy
  reports as its own stop (status 6).

`auto` chooses ACPI when
  1. kernel modules are given (`--modules`): a modular kernel loads virtio_mmio from
     the initramfs, and a module cannot take devices the kernel's command line parsed
     before it existed unless VIRTIO_MMIO_CMDLINE_DEVICES is built in; distributions
     leave it out, and describe their machines with ACPI. Or when
  2. the kernel's build configuration is found (`config` beside a kvmpy-built kernel,
     `config-<release>` beside a Debian `vmlinuz-<release>`) and has CONFIG_ACPI=y
     (kvmpy's minimal kernel has it).
Otherwise (no configuration found, or one without ACPI) it uses the MP table: without a
configuration kvmpy cannot tell whether the kernel reads ACPI, and listing the devices
both ways would have a kernel with ACPI probe each twice. The guest-side cost of ACPI
for kvmpy's minimal kernel is about 10 ms of its boot in the lab (docs/performance.md).

What it is not: kernel loading. It reads a bzImage's version string and a config file,
nothing else; a plain vmlinux without a config beside it gets the MP table.
"""

from __future__ import annotations

import struct
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from kvmpy.boot.kconfig import kconfig_options

# Linux Documentation/arch/x86/boot.rst, "The real-mode kernel header": the magic
# "HdrS" at 0x202 and, from protocol 2.00, kernel_version at 0x20E: a pointer to a
# NUL-terminated string, minus 0x200, whose first word is the release.
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"
KERNEL_VERSION_OFFSET = 0x20E
KERNEL_VERSION_BIAS = 0x200
KERNEL_VERSION_MAX = 256


class AcpiMode(Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class AcpiChoice(NamedTuple):
    acpi: bool
    reason: str  # one line: why, for `kvmpy run -v` and error messages


def kernel_release(kernel: Path) -> str | None:
    """The release ("6.1.0-28-cloud-amd64") a bzImage names in its header; None if not one."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x400)
            if head[HEADER_MAGIC_OFFSET:HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC:
                return None
            (pointer,) = struct.unpack_from("<H", head, KERNEL_VERSION_OFFSET)
            if pointer == 0:
                return None
            f.seek(pointer + KERNEL_VERSION_BIAS)
            text = f.read(KERNEL_VERSION_MAX).split(b"\0", 1)[0]
    except (OSError, struct.error):
        return None
    words = text.decode("ascii", errors="replace").split()
    return words[0] if words else None


def find_kernel_config(kernel: Path) -> Path | None:
    """The kernel's .config if it sits where kvmpy's or Debian's layout puts it."""
    candidates = [kernel.parent / "config"]  # kvmpy's $KVMPY_CACHE/kernel/<key>/
    names = {kernel.name.removeprefix("vmlinuz-").removeprefix("vmlinux-")}
    release = kernel_release(kernel)
    if release:
        names.add(release)
    candidates += [kernel.parent / f"config-{n}" for n in sorted(names)]  # Debian /boot
    return next((c for c in candidates if c.is_file()), None)


_OPTIONS = ("CONFIG_ACPI",)


def _kconfig(path: Path) -> dict[str, str]:
    return kconfig_options(path.read_text(errors="replace"), _OPTIONS)


def choose_acpi(requested: AcpiMode | str, kernel: Path,
                modules: Path | None = None) -> AcpiChoice:
    """Decide between ACPI tables and MP table + command-line devices (module docstring)."""
    mode = AcpiMode(requested)
    if mode is AcpiMode.ON:
        return AcpiChoice(True, "ACPI tables: --acpi on")
    if mode is AcpiMode.OFF:
        return AcpiChoice(False, "MP table and command-line devices: --acpi off")
    if modules is not None:
        return AcpiChoice(True, "ACPI tables: a modular kernel (--modules) finds virtio-mmio "
                                "devices only through ACPI")
    config_path = find_kernel_config(kernel)
    if config_path is None:
        return AcpiChoice(False, f"MP table: no kernel config found beside {kernel.name}")
    config = _kconfig(config_path)
    if config.get("CONFIG_ACPI") != "y":
        return AcpiChoice(False, f"MP table: {config_path.name} has no CONFIG_ACPI")
    return AcpiChoice(True, f"ACPI tables: {config_path.name} has CONFIG_ACPI")
