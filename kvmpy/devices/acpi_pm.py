"""ACPI power management registers for a hardware-reduced platform: sleep and reset.

What it is: three 8-bit I/O registers at `layout.PM_PORT_BASE`, the ones the
FADT names (ACPI 6.5 §4.8.3.6-§4.8.3.8):

  offset 0  SLEEP_CONTROL_REG  bits 2-4 SLP_TYPx, bit 5 SLP_EN (write-only, reads 0)
  offset 1  SLEEP_STATUS_REG   bit 7 WAK_STS (write 1 to clear)
  offset 2  RESET_REG          writing RESET_VALUE resets the system

Linux powers off by writing SLP_TYP from \\_S5 with SLP_EN set to the sleep
control register (ACPICA hwesleep.c), and with reboot=acpi (its first choice)
writes RESET_VALUE to the reset register. This device turns those writes
into `on_poweroff()` and `on_reboot()`, which the VMM supplies.

Other sleep states are not implemented (the DSDT only declares \\_S5). A
request for one sets WAK_STS at once, so an OS that tries anyway sees an
immediate wake instead of spinning forever on the status register.

What it is not: PM1 event/control blocks, a PM timer, GPEs or an SCI; a
hardware-reduced platform has none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmpy.log import get_logger
from kvmpy.state.values import StateReader

log = get_logger(__name__)

# Register offsets from layout.PM_PORT_BASE; the FADT points at these.
SLEEP_CONTROL = 0
SLEEP_STATUS = 1
RESET = 2
PM_PORT_LEN = 3

# §4.8.3.7 Sleep Control Register
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
# §4.8.3.8 Sleep Status Register
WAK_STS = 1 << 7

SLP_TYP_S5 = 5  # the value kvmpy's \_S5 package hands the OS; any 3-bit value would do
RESET_VALUE = 0x42  # the FADT's RESET_VALUE (same value as QEMU's generic event device)


class AcpiPm:
    """The sleep control/status and reset registers of a hardware-reduced ACPI platform."""

    def __init__(self, on_poweroff: Callable[[], None], on_reboot: Callable[[], None]) -> None:
        self.on_poweroff = on_poweroff
        self.on_reboot = on_reboot
        self.slp_typ = 0  # SLP_TYPx is read/write; SLP_EN always reads 0
        self.wak_sts = False
        self.requests: list[str] = []  # what the OS asked for, in order: "S5", "reset"
        self._warned: set[str] = set()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_byte(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        # A wider access than the 8-bit registers acts on each byte it covers.
        for i, value in enumerate(data):
            self._write_byte(offset + i, value)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"slp_typ": self.slp_typ, "wak_sts": self.wak_sts}

    def restore(self, state: object, where: str = "acpi-pm") -> None:
        r = StateReader(state, where)
        slp_typ = r.int("slp_typ", 0, SLP_TYP_MASK >> SLP_TYP_SHIFT)
        wak_sts = r.bool("wak_sts")
        r.done()
        self.slp_typ, self.wak_sts = slp_typ, wak_sts

    # -- registers ---------------------------------------------------------------------------
    def _read_byte(self, offset: int) -> int:
        if offset == SLEEP_CONTROL:
            return self.slp_typ << SLP_TYP_SHIFT
        if offset == SLEEP_STATUS:
            return WAK_STS if self.wak_sts else 0
        return 0  # RESET_REG is write-only

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == SLEEP_CONTROL:
            self.slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if value & SLP_EN:
                self._sleep(self.slp_typ)
        elif offset == SLEEP_STATUS:
            if value & WAK_STS:
                self.wak_sts = False
        elif offset == RESET:
            if value == RESET_VALUE:
                self.requests.append("reset")
                self.on_reboot()
            else:
                self._warn_once("reset", "reset register written with %#x, not %#x; ignored",
                                value, RESET_VALUE)

    def _sleep(self, slp_typ: int) -> None:
        if slp_typ == SLP_TYP_S5:
            self.requests.append("S5")
            self.on_poweroff()
            return
        self._warn_once(f"slp{slp_typ}", "sleep type %d requested; only S5 (%d) exists, "
                        "waking at once", slp_typ, SLP_TYP_S5)
        self.wak_sts = True

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("acpi-pm: " + msg, *args)
