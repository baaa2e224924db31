"""Lab tests read every Linux guest's kernel log for distress (`kvmpy.distress`).

- `assert_calm(text, allow=())`: fails the test, listing the lines, if `text` (a
  console transcript, `dmesg`) shows the kernel in distress. For output a test gathers
  itself: `subprocess.run` of `kvmpy run`, QEMU's console.
- `LAB_QUIRKS`: what the lab's emulator makes every guest say, whatever its VMM; allowed
  inside the lab only, where each was seen under QEMU microvm too (on real hardware
  it would be a real problem).
- `ConsoleWatch`: remembers every object of the watched classes made during a test
  (`kvmpy.api.Guest`, `virtio_kit.KvmpyProcess`: anything with an `.output`
  transcript) and checks each one's output when the test ends. tests/lab/conftest.py
  watches those two for every lab test, so a new test that boots a guest through them
  is checked without asking.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import pytest

from kvmpy.distress import GuestInDistress, check_calm
from kvmpy.lab import INSIDE_ENV

Allowed = Iterable[str | re.Pattern[str]]

# Debian's stock kernel, under kvmpy and under QEMU microvm alike, in the lab (2026-12-06):
# "XSAVE consistency problem: size 2696 != kernel_size 576", a WARNING at
# arch/x86/kernel/fpu/xstate.c:606. The guest enabled AVX and PKRU in XCR0, but the
# lab's KVM answers CPUID 0xD.0 with the size for x87 and SSE only, the XCR0 it thinks
# the guest has: QEMU 7.2's TCG runs a nested guest's XSETBV itself, with no SVM exit
# to the lab's KVM (its helper_xsetbv checks no intercept). kvmpy's minimal kernel
# (no PKRU) does not check this.
LAB_QUIRKS = (r"WARNING: CPU: \d+ PID: \d+ at arch/x86/kernel/fpu/xstate\.c:\d+ "
              r"fpu__init_system_xstate",)


def assert_calm(text: str, allow: Allowed = (), what: str = "the guest") -> None:
    """Fail the test if `text` shows the guest's kernel in distress (lines in `allow`
    excepted, and in the lab, `LAB_QUIRKS`)."""
    if os.environ.get(INSIDE_ENV) == "1":
        allow = [*allow, *LAB_QUIRKS]
    try:
        check_calm(text, allow, what)
    except GuestInDistress as e:
        raise AssertionError(str(e)) from None


class ConsoleWatch:
    """Objects with an `.output` transcript made while a test runs, checked at its end."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def watch(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        """Remember every `cls` made from now on (until `monkeypatch` undoes it)."""
        made = cls.__init__

        def init(obj: Any, *args: Any, **kwargs: Any) -> None:
            made(obj, *args, **kwargs)
            self.seen.append(obj)

        monkeypatch.setattr(cls, "__init__", init)

    def check(self, allow: Allowed = ()) -> None:
        """assert_calm on the output of each object seen, in the order they were made."""
        for n, obj in enumerate(self.seen):
            assert_calm(obj.output, allow, f"{type(obj).__name__} #{n + 1} of this test")
