"""An ACPI Generic Event Device (ACPI 6.5 §5.6.9): how a hardware-reduced platform tells
the OS about events such as a press of the power button.

What it is: one 32-bit event selector register at `layout.GED_PORT` and an interrupt
line (`layout.GED_GSI`, edge). `signal(event)` sets the event's bit and raises an edge;
the OS's GED driver (Linux's drivers/acpi/evged.c) runs the device's _EVT method, which
reads the register, which hands over the pending bits and clears them, and notifies the
device each bit stands for. kvmpy's DSDT (kvmpy.acpi.dsdt.ged_device) has one event:

    bit 0  POWER_BUTTON  Notify (\\_SB.PWRB, 0x80): the power button (PNP0C0C) was pressed

which is what QMP's system_powerdown does. What the OS then does is up to it: Linux's
ACPI button driver reports KEY_POWER, and a userspace that listens (systemd-logind,
acpid) shuts down; a guest with neither ignores the press, as it would on hardware.

What it is not: the fixed-hardware power button of a full ACPI platform (PM1 status
bits and an SCI), which a hardware-reduced one does not have. QEMU's microvm machine
has the same device (hw/acpi/generic_event_device.c).
"""

from __future__ import annotations

import threading
from typing import Any

from kvmpy.bus import IrqLine
from kvmpy.state.values import U32, StateReader

POWER_BUTTON = 1 << 0
EVENTS = POWER_BUTTON  # the bits _EVT knows
REGISTER_SIZE = 4


class Ged:
    def __init__(self, irq: IrqLine) -> None:
        self._irq = irq
        self._lock = threading.Lock()
        self.selector = 0  # events signalled, not yet read by the OS
        self.signalled = 0  # how many events were signalled, for tests and logs

    def signal(self, event: int) -> None:
        with self._lock:
            self.selector |= event & EVENTS
            self.signalled += 1
        self._irq.pulse()

    def read(self, offset: int, size: int) -> bytes:
        """The selector (offset 0, as the DSDT's DWordAcc field reads it), then cleared."""
        with self._lock:
            value, self.selector = self.selector, 0
        return (value.to_bytes(REGISTER_SIZE, "little") + bytes(8))[offset : offset + size]

    def write(self, offset: int, data: bytes) -> None:
        """Writes are ignored (the field is WriteAsZeros and _EVT never writes it)."""

    def state(self) -> dict[str, Any]:
        return {"selector": self.selector}

    def restore(self, state: object, where: str = "ged") -> None:
        r = StateReader(state, where)
        selector = r.int("selector", 0, U32)
        r.done()
        if selector & ~EVENTS:
            raise r.fail("selector", f"{selector:#x} has events kvmpy does not have")
        with self._lock:
            self.selector = selector
