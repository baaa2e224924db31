"""Why a VM stopped, and the process exit status that says so.

Each way a run can end has its own status, so scripts and tests can tell a
clean poweroff from a reboot request, a triple fault or a hung guest.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class StopKind(enum.Enum):
    POWEROFF = 0  # guest powered off (or a flat guest halted with interrupts off)
    ERROR = 1  # host-side failure while running
    FAULT = 4  # triple fault, failed VM entry, emulation failure
    REBOOT = 5  # guest asked for a reset
    HALTED = 6  # every vCPU halted with interrupts disabled: the guest can never continue
    MIGRATED = 7  # the guest runs on in another process now (kvmpy.migration)
    DEBUG_EXIT = -1  # the guest wrote its own status to the debug-exit port
    SIGINT = 130
    SIGTERM = 143


class Stop(NamedTuple):
    kind: StopKind
    reason: str  # one line for the user
    status: int | None = None  # overrides kind's status (DEBUG_EXIT)
    details: str = ""  # multi-line diagnostic (registers, code bytes) for fatal stops

    @property
    def exit_status(self) -> int:
        return self.status if self.status is not None else self.kind.value
