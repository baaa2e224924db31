r"""Script a VM from Python: create, boot, wait for console output, type, stop.

    from kvmpy.api import Guest
    with Guest(kernel="bzImage", initrd="initramfs.cpio.gz", cpus=2) as g:
        g.expect(r"/ # ")
        g.send("uname -r\n")
        g.expect(r"\d+\.\d+")

`Guest(...)` takes what `kvmpy run` takes, by the same names (`append`, `cpus`, `mem`,
`disks=["disk.img,ro"]`, `nets=["tap=tap0"]`, `rng`, `console`, `acpi`, `modules`;
`kvmpy.options.linux_machine`); with no kernel it boots kvmpy's minimal kernel and
busybox initramfs. `Guest.flat(path, mode="long", ...)` runs a raw binary guest
(`kvmpy.options.flat_machine`), `Guest.from_config(MachineConfig(...))` anything a
MachineConfig can say. The guest runs in background threads (one per vCPU); the
console transcript is kept so `expect` can search it. `stop()` ends the VM and
returns its Stop.

`pause()` and `resume()` hold and release the whole guest; `snapshot(dir)` saves it
(running or paused) to a new directory, and `Guest.restore(dir)` brings such a
snapshot back in this process or any other (docs/snapshots.md). `migrate(uri)` moves
the running guest to a `kvmpy run --incoming` process (docs/migration.md). `mark()` keeps the
guest's state in this process and `reset()` puts it back, copying only the pages that
changed since (kvmpy.state.reset, docs/fuzzing.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy.console import ConsoleOutput
from kvmpy.errors import KvmpyError
from kvmpy.machine import UNPACK_WAIT_S, Machine, MachineConfig
from kvmpy.options import flat_machine, linux_machine
from kvmpy.stop import Stop, StopKind

if TYPE_CHECKING:
    from kvmpy.state.reset import ResetPoint
    from kvmpy.state.snapshot import Snapshot


class ExpectTimeout(KvmpyError):
    """The console did not show the expected text in time."""


class Guest:
    """A running VM and its console. `echo=True` also copies the console to stdout;
    `trace`, `gdb` and `stats` are MachineConfig's (a Tracer, a GdbConfig, a bool)."""

    def __init__(self, kernel: str | Path | None = None, initrd: str | Path | None = None,
                 *, echo: bool = False, trace: Any = None, gdb: Any = None,
                 stats: bool = False, **options: Any) -> None:

        config = linux_machine(kernel, initrd, **options)
        self._start(config._replace(trace=trace, gdb=gdb, stats=stats), echo)

    @classmethod
    def flat(cls, path: str | Path, *, echo: bool = False, trace: Any = None, gdb: Any = None,
             stats: bool = False, **options: Any) -> Guest:
        """A raw binary guest: `mode`, `entry`, `cpl`, `irqchip`, `cpus`, `mem`, devices."""

        config = flat_machine(path, **options)
        return cls.from_config(config._replace(trace=trace, gdb=gdb, stats=stats), echo=echo)

    @classmethod
    def from_config(cls, config: MachineConfig, *, echo: bool = False) -> Guest:
        """Any machine a MachineConfig describes (its `console` is replaced)."""
        guest = cls.__new__(cls)
        guest._start(config, echo)
        return guest

    @classmethod
    def restore(cls, path: str | Path, *, disks: Sequence[str | Path] = (),
                nets: Sequence[str] = (), shares: Sequence[str] = (),
                vsock: str | None = None, echo: bool = False, trace: Any = None,
                gdb: Any = None, stats: bool = False, verify_ram: bool = False,
                cpus: int | None = None, mem: int | str | None = None) -> Guest:
        """The guest saved in snapshot `path`, running again. Each writable disk runs on a
        new copy of the snapshot's, at `disks[i]` or in a new temporary directory; a
        read-only disk must be named at its place in `disks`. The host ends of its other
        devices are the caller's, as on the command line: `nets` (tap=NAME) one per
        network device, `shares` (DIR,tag=TAG[,ro]) one per saved tag, `vsock`
        ("CID,uds=PATH", the guest's CID). `cpus` and `mem`, if given, must be the
        snapshot's. `verify_ram` also checks guest RAM's digest."""
        from kvmpy.options import disk_config, net_config, share_config, size, vsock_config
        from kvmpy.state.config import refuse_mismatch
        from kvmpy.state.snapshot import open_snapshot

        snapshot = open_snapshot(path, verify_ram=verify_ram)
        refuse_mismatch(snapshot.machine, snapshot.what(), cpus=cpus,
                        mem_size=None if mem is None else size(mem))
        config, copies = snapshot.working_config(
            [disk_config(d) for d in disks], nets=[net_config(n) for n in nets],
            shares=[share_config(s) for s in shares],
            vsock=None if vsock is None else vsock_config(vsock))
        guest = cls.__new__(cls)
        try:
            guest._start(config._replace(trace=trace, gdb=gdb, stats=stats), echo, snapshot)
        except BaseException:
            copies.discard()
            raise
        return guest

    def _start(self, config: MachineConfig, echo: bool, snapshot: Snapshot | None = None) -> None:
        import sys

        self.console = ConsoleOutput(forward=sys.stdout.buffer if echo else None)
        self.machine = Machine(config._replace(console=self.console), snapshot=snapshot)
        self._mark = 0
        self._point: ResetPoint | None = None
        self._unpacking = self.machine.unpack_for_next_boot()  # for the next Guest's boot
        self.machine.start()

    # -- state ------------------------------------------------------------
    def pause(self) -> None:
        """Hold every vCPU and device; all console output so far is in `output`."""
        self.machine.pause()

    def resume(self) -> None:
        self.machine.resume()

    @property
    def paused(self) -> bool:
        return self.machine.paused

    def snapshot(self, path: str | Path, *, base: str | Path | None = None) -> dict[str, Any]:
        """Save the guest to the new directory `path` (pausing it meanwhile if it runs);
        returns the snapshot's metadata. With `base`, this guest's last snapshot, only
        the RAM written since it is saved (an incremental snapshot, which needs `base`
        to restore: docs/snapshots.md)."""
        from kvmpy.state.snapshot import take_snapshot

        return take_snapshot(self.machine, path, base=base)

    def migrate(self, uri: str, *, downtime_limit_ms: int | None = None,
                max_rounds: int | None = None, max_bandwidth: int | None = None
                ) -> dict[str, Any]:
        """Move the running guest to `kvmpy run ... --incoming URI` (unix:PATH or
        tcp:HOST:PORT) while it runs; returns the migration's figures (QMP
        query-migrate's). Afterwards this Guest has stopped (StopKind.MIGRATED). If the
        migration fails the guest runs on here and MigrationError says why."""
        from kvmpy.migration.source import MachineHolder, Migration, Parameters
        from kvmpy.migration.wire import MigrationError, parse_address

        params = Parameters()
        params.set({name: value for name, value in (
            ("downtime-limit", downtime_limit_ms), ("x-max-rounds", max_rounds),
            ("max-bandwidth", max_bandwidth)) if value is not None})
        migration = Migration(self.machine, parse_address(uri), params,
                              MachineHolder(self.machine), lambda status, info: None)
        migration.start()
        migration.wait()
        if migration.status != "completed":
            raise MigrationError(f"migration to {uri} {migration.status}: {migration.error}")
        return migration.info()

    def mark(self) -> ResetPoint:
        """Keep the guest's state now, in this process, for `reset()` (pausing it
        meanwhile if it runs). A new mark replaces the last."""
        from kvmpy.state.reset import mark

        if self._point is not None:
            self._point.close()
        stopped = self.machine.stopped is not None
        was_paused = self.paused or stopped
        if not was_paused:
            self.pause()
        try:
            self._point = mark(self.machine)
        finally:
            if not was_paused:
                self.resume()
        return self._point

    def reset(self) -> int:
        """Put the guest back as it was at `mark()` and let it run from there (a paused
        guest stays paused, a stopped one runs again); returns the pages copied back.
        Console output already printed stays in `output`."""
        if self._point is None:
            raise KvmpyError("reset: no mark() to go back to")
        stopped = self.machine.stopped is not None
        was_paused = self.paused
        if not stopped:
            self.pause()
        copied = self._point.reset()
        if stopped:
            self.machine.start()
        elif not was_paused:
            self.resume()
        return copied

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
        if self._unpacking is not None:  # a run shorter than the unpacking: finish it once
            self._unpacking.join(UNPACK_WAIT_S)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
