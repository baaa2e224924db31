"""A running Linux guest snapshotted over QMP and restored in new processes (issue 18).

kvmpy's minimal kernel and default initramfs boot with an ext4 disk. In the guest's
shell a counter prints `n=<i> t=<uptime>` every 0.3 s and appends i to a file on the
disk. QMP `stop` and `x-kvmpy-snapshot-save` save it; the first VMM runs on, then is
killed (SIGKILL). `kvmpy run --restore` in a new process must carry on: the counter
goes on from the value it had at the snapshot (the console output before the stop and
after the restore together are one unbroken count), the shell answers typed input,
guest time has moved by no more than the time the guest spent saved, and after the
guest unmounts and powers off `e2fsck` finds the restored disk clean and the file on
it counts without a gap. Two restores of one snapshot then run at once, each on its
own copy of the disk.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.virtio_kit import KvmpyProcess
from tests.qmp_kit import close, connect

pytestmark = pytest.mark.lab

COUNTER = ("mount -t ext4 /dev/vda /mnt && i=0 && while true; do i=$((i+1)); "
           "echo n=$i t=$(cut -d' ' -f1 /proc/uptime); echo $i >> /mnt/count; sleep 0.3; "
           "done &\n")
COUNT = re.compile(r"n=(\d+) t=([\d.]+)\r?\n")
PROMPT = r"/ # "


def make_disk(path: Path) -> Path:
    subprocess.run(["mkfs.ext4", "-F", "-q", "-L", "snapdisk", str(path), "64M"], check=True,
                   capture_output=True)
    return path


def counts(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(t)) for n, t in COUNT.findall(text)]


def saved_guest(tmp_path: Path) -> tuple[Path, str, float]:
    """Boot, start the counter, snapshot it over QMP, run on, kill the VMM: the snapshot,
    the console output up to the stop, and when (host monotonic time) it stopped."""
    disk, sock, snap = make_disk(tmp_path / "disk.img"), tmp_path / "qmp.sock", tmp_path / "snap"
    first = KvmpyProcess(["--disk", str(disk), "--qmp", f"unix:{sock}"], typing=True)
    try:
        first.expect(PROMPT, 240)
        first.send(COUNTER)
        first.expect(r"n=5 t=", 120)
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
    return snap, before, stopped


def test_linux_guest_restored_in_a_new_process_carries_on(tmp_path: Path) -> None:
    snap, before, stopped = saved_guest(tmp_path)
    run_disk = tmp_path / "restored.img"
    second = KvmpyProcess(["--restore", str(snap), "--disk", str(run_disk)], typing=True)
    try:
        match = second.expect(r"n=\d+ t=[\d.]+\r?\n", 120)
        resumed = time.monotonic()
        second.expect(r"n=\d+ t=[\d.]+\r?\n", 60)
        # one unbroken count across the snapshot: nothing lost, nothing twice
        seen = counts(before + second.output)
        assert [n for n, _ in seen] == list(range(1, len(seen) + 1)), seen
        # guest time moved on by no more than the time the guest was held
        last_saved = counts(before)[-1][1]
        first_restored = counts(before + second.output[: match.end()])[-1][1]
        assert 0 <= first_restored - last_saved <= (resumed - stopped) + 0.3, \
            (last_saved, first_restored, resumed - stopped)
        second.send("echo answer$((6*7))\n")
        second.expect(r"answer42", 60)
        second.send("kill %1; sync; umount /mnt && echo unmounted\n")
        second.expect(r"\nunmounted", 60)
        second.send("exit\n")
        status, err = second.wait(120)
    finally:
        second.kill()
    assert status in (0, 6), err  # poweroff; 6: halted, as a guest without ACPI does
    fsck = subprocess.run(["e2fsck", "-fn", str(run_disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stored = subprocess.run(["debugfs", "-R", "cat /count", str(run_disk)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert stored == [str(i) for i in range(1, len(stored) + 1)] and len(stored) >= 8, stored


def test_one_snapshot_restored_twice_at_once(tmp_path: Path) -> None:
    snap, before, _ = saved_guest(tmp_path)
    last = counts(before)[-1][0]
    disks = [tmp_path / f"run{i}.img" for i in range(2)]
    runs = [KvmpyProcess(["--restore", str(snap), "--disk", str(d)], typing=True)
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
