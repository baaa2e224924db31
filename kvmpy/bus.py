"""Buses: the only dispatcher from a guest address to the device that owns it.

What it is: a sorted map of non-overlapping [base, base+length) ranges to
devices, one instance for port I/O and one for MMIO. A device sees offsets
relative to its own base and never learns about KVM, vCPUs or exits, so the
same device object runs under a unit test or a fuzzer with a fake bus.

Unclaimed addresses behave as on real hardware: reads float to all-ones and
writes are dropped. Each such access is counted, and logged once per address.

Learned from Firecracker's devices/bus.rs.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Protocol

from kvmpy.errors import ConfigError
from kvmpy.log import get_logger

log = get_logger(__name__)


class Device(Protocol):
    """What a bus needs from a device. `size` is 1, 2, 4 or 8 bytes."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class IrqLine(Protocol):
    """An interrupt line a device drives; the VM decides how it reaches the guest."""

    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None: ...


class NullIrq:
    """An interrupt line that goes nowhere but remembers its state (tests, fuzzing).

    `edges` counts rising edges: on an edge-triggered IO-APIC pin each one is an
    interrupt the guest would take.
    """

    def __init__(self) -> None:
        self.level = False
        self.pulses = 0
        self.edges = 0

    def set_level(self, level: bool) -> None:
        if level and not self.level:
            self.edges += 1
        self.level = level

    def pulse(self) -> None:
        self.pulses += 1


class Bus:
    """Address ranges to devices; `name` is "pio" or "mmio" in messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, Device, str]] = []  # (base, end, device, label)
        self.unhandled: Counter[int] = Counter()

    def insert(self, base: int, length: int, device: Device, label: str | None = None) -> None:
        if base < 0 or length <= 0:
            raise ConfigError(f"{self.name} range {base:#x}+{length:#x} is empty or negative")
        end = base + length
        i = bisect.bisect_right(self._bases, base)
        if i > 0 and self._entries[i - 1][1] > base:
            raise ConfigError(f"{self.name} range {base:#x} overlaps {self._entries[i - 1][3]}")
        if i < len(self._entries) and self._entries[i][0] < end:
            raise ConfigError(f"{self.name} range {base:#x} overlaps {self._entries[i][3]}")
        self._bases.insert(i, base)
        self._entries.insert(i, (base, end, device, label or type(device).__name__))

    def lookup(self, addr: int) -> tuple[Device, int, str] | None:
        """The device owning `addr`, the offset into it, and its label."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            base, end, device, label = self._entries[i]
            if addr < end:
                return device, addr - base, label
        return None

    def devices(self) -> list[tuple[int, int, str]]:
        return [(b, e - b, label) for b, e, _, label in self._entries]

    def read(self, addr: int, size: int) -> bytes:
        hit = self.lookup(addr)
        if hit is None:
            self._unhandled(addr, "read")
            return b"\xff" * size
        device, offset, _ = hit
        return device.read(offset, size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self.lookup(addr)
        if hit is None:
            self._unhandled(addr, "write")
            return
        device, offset, _ = hit
        device.write(offset, data)

    def _unhandled(self, addr: int, what: str) -> None:
        if addr not in self.unhandled:
            log.info("%s %s at %#x: no device (reads all-ones, writes dropped)",
                     self.name, what, addr)
        self.unhandled[addr] += 1
