"""Bugs planted back into copies of kvmpy's devices, for the `kvmpy fuzz` tests
(tests/unit/test_fuzz_command.py KVM-free, tests/kvm/test_fuzz_kvm.py through KVM).

Each plant is a monkeypatch of a real class (the source is not edited): the four
weaknesses issue 19 fixed, put back as they were, and two bugs of the kinds the
`outside-ram` and `ro-disk` oracles exist for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmpy.cli import main
from kvmpy.fuzz.targets import ConsoleSink
from kvmpy.memory import GuestMemory
from kvmpy.virtio.blk import Block
from kvmpy.virtio.console import Console
from kvmpy.virtio.device import VIRTIO_STATUS_FAILED, LogOnce
from kvmpy.virtio.device import log as device_log
from kvmpy.virtio.mmio import VirtioMmioTransport
from kvmpy.virtio.queue import DescriptorChain

FINDING = re.compile(r"^finding: (\S+) in (\S+): .*; reproducer (\S+)$", re.MULTILINE)


def fuzz(capfd: pytest.CaptureFixture[str], tmp_path: Path, target: str, runs: int,
         *extra: str, seed: int = 1) -> tuple[int, str]:
    """`kvmpy fuzz` as a user types it; (exit status, its stdout)."""
    status = main(["fuzz", "--target", target, "--seed", str(seed), "--runs", str(runs),
                   "--out", str(tmp_path / "findings"), *extra])
    return status, capfd.readouterr().out


def found(out: str) -> tuple[str, str, Path]:
    """(oracle, target, reproducer) of the `finding:` line in `out`."""
    match = FINDING.search(out)
    assert match, out
    return match.group(1), match.group(2), Path(match.group(3))


def plant_whole_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old console: a transmit chain copied whole into one bytes object."""
    def whole(self: Console, chain: DescriptorChain) -> int:
        readable, _ = chain.buffers()
        if self.output is not None:
            self.output(b"".join(bytes(v) for v in readable))
        return 0

    monkeypatch.setattr(Console, "_transmit", whole)


def plant_log_per_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old "log once": a key per guest-chosen value, no cap."""
    def per_value(self: LogOnce, key: str, msg: str, *args: object, level: int = 30) -> None:
        text = msg % args
        if text not in self.seen:
            self.seen[text] = set()
            device_log.log(level, f"{self.name}: {text}")

    monkeypatch.setattr(LogOnce, "__call__", per_value)


def plant_live_after_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old status machine: FAILED, then DRIVER_OK, and the device goes live."""
    original = VirtioMmioTransport._write_status

    def accepts_after_failed(self: VirtioMmioTransport, value: int) -> None:
        failed = self.status & VIRTIO_STATUS_FAILED
        self.status &= ~failed
        original(self, value & ~failed)
        self.status |= failed

    monkeypatch.setattr(VirtioMmioTransport, "_write_status", accepts_after_failed)


def plant_narrow_output_catch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old console caught only OSError from its output; the host's sink here fails
    with ValueError (a closed file object)."""
    def narrow(self: Console, chain: DescriptorChain) -> int:
        readable, _ = chain.buffers()
        try:
            if self.output is not None:
                self.output(b"".join(bytes(v) for v in readable)[:65536])
        except OSError as e:
            self.warn("output", "console output failed: %r", e)
        return 0

    def closed(self: ConsoleSink, data: bytes) -> int:
        raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(Console, "_transmit", narrow)
    monkeypatch.setattr(ConsoleSink, "write", closed)


def plant_unchecked_host_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bounds check that forgets the length: preadv may write past the region's end."""
    def host_address(self: GuestMemory, gpa: int, length: int) -> int:
        for start, end, _, base in self._spans:
            if start <= gpa < end:
                return int(base + gpa - start)
        return GuestMemory.host_address(self, -1, 1)  # (raises)

    original_init = GuestMemory.__init__

    def init(self: GuestMemory, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.host_address = host_address.__get__(self)  # type: ignore[method-assign]

    monkeypatch.setattr(GuestMemory, "__init__", init)


def plant_ignored_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtio-blk that opens a ,ro disk read-write and takes the guest's writes."""
    original = Block.__init__

    def writable(self: Block, path: str, *, read_only: bool = False, **kw: object) -> None:
        original(self, path, read_only=False, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Block, "__init__", writable)


PLANTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str, str, int]] = {
    # name: (plant, target, oracle, inputs within which it must be found)
    "memory-amplification": (plant_whole_copy, "console", "memory", 400),
    "log-flood": (plant_log_per_value, "rng", "log-flood", 1500),
    "live-after-failed": (plant_live_after_failed, "rng", "virtio-state", 1500),
    "narrow-output-catch": (plant_narrow_output_catch, "console", "vmm-stop", 400),
    "write-outside-ram": (plant_unchecked_host_address, "blk", "outside-ram", 1500),
    "write-to-ro-disk": (plant_ignored_read_only, "blk", "ro-disk", 1500),
}
