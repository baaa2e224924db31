"""Talking to `kvmpy run --qmp` from tests with QEMU's own client (qemu.qmp, PyPI qemu-qmp)."""

from __future__ import annotations

import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError


def connect(sock: Path, timeout: float = 60) -> QEMUMonitorProtocol:
    """Wait for the socket, connect, negotiate; checks the greeting is kvmpy's."""
    deadline = time.monotonic() + timeout
    while not sock.exists():
        assert time.monotonic() < deadline, f"no QMP socket at {sock}"
        time.sleep(0.02)
    while True:  # (the socket exists from its bind, and takes connections from its listen)
        qmp = QEMUMonitorProtocol(str(sock))
        try:
            greeting = qmp.connect(negotiate=True)
            break
        except ConnectError:
            assert time.monotonic() < deadline, f"no QMP server at {sock}"
            time.sleep(0.02)
    assert greeting is not None and greeting["QMP"]["version"]["package"].startswith("kvmpy ")
    return qmp


def close(qmp: QEMUMonitorProtocol) -> None:
    """The client's close after the server went away (as QEMU's does after SHUTDOWN)."""
    try:
        qmp.close()
    except EOFError:
        pass
