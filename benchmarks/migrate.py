"""Live migration of a Linux guest that keeps dirtying memory: kvmpy against QEMU's own.

One lab session (or here, where /dev/kvm boots Linux). kvmpy's minimal kernel and
default initramfs, `quiet`, 256 MiB, one vCPU, no virtio device, for both VMMs
(common.guest_argvs). In the guest's shell a workload copies a file of random bytes
on a tmpfs over and over and prints `seq=<i> <t0> <t1>` after each copy (the guest's
own clock, /proc/uptime, before and after the copy), at two dirty rates:

  low   1 MiB copied per tick, then `sleep 0.1`
  high  16 MiB copied per tick, then `sleep 0.05`

Each round boots a source, starts the workload, starts a destination waiting on a unix
socket (`kvmpy run ... --incoming unix:P`; QEMU: the same command line with
`-incoming unix:P`) and migrates with QMP `migrate` (downtime limit 300 ms on both;
QEMU's bandwidth cap, 128 MiB/s by default, lifted, as kvmpy has none). Figures:

  downtime_ms       the guest paused -> resumed at the destination, one definition for
                    both: from the source's vCPUs stopped to the destination letting its
                    vCPUs go. kvmpy: its -v marks `paused` and `dst-resumed` (monotonic
                    clock); QEMU: the source's STOP event to the destination's RESUME event
                    (their QMP timestamps, the host's real-time clock; STOP is sent once
                    every vCPU is paused, RESUME just before they go)
  reported_downtime_ms  the VMM's own figure: kvmpy's from pausing the source (the vCPU
                    kick included) to the destination's "running" (its `migrated` line),
                    QEMU's `downtime` in query-migrate (from stopping the source to its
                    last byte written: QEMU's source does not wait for its destination)
  sent_ms           kvmpy: from pausing the source to its last byte written, QEMU's measure
  pause_phases_ms   kvmpy: each step of the pause, in ms from its start, both ends (their
                    -v lines: kvmpy.migration.wire.Phases; "dst-" the destination's)
  gap_split_ms      kvmpy: switch_gap cut at the pause and at the destination's resume
  guest_stall_ms    seen from the guest's own sequence numbers: the host-side gap between
                    the last `seq=` line the source printed and the first the destination
                    printed, less the workload's median tick period
  guest_clock_ms    the same ticks by the guest's own clock (10 ms steps): a copy and
                    the rest of a tick (echo, sleep, next t0), medians at the source;
                    `gap` and `rest_across`, from the source's last line to the
                    destination's first; the destination's first copies and rests
  total_s           from `migrate` to completion (kvmpy's line; QEMU's total-time)
  rounds            pre-copy rounds (kvmpy's; QEMU's dirty-sync-count)
  sequence_ok       the two consoles together count every tick once
  lost_rounds       rounds run again because the lab lost the guest: it died, or went
                    quiet before its migration began (docs/lab.md, "Known failure modes")

Medians of ROUNDS rounds per VMM and rate, alternating VMMs. Target: at the low rate,
kvmpy's downtime <= 1.0 x QEMU's and <= 300 ms (downtime_ms, and the guest's stall).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import guest_argvs, linux_guest_benchmark, median, qmp_session, write_result

ROUNDS = int(os.environ.get("KVMPY_BENCH_ROUNDS", "2"))
RATES = {"low": (1, 0.1), "high": (16, 0.05)}  # MiB copied per tick, sleep after it
# a look at part of it (e.g. "low" and "kvmpy"): the figures of what is left out are absent
ONLY_RATES = os.environ.get("KVMPY_BENCH_MIGRATE_RATES", ",".join(RATES)).split(",")
ONLY_VMMS = os.environ.get("KVMPY_BENCH_MIGRATE_VMMS", "kvmpy,qemu").split(",")
PROMPT = rb"/ # "
# each line: its number, then the guest's own clock (/proc/uptime) before and after the copy
SEQ = re.compile(rb"seq=(\d+) ([\d.]+) ([\d.]+)\r?\n")
WORKLOAD = ("mkdir -p /w && mount -t tmpfs -o size=96m none /w && dd if=/dev/urandom "
            "of=/w/src bs=64k count={blocks} 2>/dev/null && i=0 && while true; do "
            "read t0 x </proc/uptime; i=$((i+1)); cp /w/src /w/d$((i%2)); "
            "read t1 x </proc/uptime; echo seq=$i $t0 $t1; sleep {sleep}; done &\n")
DOWNTIME_LIMIT_MS = 300
KVMPY_LINE = re.compile(r"migrated to \S+ \((\d+) rounds, ([\d.]+) MiB in ([\d.]+) s, "
                        r"downtime (\d+) ms\)")
MARK = re.compile(r"([\w-]+) at ([\d.]+)")
# a guest lost in the lab (docs/lab.md, "Known failure modes") costs its round, which
# runs again, up to this often per rate; each is in the figures (`lost_rounds`)
RETRIES = 2


class GuestLost(RuntimeError):
    """The guest died, at either end (the lab's triple fault: kvmpy exits 4, QEMU with
    -no-reboot 0), or went quiet before its migration began."""


class Console:
    """A VMM process: stdin to type into, stdout lines kept with their arrival times."""

    def __init__(self, argv: list[str], err: Path) -> None:
        self.err = err
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err.open("wb"))
        self.seen = b""
        self.lines: list[tuple[float, bytes]] = []
        self.partial = b""  # a line begun and not ended (a source's last, when the pause cut it)
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[union-attr]
            now = time.monotonic()
            with self._lock:
                self.seen += chunk
                *complete, self.partial = (self.partial + chunk).split(b"\n")
                self.lines += [(now, line + b"\n") for line in complete]

    def type(self, data: bytes) -> None:
        self.proc.stdin.write(data)  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def wait_for(self, marker: bytes, timeout: float = 240) -> None:
        """Until the regular expression `marker` matches the output."""
        deadline = time.monotonic() + timeout
        while not re.search(marker, self.seen):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                died = self.proc.returncode in (0, 4)
                raise (GuestLost if died else RuntimeError)(
                    f"no {marker!r} (status {self.proc.returncode}): {self.seen[-300:]!r} "
                    f"{self.err.read_text()[-300:]}")
            time.sleep(0.01)

    def seqs(self) -> list[tuple[float, int]]:
        return [(t, n) for t, n, _, _ in self.ticks()]

    def ticks(self, head: bytes = b"") -> list[tuple[float, int, float, float]]:
        """Each `seq=` line: when it arrived, its number, the guest's clock before and
        after that tick's copy (s). `head`: what came before the first line (a
        destination's first line ends the one its source began)."""
        with self._lock:
            lines = [(t, head + line if i == 0 else line) for i, (t, line)
                     in enumerate(self.lines)]
        return [(t, int(m.group(1)), float(m.group(2)), float(m.group(3)))
                for t, line in lines if (m := SEQ.search(line))]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def one_migration(vmm: str, argv: list[str], rate: str, work: Path) -> dict[str, Any]:
    mib, sleep = RATES[rate]
    qsock, msock = work / f"{vmm}-qmp.sock", work / f"{vmm}-mig.sock"
    dqsock = work / f"{vmm}-dst-qmp.sock"
    for path in (qsock, msock, dqsock):
        path.unlink(missing_ok=True)
    if vmm == "kvmpy":
        src_argv, dst_argv = [*argv, "--qmp", f"unix:{qsock}"], [*argv, "--incoming",
                                                                  f"unix:{msock}"]
    else:  # (QEMU's destination has a QMP socket too: its RESUME event)
        src_argv = [*argv, "-qmp", f"unix:{qsock},server=on,wait=off"]
        dst_argv = [*argv, "-qmp", f"unix:{dqsock},server=on,wait=off", "-incoming",
                    f"unix:{msock}"]
    src = Console(src_argv, work / f"{vmm}-src.err")
    dst = None
    try:
        try:
            src.wait_for(PROMPT)
            src.type(WORKLOAD.format(blocks=mib * 16, sleep=sleep).encode())
            src.wait_for(rb"seq=10 [\d.]+ [\d.]+\r?\n", 120)
        except RuntimeError as e:  # (nothing migrated yet: the lab lost the guest)
            raise GuestLost(f"before the migration: {e}") from None
        dst = Console(dst_argv, work / f"{vmm}-dst.err")
        deadline = time.monotonic() + 60
        while not msock.exists():
            if time.monotonic() > deadline or dst.proc.poll() is not None:
                raise RuntimeError(f"{vmm}: no destination socket: {dst.err.read_text()}")
            time.sleep(0.02)
        qmp = qmp_session(qsock)
        dst_qmp = qmp_session(dqsock) if vmm == "qemu" else None
        params: dict[str, Any] = {"downtime-limit": DOWNTIME_LIMIT_MS}
        if vmm == "qemu":
            params["max-bandwidth"] = 1 << 40
        qmp.cmd("migrate-set-parameters", **params)
        started = time.monotonic()
        qmp.cmd("migrate", uri=f"unix:{msock}")
        result = (_kvmpy_result(src, qmp) if vmm == "kvmpy" else
                  _qemu_result(qmp, dst_qmp))
        result["wall_s"] = round(time.monotonic() - started, 3)
        for session in (qmp, dst_qmp):
            try:
                if session is not None:
                    session.close()
            except Exception:  # noqa: BLE001  (kvmpy's source has gone: its socket with it)
                pass
        last = src.seqs()[-1][1]
        dst.wait_for(rf"seq={last + 10} [\d.]+ [\d.]+\r?\n".encode(), 120)
        if vmm == "kvmpy":
            marks = _marks(src.err, dst.err)
            phases = result["pause_phases_ms"] = _since(marks, "pause")
            result["sent_ms"] = phases.get("state-sent")
            if "paused" in marks and "dst-resumed" in marks:
                result["downtime_ms"] = round(marks["dst-resumed"] - marks["paused"], 1)
            if "pause" in marks and "dst-resumed" in marks:
                result["gap_split_ms"] = {  # (one clock: CLOCK_MONOTONIC, both ends)
                    "last_line_to_pause": round(marks["pause"] - src.seqs()[-1][0] * 1000, 1),
                    "pause_to_resumed": round(marks["dst-resumed"] - marks["pause"], 1),
                    "resumed_to_first_line": round(dst.ticks(src.partial)[0][0] * 1000
                                                   - marks["dst-resumed"], 1)}
        return result | _guest_view(src.ticks(), dst.ticks(src.partial))
    finally:
        src.close()
        if dst is not None:
            dst.close()


def _kvmpy_result(src: Console, qmp: Any) -> dict[str, Any]:
    info: dict[str, Any] = {}
    while src.proc.poll() is None:
        try:
            info = qmp.cmd("query-migrate") or info
        except Exception:  # noqa: BLE001  (the source exited, its QMP socket with it)
            break
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"kvmpy's migration {info['status']}: {info}")
        if info.get("status") not in ("setup", "active"):
            break  # paused: not asked again (a query then takes the GIL from the pause)
        time.sleep(0.05)
    try:
        src.proc.wait(120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"kvmpy's source did not exit: {src.err.read_text()[-500:]}"
                           ) from None
    line = KVMPY_LINE.search(src.err.read_text())
    if src.proc.returncode != 7 or line is None:
        raise (GuestLost if src.proc.returncode == 4 else RuntimeError)(
            f"kvmpy's source: status {src.proc.returncode}, {src.err.read_text()[-500:]}")
    rounds, _, total, downtime = line.groups()
    return {"reported_downtime_ms": float(downtime), "total_s": float(total),
            "rounds": int(rounds),
            "dirty_pages_rate": info.get("ram", {}).get("dirty-pages-rate"),
            "mbytes": round(info.get("ram", {}).get("transferred", 0) / 1e6, 1)}


def _marks(src_err: Path, dst_err: Path) -> dict[str, float]:
    """kvmpy's pause, step by step (both ends' -v lines: kvmpy.migration.wire.Phases),
    each on the monotonic clock in ms; the destination's steps prefixed "dst-"."""
    marks = {}
    for prefix, err in (("", src_err), ("dst-", dst_err)):
        for line in err.read_text(errors="replace").splitlines():
            if "pause's steps" in line or "migration received" in line:
                marks.update({prefix + name: float(t) for name, t in MARK.findall(line)})
    return marks


def _since(marks: dict[str, float], origin: str) -> dict[str, float]:
    if origin not in marks:
        return {}
    return {name: round(t - marks[origin], 1) for name, t in
            sorted(marks.items(), key=lambda item: item[1])}


def _qemu_result(qmp: Any, dst_qmp: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        info = qmp.cmd("query-migrate")
        # (QEMU says "completed" a moment before it has worked out the figures: 0 till then)
        if info.get("status") == "completed" and info.get("total-time"):
            break
        if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"QEMU's migration: {info}")
        time.sleep(0.05)
    ram = info.get("ram", {})
    stopped, resumed = _event_time(qmp, "STOP"), _event_time(dst_qmp, "RESUME")
    return {"downtime_ms": round((resumed - stopped) * 1000, 1),
            "reported_downtime_ms": float(info["downtime"]),
            "total_s": info["total-time"] / 1000,
            "rounds": ram.get("dirty-sync-count"), "dirty_pages_rate":
            ram.get("dirty-pages-rate"), "mbytes": round(ram.get("transferred", 0) / 1e6, 1)}


def _event_time(qmp: Any, name: str, timeout: float = 60.0) -> float:
    """When QEMU sent the event `name` on this QMP session (its timestamp: the host's
    real-time clock, s), waiting for it up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:  # (the events that came during earlier commands first)
            event = qmp.pull_event(wait=left)
        except TimeoutError:
            break
        if event is not None and event.get("event") == name:
            stamp = event["timestamp"]
            return float(stamp["seconds"]) + stamp["microseconds"] / 1e6
    raise RuntimeError(f"QEMU sent no {name} event")


def _guest_view(before: list[tuple[float, int, float, float]],
                after: list[tuple[float, int, float, float]]) -> dict[str, Any]:
    numbers = [n for _, n, _, _ in before + after]
    ok = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    period = median([b[0] - a[0] for a, b in zip(before, before[1:], strict=False)])
    gap = after[0][0] - before[-1][0]
    # the guest's own clock: the copy (t1 - t0) and the rest of a tick (echo, sleep, next
    # t0), steady (medians at the source) and across the switch
    copy = median([t1 - t0 for _, _, t0, t1 in before])
    rest = median([b[2] - a[3] for a, b in zip(before, before[1:], strict=False)])
    return {"sequence_ok": ok, "tick_period_ms": round(period * 1000, 1),
            "switch_gap_ms": round(gap * 1000, 1),
            "guest_stall_ms": round(max(0.0, gap - period) * 1000, 1),
            "guest_clock_ms": {"copy": round(copy * 1000), "rest": round(rest * 1000),
                               "gap": round((after[0][3] - before[-1][3]) * 1000),
                               "rest_across": round((after[0][2] - before[-1][3]) * 1000),
                               "first_copies": [round((t1 - t0) * 1000)
                                                for _, _, t0, t1 in after[:3]],
                               "first_rests": [round((b[2] - a[3]) * 1000)
                                               for a, b in zip(after, after[1:3],
                                                               strict=False)]}}


def measure() -> dict[str, object]:
    from kvmpy import assets

    kernel = str(assets.kernel_path().bzimage)
    initrd = str(assets.initramfs_path())
    kvmpy, qemu = guest_argvs(kernel, initrd, "quiet", [], [])
    kvmpy.insert(kvmpy.index("run"), "-v")  # (the pause's steps: `_phases`)
    argvs = {"kvmpy": kvmpy, "qemu": qemu}
    work = Path(tempfile.mkdtemp(prefix="kvmpy-bench-mig-"))
    out: dict[str, Any] = {"rounds": ROUNDS, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                           "rates_mib_per_tick_and_sleep_s": RATES}
    try:
        for rate in [r for r in RATES if r in ONLY_RATES]:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ("kvmpy", "qemu")
                                                     if v in ONLY_VMMS}
            lost: list[str] = []
            for i in range(ROUNDS):
                for vmm in runs:
                    while True:
                        try:
                            runs[vmm].append(one_migration(vmm, argvs[vmm], rate, work))
                            break
                        except GuestLost as e:
                            lost.append(f"{vmm} round {i}: {str(e)[:300]}")
                            print(f"migrate {rate} round {i} {vmm}: the guest was lost, "
                                  f"once more: {e}", file=sys.stderr, flush=True)
                            if len(lost) > RETRIES:
                                raise
                    print(f"migrate {rate} round {i} {vmm}: {runs[vmm][-1]}", file=sys.stderr,
                          flush=True)
            figures: dict[str, Any] = {"lost_rounds": lost}
            for vmm, results in runs.items():
                for key in ("downtime_ms", "reported_downtime_ms", "sent_ms",
                            "guest_stall_ms", "total_s"):
                    if key in results[0]:
                        figures[f"{vmm}_{key}"] = median([r[key] for r in results])
                figures[f"{vmm}_sequence_ok"] = all(r["sequence_ok"] for r in results)
                figures[f"{vmm}_all"] = results
            if len(runs) == 2:
                figures["ratio_downtime_kvmpy_to_qemu"] = round(
                    figures["kvmpy_downtime_ms"] / max(figures["qemu_downtime_ms"], 0.001), 3)
                figures["ratio_reported_downtime_kvmpy_to_qemu"] = round(
                    figures["kvmpy_reported_downtime_ms"]
                    / max(figures["qemu_reported_downtime_ms"], 0.001), 3)
                figures["ratio_sent_kvmpy_to_qemu_reported"] = round(
                    figures["kvmpy_sent_ms"] / max(figures["qemu_reported_downtime_ms"],
                                                   0.001), 3)
                figures["ratio_guest_stall_kvmpy_to_qemu"] = round(
                    figures["kvmpy_guest_stall_ms"] / max(figures["qemu_guest_stall_ms"],
                                                          0.001), 3)
            out[rate] = figures
        out["target_low_ratio_downtime_max"] = 1.0
        out["target_low_kvmpy_downtime_ms_max"] = DOWNTIME_LIMIT_MS
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> dict[str, object]:
    return linux_guest_benchmark(__file__, measure)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_result(sys.argv[1], measure)
