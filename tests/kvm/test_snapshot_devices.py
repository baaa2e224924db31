"""Snapshots of a flat guest with a 9p share and a vsock device, on this machine's /dev/kvm:
the 9P session (fids walked and open, as a guest's mount holds them) is open again in
the restored process on the same files; vsock's host socket listens again (at another
path while the first VMM still runs) and the guest is told its connections are gone;
a share that changed since the snapshot is refused in one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.api import Guest
from kvmpy.errors import ConfigError
from kvmpy.machine import ShareConfig, VsockConfig
from kvmpy.ninep.client import Client, mount
from kvmpy.virtio.ninep import NinePDevice
from kvmpy.virtio.vsock import Vsock
from tests.kvm.test_snapshot import count_line, counter

pytestmark = pytest.mark.kvm

KVMPY = [sys.executable, "-m", "kvmpy"]
ROOT, FILE, DIR = 1, 2, 3
RDWR, DIRECTORY = 2, 0o200000


def device(guest: Guest, kind: type) -> object:
    return next(t.device for t, _, _ in guest.machine.virtio if isinstance(t.device, kind))


def test_share_session_and_vsock_come_back(guest_dir: Path, tmp_path: Path) -> None:
    share, snap = tmp_path / "share", tmp_path / "snap"
    (share / "sub").mkdir(parents=True)
    (share / "sub" / "notes.txt").write_text("host line\n")
    config = counter(guest_dir, "cpl3", tmp_path)._replace(
        shares=[ShareConfig(share, "data")], vsock=VsockConfig(3, tmp_path / "v.sock"))
    with Guest.from_config(config) as g:
        g.expect(count_line("cpl3", 3) + "\n", 60)
        g.pause()  # the snapshot holds the last count printed, not one the steps below ran past
        ninep = device(g, NinePDevice)
        assert isinstance(ninep, NinePDevice)
        with ninep.lock:  # a session as a guest's mount leaves it: root, an open file, a dir
            c = mount(ninep.server, ROOT)
            c.walk(ROOT, FILE, b"sub", b"notes.txt")
            c.lopen(FILE, RDWR)
            c.write(FILE, b"guest line\n", 10)
            c.walk(ROOT, DIR, b"sub")
            c.lopen(DIR, DIRECTORY)
            qid = c.getattr(FILE)["qid"]
        g.snapshot(snap)
        saved = g.output  # its last line may be cut short: the restored guest ends it
        last = int(saved.split("\n")[-2].split()[-1], 16)  # the last whole count
        # the host ends are the restore's to give; the first VMM still listens at
        # v.sock, so a second one must listen elsewhere
        shares = [f"{share},tag=data"]
        with pytest.raises(ConfigError, match="another process listens there"):
            Guest.restore(snap, shares=shares, vsock=f"3,uds={tmp_path / 'v.sock'}")
        with Guest.restore(snap, shares=shares, vsock=f"3,uds={tmp_path / 'v2.sock'}") as r:
            r.expect(count_line("cpl3", last + 2) + "\n", 60)  # it counts on from there
            assert (saved + r.output).split("\n")[:last + 3] == \
                [count_line("cpl3", n) for n in range(last + 3)]
            restored = device(r, NinePDevice)
            assert isinstance(restored, NinePDevice)
            with restored.lock:
                assert sorted(restored.server.fids) == [ROOT, FILE, DIR]
                n = Client(restored.server, c.msize)
                n.tag = c.tag
                assert n.getattr(FILE)["qid"] == qid  # the same inode, as the guest knew it
                assert n.read(FILE) == b"host line\nguest line\n"
                n.write(FILE, b"after restore\n", 21)
                assert sorted(n.listdir(DIR)) == [b".", b"..", b"notes.txt"]
            vsock = device(r, Vsock)
            assert isinstance(vsock, Vsock)
            assert vsock.reset_event_pending  # no driver yet to tell: told when it offers
            host = socket.socket(socket.AF_UNIX)
            host.connect(str(tmp_path / "v2.sock"))  # the listener is back
            host.close()
            r.stop()
        g.stop()
    assert (share / "sub" / "notes.txt").read_text() == "host line\nguest line\nafter restore\n"

    (share / "sub" / "notes.txt").rename(share / "sub" / "moved.txt")
    run = subprocess.run([*KVMPY, "run", "--restore", str(snap), "--share", shares[0],
                          "--vsock", f"3,uds={tmp_path / 'v3.sock'}"], capture_output=True,
                         timeout=60)
    err = run.stderr.decode()
    assert run.returncode == 2 and run.stdout == b"", err
    assert "notes.txt: No such file or directory: the shared directory changed since the " \
           "snapshot" in err and err.count("\n") == 1, err
