"""Fixtures shared by the Linux-booting tests: kvmpy's minimal kernel and default initramfs,
and the kernel-log check every one of them gets.

Distress (tests/lab/distress.py, kvmpy.distress): a lab test that boots Linux must show
that the guest's kernel did not complain (panic, BUG:, WARNING:, call traces, RCU
stalls, hung tasks, "nobody cared", NETDEV WATCHDOG, I/O errors and timeouts on
kvmpy's devices, virtqueue errors, ACPI errors), not only that its data arrived.

- Every `kvmpy.api.Guest` and `virtio_kit.KvmpyProcess` a lab test makes is checked
  when the test ends (`guest_logs_are_calm`, autouse): nothing to write.
- Output a test collects another way (`subprocess.run` of `kvmpy run`, a QEMU console)
  is checked by calling `assert_calm(text)` from tests/lab/distress.py.
- A test that provokes a complaint on purpose names it, and only it:
  `@pytest.mark.distress_allowed(r"I/O error, dev vda")` (patterns searched in a line).
- The console only carries the kernel's warnings without `quiet` (its default level), or
  with `loglevel=5` after `quiet`: `quiet` hides `WARNING:` and its call trace.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy import assets
from kvmpy.api import Guest
from tests.lab.distress import ConsoleWatch
from tests.lab.virtio_kit import KvmpyProcess


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "distress_allowed(*patterns): kernel-log lines this test provokes on purpose")


@pytest.fixture(autouse=True)
def guest_logs_are_calm(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Check the kernel log of every Guest and KvmpyProcess the test made, when it ends."""
    watch = ConsoleWatch()
    watch.watch(monkeypatch, Guest, "_start")  # Guest(...), from_config and restore alike
    watch.watch(monkeypatch, KvmpyProcess)
    yield
    marker = request.node.get_closest_marker("distress_allowed")
    watch.check(marker.args if marker else ())


@pytest.fixture(scope="module")
def kernel() -> assets.KernelAssets:
    return assets.kernel_path()


@pytest.fixture(scope="module")
def initrd() -> Path:
    return assets.initramfs_path()
