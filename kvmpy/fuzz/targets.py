"""Fuzz targets: which devices a fuzzed machine has, and the windows the ops may hit.

What it is: `TARGETS`, by name (`kvmpy fuzz --list`). A target is a machine — the
one `kvmpy run` builds from the options in `Target.options` — reduced to the devices
under test, built by the same constructors `Machine` uses, on whichever rig runs it
(kvmpy.fuzz.rigs: a real VM, or buses without KVM). Its windows are those devices'
port or MMIO ranges; the decoder (kvmpy.fuzz.ops) draws addresses only there.

Differences from `kvmpy run`, each for determinism (the same input must do the same
thing every time): virtio-net's backend is in memory (frames the guest sends are
dropped; no tap), the 9p share is read-only, the RTC's clock stands still, and
console output goes to a sink that keeps nothing.

Adding a device: write a `build` function that constructs it and hands it to the rig
(`parts.add_pio` or `parts.add_virtio`), and a `Target` entry (docs/fuzzing.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvmpy import layout
from kvmpy.fuzz.ops import Window
from kvmpy.virtio.device import VirtioDevice
from kvmpy.virtio.mmio import VirtioMmioTransport

DISK_SIZE = 64 * 1024  # the fuzzed disk image: 128 sectors of a known pattern


class ConsoleSink:
    """Where the target's console output goes: counted, not kept (memory stays flat)."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes, /) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class Parts(Protocol):
    """What a target's `build` gets from the rig it runs on."""

    workdir: Path
    console: ConsoleSink

    def add_pio(self, section: str, attr: str, base: int, span: int, device: Any) -> None: ...

    def add_virtio(self, device: VirtioDevice) -> tuple[int, VirtioMmioTransport]: ...

    def power(self, what: str) -> Callable[[], None]: ...  # a device's reboot/poweroff

    def add_serial(self) -> None: ...


@dataclass(frozen=True)
class Target:
    name: str
    about: str
    options: str  # the `kvmpy run` options of the machine it stands for
    build: Callable[[Parts], list[Window]]
    power: bool = False  # its devices may end the VM (reboot, poweroff) when told to
    disk: str | None = None  # "ro" or "rw": the disk image the target has (and oracles watch)


# -- legacy devices ----------------------------------------------------------------------
def _serial(parts: Parts) -> list[Window]:
    """COM1 (a Machine always has it: the rig adds it when it has none)."""
    parts.add_serial()
    return [Window("pio", layout.COM1_PORT, 8, "serial0", registers=tuple(range(8)),
                   values=(0x80, 0x03, 0x0F, 0x07, 0xC7, 0x0B, 0x10, 0x1F))]


def _i8042(parts: Parts) -> list[Window]:
    from kvmpy.bus import NullIrq
    from kvmpy.devices.i8042 import I8042, PORT_SPAN

    parts.add_pio("i8042", "i8042", layout.I8042_PORT,
                  PORT_SPAN, I8042(on_reset=parts.power("reboot"), kbd_irq=NullIrq()))
    return [Window("pio", layout.I8042_PORT, PORT_SPAN, "i8042", registers=(0, 4),
                   values=(0x20, 0x60, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB, 0xAD, 0xAE, 0xC0, 0xD0,
                           0xD1, 0xD2, 0xD3, 0xD4, 0xF4, 0xF5, 0xED, 0xEE, 0xF2, 0xFE, 0xFF))]


def _rtc(parts: Parts) -> list[Window]:
    from kvmpy.devices.rtc import PORT_SPAN, Rtc

    parts.add_pio("rtc", "rtc", layout.RTC_PORT, PORT_SPAN,
                  Rtc(lambda: 1_700_000_000.0, ram_below_4g=layout.MiB * 16))
    return [Window("pio", layout.RTC_PORT, PORT_SPAN, "rtc", registers=(0, 1),
                   values=(0x0A, 0x0B, 0x0C, 0x0D, 0x80, 0x8A, 0x8B, 0x00, 0x32, 0x7F,
                           0x86, 0x26, 0x02, 0x06))]


def _acpi_pm(parts: Parts) -> list[Window]:
    from kvmpy.devices.acpi_pm import PM_PORT_LEN, AcpiPm

    parts.add_pio("acpi-pm", "pm", layout.PM_PORT_BASE, PM_PORT_LEN,
                  AcpiPm(on_poweroff=parts.power("poweroff"), on_reboot=parts.power("reboot")))
    return [Window("pio", layout.PM_PORT_BASE, PM_PORT_LEN, "acpi-pm",
                   registers=tuple(range(PM_PORT_LEN)),
                   values=(0x20, 0x24, 0x28, 0x2C, 0x34, 0x3C, 0x2000, 0x3400, 0x3C00))]


# -- virtio devices ----------------------------------------------------------------------
def _virtio(kind: str, make: Callable[[Parts], VirtioDevice]) -> Callable[[Parts], list[Window]]:
    def build(parts: Parts) -> list[Window]:
        from kvmpy.fuzz.ops import VirtioFacts
        gpa, transport = parts.add_virtio(make(parts))
        device = transport.device
        facts = VirtioFacts(kind, transport.device_features,
                            tuple(q.max_size for q in transport.queues))
        return [Window("mmio", gpa, layout.VIRTIO_MMIO_SIZE, device.name,
                       registers=_VIRTIO_REGISTERS,
                       values=(0, 1, 2, 3, 0xB, 0xF, 0x8F, 0x40, 0x80, 8, 16, 256),
                       virtio=facts)]

    return build


_VIRTIO_REGISTERS = (0x000, 0x004, 0x008, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038,
                     0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0,
                     0x0A4, 0x0AC, 0x0C0, 0x0FC, 0x100, 0x104, 0x108, 0x10C)


def disk_image(workdir: Path) -> Path:
    """The fuzzed disk: a known pattern, made once per run."""
    path = workdir / "disk.img"
    if not path.exists():
        path.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    return path


def _block(read_only: bool) -> Callable[[Parts], VirtioDevice]:
    def make(parts: Parts) -> VirtioDevice:
        from kvmpy.virtio.blk import Block

        return Block(str(disk_image(parts.workdir)), read_only=read_only)

    return make


def _net(parts: Parts) -> VirtioDevice:
    from kvmpy.virtio.driver import MemoryBackend
    from kvmpy.virtio.net import Net

    class DroppingBackend(MemoryBackend):
        """Frames the guest sends go nowhere (MemoryBackend would keep them all)."""

        def write_frame(self, views: Any) -> None:
            pass

    return Net(DroppingBackend(), "52:54:00:12:34:56")


def _console(parts: Parts) -> VirtioDevice:
    from kvmpy.virtio.console import Console

    return Console(output=parts.console.write)


def _rng(parts: Parts) -> VirtioDevice:
    from kvmpy.virtio.rng import Rng

    return Rng()


def _ninep(parts: Parts) -> VirtioDevice:
    from kvmpy.virtio.ninep import NinePDevice

    share = parts.workdir / "share"
    if not share.exists():
        (share / "sub").mkdir(parents=True)
        (share / "file").write_bytes(bytes(range(256)))
    return NinePDevice(str(share), "fuzz", read_only=True)


def _vsock(parts: Parts) -> VirtioDevice:
    from kvmpy.virtio.vsock import Vsock

    return Vsock(3, os.path.join(parts.workdir, "vsock.sock"))


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("serial", "the 16550 UART (COM1)", "--console serial", _serial),
    Target("i8042", "the PS/2 controller (reset line, keyboard)", "(Linux guests)", _i8042,
           power=True),
    Target("rtc", "the CMOS RTC and its NVRAM", "(Linux guests)", _rtc),
    Target("acpi-pm", "the ACPI PM1 and sleep registers", "--acpi on", _acpi_pm,
           power=True),
    Target("blk", "virtio-blk on a read-only image", "--disk IMG,ro",
           _virtio("blk", _block(True)), disk="ro"),
    Target("blk-rw", "virtio-blk on a writable image (put back after each input)",
           "--disk IMG", _virtio("blk", _block(False)), disk="rw"),
    Target("net", "virtio-net, frames to and from memory", "--net tap=T",
           _virtio("net", _net)),
    Target("console", "virtio-console (hvc0)", "--console virtio", _virtio("console", _console)),
    Target("rng", "virtio-rng", "--rng on", _virtio("rng", _rng)),
    Target("9p", "virtio-9p and the 9P2000.L server's message parser, on a read-only share",
           "--share DIR,tag=fuzz,ro", _virtio("9p", _ninep)),
    Target("vsock", "virtio-vsock (its unix socket side listening)", "--vsock 3,uds=PATH",
           _virtio("vsock", _vsock)),
)}
