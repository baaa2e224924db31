"""The signals `kvmpy run` answers while vCPU threads run (kvmpy.machine._host_signals)."""

import os
import signal
import time

import pytest

from kvmpy.machine import _host_signals
from kvmpy.stop import Stop, StopKind


def test_sigterm_becomes_a_clean_stop() -> None:
    stops: list[Stop] = []
    with _host_signals(stops.append, lambda: ""):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler at the next bytecode boundary
    assert [s.kind for s in stops] == [StopKind.SIGTERM]


def test_sigusr2_prints_every_thread_then_where_the_vcpus_are(
        capfd: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with _host_signals(lambda _: None, lambda: "  vCPU 0: spinning at 0x1004"):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
    err = capfd.readouterr().err
    # faulthandler's dump, written from the signal itself (works even if the GIL is held)...
    assert "most recent call first" in err and "test_host_signals.py" in err, err
    # ...then, chained, the vCPU report from the main thread
    assert "kvmpy: the vCPUs on SIGUSR2:\n  vCPU 0: spinning at 0x1004\n" in err
    assert err.index("most recent call first") < err.index("kvmpy: the vCPUs")
    assert signal.getsignal(signal.SIGUSR2) == before  # put back afterwards
