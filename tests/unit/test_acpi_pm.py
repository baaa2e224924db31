"""The ACPI sleep/reset registers: what Linux writes to power off and reboot, and anything else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.devices.acpi_pm import (
    PM_PORT_LEN,
    RESET,
    RESET_VALUE,
    SLEEP_CONTROL,
    SLEEP_STATUS,
    SLP_EN,
    SLP_TYP_S5,
    WAK_STS,
    AcpiPm,
)


class Events:
    def __init__(self) -> None:
        self.poweroffs = 0
        self.reboots = 0

    def device(self) -> AcpiPm:
        return AcpiPm(on_poweroff=self.poweroff, on_reboot=self.reboot)

    def poweroff(self) -> None:
        self.poweroffs += 1

    def reboot(self) -> None:
        self.reboots += 1


S5_WITH_SLP_EN = SLP_TYP_S5 << 2 | SLP_EN


def test_linux_poweroff_sequence():
    """ACPICA acpi_hw_extended_sleep(): clear WAK_STS, then write SLP_TYP | SLP_EN."""
    ev = Events()
    pm = ev.device()
    pm.write(SLEEP_STATUS, bytes([WAK_STS]))
    assert ev.poweroffs == 0
    pm.write(SLEEP_CONTROL, bytes([S5_WITH_SLP_EN]))
    assert (ev.poweroffs, ev.reboots) == (1, 0)
    assert pm.requests == ["S5"]


def test_sleep_type_without_slp_en_does_nothing_and_reads_back():
    ev = Events()
    pm = ev.device()
    pm.write(SLEEP_CONTROL, bytes([SLP_TYP_S5 << 2]))
    assert ev.poweroffs == 0
    assert pm.read(SLEEP_CONTROL, 1) == bytes([SLP_TYP_S5 << 2])  # SLP_EN reads as zero


def test_linux_acpi_reboot():
    """drivers/acpi/reboot.c: write RESET_VALUE to RESET_REG."""
    ev = Events()
    pm = ev.device()
    pm.write(RESET, bytes([RESET_VALUE]))
    assert (ev.poweroffs, ev.reboots) == (0, 1)
    assert pm.requests == ["reset"]


def test_other_reset_values_are_ignored():
    ev = Events()
    pm = ev.device()
    pm.write(RESET, bytes([RESET_VALUE ^ 1]))
    pm.write(RESET, b"\x00")
    assert ev.reboots == 0 and pm.requests == []
    assert pm.read(RESET, 1) == b"\x00"


def test_unsupported_sleep_state_wakes_at_once():
    """S3 is not offered, but an OS that asks sees WAK_STS instead of waiting forever."""
    ev = Events()
    pm = ev.device()
    pm.write(SLEEP_CONTROL, bytes([3 << 2 | SLP_EN]))
    assert ev.poweroffs == 0
    assert pm.read(SLEEP_STATUS, 1) == bytes([WAK_STS])
    pm.write(SLEEP_STATUS, bytes([WAK_STS]))  # write 1 to clear
    assert pm.read(SLEEP_STATUS, 1) == b"\x00"


def test_wide_access_covers_each_register():
    ev = Events()
    pm = ev.device()
    pm.write(SLEEP_CONTROL, bytes([0, 0, RESET_VALUE]))
    assert ev.reboots == 1
    assert len(pm.read(SLEEP_CONTROL, 4)) == 4


@given(st.lists(st.tuples(st.integers(0, PM_PORT_LEN), st.binary(min_size=1, max_size=4)),
                max_size=20))
def test_any_guest_access_is_handled_and_only_the_right_writes_act(accesses):
    ev = Events()
    pm = ev.device()
    expected_poweroffs = expected_reboots = 0
    for offset, data in accesses:
        for i, value in enumerate(data):
            if offset + i == SLEEP_CONTROL and value & SLP_EN and (value >> 2) & 7 == SLP_TYP_S5:
                expected_poweroffs += 1
            if offset + i == RESET and value == RESET_VALUE:
                expected_reboots += 1
        pm.write(offset, data)
        assert len(pm.read(offset, len(data))) == len(data)
    assert (ev.poweroffs, ev.reboots) == (expected_poweroffs, expected_reboots)
