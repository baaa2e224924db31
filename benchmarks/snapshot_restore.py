"""Process start to a guest shell that answers: restoring a snapshot, against a cold boot of
the same guest and against QEMU restoring the same guest from its own migration stream.

One lab session (or here, where /dev/kvm boots Linux), kvmpy's minimal kernel and default
initramfs booted `quiet` (the fastest cold boot, as linux_boot_to_init measures it), 256 MiB,
one vCPU, no virtio device, for both VMMs. First each VMM saves a
booted guest sitting at its shell prompt: kvmpy with QMP `x-kvmpy-snapshot-save`, QEMU
(microvm) with QMP `migrate` to `exec:cat > FILE` (QEMU 7.2 has no `file:` URI); the time
each takes and the size of what it wrote (blocks on disk) are reported. Then, in
alternating rounds, the time from spawning the process until the guest's shell has
answered `echo ready$((6*7))` with `ready42`:

  kvmpy_cold    `kvmpy run` booting (its kernel as unpacked by an earlier boot), the
                command typed once the prompt shows;
  kvmpy_restore `kvmpy run --restore DIR`;
  qemu_restore  `qemu-system-x86_64 ... -incoming "exec:cat FILE"`;
  qemu_cold     QEMU booting, for reference.

A restored guest prints no prompt (it printed it before it was saved), so the command
is typed at once and again every quarter second until the answer comes (QEMU drops
serial input that arrives while it is still loading the stream).
Targets: kvmpy_restore <= 0.25 x kvmpy_cold, and <= 1.0 x qemu_restore. QEMU's own
restore-to-cold-boot ratio is reported beside kvmpy's, as what the place allows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import linux_guest_benchmark, qmp_session, write_result

ROUNDS = int(os.environ.get("KVMPY_BENCH_ROUNDS", "5"))
MEM_MIB = 256
COMMAND = b"echo ready$((6*7))\n"
ANSWER = b"ready42"
PROMPT = b"/ # "
APPEND = "quiet"


class Console:
    """A VMM process whose stdin we type into and whose stdout we search."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self.seen = b""

    def _read(self) -> None:
        try:
            chunk = self.proc.stdout.read()  # type: ignore[union-attr]
        except BlockingIOError:
            chunk = None
        if chunk:
            self.seen += chunk
        elif chunk == b"" and self.proc.poll() is not None:
            raise RuntimeError(f"the VMM exited: {self.seen[-300:]!r}")

    def type(self, data: bytes) -> None:
        self.proc.stdin.write(data)  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def wait_for(self, marker: bytes, timeout: float = 240, retype: bytes | None = None,
                 start: int = 0) -> float:
        """Seconds from spawning to `marker` (after byte `start` of the output); types
        `retype` every quarter second meanwhile."""
        deadline = time.perf_counter() + timeout
        next_type = 0.0
        while marker not in self.seen[start:]:
            now = time.perf_counter()
            if now > deadline:
                raise RuntimeError(f"no {marker!r} in {timeout} s: {self.seen[-300:]!r}")
            if retype is not None and now >= next_type:
                self.type(retype)
                next_type = now + 0.25
            self._read()
            time.sleep(0.005)
        return time.perf_counter() - self.started

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def shell_answers_after_boot(argv: list[str]) -> float:
    console = Console(argv)
    try:
        console.wait_for(PROMPT)
        mark = len(console.seen)
        return console.wait_for(ANSWER, retype=COMMAND, start=mark)
    finally:
        console.close()


def shell_answers_after_restore(argv: list[str]) -> float:
    console = Console(argv)
    try:
        return console.wait_for(ANSWER, retype=COMMAND)
    finally:
        console.close()


def disk_bytes(path: Path) -> int:
    """Bytes a file or directory takes on disk (its allocated blocks: holes are free)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(os.stat(p).st_blocks * 512 for p in files)


def measure() -> dict[str, object]:
    from kvmpy import assets
    from kvmpy.boot.linux import BASE_CMDLINE

    kernel = str(assets.kernel_path().bzimage)
    initrd = str(assets.initramfs_path())
    work = Path(tempfile.mkdtemp(prefix="kvmpy-bench-snap-"))
    try:
        kvmpy = [str(Path(sys.executable).with_name("kvmpy")), "run", "--kernel", kernel,
                 "--initrd", initrd, "--mem", f"{MEM_MIB}M", "--rng", "off", "--append", APPEND]
        qemu = ["qemu-system-x86_64", "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host",
                "-m", str(MEM_MIB), "-smp", "1", "-kernel", kernel, "-initrd", initrd,
                "-append", f"console=ttyS0 {BASE_CMDLINE} {APPEND}", "-nodefaults",
                "-no-user-config",
                "-no-reboot", "-display", "none", "-serial", "stdio"]

        # each VMM saves a guest that sits at its prompt
        snap, sock = work / "snap", work / "kvmpy.sock"
        saver = Console([*kvmpy, "--qmp", f"unix:{sock}"])
        saver.wait_for(PROMPT)
        qmp = qmp_session(sock)
        t = time.perf_counter()
        reply = qmp.cmd("x-kvmpy-snapshot-save", path=str(snap))
        kvmpy_save_s = time.perf_counter() - t
        qmp.close()
        saver.close()

        stream, qsock = work / "qemu.stream", work / "qemu.sock"
        qsaver = Console([*qemu, "-qmp", f"unix:{qsock},server=on,wait=off"])
        qsaver.wait_for(PROMPT)
        qmp = qmp_session(qsock)
        t = time.perf_counter()
        qmp.cmd("migrate", uri=f"exec:cat > {stream}")
        while qmp.cmd("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(0.01)
        qemu_save_s = time.perf_counter() - t
        status = qmp.cmd("query-migrate")["status"]
        qmp.close()
        qsaver.close()
        if status != "completed":
            raise RuntimeError(f"QEMU's migration to a file ended {status}")

        cold, restore, qrestore, qcold = [], [], [], []
        for i in range(ROUNDS):
            restore.append(shell_answers_after_restore([*kvmpy[:2], "--restore", str(snap)]))
            qrestore.append(shell_answers_after_restore([*qemu, "-incoming",
                                                         f"exec:cat {stream}"]))
            cold.append(shell_answers_after_boot(kvmpy))
            qcold.append(shell_answers_after_boot(qemu))
            print(f"snapshot_restore round {i}: kvmpy restore {restore[-1]:.2f} s, qemu "
                  f"restore {qrestore[-1]:.2f} s, kvmpy cold {cold[-1]:.2f} s, qemu cold "
                  f"{qcold[-1]:.2f} s", file=sys.stderr, flush=True)
        mid = ROUNDS // 2
        for values in (cold, restore, qrestore, qcold):
            values.sort()
        return {
            "rounds": ROUNDS,
            "kvmpy_restore_s": round(restore[mid], 3),
            "kvmpy_cold_boot_s": round(cold[mid], 3),
            "qemu_restore_s": round(qrestore[mid], 3),
            "qemu_cold_boot_s": round(qcold[mid], 3),
            "ratio_restore_to_cold_boot": round(restore[mid] / cold[mid], 3),
            "target_ratio_restore_to_cold_boot_max": 0.25,
            "ratio_restore_to_qemu_restore": round(restore[mid] / qrestore[mid], 3),
            # the same ratio for QEMU itself: what the place allows a VMM (in the lab, a C
            # VMM's start-up and the guest's answer are emulated too)
            "qemu_ratio_restore_to_cold_boot": round(qrestore[mid] / qcold[mid], 3),
            "target_ratio_restore_to_qemu_restore_max": 1.0,
            "kvmpy_restore_all_s": [round(x, 3) for x in restore],
            "qemu_restore_all_s": [round(x, 3) for x in qrestore],
            "kvmpy_cold_all_s": [round(x, 3) for x in cold],
            "qemu_cold_all_s": [round(x, 3) for x in qcold],
            "kvmpy_snapshot_take_s": round(kvmpy_save_s, 3),
            "kvmpy_snapshot_in_kvmpy_s": reply["seconds"],
            "kvmpy_snapshot_disk_bytes": disk_bytes(snap),
            "kvmpy_snapshot_ram_data_bytes": reply["ram_bytes"],
            "qemu_migrate_to_file_s": round(qemu_save_s, 3),
            "qemu_stream_disk_bytes": disk_bytes(stream),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> dict[str, object]:
    return linux_guest_benchmark(__file__, measure)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_result(sys.argv[1], measure)
