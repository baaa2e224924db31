"""The Generic Event Device: a signalled event is one edge and one read of the selector."""

from __future__ import annotations

import pytest

from kvmpy.bus import NullIrq
from kvmpy.devices.ged import POWER_BUTTON, Ged
from kvmpy.errors import SnapshotError


def test_signal_pulses_and_the_read_hands_the_events_over_once() -> None:
    irq = NullIrq()
    ged = Ged(irq)
    assert ged.read(0, 4) == bytes(4)
    ged.signal(POWER_BUTTON)
    ged.signal(POWER_BUTTON)
    assert irq.pulses == 2 and ged.signalled == 2
    assert ged.read(0, 4) == (POWER_BUTTON).to_bytes(4, "little")  # _EVT's Local0 = ESEL
    assert ged.read(0, 4) == bytes(4)  # cleared by that read
    ged.write(0, b"\xff\xff\xff\xff")  # ignored
    assert ged.read(0, 4) == bytes(4)
    ged.signal(1 << 7)  # an event the DSDT does not know: never shown to the guest
    assert ged.read(0, 4) == bytes(4)


def test_state_round_trip_and_refusal() -> None:
    ged = Ged(NullIrq())
    ged.signal(POWER_BUTTON)
    other = Ged(NullIrq())
    other.restore(ged.state())
    assert other.read(0, 4) == POWER_BUTTON.to_bytes(4, "little")
    with pytest.raises(SnapshotError, match="ged.selector: 0x2 has events kvmpy does not have"):
        other.restore({"selector": 2})
