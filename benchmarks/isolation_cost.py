"""What confinement costs (docs/isolation.md): kvmpy's minimal guest booted to its /init,
and virtio-blk throughput, with `--seccomp off` beside the default (`--seccomp kill`,
each thread on its allow-list), alternately, in one lab session. Target: at most 3%.

The boot figure is what lock_down adds on the way (libseccomp loaded, the filters
compiled and loaded, the I/O thread restarted); the disk figure is what the filter adds
to each of the I/O thread's system calls (a BPF program run per call).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    bench_initrd,
    guest_argvs,
    linux_guest_benchmark,
    median,
    write_result,
)

ROUNDS = int(os.environ.get("KVMPY_BENCH_ROUNDS", "5"))
MODES = ("off", "kill")


def measure() -> dict[str, object]:
    """Inside a place where Linux boots."""
    import linux_boot
    import virtio_blk

    from kvmpy import assets
    from kvmpy.initramfs import INIT_MARKER

    kernel = str(assets.kernel_path().bzimage)
    initrd = str(assets.initramfs_path())
    boot = {m: [str(Path(sys.executable).with_name("kvmpy")), "run", "--kernel", kernel,
                "--initrd", initrd, "--append", linux_boot.APPEND, "--seccomp", m]
            for m in MODES}
    boots: dict[str, list[float]] = {m: [] for m in MODES}
    disks: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        blk_initrd = bench_initrd(Path(tmp) / "blkbench.cpio.gz", "blkbench.sh",
                                  virtio_blk.BENCH_SCRIPT)
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(virtio_blk.IMAGE_MIB << 20)
        for i in range(ROUNDS):
            for m in MODES:
                boots[m].append(linux_boot._time_to_marker(boot[m], INIT_MARKER.encode()))
                argv, _ = guest_argvs(kernel, blk_initrd, "quiet -- sh /blkbench.sh",
                                      ["--disk", str(image), "--seccomp", m], [])
                disks[m].append(virtio_blk._run_guest(f"kvmpy --seccomp {m}", argv))
            print(f"isolation_cost round {i}: boot off {boots['off'][-1]:.2f} s, "
                  f"kill {boots['kill'][-1]:.2f} s", file=sys.stderr, flush=True)
    out: dict[str, object] = {"rounds": ROUNDS}
    boot_s = {m: median(boots[m]) for m in MODES}
    for m in MODES:
        out[f"boot_s_seccomp_{m}"] = round(boot_s[m], 3)
        out[f"boot_all_s_seccomp_{m}"] = [round(x, 3) for x in boots[m]]
    out["boot_cost"] = round(boot_s["kill"] / boot_s["off"] - 1, 4)
    for key in ("write_mb_s", "read_mb_s"):
        mb_s = {m: median([r[key] for r in disks[m]]) for m in MODES}
        for m in MODES:
            out[f"blk_{key}_seccomp_{m}"] = round(mb_s[m], 1)
        out[f"blk_{key.removesuffix('_mb_s')}_cost"] = round(1 - mb_s["kill"] / mb_s["off"], 4)
    out["target_cost_max"] = 0.03
    return out


def main() -> dict[str, object]:
    return linux_guest_benchmark(__file__, measure)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_result(sys.argv[1], measure)
