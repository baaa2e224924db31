"""Paths and helpers the benchmarks share."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KVMPY_CACHE", Path.home() / ".cache" / "kvmpy"))
GUESTS = CACHE / "guests"


def build_c(name: str) -> Path:
    """Compile benchmarks/<name>.c into the cache (once per source change)."""
    src = ROOT / "benchmarks" / f"{name}.c"
    out = CACHE / "bench" / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], check=True)
    return out


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def vmm_ratios(runs: dict[str, list[dict[str, float]]], key: str, label: str
               ) -> dict[str, object]:
    """kvmpy against QEMU microvm on one figure of their rounds (higher is better): the
    medians and their ratio, the ratio of the best rounds (the lab's noise only ever takes
    speed away), and every round."""
    k = [r[key] for r in runs["kvmpy"]]
    q = [r[key] for r in runs["qemu"]]
    return {f"kvmpy_{key}": round(median(k), 2), f"qemu_microvm_{key}": round(median(q), 2),
            f"{label}_ratio": round(median(k) / median(q), 3),
            f"{label}_ratio_of_maximums": round(max(k) / max(q), 3),
            f"kvmpy_{label}_all": [round(v, 2) for v in k],
            f"qemu_{label}_all": [round(v, 2) for v in q]}


def bench_initrd(path: Path, name: str, script: str) -> str:
    """kvmpy's default guest (same /init, same busybox) with `/name` added, gzip'd; the
    guest runs it with `-- sh /name`."""
    from kvmpy.initramfs import DEFAULT_INIT, busybox_initramfs

    archive = busybox_initramfs(DEFAULT_INIT, files={name: script.encode()})
    path.write_bytes(archive.to_gzip())
    return str(path)


def guest_argvs(kernel: str, initrd: str, append: str, kvmpy_devices: list[str],
                qemu_devices: list[str]) -> tuple[list[str], list[str]]:
    """`kvmpy run` and QEMU microvm booting the same kernel, initrd and command line with
    one vCPU and 256 MiB, each with its own spelling of the same devices."""
    from kvmpy.boot.linux import BASE_CMDLINE

    kvmpy = [sys.executable, "-m", "kvmpy", "run", "--kernel", kernel, "--initrd", initrd,
             *kvmpy_devices, "--rng", "off", "--cpus", "1", "--mem", "256M", "--append", append]
    qemu = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host",
            "-m", "256", "-smp", "1", "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 {BASE_CMDLINE} {append}", *qemu_devices,
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-serial", "stdio"]
    return kvmpy, qemu


def run_until(name: str, argv: list[str], pattern: re.Pattern[bytes],
              timeout: float = 300, fail: re.Pattern[bytes] | None = None) -> bytes:
    """Run a VMM until its output (stdout and stderr) matches `pattern`, then kill it;
    what it printed. RuntimeError, with the output's tail, if it exits, goes quiet or
    prints `fail` first."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    started = time.monotonic()
    try:
        while not pattern.search(seen):
            left = started + timeout - time.monotonic()
            # a guest that hangs prints nothing: wait for output with the deadline in hand
            chunk = os.read(proc.stdout.fileno(), 4096) if left > 0 and select.select(
                [proc.stdout], [], [], left)[0] else b""
            if not chunk:
                why = "exited" if proc.poll() is not None else f"no result in {timeout:.0f} s"
                raise RuntimeError(f"{name}: {why}: {seen[-1500:]!r}")
            seen += chunk
            if fail is not None and fail.search(seen):
                raise RuntimeError(f"{name}: the guest failed: {seen[-1500:]!r}")
    finally:
        proc.kill()
        proc.wait()
    return seen


def in_linux_capable_place(script: str, measure: Callable[[], dict[str, object]],
                           lab_kernel_args: Sequence[str] = (),
                           lab_cpus: int = 0) -> dict[str, object]:
    """Run `measure` here if /dev/kvm boots Linux, else run `script RESULT` in one lab session.

    The script, run with a path, calls `measure()` and writes its JSON there (see
    `write_result`); the lab shares the result's directory back. `lab_kernel_args` go on
    the lab kernel's command line (`kvmpy.lab.run_in_lab`); `lab_cpus`: the lab's CPUs
    (else BENCH_LAB_CPUS).
    """
    from kvmpy.lab import LabError, can_boot_linux
    from kvmpy.lab.runner import LabBroke

    if can_boot_linux():
        return measure()
    try:
        return _in_lab(script, lab_kernel_args, lab_cpus)
    except LabBroke as e:  # the lab stalled or died (kvmpy/lab/runner.py): once more
        stalled = str(e)
        print(f"bench: RETRY: the lab failed ({e}); measuring in a new lab", file=sys.stderr,
              flush=True)
    try:
        data = _in_lab(script, lab_kernel_args, lab_cpus)
    except LabError as e:
        return {"error": str(e), "stalled_before": stalled}
    data["stalled_before"] = stalled  # the figures are from a second lab session
    return data


def linux_guest_benchmark(script: str, measure: Callable[[], dict[str, object]],
                          lab_cpus: int = 0) -> dict[str, object]:
    """`in_linux_capable_place` for a benchmark of kvmpy's minimal kernel: its bzImage is
    unpacked into the cache first (the lab's view of the cache is read-only), and the lab
    zeroes freed pages (without it a second of TCG's, now and then, lands on either VMM;
    docs/lab.md)."""
    from kvmpy import assets
    from kvmpy.boot.unpack import unpack_file
    from kvmpy.lab.runner import ZERO_FREED_PAGES

    if unpack_file(assets.kernel_path().bzimage) is None:
        raise RuntimeError("cannot unpack kvmpy's minimal kernel into its cache")
    return in_linux_capable_place(script, measure, [ZERO_FREED_PAGES], lab_cpus)


# The benchmarks' figures (README, docs/) were measured in a lab of two CPUs, where a
# two-vCPU guest's vCPUs run at once; a lab guest's death there costs a round, not a run.
BENCH_LAB_CPUS = 2


def _in_lab(script: str, kernel_args: Sequence[str], cpus: int = 0) -> dict[str, object]:
    """`script RESULT` in one lab session; its JSON, or {"error"}; raises LabBroke."""
    from kvmpy.lab import LabError, run_in_lab
    from kvmpy.lab.runner import LabBroke

    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "result.json"
        try:
            status = run_in_lab([sys.executable, os.path.abspath(script), str(result)], rw=[out],
                                cpus=cpus or BENCH_LAB_CPUS, kernel_args=kernel_args)
        except LabBroke:
            raise
        except LabError as e:
            return {"error": str(e)}
        if not result.exists():
            return {"error": f"lab run failed with status {status}"}
        data: dict[str, object] = json.loads(result.read_text())
        if "error" not in data:
            data["where"] = "lab (nested KVM under QEMU TCG); compare as a ratio"
        return data


def write_result(path: str, measure: Callable[[], dict[str, object]]) -> None:
    """Inside the lab: measure, and hand the reason back if it fails."""
    try:
        result = measure()
    except Exception as e:  # the reason, not just a status, reaches `make bench`
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(path).write_text(json.dumps(result))


def qmp_session(sock: Path):  # type: ignore[no-untyped-def]
    """A negotiated QMP client (qemu.qmp) on `sock`, waiting up to a minute for it."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + 60
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no QMP socket {sock}")
        time.sleep(0.02)
    qmp = QEMUMonitorProtocol(str(sock))
    qmp.connect(negotiate=True)
    return qmp
