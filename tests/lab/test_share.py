"""virtio-9p under Linux's own 9p client: copies both ways, read-only shares, escapes.

Each test boots kvmpy's minimal kernel with the default /init, which mounts every share
given on the kernel command line (`kvmpy.share=TAG`) at /mnt/TAG, then runs a script
from a test initramfs. Results are checked from the host: checksums of what the guest
copied, the trees' contents, and that nothing outside a share changed. The same escapes
are unit tests of the server in tests/unit/test_ninep_server.py; here a Linux guest
tries them through its own VFS.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from kvmpy import assets
from kvmpy.api import Guest
from kvmpy.initramfs import INIT_MARKER
from kvmpy.machine import ShareConfig
from kvmpy.stop import StopKind
from tests.lab.virtio_kit import guest_initrd

pytestmark = pytest.mark.lab

FILES = 1000

CP_SH = """\
set -e
cp -a /mnt/src/tree /tmp/in
echo "in-files=$(find /tmp/in -type f | wc -l)"
cd /tmp/in
find . -type f | sort | xargs sha256sum > /tmp/in.sums
echo "in-sums=$(sha256sum < /tmp/in.sums | cut -d' ' -f1)"
cd /
cp -a /tmp/in /mnt/dst/out
sync
echo cp-done
"""

# one of each operation a program does on files, with what the guest saw printed; the
# host checks the result after the guest has powered off
OPS_SH = """\
set -e
cd /mnt/w
echo "read=$(cat given.txt)"
printf 'hello\\n' > created.txt
printf 'more\\n' >> created.txt
dd if=/dev/urandom of=big.bin bs=65536 count=48 2>/dev/null
echo "big-sum=$(sha256sum big.bin | cut -d' ' -f1)"
mkdir -p a/b/c
echo nested > a/b/c/leaf.txt
mv created.txt a/renamed.txt
mv a/b a/b2
ln -s renamed.txt a/link
ln a/renamed.txt a/hard.txt
echo "readlink=$(readlink a/link)"
echo "via-link=$(cat a/link | head -n1)"
rm doomed.txt
rmdir emptydir
truncate -s 3 given.txt
chmod 600 a/renamed.txt
touch -d '2001-02-03 04:05:06' a/b2/c/leaf.txt
echo "stat=$(stat -c '%s %a %h %F' a/renamed.txt)"
echo "nlink=$(stat -c %h a/hard.txt)"
echo "ls=$(ls a | tr '\\n' ' ')"
df -k /mnt/w | tail -n1 | awk '{print "statfs-blocks=" $2}'
echo "gone=$(ls doomed.txt 2>&1 >/dev/null | wc -l)"
echo ops-done
"""

# every write a shell can do, on the share mounted read-only by /init and again read-write
# by the guest itself (which only the server's EROFS can refuse)
RO_SH = """\
try_writes() {
  d=$1
  for op in "echo x > $d/file" "echo x >> $d/file" "touch $d/new" "mkdir $d/newdir" \\
            "rm -f $d/file" "mv -f $d/file $d/moved" "ln -s x $d/link" "ln $d/file $d/hard" \\
            "chmod 777 $d/file" "rmdir $d/sub" "mkfifo $d/fifo" "truncate -s 0 $d/file"; do
    sh -c "$op" 2>&1
    echo "op-status=$? $op"
  done
}
try_writes /mnt/ro
umount /mnt/ro  # a virtio-9p channel takes one mount
mkdir -p /mnt/again
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ro /mnt/again
grep ' /mnt/again ' /proc/mounts
try_writes /mnt/again
echo "content=$(cat /mnt/again/file)"
"""

# (name, command, must it fail?); None: either way, as long as the secret stays unread
ESCAPES = [
    ("absolute symlink to a dir", "cat $S/abs/secret", True),
    ("absolute symlink to a file", "cat $S/abs_file", True),
    ("relative symlink out", "cat $S/rel", True),
    ("list through a symlink", "ls -la $S/abs/", True),
    ("dotdot out of the mount", "cat $S/../..$SECRET_DIR/secret", True),
    ("find following links", "find -L $S -name secret -exec cat {} +", None),
    ("cd above the share", "cd $S && cd ../../.. && ls", None),
    ("swap a dir for a symlink", "mv $S/dir $S/dir.real && ln -s $SECRET_DIR $S/dir && "
                                 "cat $S/dir/secret", True),
    ("create through a dangling symlink", "echo pwned > $S/dangling", True),
    ("hard link to a symlink", "ln $S/abs_file $S/hard_to_link", False),
    ("hard link from outside", "ln /init $S/hard_from_guest", True),
    ("char device node", "mknod $S/kmem c 1 2", True),
    ("block device node", "mknod $S/sda b 8 0", True),
    ("open a host device node", "head -c 16 $S/hostmem > /dev/null", True),
    ("fifo", "mkfifo $S/fifo", False),
    ("set-user-ID bit", "touch $S/suid && chmod 4755 $S/suid", False),
]


def escape_script(secret_dir: Path) -> str:
    lines = [f"export S=/mnt/s SECRET_DIR={secret_dir}"]
    for name, command, _ in ESCAPES:
        lines += [f"echo '== {name}'", f"sh -c {shlex.quote(command)} 2>&1",
                  f"echo 'try-status={name}='$?"]
    return "\n".join([*lines, "echo escape-done", ""])


@pytest.fixture(scope="module")
def kernel() -> Path:
    return assets.kernel_path().bzimage


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guest_initrd(tmp_path_factory.mktemp("initrd") / "share-tests.cpio",
                        scripts={"cp.sh": CP_SH, "ro.sh": RO_SH})


def run_script(kernel: Path, initrd: Path, script: str, timeout: float = 600,
               **config: Any) -> str:
    """Boot with `/init` running `sh /script`; the transcript, once the guest has stopped."""
    with Guest(kernel, initrd, append=f"-- sh /{script}", **config) as g:
        g.expect(INIT_MARKER, 120)
        g.expect(r"kvmpy-guest: exit status \d+", timeout)
        stop = g.wait(60)
        log = g.output
    assert stop is not None and stop.kind is StopKind.POWEROFF, log[-2000:]
    return log


def test_file_operations_reach_the_host(kernel: Path, tmp_path: Path) -> None:
    share = tmp_path / "w"
    share.mkdir()
    (share / "given.txt").write_text("from the host\n")
    (share / "doomed.txt").write_text("x")
    (share / "emptydir").mkdir()
    initrd = guest_initrd(tmp_path / "ops.cpio", scripts={"ops.sh": OPS_SH})
    log = run_script(kernel, initrd, "ops.sh", shares=[ShareConfig(share, "w")])
    assert "ops-done" in log and "kvmpy-guest: exit status 0" in log, log[-3000:]
    # what the guest saw
    assert "read=from the host" in log
    assert "readlink=renamed.txt" in log and "via-link=hello" in log
    assert "stat=11 600 2 regular file" in log, log[-3000:]
    assert "nlink=2" in log
    assert "ls=b2 hard.txt link renamed.txt " in log, log[-3000:]
    blocks = re.search(r"statfs-blocks=(\d+)", log)
    host = os.statvfs(share)
    assert blocks and int(blocks.group(1)) == host.f_blocks * host.f_frsize // 1024, log[-3000:]
    # what the host has, after the guest powered off
    assert (share / "given.txt").read_text() == "fro"
    assert (share / "a" / "renamed.txt").read_text() == "hello\nmore\n"
    assert stat.S_IMODE((share / "a" / "renamed.txt").stat().st_mode) == 0o600
    assert os.readlink(share / "a" / "link") == "renamed.txt"
    assert os.path.samefile(share / "a" / "hard.txt", share / "a" / "renamed.txt")
    leaf = share / "a" / "b2" / "c" / "leaf.txt"
    assert leaf.read_text() == "nested\n"
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(leaf.stat().st_mtime)) == \
        "2001-02-03 04:05:06"
    big = re.search(r"big-sum=([0-9a-f]{64})", log)
    assert big and hashlib.sha256((share / "big.bin").read_bytes()).hexdigest() == big.group(1)
    assert (share / "big.bin").stat().st_size == 48 * 65536
    assert not (share / "doomed.txt").exists() and not (share / "emptydir").exists()
    assert not (share / "created.txt").exists() and not (share / "a" / "b").exists()
    assert sorted(os.listdir(tmp_path)) == ["ops.cpio", "w"]  # nothing beside the share


def make_tree(root: Path, files: int) -> None:
    """`files` regular files in nested directories, plus symlinks, modes and an empty dir."""
    rng = secrets.SystemRandom()
    for i in range(files):
        d = root / f"d{i % 10}" / (f"e{i % 3}" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 20000, 70000]) if i else 1 << 20
        path = d / f"file{i:04d}.bin"
        path.write_bytes(os.urandom(size))
        os.chmod(path, rng.choice([0o644, 0o600, 0o755, 0o444]))
        os.utime(path, ns=(1_600_000_000_000_000_000 + i, 1_500_000_000_123_456_789 + i))
    (root / "d0" / "link_rel").symlink_to("../d1/file0001.bin")
    (root / "d0" / "link_abs").symlink_to("/nonexistent/target")
    (root / "empty").mkdir()


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """What a faithful copy keeps: type, permissions, contents or target, file mtimes."""
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size,
                        hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns // 10**9)
    return out


def sha256sum_listing(root: Path) -> str:
    """The sha256 of `cd root; find . -type f | sort | xargs sha256sum`'s output."""
    files = sorted(b"./" + bytes(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and not p.is_symlink())
    lines = b"".join(hashlib.sha256((root / f.decode()[2:]).read_bytes()).hexdigest().encode()
                     + b"  " + f + b"\n" for f in files)
    return hashlib.sha256(lines).hexdigest()


def test_cp_a_a_tree_of_1000_files_in_and_out(kernel: Path, initrd: Path,
                                              tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src / "tree", FILES)
    dst.mkdir()
    log = run_script(kernel, initrd, "cp.sh", timeout=1200,
                     shares=[ShareConfig(src, "src", read_only=True), ShareConfig(dst, "dst")])
    assert "cp-done" in log and "kvmpy-guest: exit status 0" in log, log[-3000:]
    # in: what the guest read is what the host has, byte for byte
    assert f"in-files={FILES}" in log, log[-3000:]
    sums = re.search(r"in-sums=([0-9a-f]{64})", log)
    assert sums and sums.group(1) == sha256sum_listing(src / "tree"), log[-3000:]
    # out: the tree the guest wrote back is the original, modes, links and mtimes kept
    assert manifest(dst / "out") == manifest(src / "tree")


def test_a_read_only_share_refuses_every_write(kernel: Path, initrd: Path,
                                               tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    (ro / "sub").mkdir(parents=True)
    (ro / "file").write_text("read-only\n")
    before = manifest(ro)
    log = run_script(kernel, initrd, "ro.sh", shares=[ShareConfig(ro, "ro", read_only=True)])
    assert "kvmpy-guest: exit status 0" in log, log[-3000:]
    assert re.search(r"ro /mnt/again 9p rw", log), log[-3000:]  # mounted read-write...
    statuses = re.findall(r"op-status=(\d+) (.*)", log)
    assert len(statuses) == 24, log[-4000:]
    assert all(s != "0" for s, _ in statuses), statuses  # ...and still refused
    assert log.count("Read-only file system") >= 20, log[-4000:]
    assert "content=read-only" in log
    assert manifest(ro) == before


def test_escapes_from_the_guest_are_refused(kernel: Path, tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    secret_dir = Path(f"/tmp/kvmpy-secret-{token[:8]}")
    secret_dir.mkdir()
    try:
        (secret_dir / "secret").write_text(f"{token}\n")
        share = tmp_path / "s"
        (share / "dir").mkdir(parents=True)
        (share / "abs").symlink_to(secret_dir)
        (share / "abs_file").symlink_to(secret_dir / "secret")
        (share / "rel").symlink_to(os.path.relpath(secret_dir / "secret", share))
        (share / "dangling").symlink_to(secret_dir / "created")
        if os.geteuid() == 0:
            os.mknod(share / "hostmem", stat.S_IFCHR | 0o644, os.makedev(1, 1))  # /dev/mem
        initrd = guest_initrd(tmp_path / "escape.cpio",
                              scripts={"escape.sh": escape_script(secret_dir)})
        log = run_script(kernel, initrd, "escape.sh", shares=[ShareConfig(share, "s")])
        assert "escape-done" in log, log[-3000:]
        assert token not in log  # not one read reached the host's secret
        statuses = dict(re.findall(r"try-status=(.*)=(\d+)", log))
        for name, _, must_fail in ESCAPES:
            if must_fail is not None and not (name == "open a host device node"
                                              and not (share / "hostmem").exists()):
                assert (statuses[name] != "0") == must_fail, (name, log[-4000:])
        assert re.search(r"mknod: .*kmem: Operation not permitted", log), log[-4000:]
        assert re.search(r"mknod: .*sda: Operation not permitted", log), log[-4000:]
        # the host's view: the secret untouched, nothing new beside it
        assert sorted(os.listdir(secret_dir)) == ["secret"]
        assert (secret_dir / "secret").read_text() == f"{token}\n"
        assert os.stat(secret_dir / "secret").st_nlink == 1
        # what the guest made stayed in the share, and harmless
        assert os.path.islink(share / "hard_to_link")  # a link to the symlink itself
        assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
        assert not os.lstat(share / "suid").st_mode & (stat.S_ISUID | stat.S_ISGID)
        assert not (share / "kmem").exists() and not (share / "sda").exists()
        assert os.path.islink(share / "dir")  # the guest's own swap, confined to the share
        assert sorted(os.listdir(tmp_path)) == ["escape.cpio", "s"]
    finally:
        for p in secret_dir.iterdir():
            p.unlink()
        secret_dir.rmdir()
