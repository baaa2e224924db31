"""A running Linux guest moved live between kvmpy processes, twice (issue 20).

kvmpy's minimal kernel and default initramfs on two vCPUs with an ext4 disk. In the
guest's shell a workload keeps writing memory: each tick it checks the MD5 of the
2 MiB file of random bytes it wrote on a tmpfs the tick before, writes a new one,
prints `seq=<i> check=<ok|BAD>` and appends i to a file on the disk. The guest is
migrated over QMP `migrate` to a second kvmpy process (`--incoming unix:`), then
from that one to a third (`--incoming tcp:127.0.0.1:PORT`), both using the same
disk image (shared storage). Across the three consoles the sequence has no gap and
no repeat and every check is ok (a page lost or stale on the way would break the
checksum of a file held in guest RAM), typed input reaches each destination's shell,
each source exits with the migrated status and says so, and after the guest
unmounts and powers off, `e2fsck -fn` finds the disk clean and its file counts
without a gap. The kernel logs no distress in any of the three (the autouse check).
Then a flat guest's time across a migration, where the lab's KVM takes a TSC written.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kvmpy.stop import StopKind
from tests.lab.virtio_kit import KvmpyProcess
from tests.qmp_kit import close, connect

pytestmark = pytest.mark.lab

WORKLOAD = ("mount -t ext4 /dev/vda /mnt && mkdir -p /w && mount -t tmpfs -o size=16m none /w "
            "&& i=0 && while true; do i=$((i+1)); c=ok; if [ -f /w/f.md5 ]; then "
            "md5sum -c -s /w/f.md5 || c=BAD; fi; "
            "dd if=/dev/urandom of=/w/f bs=64k count=32 2>/dev/null; md5sum /w/f > /w/f.md5; "
            "echo seq=$i check=$c; echo $i >> /mnt/seq; sleep 0.2; done &\n")
SEQ = re.compile(r"seq=(\d+) check=(\w+)\r?\n")
PROMPT = r"/ # "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(uri: str) -> bool:
    """Whether a destination listens at `uri` yet (asked without connecting: a
    destination takes one connection, the migration's)."""
    kind, _, where = uri.partition(":")
    if kind == "unix":
        return Path(where).exists()
    port = f":{int(where.rsplit(':', 1)[1]):04X}"
    return any(fields[1].endswith(port) and fields[3] == "0A"  # TCP_LISTEN
               for fields in (line.split() for line in
                              Path("/proc/net/tcp").read_text().splitlines()[1:]))


def migrate(source: KvmpyProcess, qmp_sock: Path, uri: str, args: list[str]) -> KvmpyProcess:
    """Start a destination with `args` at `uri`, migrate `source` there over QMP once it
    listens; the source must exit with the migrated status; returns the destination.

    The wait is the caller's, as with QEMU's -incoming: a source gives a destination
    10 s to listen (kvmpy.migration.source.CONNECT_TIMEOUT_S), and one starting in a
    lab of one CPU beside a busy guest, on a loaded host, has taken longer."""
    dest = KvmpyProcess([*args, "--incoming", uri], typing=True)
    deadline = time.monotonic() + 240
    while not listening(uri):
        if time.monotonic() > deadline or dest.proc.poll() is not None:
            raise dest.give_up(f"the destination did not listen at {uri}")
        time.sleep(0.05)
    qmp = connect(qmp_sock)
    try:
        assert qmp.cmd("migrate", uri=uri) == {}
        try:
            status, err = source.wait(300)
        except AssertionError as e:  # the source's state, and the destination's
            raise AssertionError(f"the source: {e}\nthe destination: "
                                 f"{dest.give_up('killed with its source')}") from None
    finally:
        close(qmp)
    assert status == StopKind.MIGRATED.value, err
    assert re.search(rf"kvmpy: migrated to {re.escape(uri)} \(\d+ rounds, ", err), err
    print(err.strip())  # (its rounds, bytes, time and downtime: shown with pytest -rP)
    return dest


def test_linux_guest_migrates_twice_while_it_writes_memory(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-F", "-q", str(disk), "64M"], check=True,
                   capture_output=True)
    machine = ["--cpus", "2", "--disk", str(disk)]
    socks = [tmp_path / f"qmp{i}.sock" for i in range(3)]
    runs: list[KvmpyProcess] = []
    try:
        runs.append(KvmpyProcess([*machine, "--qmp", f"unix:{socks[0]}"], typing=True))
        runs[0].expect(PROMPT, 240)
        runs[0].send(WORKLOAD)
        runs[0].expect(r"seq=5 check=", 120)
        runs.append(migrate(runs[0], socks[0], f"unix:{tmp_path / 'mig.sock'}",
                            [*machine, "--qmp", f"unix:{socks[1]}"]))
        runs[1].expect(r"seq=\d+ check=\w+\r?\n", 120)  # it goes on here
        runs[1].send("echo answer$((6*7))\n")
        runs[1].expect(r"answer42", 60)
        runs[1].expect(r"seq=\d+ check=\w+\r?\n", 60)
        runs.append(migrate(runs[1], socks[1], f"tcp:127.0.0.1:{free_port()}",
                            [*machine, "--qmp", f"unix:{socks[2]}"]))
        runs[2].expect(r"seq=\d+ check=\w+\r?\n", 120)
        runs[2].send("echo answer$((7*7)) cpus=$(nproc)\n")
        runs[2].expect(r"answer49 cpus=2", 60)
        last = runs[2].expect(r"seq=(\d+) check=\w+\r?\n", 60)
        # one unbroken sequence across the three processes, every checksum right
        seen = SEQ.findall("".join(run.output for run in runs))
        numbers = [int(n) for n, _ in seen]
        assert numbers == list(range(1, len(numbers) + 1)), numbers
        assert {c for _, c in seen} == {"ok"}, seen
        assert len(numbers) >= int(last.group(1)) >= 8
        runs[2].send("kill %1; sync; umount /mnt && echo unmounted\n")
        runs[2].expect(r"\nunmounted", 60)
        runs[2].send("exit\n")
        status, err = runs[2].wait(120)
        assert status == 0, err
    finally:
        for run in runs:
            run.kill()
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stored = subprocess.run(["debugfs", "-R", "cat /seq", str(disk)], capture_output=True,
                            text=True, check=True).stdout.split()
    assert stored == [str(i) for i in range(1, len(stored) + 1)] and len(stored) >= 8, stored


def test_a_migrated_guest_keeps_to_the_host_time_tsc_too(guest_dir: Path, tmp_path: Path
                                                         ) -> None:
    """tests/kvm/test_migrate.py's check of guest time across a migration where KVM takes
    a vCPU's TSC written, as the lab's does (this machine's PVM does not): kvmclock and
    the TSC both go on by the host time between the capture and the run."""
    from tests.kvm.test_migrate import check_guest_time_across_migration

    check_guest_time_across_migration(guest_dir, tmp_path, tsc_required=True)
