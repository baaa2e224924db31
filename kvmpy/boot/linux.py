"""Boot Linux directly: the order of the steps, from a kernel file to the first instruction.

    kernel -> initrd above it -> command line -> e820 map -> MP table / ACPI
           -> zero page (64-bit entry) or hvm_start_info (PVH entry)
           -> the BSP's registers in the mode that entry expects

Every step is a loader or configurator in this package that writes guest
memory and returns what it wrote; this module only strings them together and
sets the boot vCPU's registers. Application processors need nothing: the
in-kernel LAPIC starts them when the kernel sends INIT/SIPI.

Linux Documentation/arch/x86/boot.rst ("64-bit Boot Protocol"),
Documentation/arch/x86/x86_64/boot / PVH (xen/include/public/arch-x86/hvm/start_info.h).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from kvmpy import layout
from kvmpy.boot.cmdline import write_cmdline
from kvmpy.boot.e820 import E820Entry, build_e820, mark_acpi
from kvmpy.boot.initrd import LoadedInitrd, load_initrd
from kvmpy.boot.kernel import LoadedKernel, load_kernel
from kvmpy.boot.mptable import write_mptable
from kvmpy.boot.params import write_boot_params
from kvmpy.cpu.modes import setup_long, setup_protected
from kvmpy.memory import GuestMemory

# What every kvmpy guest gets before the machine's devices and the user's arguments:
#   reboot=k       reboot through the i8042's reset line (kvmpy ends with the reboot status)
#   panic=-1       a panic reboots at once instead of hanging the VMM
#   pci=off        there is no PCI bus; don't probe for one
#   i8042.noaux    no mouse port: skip its probe timeouts
#   i8042.nokbd    nor a keyboard worth probing: the console is the UART (or hvc0), and
#                  the controller is there for reboot=k, which does not need the driver.
#                  atkbd's probe is a dozen commands through the controller, each a VM
#                  exit and an interrupt, on the way to /init (`i8042.nokbd=0` brings
#                  the keyboard back: kvmpy.devices.i8042 answers atkbd)
BASE_CMDLINE = "reboot=k panic=-1 pci=off i8042.noaux i8042.nokbd"


class LinuxBoot(NamedTuple):
    """What was placed where: for diagnostics, tests and the `--stats` report."""

    kernel: LoadedKernel
    initrd: LoadedInitrd | None
    cmdline: str
    e820: list[E820Entry]
    acpi_rsdp_gpa: int


def boot_linux(memory: GuestMemory, bsp: Any, *, kernel: Path, initrd: Path | None,
               cmdline: str, n_cpus: int, prefer_pvh: bool = True,
               unpacked: Path | None = None,
               acpi: tuple[int, int, int] | None = None) -> LinuxBoot:
    """Load and configure everything; leave `bsp` at the kernel's entry.

    `acpi` is (rsdp_gpa, start, end) when ACPI tables were written; without
    it the kernel finds CPUs in the MP table and devices on the command line.
    `unpacked`: the ELF a bzImage's kernel was unpacked to (`unpack.py`), booted
    instead of its decompressor.
    """
    loaded = load_kernel(memory, kernel, prefer_pvh=prefer_pvh, unpacked=unpacked)
    rd = None
    if initrd is not None:
        rd = load_initrd(memory, initrd, kernel_end=loaded.end_gpa,
                         addr_max=loaded.initrd_addr_max)
    line = write_cmdline(memory, cmdline, loaded.cmdline_max)
    e820 = build_e820(memory)
    write_mptable(memory, n_cpus)
    rsdp = 0
    if acpi is not None:
        rsdp, start, end = acpi
        e820 = mark_acpi(e820, start, end - start)

    if loaded.protocol == "pvh":
        from kvmpy.boot.pvh import write_start_info

        start_info = write_start_info(memory, e820=e820, cmdline=line, initrd=rd, rsdp_gpa=rsdp)
        # PVH: 32-bit protected mode, paging off, EBX = hvm_start_info (start_info.h)
        setup_protected(bsp, memory, loaded.entry_gpa, layout.BOOT_STACK_TOP, rbx=start_info)
    else:
        zero_page = write_boot_params(memory, e820=e820, cmdline=line,
                                      setup_header=loaded.setup_header,
                                      kernel_load_gpa=loaded.load_gpa, initrd=rd,
                                      acpi_rsdp_gpa=rsdp)
        # 64-bit boot protocol: long mode, identity map, RSI = boot_params
        setup_long(bsp, memory, loaded.entry_gpa, layout.BOOT_STACK_TOP, rsi=zero_page)
    return LinuxBoot(loaded, rd, cmdline, e820, rsdp)
