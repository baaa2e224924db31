"""virtio-9p from inside the guest: kvmpy against QEMU microvm's -virtfs on the same directory.

Both VMMs boot kvmpy's minimal kernel and the default initramfs (plus one script), share
one host directory (QEMU: `-fsdev local,security_model=none` + `virtio-9p-device`), and
the guest mounts it with the same options (9p2000.L, msize=512000, cache=none: every
operation goes to the server). Alternately, ROUNDS times each, the guest times with
/proc/uptime (10 ms ticks):

- read: `dd` of a 128 MiB file in 1 MiB blocks (MB/s, 10^6 bytes/s);
- write: `dd` of 128 MiB in 1 MiB blocks to a new file, then fsync (MB/s);
- walk: `find` over 5,000 files in 50 directories with `stat` of each (files/s).

The figures are medians per VMM and their ratios kvmpy/QEMU (and the ratios of the best
runs, which the lab's noise disturbs least). Target: ratio >= 0.8 for each.

The directory lives on tmpfs (/dev/shm), so both servers read host memory, not a disk.
Unless /dev/kvm boots Linux, everything runs inside ONE lab session (nested KVM under
QEMU TCG: absolute figures are low and noisy there; the ratio is the result).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

from common import (
    bench_initrd,
    guest_argvs,
    in_linux_capable_place,
    run_until,
    vmm_ratios,
    write_result,
)

# under the lab's emulation one walk of 5,000 files takes minutes for either VMM
ROUNDS = int(os.environ.get("KVMPY_BENCH_ROUNDS", "3"))
BIG_MIB = 128
META_DIRS, META_FILES = 50, 100  # 5,000 files
TAG = "bench"
# kvmpy's default guest mounts its share at /mnt/TAG already; a virtio-9p channel takes
# one mount, and both VMMs' guests must mount it the same way
BENCH_SCRIPT = f"""\
umount /mnt/{TAG} 2>/dev/null
mkdir -p /b
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none {TAG} /b || exit 1
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/b/big of=/dev/null bs=1M 2>/dev/null
r=$?
t1=$(cut -d' ' -f1 /proc/uptime)
n=$(find /b/meta -type f -exec stat -c %s {{}} + | wc -l)
w=$?
t2=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/b/written bs=1M count={BIG_MIB} conv=fsync 2>/dev/null
wr=$?
t3=$(cut -d' ' -f1 /proc/uptime)
rm -f /b/written
echo "ninepbench read $r $t0 $t1 walk $w $n $t1 $t2 write $wr $t2 $t3 end"
"""
FAILED = re.compile(rb"kvmpy-guest: exit status [1-9]")
RESULT = re.compile(rb"ninepbench read (\d+) ([\d.]+) ([\d.]+) walk (\d+) (\d+) ([\d.]+) "
                    rb"([\d.]+) write (\d+) ([\d.]+) ([\d.]+) end")


def _make_tree(root: Path) -> int:
    with open(root / "big", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BIG_MIB):
            f.write(block)
    files = 0
    for d in range(META_DIRS):
        sub = root / "meta" / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(META_FILES):
            (sub / f"f{i:03d}").write_bytes(b"x" * (i % 7))
            files += 1
    return files


def _parse(name: str, seen: bytes, files: int) -> dict[str, float]:
    found = RESULT.search(seen)
    assert found is not None
    r, t0, t1, w, n, t1b, t2, wr, t2b, t3 = found.groups()
    if int(r) or int(w) or int(wr) or int(n) != files:
        raise RuntimeError(f"{name}: the guest's dd/find failed: {seen[-1500:]!r}")
    big = BIG_MIB * (1 << 20)
    result = {"read_mb_s": big / max(float(t1) - float(t0), 0.01) / 1e6,
              "walk_files_s": files / max(float(t2) - float(t1b), 0.01),
              "write_mb_s": big / max(float(t3) - float(t2b), 0.01) / 1e6}
    print(f"ninep: {name}: read {result['read_mb_s']:.1f} MB/s, write "
          f"{result['write_mb_s']:.1f} MB/s, walk {result['walk_files_s']:.0f} files/s",
          file=sys.stderr, flush=True)
    return result


def measure() -> dict[str, object]:
    """Inside a place where Linux boots: both VMMs on the same directory, alternately."""
    from kvmpy import assets

    kernel = str(assets.kernel_path().bzimage)
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        initrd = bench_initrd(Path(tmp) / "ninepbench.cpio.gz", "ninepbench.sh",
                              BENCH_SCRIPT)
        share = Path(tmp) / "share"
        share.mkdir()
        files = _make_tree(share)
        kvmpy, qemu = guest_argvs(
            kernel, initrd, "quiet -- sh /ninepbench.sh", ["--share", f"{share},tag={TAG}"],
            ["-fsdev", f"local,id=fs0,path={share},security_model=none",
             "-device", f"virtio-9p-device,fsdev=fs0,mount_tag={TAG}"])
        runs: dict[str, list[dict[str, float]]] = {"kvmpy": [], "qemu": []}
        for _ in range(ROUNDS):
            for name, argv in (("qemu", qemu), ("kvmpy", kvmpy)):
                started = time.monotonic()
                seen = run_until(name, argv, RESULT, timeout=1200, fail=FAILED)
                runs[name].append(_parse(name, seen, files))
                print(f"ninep: {name} round took {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)

    out: dict[str, object] = {
        "rounds": ROUNDS, "read_and_write_bytes": BIG_MIB << 20, "walk_files": files,
        "mount": "9p2000.L, msize=512000, cache=none; QEMU security_model=none"}
    for key, label in (("read_mb_s", "read"), ("write_mb_s", "write"),
                       ("walk_files_s", "walk")):
        out.update(vmm_ratios(runs, key, label))
    out["target_ratio_min"] = 0.8
    return out


def main() -> dict[str, object]:
    return in_linux_capable_place(__file__, measure)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_result(sys.argv[1], measure)
