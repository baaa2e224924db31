"""Script a VM from Python: create, boot, wait for console output, type, stop.

    from kvmpy.api import Guest
    with Guest(kernel=..., initrd=..., cpus=2) as g:
        g.expect(r"/ # ")
        g.send("uname -r\n")
        g.expect(r"\\d+\\.\\d+")

The guest runs in background threads (one per vCPU); the console transcript
is kept so `expect` can search it. `stop()` ends the VM and returns its Stop.
"""

from __future__ import annotations

import re
from typing import Any

from kvmpy.console import ConsoleOutput
from kvmpy.errors import KvmpyError
from kvmpy.machine import Machine, MachineConfig
from kvmpy.stop import Stop, StopKind


class ExpectTimeout(KvmpyError):
    """The console did not show the expected text in time."""


class Guest:
    def __init__(self, echo: bool = False, **config: Any) -> None:
        import sys

        self.console = ConsoleOutput(forward=sys.stdout.buffer if echo else None)
        self.machine = Machine(MachineConfig(console=self.console, **config))
        self._mark = 0
        self.machine.start()

    # -- console ----------------------------------------------------------
    def expect(self, pattern: str | re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        """Wait for `pattern` after the previous match; returns the match."""
        found = self.console.wait_for(pattern, timeout, self._mark, alive=self.running)
        if found is None:
            tail = self.console.text[-500:]
            if self.machine.stopped:
                state = "stopped: " + self.machine.stopped.reason
            else:  # a guest gone quiet: say where each vCPU is
                state = f"no match in {timeout} s; vCPUs now:\n{self.machine.describe_vcpus()}\n"
            raise ExpectTimeout(f"waiting for {pattern!r}: {state}; console ends with {tail!r}")
        self._mark = found.end()
        return found

    def send(self, text: str | bytes) -> None:
        self.machine.console_input(text.encode() if isinstance(text, str) else text)

    @property
    def output(self) -> str:
        return self.console.text

    # -- lifetime ---------------------------------------------------------
    def running(self) -> bool:
        return self.machine.stopped is None

    def wait(self, timeout: float | None = None) -> Stop | None:
        return self.machine.wait(timeout)

    def stop(self) -> Stop:
        self.machine.request_stop(Stop(StopKind.POWEROFF, "stopped by the host"))
        stop = self.machine.wait(10)
        assert stop is not None
        return stop

    def close(self) -> None:
        if self.running():
            self.stop()
        self.machine.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
