"""`make lab-soak`: how often the lab stalls and its Linux guests die, kvmpy and QEMU alike.

Boots kvmpy's minimal kernel and default initramfs (2 vCPUs, `loglevel=5 -- true`: the
kernel's warnings and worse on the 8250 console, /init runs `true` and powers off) again
and again in the lab, kvmpy and QEMU microvm alternating, and reports as JSON:

- guest deaths per VMM: a boot that did not end with /init's "exit status 0" and the
  VMM's status for a powered-off guest (0: both describe the machine in ACPI, so
  `poweroff -f` powers off) within `--boot-timeout`, with how it ended and the end of
  its console (a kvmpy guest that went quiet is asked where its vCPUs are first,
  SIGUSR2); and boots whose kernel log shows distress (`kvmpy.distress`), counted apart;
- lab stalls per hour of lab time, each with where the lab's CPUs were (QEMU's monitor,
  RIPs named from the lab kernel's symbols), noticed by the lab's heartbeat; and lab
  deaths (the lab's kernel or emulated machine went down under the soak);
- boots per second of lab time, each VMM's boot times, the longest heartbeat gap of a
  healthy lab, and the host's load average during each lab session (other work on the
  machine slows the lab's TCG).

The boots run in lab sessions of at most `--chunk` boots per VMM; a session that stalls
is counted and the soak goes on in a new one. `--lock FILE` takes that flock around
each session, so a long soak lets other users of a shared machine's lab in between.
Every part of the lab VM is one flag: `--lab-cpus`, `--lab-mem`, `--lab-accel`,
`--lab-cpu`, `--lab-arg` (lab kernel command line, repeatable).

    benchmarks/lab_soak.py --boots 200 --out soak.json [--lab-accel tcg,thread=single]
    benchmarks/lab_soak.py --table today.json kept.json   # side by side, as Markdown

Not part of `make test` or `make bench`: 200 boots per VMM take about an hour.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# loglevel=5: the console shows KERN_WARNING and worse, so distress is seen, without the
# rest of the boot log, which costs both VMMs an exit a character (~5x the boot time)
GUEST_APPEND = "loglevel=5 -- true"
EXIT_MARK = "kvmpy-guest: exit status 0"
VMMS = ("kvmpy", "qemu")
LOAD_SAMPLE_S = 15.0


# --- inside the lab: boot, boot, boot -----------------------------------------------------

def vmm_argv(vmm: str, kernel: str, initrd: str, cpus: int,
             append: str) -> tuple[list[str], int]:
    """The command that boots the guest with `vmm`, and its exit status when all went well."""
    from kvmpy.boot.linux import BASE_CMDLINE
    from kvmpy.stop import StopKind

    if vmm == "kvmpy":  # ACPI (its default for a CONFIG_ACPI kernel): poweroff -f powers off
        return ([sys.executable, "-m", "kvmpy", "run", "--kernel", kernel, "--initrd", initrd,
                 "--cpus", str(cpus), "--mem", "256M", "--append", append],
                StopKind.POWEROFF.value)
    # microvm with ACPI (its default) powers off on poweroff -f; rtc=on: no CMOS probe wait
    return (["qemu-system-x86_64", "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host",
             "-m", "256", "-smp", str(cpus), "-kernel", kernel, "-initrd", initrd,
             "-append", f"console=ttyS0 {BASE_CMDLINE} {append}", "-nodefaults",
             "-no-user-config", "-no-reboot", "-display", "none", "-serial", "stdio"], 0)


def boot_once(vmm: str, argv: list[str], expected: int, timeout: float) -> dict[str, Any]:
    """One boot: its outcome, time, kernel-log distress, and how it ended if it died."""
    from kvmpy.distress import distress
    from kvmpy.lab import quirks

    t = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    why = ""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        why = f"no end within {timeout:.0f} s"
        if vmm == "kvmpy":  # where its vCPUs are (kvmpy.machine's SIGUSR2 report)
            proc.send_signal(signal.SIGUSR2)
            time.sleep(3)
        proc.kill()
        out, err = proc.communicate()
    seconds = time.monotonic() - t
    console = out.decode(errors="replace")
    if not why and proc.returncode != expected:
        why = f"exit status {proc.returncode}, not {expected}"
    if not why and EXIT_MARK not in console:
        why = f"no {EXIT_MARK!r} on the console"
    record: dict[str, Any] = {"vmm": vmm, "ok": not why, "s": round(seconds, 3),
                              "distress": [str(d) for d in distress(console, quirks.here())][:20]}
    if why:
        record["why"] = why
        # 80 lines: the lab's XSAVE WARNING alone dumps 30 (kvmpy.lab.quirks)
        record["console"] = console.splitlines()[-80:]
        record["stderr"] = err.decode(errors="replace").splitlines()[-60:]
    return record


def inside(results: Path, pairs: int, cpus: int, timeout: float, vmms: Sequence[str],
           append: str) -> int:
    from kvmpy import assets

    kernel = str(assets.kernel_path().bzimage)
    initrd = str(assets.initramfs_path())
    for i in range(pairs):
        for vmm in vmms:
            argv, expected = vmm_argv(vmm, kernel, initrd, cpus, append)
            record = boot_once(vmm, argv, expected, timeout)
            with open(results, "a") as f:  # one line a boot: a stalled lab keeps the rest
                f.write(json.dumps(record) + "\n")
            status = "ok" if record["ok"] else f"DIED ({record['why']})"
            if record["distress"]:
                status += f", distress: {record['distress'][0]}"
            print(f"lab-soak: {vmm} {i + 1}/{pairs} {record['s']:.2f} s {status}", flush=True)
            if not record["ok"]:  # the end of its console and stderr, as it happens
                for line in record["console"][-8:] + record["stderr"][-12:]:
                    print(f"lab-soak: | {line}", flush=True)
    return 0


# --- outside: lab sessions, chunk by chunk ------------------------------------------------

@contextmanager
def lab_lock(path: str | None) -> Iterator[None]:
    """Hold flock(`path`) for one lab session, if a path is given."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"lab-soak: waiting for the lab lock {path}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LoadSampler(threading.Thread):
    """The host's 1-minute load average, every LOAD_SAMPLE_S seconds, while a session runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            if self._done.wait(LOAD_SAMPLE_S):
                return

    def finish(self) -> dict[str, float]:
        self._done.set()
        self.join()
        self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
        return {"min": min(self.samples), "mean": round(statistics.mean(self.samples), 2),
                "max": max(self.samples)}


def lab_config(args: argparse.Namespace) -> dict[str, Any]:
    from kvmpy.lab.runner import KERNEL_CMDLINE

    return {"lab_accel": args.lab_accel, "lab_cpu": args.lab_cpu, "lab_cpus": args.lab_cpus,
            "lab_mem_mib": args.lab_mem >> 20,
            "lab_cmdline": " ".join([KERNEL_CMDLINE, *args.lab_arg]),
            "guest_cpus": args.guest_cpus, "guest_append": args.guest_append,
            "boot_timeout_s": args.boot_timeout,
            "heartbeat_timeout_s": args.heartbeat_timeout}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from kvmpy import assets
    from kvmpy.boot.unpack import unpack_file
    from kvmpy.lab import LabError
    from kvmpy.lab.runner import LabDied, LabStalled, LabStats, run_in_lab

    # kvmpy boots the bzImage as it does once it has booted it before: from the kernel
    # unpacked into its cache, which the lab sees read-only (benchmarks/linux_boot.py)
    if unpack_file(assets.kernel_path().bzimage) is None:
        raise SystemExit("lab_soak: cannot unpack kvmpy's minimal kernel into its cache")
    vmms = args.vmms.split(",")
    records: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []
    died: list[dict[str, Any]] = []
    error = ""
    with tempfile.TemporaryDirectory(prefix="kvmpy-soak-") as share:
        results = Path(share) / "boots.jsonl"
        # a stall costs a session, a stalled session's boots are made up: but not forever
        while len(chunks) < 2 * (args.boots // args.chunk + 1) + 3:
            left = max(args.boots - sum(r["vmm"] == v for r in records) for v in vmms)
            if left <= 0:
                break
            pairs = min(args.chunk, left)
            argv = [sys.executable, os.path.abspath(__file__), "--inside", str(results),
                    "--pairs", str(pairs), "--guest-cpus", str(args.guest_cpus),
                    "--boot-timeout", str(args.boot_timeout), "--vmms", args.vmms,
                    "--guest-append", args.guest_append]
            stats = LabStats()
            chunk: dict[str, Any] = {"pairs": pairs}
            with lab_lock(args.lock):
                load = LoadSampler()
                load.start()
                chunk["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
                try:
                    run_in_lab(argv, rw=[share], cpus=args.lab_cpus, mem=args.lab_mem,
                               accel=args.lab_accel, cpu_model=args.lab_cpu,
                               kernel_args=args.lab_arg, heartbeat_timeout=args.heartbeat_timeout,
                               stdout=2, stderr=2, stats=stats)
                except LabStalled as e:
                    chunk["stalled"] = True
                    stalls.append({"session": len(chunks), "at_lab_s": round(stats.lab_s, 1),
                                   "message": str(e).split("; the lab's CPUs:")[0],
                                   "cpus": e.cpus})
                    print(f"lab-soak: {e}", file=sys.stderr, flush=True)
                except LabDied as e:
                    chunk["died"] = True
                    died.append({"session": len(chunks), "at_lab_s": round(stats.lab_s, 1),
                                 "message": str(e)})
                    print(f"lab-soak: the lab died: {e}", file=sys.stderr, flush=True)
                except LabError as e:
                    error = str(e)
                finally:
                    chunk["host_load_1min"] = load.finish()
            new = [json.loads(line) for line in results.read_text().splitlines()] \
                if results.exists() else []
            chunk.update(boots=len(new) - len(records), lab_s=round(stats.lab_s, 1),
                         lab_boot_s=None if stats.boot_s is None else round(stats.boot_s, 1),
                         longest_heartbeat_gap_s=round(stats.longest_heartbeat_gap_s, 2))
            records = new
            chunks.append(chunk)
            if error:
                break
    return report(args, vmms, records, chunks, stalls, died, error)


def _seconds(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"median": round(statistics.median(s), 2), "p90": round(s[int(len(s) * 0.9)], 2),
            "max": round(s[-1], 2)}


def report(args: argparse.Namespace, vmms: list[str], records: list[dict[str, Any]],
           chunks: list[dict[str, Any]], stalls: list[dict[str, Any]],
           died: list[dict[str, Any]], error: str) -> dict[str, Any]:
    lab_s = sum(c["lab_s"] for c in chunks)
    healthy = [c["longest_heartbeat_gap_s"] for c in chunks
               if not c.get("stalled") and not c.get("died")]
    per_vmm = {}
    for vmm in vmms:
        mine = [r for r in records if r["vmm"] == vmm]
        dead = [r for r in mine if not r["ok"]]
        per_vmm[vmm] = {
            "boots": len(mine), "deaths": len(dead),
            "distressed": sum(bool(r["distress"]) for r in mine),
            "boot_s": _seconds([r["s"] for r in mine if r["ok"]]),
            "death_details": [{k: r[k] for k in ("why", "console", "stderr", "distress")}
                              for r in dead],
            "distress_lines": sorted({line for r in mine for line in r["distress"]})[:40],
        }
    result: dict[str, Any] = {
        "label": args.label, "config": lab_config(args),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "boots": per_vmm,
        "lab_hours": round(lab_s / 3600, 3),
        "lab_sessions": len(chunks),
        "stalls": len(stalls),
        "stalls_per_lab_hour": round(len(stalls) / (lab_s / 3600), 2) if lab_s else None,
        "lab_deaths": len(died),
        "lab_deaths_per_lab_hour": round(len(died) / (lab_s / 3600), 2) if lab_s else None,
        "boots_per_lab_s": round(len(records) / lab_s, 3) if lab_s else None,
        "longest_heartbeat_gap_s": max(healthy, default=None),
        "stall_details": stalls,
        "lab_death_details": died,
        "sessions": chunks,
        "command": shlex.join(["benchmarks/lab_soak.py", *sys.argv[1:]]),
    }
    if error:
        result["error"] = error
    return result


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


# --- the table for docs/lab.md --------------------------------------------------------------

def table(paths: list[str]) -> str:
    """The soak reports in `paths` side by side, a column each, as a Markdown table."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    return table_of(reports, [r["label"] or Path(p).stem
                              for r, p in zip(reports, paths, strict=True)])


def table_of(reports: list[dict[str, Any]], names: list[str] | None = None) -> str:

    def vmm(r: dict[str, Any], name: str, key: str) -> str:
        b = r["boots"].get(name, {})
        if key == "boot_s":
            s = b.get("boot_s", {})
            return f"{s['median']} / {s['p90']} s" if s else "-"
        return str(b.get(key, "-"))

    def load(r: dict[str, Any]) -> str:
        means = [c["host_load_1min"]["mean"] for c in r["sessions"]]
        peak = max(c["host_load_1min"]["max"] for c in r["sessions"])
        return f"{min(means)}-{max(means)} (peak {peak})"

    rows: list[tuple[str, Any]] = [
        ("lab `-accel`", lambda r: f"`{r['config']['lab_accel']}`"),
        ("lab `-cpu`", lambda r: f"`{r['config']['lab_cpu']}`"),
        ("lab CPUs", lambda r: r["config"]["lab_cpus"]),
        ("lab kernel command line", lambda r: f"`{r['config']['lab_cmdline']}`"),
        ("kvmpy boots / deaths / distressed",
         lambda r: f"{vmm(r, 'kvmpy', 'boots')} / {vmm(r, 'kvmpy', 'deaths')} / "
                   f"{vmm(r, 'kvmpy', 'distressed')}"),
        ("QEMU boots / deaths / distressed",
         lambda r: f"{vmm(r, 'qemu', 'boots')} / {vmm(r, 'qemu', 'deaths')} / "
                   f"{vmm(r, 'qemu', 'distressed')}"),
        ("lab stalls (per lab hour)", lambda r: f"{r['stalls']} ({r['stalls_per_lab_hour']})"),
        ("lab deaths (per lab hour)",
         lambda r: f"{r['lab_deaths']} ({r['lab_deaths_per_lab_hour']})"),
        ("lab time, sessions", lambda r: f"{r['lab_hours']} h, {r['lab_sessions']}"),
        ("boots per lab second", lambda r: r["boots_per_lab_s"]),
        ("kvmpy boot, median / p90", lambda r: vmm(r, "kvmpy", "boot_s")),
        ("QEMU boot, median / p90", lambda r: vmm(r, "qemu", "boot_s")),
        ("longest heartbeat gap, healthy lab", lambda r: f"{r['longest_heartbeat_gap_s']} s"),
        ("host load, 1-min mean per session", load),
        ("commit", lambda r: r["commit"]),
    ]
    names = names or [r["label"] for r in reports]
    out = ["| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(reports)]
    out += [f"| {name} | " + " | ".join(str(cell(r)) for r in reports) + " |"
            for name, cell in rows]
    return "\n".join(out)


# --- command line ---------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    from kvmpy.lab.host import DEFAULT_CPUS, DEFAULT_MEM
    from kvmpy.lab.runner import DEFAULT_ACCEL, DEFAULT_CPU_MODEL, HEARTBEAT_TIMEOUT
    from kvmpy.units import parse_size

    p = argparse.ArgumentParser(prog="lab_soak.py", description=__doc__.split("\n")[0])
    p.add_argument("--boots", type=int, default=200, help="boots per VMM (default 200)")
    p.add_argument("--chunk", type=int, default=100,
                   help="boots per VMM in one lab session (default 100)")
    p.add_argument("--guest-cpus", type=int, default=2, help="each guest's vCPUs (default 2)")
    p.add_argument("--guest-append", default=GUEST_APPEND,
                   help=f"the guest's command line, after kvmpy's own (default {GUEST_APPEND!r})")
    p.add_argument("--boot-timeout", type=float, default=60,
                   help="seconds a boot may take before it counts as a death (default 60)")
    p.add_argument("--vmms", default=",".join(VMMS), help="comma-separated, in boot order")
    p.add_argument("--lab-cpus", type=int, default=DEFAULT_CPUS)
    p.add_argument("--lab-mem", type=parse_size, default=DEFAULT_MEM)
    p.add_argument("--lab-accel", default=DEFAULT_ACCEL, help="QEMU's -accel for the lab")
    p.add_argument("--lab-cpu", default=DEFAULT_CPU_MODEL, help="QEMU's -cpu for the lab")
    p.add_argument("--lab-arg", action="append", default=[], metavar="ARG",
                   help="add ARG to the lab kernel's command line (repeatable)")
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT)
    p.add_argument("--lock", metavar="FILE", help="hold flock(FILE) around each lab session")
    p.add_argument("--label", default="", help="the configuration's name in the report")
    p.add_argument("--out", metavar="FILE", help="also write the JSON report here")
    p.add_argument("--table", nargs="+", metavar="REPORT",
                   help="print these reports side by side as a Markdown table, and exit")
    p.add_argument("--inside", metavar="RESULTS", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [v for v in args.vmms.split(",") if v not in VMMS]
    if bad:
        p.error(f"--vmms: unknown {', '.join(bad)} (known: {', '.join(VMMS)})")
    if args.boots < 1 or args.chunk < 1 or args.guest_cpus < 1:
        p.error("--boots, --chunk and --guest-cpus must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.inside:
        return inside(Path(args.inside), args.pairs, args.guest_cpus, args.boot_timeout,
                      args.vmms.split(","), args.guest_append)
    result = soak(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
