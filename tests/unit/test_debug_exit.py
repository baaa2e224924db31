"""Debug-exit port: the number the guest writes is the status the VM ends with."""

from __future__ import annotations

import pytest

from kvmpy.devices.debug_exit import DebugExit


@pytest.mark.parametrize("data,status", [(b"\x00", 0), (b"\x2a", 42), (b"\x01\x02", 0x201),
                                         (b"\xff\xff\xff\xff", 0xFFFFFFFF)])
def test_write_calls_on_exit_with_the_value(data, status):
    got: list[int] = []
    DebugExit(got.append).write(0, data)
    assert got == [status]


def test_reads_float_high_and_empty_writes_do_nothing():
    got: list[int] = []
    dev = DebugExit(got.append)
    assert dev.read(0, 1) == b"\xff"
    assert dev.read(0, 4) == b"\xff" * 4
    dev.write(0, b"")
    assert got == []
