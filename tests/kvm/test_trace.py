"""--trace and --stats on real exits of the test guests."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.cpu.modes import Mode
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.stop import Stop, StopKind
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

pytestmark = pytest.mark.kvm
LINE = re.compile(r"^\d+\.\d{6} vcpu0 (\w+)(?: (.*?))? \| (\S+): (.*)$")


def kvmpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy", "run", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_line_per_exit_with_the_instruction(guest_dir: Path) -> None:
    r = kvmpy("--flat", str(guest_dir / "hello_real.bin"), "--trace")
    assert r.returncode == 0 and r.stdout == "Hello from real mode\n"
    lines = r.stderr.splitlines()
    n = len("Hello from real mode\n")
    outs = [ln for ln in lines if " IO out port=0x3f8 " in ln]
    assert len(outs) == n
    first = LINE.match(outs[0])
    assert first is not None, outs[0]
    assert first.group(2) == "out port=0x3f8 size=1 value=0x48 'H' dev=serial0+0x0"
    assert first.groups()[2:] == ("1000:0016", "out dx, al")  # real mode: CS:IP
    polls = [LINE.match(ln) for ln in lines if " IO in port=0x3fd " in ln]
    assert polls and all(m and m.group(4) == "in al, dx" for m in polls)
    assert lines[-1].endswith("vcpu0 HLT | 1000:0019: hlt")


def test_mmio_exits_in_long_mode(guest_dir: Path) -> None:
    r = kvmpy("--flat", str(guest_dir / "mmio_echo.bin"), "--mode", "long", "--trace=mmio")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 7  # 1 identity read, 3 writes, 3 read-backs
    assert "MMIO write addr=0xe0000010 size=8 value=0x1122334455667788 dev=testdev+0x10" \
        " | 0x1001e: mov qword ptr [rbx + 0x10], rax" in lines[1]
    assert "MMIO read addr=0xe0000030 size=1 value=0x5a 'Z' dev=testdev+0x30 | 0x1003c: " \
        "cmp byte ptr [rbx + 0x30], 0x5a" in lines[6]


def test_filters_and_trace_file(guest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.txt"
    r = kvmpy("--flat", str(guest_dir / "modes.bin"), "--trace=port:0x3f8,hlt",
              "--trace-file", str(out))
    assert r.returncode == 0 and r.stderr == ""
    lines = out.read_text().splitlines()
    text = "real mode\nprotected mode\nlong mode\n"
    assert len(lines) == len(text) + 1
    assert all(" IO out port=0x3f8 " in ln for ln in lines[:-1])
    assert " HLT | 0x100" in lines[-1] and lines[-1].endswith(": hlt")
    where = [LINE.match(ln).group(3) for ln in lines]  # type: ignore[union-attr]
    # one guest, three widths: CS:IP in real mode, then 32-bit, then 64-bit addresses
    assert where[0].startswith("1000:") and where[-2].startswith("0x100")
    assert [LINE.match(ln).group(4) for ln in lines[:-1]] == ["out dx, al"] * len(text)  # type: ignore[union-attr]
    r = kvmpy("--flat", str(guest_dir / "modes.bin"), "--trace=dev:post-code")
    assert r.returncode == 0 and r.stderr == ""  # this guest never touches port 0x80


def test_bad_filter_is_one_line(guest_dir: Path) -> None:
    r = kvmpy("--flat", str(guest_dir / "modes.bin"), "--trace=port:9-1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "ends before it starts" in r.stderr


def test_stats_table_then_json(guest_dir: Path) -> None:
    r = kvmpy("--flat", str(guest_dir / "mmio_echo.bin"), "--mode", "long", "--stats")
    err = r.stderr.strip().splitlines()
    stats = json.loads(err[-1])
    vcpu = stats["vcpus"][0]
    assert vcpu["by_device"] == {"serial0": 16, "testdev": 7}
    times = vcpu["handler_us"]
    assert set(times["by_reason"]) == {"IO", "MMIO", "HLT"}
    assert times["by_device"]["testdev"] > 0 and times["by_address"]["mmio:0xe0000000"] > 0
    table = "\n".join(err[:-1])
    assert re.search(r"^  MMIO\s+7\s+\d+\.\d\s+\d+\.\d{3}$", table, re.M), table
    assert re.search(r"^  testdev\s+7\s", table, re.M)


def test_stats_from_python_while_the_guest_runs(guest_dir: Path) -> None:
    flat = FlatConfig(guest_dir / "pio_loop.bin", Mode.REAL, gprs={"rcx": 10**9})
    machine = Machine(MachineConfig(mem_size=2 << 20, flat=flat, stats=True,
                                    console=io.BytesIO()))
    runner = threading.Thread(target=machine.run)
    runner.start()
    try:
        seen = []
        for _ in range(3):
            time.sleep(0.2)
            seen.append(machine.stats()["vcpus"][0]["by_address"].get("pio:0x80", 0))
        assert seen[0] > 0 and seen[0] < seen[1] < seen[2]
        assert machine.stats()["vcpus"][0]["by_device"]["post-code"] >= seen[2]
    finally:
        machine.request_stop(Stop(StopKind.POWEROFF, "test done"))
        runner.join(10)
        machine.close()


def test_tracing_from_python(guest_dir: Path) -> None:
    out = io.StringIO()
    flat = FlatConfig(guest_dir / "hello_long.bin", Mode.LONG)
    machine = Machine(MachineConfig(mem_size=16 << 20, flat=flat, console=io.BytesIO(),
                                    trace=Tracer(TraceFilter.parse("io"), out)))
    machine.run()
    machine.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 * len("Hello from long mode\n")
    assert lines[0].endswith("| 0x1003c: in al, dx") and lines[1].endswith("| 0x10047: out dx, al")
