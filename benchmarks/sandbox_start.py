"""`kvmpy sandbox -- true` against QEMU microvm running the same sandbox to the same point.

Both boot kvmpy's minimal kernel with the sandbox's initramfs (kvmpy.sandbox) and the
host's root shared read-only over 9p (QEMU: `-fsdev local,security_model=none,
readonly=on` + `virtio-9p-device`), mount the tmpfs overlay, chroot into it and run
`true`; the init then reports `status 0` on hvc2 (QEMU: the third virtconsole port of a
virtio-serial device, on its stdout). Same RAM, one vCPU, virtio-rng on both.

kvmpy is timed as a user sees it, from spawning `kvmpy sandbox` to its exit (its own
teardown included); QEMU from its spawn to the `status 0` line (its teardown not
counted). Medians of ROUNDS alternate runs, and the ratio kvmpy/QEMU (target <= 1.0).
Unless /dev/kvm boots Linux, all of it runs inside ONE lab session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import in_linux_capable_place, run_until, write_result

ROUNDS = int(os.environ.get("KVMPY_BENCH_ROUNDS", "7"))
STATUS = re.compile(rb"status 0\n")


def _time_kvmpy(argv: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"kvmpy sandbox -- true: status {done.returncode}: "
                           f"{done.stderr[-1500:]!r}")
    return elapsed


def _time_qemu(argv: list[str]) -> float:
    t = time.perf_counter()
    run_until("qemu", argv, STATUS, timeout=300)
    return time.perf_counter() - t


def measure() -> dict[str, object]:
    from kvmpy import assets
    from kvmpy.boot.linux import BASE_CMDLINE
    from kvmpy.sandbox import ROOT_TAG, sandbox_initrd, write_job

    kernel = str(assets.kernel_path().bzimage)
    initrd = str(sandbox_initrd())
    # the `kvmpy` command a user types (pip's entry-point script beside this Python)
    kvmpy = [str(Path(sys.executable).with_name("kvmpy")), "sandbox", "--", "true"]
    with tempfile.TemporaryDirectory(prefix="kvmpy-sandbox-bench-") as tmp:
        job = Path(tmp).resolve()
        write_job(job, ["true"], cwd=tmp)
        qemu = ["qemu-system-x86_64", "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host",
                "-m", "512", "-smp", "1", "-kernel", kernel, "-initrd", initrd,
                "-append", f"console=ttyS0 {BASE_CMDLINE} quiet kvmpy.job={job}",
                "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,"
                          "multidevs=remap",
                "-device", f"virtio-9p-device,fsdev=root,mount_tag={ROOT_TAG}",
                "-device", "virtio-rng-device",
                "-device", "virtio-serial-device",
                "-chardev", "file,id=out,path=/dev/null",
                "-device", "virtconsole,chardev=out",
                "-chardev", "file,id=err,path=/dev/null",
                "-device", "virtconsole,chardev=err",
                "-chardev", "stdio,id=status", "-device", "virtconsole,chardev=status",
                "-serial", "file:/dev/null",
                "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"]
        k, q = [], []
        for i in range(ROUNDS):
            q.append(_time_qemu(qemu))
            k.append(_time_kvmpy(kvmpy))
            print(f"sandbox_start round {i}: qemu {q[-1]:.2f} s, kvmpy {k[-1]:.2f} s",
                  file=sys.stderr, flush=True)
    k.sort()
    q.sort()
    mid = ROUNDS // 2
    return {"rounds": ROUNDS, "kvmpy_s": round(k[mid], 3), "qemu_microvm_s": round(q[mid], 3),
            "kvmpy_all_s": [round(x, 3) for x in k], "qemu_all_s": [round(x, 3) for x in q],
            "ratio": round(k[mid] / q[mid], 3), "ratio_of_minimums": round(k[0] / q[0], 3),
            "target_ratio_max": 1.0,
            "measured": "kvmpy: spawn to exit; QEMU: spawn to the init's `status 0`"}


def main() -> dict[str, object]:
    from kvmpy.lab.runner import ZERO_FREED_PAGES

    # as the boot benchmark does: TCG's cleanup after one VM must not land on the next
    return in_linux_capable_place(__file__, measure, lab_kernel_args=[ZERO_FREED_PAGES])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_result(sys.argv[1], measure)
