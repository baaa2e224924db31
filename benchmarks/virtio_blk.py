"""virtio-blk sequential throughput from inside the guest: kvmpy against QEMU microvm.

Both VMMs boot kvmpy's minimal kernel and the default initramfs (plus one script) with
one raw image as their only virtio-blk disk, alternately, ROUNDS times each. In the
guest, with the page cache dropped and O_DIRECT (so each 1 MiB block is a request to
the device, not a hit in the guest's cache), `dd` writes then reads the whole image in
1 MiB blocks; the guest times each by its own clock in ns (/proc/timer_list's "now";
/proc/uptime's 10 ms ticks were 1-2% of a transfer of 128 MiB, which lasts about a
second). The figures are the median MB/s (10^6 bytes/s) per
direction and the ratios kvmpy/QEMU, and the ratios of the fastest transfers, which
the lab's noise disturbs least. Target: ratio >= 0.8 both ways.

Linux cannot boot on this machine's /dev/kvm (PVM), so unless /dev/kvm has hardware
virtualization the whole measurement runs inside ONE lab session (nested KVM under
QEMU TCG: absolute figures are low and noisy there; the ratio is the result). The
image lives on a tmpfs (/dev/shm) so both VMMs read and write host memory, not a disk.
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

ROUNDS = 9
IMAGE_MIB = 128
BENCH_SCRIPT = f"""\
now() {{ sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list; }}
sync
echo 3 > /proc/sys/vm/drop_caches
t0=$(now)
dd if=/dev/zero of=/dev/vda bs=1M count={IMAGE_MIB} oflag=direct conv=fsync 2>/dev/null
w=$?
t1=$(now)
echo 3 > /proc/sys/vm/drop_caches
t2=$(now)
dd if=/dev/vda of=/dev/null bs=1M count={IMAGE_MIB} iflag=direct 2>/dev/null
r=$?
t3=$(now)
echo "blkbench write $w $t0 $t1 read $r $t2 $t3 end"
"""
# the dd statuses, and the guest's clock (ns) before and after each transfer
RESULT = re.compile(rb"blkbench write (\d+) (\d+) (\d+) read (\d+) (\d+) (\d+) end")


def rates(found: re.Match[bytes], name: str) -> dict[str, float]:
    """MB/s each way from one RESULT line; RuntimeError if either dd failed."""
    w, t0, t1, r, t2, t3 = map(int, found.groups())
    if w or r:
        raise RuntimeError(f"{name}: dd failed in the guest: {found.group(0)!r}")
    size = IMAGE_MIB << 20
    return {"write_mb_s": size / ((t1 - t0) / 1e9) / 1e6,
            "read_mb_s": size / ((t3 - t2) / 1e9) / 1e6}


def _run_guest(name: str, argv: list[str], timeout: float = 300) -> dict[str, float]:
    """Run one VMM until the guest prints its result line; MB/s each way."""
    started = time.monotonic()
    seen = run_until(name, argv, RESULT, timeout)
    found = RESULT.search(seen)
    assert found is not None
    result = rates(found, name)
    print(f"virtio_blk: {name}: write {result['write_mb_s']:.1f} MB/s, "
          f"read {result['read_mb_s']:.1f} MB/s ({time.monotonic() - started:.0f} s)",
          file=sys.stderr, flush=True)
    return result


def measure() -> dict[str, object]:
    """Inside a place where Linux boots: both VMMs on the same image, alternately."""
    from kvmpy import assets

    kernel = str(assets.kernel_path().bzimage)
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        initrd = bench_initrd(Path(tmp) / "blkbench.cpio.gz", "blkbench.sh", BENCH_SCRIPT)
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_MIB << 20)
        kvmpy, qemu = guest_argvs(
            kernel, initrd, "quiet -- sh /blkbench.sh", ["--disk", str(image)],
            ["-drive", f"id=vda,file={image},format=raw,if=none",
             "-device", "virtio-blk-device,drive=vda"])
        runs: dict[str, list[dict[str, float]]] = {"kvmpy": [], "qemu": []}
        for _ in range(ROUNDS):
            runs["qemu"].append(_run_guest("qemu", qemu))
            runs["kvmpy"].append(_run_guest("kvmpy", kvmpy))

    out: dict[str, object] = {"rounds": ROUNDS, "bytes_per_transfer": IMAGE_MIB << 20,
                              "block": "1 MiB, O_DIRECT, guest page cache dropped"}
    for key in ("write_mb_s", "read_mb_s"):
        out.update(vmm_ratios(runs, key, key.removesuffix("_mb_s")))
    out["target_ratio_min"] = 0.8
    return out


def main() -> dict[str, object]:
    return in_linux_capable_place(__file__, measure)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_result(sys.argv[1], measure)
