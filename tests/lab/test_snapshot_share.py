"""A Linux guest with a 9p share mounted and a file on it held open, snapshotted and
restored in a new process: Linux's own 9p client goes on using the fids the snapshot
saved (kvmpy.ninep.session) -- the open file takes more lines, the mount lists and
creates files -- and the same snapshot is refused in one line once a file it had open
is gone from the share.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.virtio_kit import KvmpyProcess
from tests.qmp_kit import close, connect

pytestmark = pytest.mark.lab

PROMPT = r"/ # "
# a counter that keeps /mnt/data/log open on fd 3 (one fid, open for appending) and
# writes each number to the console and to it
COUNTER = ("cd /mnt/data && exec 3>>log && i=0 && while true; do i=$((i+1)); echo n=$i; "
           "echo $i >&3; sleep 0.3; done &\n")


def test_a_mounted_share_goes_on_after_a_restore(tmp_path: Path) -> None:
    share, sock, snap = tmp_path / "share", tmp_path / "qmp.sock", tmp_path / "snap"
    share.mkdir()
    (share / "hello.txt").write_text("from the host\n")
    first = KvmpyProcess(["--share", f"{share},tag=data", "--qmp", f"unix:{sock}"],
                         typing=True)
    try:
        first.expect(PROMPT, 240)
        first.send(COUNTER)
        first.expect(r"n=4\r?\n", 120)
        qmp = connect(sock)
        qmp.cmd("stop")
        qmp.cmd("x-kvmpy-snapshot-save", path=str(snap))
        close(qmp)
    finally:
        first.kill()
    saved = [int(n) for n in (share / "log").read_text().split()]
    assert saved == list(range(1, len(saved) + 1)) and len(saved) >= 4, saved

    second = KvmpyProcess(["--restore", str(snap), "--share", f"{share},tag=data"], typing=True)
    try:
        second.expect(rf"n={saved[-1] + 3}\r?\n", 120)  # the counter writes through fd 3
        # the counter's lines land anywhere in what a command prints: the listing is
        # checked in the guest, which answers in one line (not in the typed command)
        second.send("cat /mnt/data/hello.txt; echo made > /mnt/data/new.txt; "
                    "l=$(ls /mnt/data | tr '\\n' ' '); [ \"$l\" = 'hello.txt log new.txt ' ] "
                    "&& echo listed-$((6*7)) || echo \"listed-$((6*6)): $l\"\n")
        second.expect(r"from the host", 60)
        listed = second.expect(r"listed-(42|36: .*)", 60).group(0)
        assert listed == "listed-42", listed  # 36: the listing was wrong
        second.send("kill %1; echo killed\n")
        second.expect(r"\nkilled", 60)
    finally:
        second.kill()
    numbers = [int(n) for n in (share / "log").read_text().split()]
    assert numbers[:len(saved)] == saved and numbers[len(saved):] == list(
        range(saved[-1] + 1, len(numbers) + 1)) and len(numbers) >= len(saved) + 3, numbers
    assert (share / "new.txt").read_text() == "made\n"

    (share / "log").unlink()  # the file the guest holds open is gone: no restore
    run = subprocess.run([sys.executable, "-m", "kvmpy", "run", "--restore", str(snap),
                          "--share", f"{share},tag=data"], capture_output=True, timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 2 and err.count("\n") == 1, err
    assert "log: No such file or directory: the shared directory changed since the " \
           "snapshot" in err, err
