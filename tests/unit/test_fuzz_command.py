"""`kvmpy fuzz` (KVM-free): bugs planted back into copies of the devices are found by the
command, with a fixed seed, within a bounded number of inputs, by the right oracle.

Each plant is a monkeypatch of the real class for the test's length (the source is not
edited). Each test also runs the same seed on the real code, which must find nothing:
the oracle fires for the bug, not for the input. The same runs through KVM are in
tests/kvm/test_fuzz_kvm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmpy.cli import main
from kvmpy.fuzz import ops
from kvmpy.fuzz.oracles import DiskWatch, Finding, Guards
from kvmpy.fuzz.targets import TARGETS
from kvmpy.memory import GuestMemory
from tests.fuzz_plants import PLANTS, found, fuzz, plant_live_after_failed


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
                assert 0x400000 <= op.address and op.address + op.times <= 0x800000
            else:
                window = windows[0] if op.kind in (ops.PIO_READ, ops.PIO_WRITE) else windows[1]
                assert window.base <= op.address < window.base + window.length
                assert op.size in (1, 2, 4, 8) and op.times >= 1


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


def test_a_read_only_disk_written_right_after_its_put_back_is_caught(tmp_path: Path) -> None:
    """The disk oracle skips the checksum while the image keeps the mtime it set: a
    write in the same clock tick as the put-back, by a descriptor opened before it
    (as a device's is), must still move it."""
    import os

    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 16)
    watch = DiskWatch()
    watch.watch(path, read_only=True)
    fd = os.open(path, os.O_RDWR)
    try:
        watch.check()  # untouched
        for write in (lambda: os.pwrite(fd, b"x", 7), lambda: os.truncate(path, 100)):
            write()
            with pytest.raises(Finding, match="ro-disk"):
                watch.check()
            assert path.read_bytes() == bytes(range(256)) * 16  # put back
        os.pwrite(fd, b"\x07", 7)  # the byte it had: written, but not changed
        watch.check()
        os.pwrite(fd, b"y", 9)  # and after that, a change is still seen
        with pytest.raises(Finding, match="ro-disk"):
            watch.check()
    finally:
        os.close(fd)


def test_a_device_that_never_returns_is_a_hang(capfd: pytest.CaptureFixture[str],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmpy.virtio.rng import Rng

    def spin(self: Rng, index: int) -> None:
        while True:  # a descriptor-chain walk that never ends, say
            pass

    monkeypatch.setattr(Rng, "process_queue", spin)
    status, out = fuzz(capfd, tmp_path, "rng", 50, "--no-kvm", "--timeout", "0.5")
    assert status == 1
    assert found(out)[:2] == ("hang", "rng")
