"""Lab tests read every Linux guest's kernel log for distress (`kvmpy.distress`).

- `assert_calm(text, allow=())`: fails the test, listing the lines, if `text` (a
  console transcript, `dmesg`) shows the kernel in distress. For output a test gathers
  itself: `subprocess.run` of `kvmpy run`, QEMU's console.
- Inside the lab, what the lab's emulator makes every guest say is allowed
  (`kvmpy.lab.quirks`: each seen under QEMU microvm too, in the same lab).
- `ConsoleWatch`: remembers every object of the watched classes made during a test
  (`kvmpy.api.Guest`, `virtio_kit.KvmpyProcess`: anything with an `.output`
  transcript) and checks each one's output when the test ends. tests/lab/conftest.py
  watches those two for every lab test, so a new test that boots a guest through them
  is checked without asking.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pytest

from kvmpy.distress import GuestInDistress, check_calm
from kvmpy.lab import quirks

Allowed = Iterable[str | re.Pattern[str]]

def assert_calm(text: str, allow: Allowed = (), what: str = "the guest") -> None:
    """Fail the test if `text` shows the guest's kernel in distress (lines in `allow`
    excepted, and in the lab, the lab's own quirks)."""
    allow = [*allow, *quirks.here()]
    try:
        check_calm(text, allow, what)
    except GuestInDistress as e:
        raise AssertionError(str(e)) from None


class ConsoleWatch:
    """Objects with an `.output` transcript made while a test runs, checked at its end."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def watch(self, monkeypatch: pytest.MonkeyPatch, cls: type,
              method: str = "__init__") -> None:
        """Remember every `cls` object once `method` (its constructor, or the method
        every way of making one goes through) has run on it, from now on (until
        `monkeypatch` undoes it)."""
        made = getattr(cls, method)

        def record(obj: Any, *args: Any, **kwargs: Any) -> None:
            made(obj, *args, **kwargs)
            self.seen.append(obj)

        monkeypatch.setattr(cls, method, record)

    def check(self, allow: Allowed = ()) -> None:
        """assert_calm on the output of each object seen, in the order they were made."""
        for n, obj in enumerate(self.seen):
            assert_calm(obj.output, allow, f"{type(obj).__name__} #{n + 1} of this test")
