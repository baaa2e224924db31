"""A running Linux guest snapshotted over QMP and restored in new processes (issue 18).

kvmpy's minimal kernel and default initramfs boot on two vCPUs with an ext4 disk on
virtio-blk. In the guest's shell a counter prints `n=<i> t=<uptime>` every 0.3 s and
appends i to a file on the disk. QMP `stop` and `x-kvmpy-snapshot-save` save it; the
first VMM runs on, then is killed (SIGKILL). `kvmpy run --restore` in a new process
must carry on: the counter goes on from the value it had at the snapshot (the console
output before the stop and after the restore together are one unbroken count), the
shell answers typed input, the second vCPU runs what is given to it, guest time has
moved by no more than the time the guest spent saved, the kernel logs no distress
(no lockup, stall, oops, unstable clocksource or I/O error) after the restore, and
after the guest unmounts and powers off `e2fsck` finds the restored disk clean and
the file on it counts without a gap. Two restores of one snapshot run at once, each
on its own copy of the disk. The same snapshot damaged (truncated RAM, a flipped
byte in its state or metadata) or asked for as another machine is refused by
`kvmpy run --restore` in one line with a non-zero status.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.lab.virtio_kit import KvmpyProcess
from tests.qmp_kit import close, connect

pytestmark = pytest.mark.lab

COUNTER = ("mount -t ext4 /dev/vda /mnt && i=0 && while true; do i=$((i+1)); "
           "echo n=$i t=$(cut -d' ' -f1 /proc/uptime); echo $i >> /mnt/count; sleep 0.3; "
           "done &\n")
COUNT = re.compile(r"n=(\d+) t=([\d.]+)\r?\n")
PROMPT = r"/ # "
CPUS = 2
# What a kernel says when something went wrong under it: a restore that broke time,
# interrupts, a vCPU or the disk shows up as one of these.
DISTRESS = re.compile(r"soft lockup|hard lockup|hung task|rcu.*stall|BUG:|WARNING:|Oops|"
                      r"Call Trace|clocksource.*unstable|Marking clocksource|I/O error|"
                      r"EXT4-fs error|blk_update_request|timed out|virtio.*(error|broken)|"
                      r"spurious|NMI received", re.IGNORECASE)


def make_disk(path: Path) -> Path:
    subprocess.run(["mkfs.ext4", "-F", "-q", "-L", "snapdisk", str(path), "64M"], check=True,
                   capture_output=True)
    return path


def counts(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(t)) for n, t in COUNT.findall(text)]


class Saved(NamedTuple):
    snap: Path
    before: str  # the console output up to the stop
    stopped: float  # when (host monotonic time) the guest stopped
    kmsg_lines: int  # lines in the kernel log at the snapshot


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """Boot, start the counter, snapshot it over QMP, run on, kill the VMM."""
    tmp_path = tmp_path_factory.mktemp("saved")
    disk, sock, snap = make_disk(tmp_path / "disk.img"), tmp_path / "qmp.sock", tmp_path / "snap"
    first = KvmpyProcess(["--cpus", str(CPUS), "--disk", str(disk), "--qmp", f"unix:{sock}"],
                         typing=True)
    try:
        first.expect(PROMPT, 240)
        first.send(COUNTER)
        first.expect(r"n=3 t=", 120)
        first.send("echo kmsg=$(dmesg | wc -l)\n")
        kmsg_lines = int(first.expect(r"kmsg=(\d+)", 60).group(1))
        first.expect(r"n=6 t=", 60)
        qmp = connect(sock)
        qmp.cmd("stop")
        stopped = time.monotonic()
        assert qmp.cmd("query-status")["status"] == "paused"
        time.sleep(1)  # (the output pipe's last bytes reach the transcript)
        before = first.output
        reply = qmp.cmd("x-kvmpy-snapshot-save", path=str(snap))
        assert reply["ram_bytes"] > 1 << 20
        time.sleep(1)
        assert first.output == before  # a paused guest prints nothing
        qmp.cmd("cont")
        first.expect(r"n=10 t=", 60)  # the saved guest runs on meanwhile...
        close(qmp)
    finally:
        first.kill()  # ...and its VMM dies without any chance to clean up
    return Saved(snap, before, stopped, kmsg_lines)


def test_linux_guest_restored_in_a_new_process_carries_on(saved: Saved, tmp_path: Path
                                                          ) -> None:
    run_disk = tmp_path / "restored.img"
    second = KvmpyProcess(["--restore", str(saved.snap), "--disk", str(run_disk)], typing=True)
    try:
        match = second.expect(r"n=\d+ t=[\d.]+\r?\n", 120)
        resumed = time.monotonic()
        second.expect(r"n=\d+ t=[\d.]+\r?\n", 60)
        # one unbroken count across the snapshot: nothing lost, nothing twice
        seen = counts(saved.before + second.output)
        assert [n for n, _ in seen] == list(range(1, len(seen) + 1)), seen
        # guest time moved on by no more than the time the guest was held
        last_saved = counts(saved.before)[-1][1]
        first_restored = counts(saved.before + second.output[: match.end()])[-1][1]
        assert 0 <= first_restored - last_saved <= (resumed - saved.stopped) + 0.3, \
            (last_saved, first_restored, resumed - saved.stopped)
        second.send("echo answer$((6*7))\n")
        second.expect(r"answer42", 60)
        # the second vCPU is there and runs what it is given (an IPI wakes it)
        second.send("echo cpus=$(nproc) on=$(taskset -c 1 cat /proc/self/stat | "
                    "cut -d' ' -f39)\n")
        second.expect(rf"cpus={CPUS} on=1\r?\n", 60)
        # no distress in the kernel log since the snapshot
        second.send(f"dmesg | tail -n +{saved.kmsg_lines + 1} | sed 's/^/K: /'; "
                    "echo kmsg-end\n")
        log = second.expect(r"(?s)(.*?)\nkmsg-end", 60).group(1)
        kernel = re.findall(r"K: (.*)", log)
        assert not [line for line in kernel if DISTRESS.search(line)], kernel
        second.send("kill %1; sync; umount /mnt && echo unmounted\n")
        second.expect(r"\nunmounted", 60)
        second.send("exit\n")
        status, err = second.wait(120)
    finally:
        second.kill()
    assert status == 0, err  # the shell's exit powers the guest off (ACPI)
    fsck = subprocess.run(["e2fsck", "-fn", str(run_disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stored = subprocess.run(["debugfs", "-R", "cat /count", str(run_disk)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert stored == [str(i) for i in range(1, len(stored) + 1)] and len(stored) >= 8, stored


def test_one_snapshot_restored_twice_at_once(saved: Saved, tmp_path: Path) -> None:
    last = counts(saved.before)[-1][0]
    disks = [tmp_path / f"run{i}.img" for i in range(2)]
    runs = [KvmpyProcess(["--restore", str(saved.snap), "--disk", str(d)], typing=True)
            for d in disks]
    try:
        for i, run in enumerate(runs):
            run.expect(rf"n={last + 2} t=", 120)
            run.send(f"echo restore{i}$((6*7)) > /mnt/who; cat /mnt/who\n")
            run.expect(rf"\nrestore{i}42", 60)
        for i, run in enumerate(runs):  # each wrote its own copy of the disk
            run.send("kill %1; sync; cat /mnt/who\n")
            run.expect(rf"\nrestore{i}42", 60)
    finally:
        for run in runs:
            run.kill()


def _damaged(saved: Saved, tmp_path: Path, name: str, damage: str) -> Path:
    """A copy of the saved snapshot to damage: file `damage` a copy of its own (sparse,
    as the snapshot's: RAM is mostly holes), every other file a hard link."""
    from kvmpy.state.disks import copy_image

    copy = tmp_path / name
    copy.mkdir()
    for part in saved.snap.iterdir():
        if part.name == damage:
            copy_image(part, copy / part.name)
        else:
            os.link(part, copy / part.name)
    return copy / damage


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_damaged_or_mismatched_snapshot_is_refused_in_one_line(saved: Saved, tmp_path: Path
                                                                 ) -> None:
    truncated = _damaged(saved, tmp_path, "truncated", "ram.bin")
    os.truncate(truncated, os.stat(truncated).st_size - 4096)
    state = _damaged(saved, tmp_path, "state", "state.bin")
    _flip(state, os.stat(state).st_size // 2)
    meta = _damaged(saved, tmp_path, "meta", "snapshot.json")
    _flip(meta, 40)
    cases = [([str(truncated.parent)], r"ram\.bin"), ([str(state.parent)], r"state\.bin"),
             ([str(meta.parent)], r"snapshot\.json"),
             ([str(saved.snap), "--cpus", "1"], r"vCPU|cpus"),
             ([str(saved.snap), "--mem", "64M"], r"mem|RAM")]
    for args, names in cases:
        disk = tmp_path / "never.img"
        run = subprocess.run([sys.executable, "-m", "kvmpy", "run", "--restore", *args,
                              "--disk", str(disk)], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
        assert run.returncode != 0, (args, run.stdout[-2000:])
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvmpy: "), (args, run.stderr[-3000:])
        assert re.search(names, lines[0]), (args, lines[0])
        assert not disk.exists(), args  # no disk copy left behind by a refused restore


def test_system_powerdown_presses_the_acpi_power_button(tmp_path: Path) -> None:
    """QMP system_powerdown on a guest with ACPI: the Generic Event Device's interrupt
    reaches Linux's GED driver, whose _EVT reads the event and notifies the power button
    (what the guest then does is its userspace's business; the minimal guest has no
    handler), and ACPICA finds nothing to complain about."""
    from kvmpy.acpi.linuxlog import acpi_complaints

    sock = tmp_path / "qmp.sock"
    vm = KvmpyProcess(["--acpi", "on", "--qmp", f"unix:{sock}"], typing=True)
    try:
        vm.expect(PROMPT, 240)
        qmp = connect(sock)
        vm.send("grep Ged /proc/interrupts\n")
        before = vm.expect(r"\s(\d+)\s+IO-APIC\s+3-edge\s+ACPI:Ged", 60)
        assert before.group(1) == "0"
        qmp.cmd("system_powerdown")
        assert [e["event"] for e in qmp.get_events(wait=True)] == ["POWERDOWN"]
        time.sleep(1)
        vm.send("grep Ged /proc/interrupts; dmesg > /tmp/log; echo lines=$(wc -l < /tmp/log)\n")
        after = vm.expect(r"\s(\d+)\s+IO-APIC\s+3-edge\s+ACPI:Ged", 60)
        assert after.group(1) == "1"
        vm.expect(r"lines=\d+", 30)
        vm.send("cat /tmp/log; echo end-of-log\n")
        log = vm.expect(r"(?s)(.*)end-of-log\r?\n", 60).group(1)
        assert acpi_complaints(log) == [], log[-3000:]
        vm.send("exit\n")
        event = qmp.pull_event(wait=120)
        assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "guest-shutdown"
        status, err = vm.wait(60)
        assert status == 0, err
        close(qmp)
    finally:
        vm.kill()
