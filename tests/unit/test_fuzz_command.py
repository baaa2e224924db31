"""`kvmpy fuzz` (KVM-free): bugs planted back into copies of the devices are found by the
command, with a fixed seed, within a bounded number of inputs, by the right oracle.

Each plant is a monkeypatch of the real class for the test's length (the source is not
edited). Each test also runs the same seed on the real code, which must find nothing:
the oracle fires for the bug, not for the input. The same runs through KVM are in
tests/kvm/test_fuzz_kvm.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmpy.cli import main
from kvmpy.fuzz import ops
from kvmpy.fuzz.oracles import Finding, Guards
from kvmpy.fuzz.targets import TARGETS, ConsoleSink
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
    match = FINDING.search(out)
    assert match, out
    return match.group(1), match.group(2), Path(match.group(3))


# -- the four weaknesses of issue 19, planted back -------------------------------------
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


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_a_planted_bug_is_found_by_its_oracle(name: str, capfd: pytest.CaptureFixture[str],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    plant, target, oracle, runs = PLANTS[name]
    status, out = fuzz(capfd, tmp_path, target, runs, "--no-kvm")
    assert (status, out.count("finding:")) == (0, 0), out  # the real code: nothing
    plant(monkeypatch)
    status, out = fuzz(capfd, tmp_path, target, runs, "--no-kvm")
    assert status == 1
    assert found(out)[:2] == (oracle, target)


def test_a_finding_is_saved_and_replays(capfd: pytest.CaptureFixture[str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    plant_live_after_failed(monkeypatch)
    status, out = fuzz(capfd, tmp_path, "rng", 1500, "--no-kvm")
    assert status == 1
    oracle, _, path = found(out)
    note = json.loads(path.with_suffix(".json").read_text())
    assert (note["target"], note["oracle"], note["kvm"]) == ("rng", oracle, False)
    assert main(["fuzz", "--replay", str(path)]) == 1  # target and mode from the note
    assert found(capfd.readouterr().out)[0] == oracle
    monkeypatch.undo()  # the bug fixed: the reproducer is a regression test that passes
    assert main(["fuzz", "--replay", str(path)]) == 0
    assert "no finding" in capfd.readouterr().out


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_runs_clean(target: str, capfd: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    status, out = fuzz(capfd, tmp_path, target, 150, "--no-kvm", seed=7)
    assert status == 0, out
    assert "150 inputs, no finding" in out


def test_list_names_every_target(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--list"]) == 0
    names = [line.split()[0] for line in capfd.readouterr().out.splitlines()]
    assert names == list(TARGETS)


@pytest.mark.parametrize("argv, message", [
    (["fuzz"], "give --target NAME"),
    (["fuzz", "--target", "floppy", "--seed", "1"], "--target floppy: no such target"),
    (["fuzz", "--target", "rng", "--seed", "1", "--runs", "0"], "--runs 0: at least 1"),
    (["fuzz", "--target", "rng", "--seed", "1", "--timeout", "0"], "--timeout 0"),
    (["fuzz", "--target", "rng", "--seed", "1", "--trace"], "--trace is for --replay"),
    (["fuzz", "--replay", "/nonexistent/input"], "--replay /nonexistent/input:"),
])
def test_bad_arguments_are_one_line(argv: list[str], message: str,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    assert main(argv) != 0
    err = capfd.readouterr().err
    assert err.startswith("kvmpy: ") and message in err and err.count("\n") == 1, err


# -- the parts ----------------------------------------------------------------------------
def test_decoding_is_deterministic_and_stays_in_the_windows() -> None:
    windows = [ops.Window("pio", 0x60, 5, "i8042"), ops.Window("mmio", 0xD0000000, 0x1000,
                                                                 "x", registers=(0, 0x50))]
    for seed in range(50):
        data = bytes((seed * 7 + i * 13) % 256 for i in range(300))
        decoded = ops.decode(data, windows)
        assert decoded == ops.decode(data, windows)
        for op in decoded:
            if op.kind == ops.RAM_WRITE:
                assert 0x400000 <= op.address and op.address + op.count <= 0x800000
            else:
                window = windows[0] if op.kind in (ops.PIO_READ, ops.PIO_WRITE) else windows[1]
                assert window.base <= op.address < window.base + window.length
                assert op.size in (1, 2, 4, 8) and op.count >= 1


def test_the_guard_bytes_catch_a_write_past_a_region() -> None:
    memory = GuestMemory.anonymous(1 << 20)
    guards = Guards(memory)
    guards.check()
    region = memory.regions[0]
    region.buffer[region.offset + region.size + 100] = 1  # what a stray preadv would do
    with pytest.raises(Finding, match="outside-ram: a write landed 100 bytes into the guard"):
        guards.check()
    with pytest.raises(Finding, match="outside-ram"):
        memory.host_address(0, 1 << 20)  # fine
        raise Finding("outside-ram", "(reached)")
    memory.close()
