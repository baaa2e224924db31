"""docs/tutorial/, chapters 1-6: every chapter's command, run as the chapter shows it.

Each test runs the chapter's guest (guests/tutorial/, built by `make tutorial-guests`)
with the chapter's command line or host script (docs/tutorial/NN-*.py), and checks
what the chapter tells the reader they will see: the guest's output, the exits in
the trace, and the machine state the chapter reads back from Python.
Chapter 7 boots Linux: tests/lab/test_tutorial_linux.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kvmpy.cachedir import cache_dir
from kvmpy.console import ConsoleOutput
from kvmpy.cpu.modes import Mode
from kvmpy.cpu.pagetables import Translation, translate
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.stop import StopKind

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "tutorial"
# "<time> vcpu0 <what> | <where>: <instruction>", as kvmpy/trace/tracer.py writes it
TRACE = re.compile(r"^\d+\.\d{6} vcpu0 (.*?) \| (\S+): (.*)$")


@pytest.fixture(scope="module")
def tutorial_dir() -> Path:
    """The chapter guests, built by `make tutorial-guests` (built here if missing)."""
    out = cache_dir() / "tutorial"
    sources = list((ROOT / "guests" / "tutorial").glob("*.S"))
    if any(not (out / f"{s.stem}.bin").exists() for s in sources):
        subprocess.run(["make", "-s", "tutorial-guests"], cwd=ROOT, check=True)
    return out


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """A command as the chapter gives it: `python -m kvmpy ...` or `python docs/tutorial/...`."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def trace_lines(stderr: str) -> list[tuple[str, str, str]]:
    """(what, where, instruction) of each trace line."""
    return [m.groups() for m in map(TRACE.match, stderr.splitlines()) if m]  # type: ignore[misc]


def script(name: str) -> ModuleType:
    """A chapter's host script, imported from docs/tutorial/ (its name is not an identifier)."""
    spec = importlib.util.spec_from_file_location(f"tutorial_{name[:2]}", DOCS / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chapter_snippet(chapter: str) -> tuple[str, str]:
    """A chapter's Python block and the output pasted right after it."""
    found = re.search(r"```python\n(.*?)```\n\n```text\n(.*?)```", (DOCS / chapter).read_text(),
                      re.S)
    assert found is not None, f"{chapter} has no python block followed by its output"
    return found.group(1), found.group(2)


def flat_machine(path: Path, mode: Mode) -> tuple[Machine, ConsoleOutput]:
    console = ConsoleOutput()
    machine = Machine(MachineConfig(mem_size=16 << 20, flat=FlatConfig(path, mode=mode),
                                    console=console))
    return machine, console


# -- chapter 1: real mode and the first I/O exit ------------------------------------------

def test_chapter1_real_mode_and_the_first_io_exit(tutorial_dir: Path) -> None:
    r = run("-m", "kvmpy", "run", "--flat", str(tutorial_dir / "01-real-mode.bin"), "--trace")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    lines = trace_lines(r.stderr)
    assert len(lines) == 2 * len("hello\n") + 1  # a poll and a byte per character, one hlt
    assert lines[0] == ("IO in port=0x3fd size=1 value=0x60 '`' dev=serial0+0x5", "1000:000e",
                        "in al, dx")
    assert lines[1] == ("IO out port=0x3f8 size=1 value=0x68 'h' dev=serial0+0x0", "1000:0018",
                        "out dx, al")
    assert lines[-1] == ("HLT", "1000:001b", "hlt")

    # the same guest on the chapter's fifty-line VMM, which answers the port reads itself
    r = run(str(DOCS / "01-minimal-vmm.py"))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "exit 1: IO in  port=0x3fd size=1 -> 0x20"
    assert out[1] == "exit 2: IO out port=0x3f8 size=1 value=0x68"
    assert out[12] == "exit 13: HLT at rip=0x1c"  # KVM leaves RIP after the hlt
    assert out[-1] == "the guest wrote b'hello\\n' to COM1"


# -- chapter 2: protected mode ----------------------------------------------------------------

def test_chapter2_the_guest_enters_protected_mode(tutorial_dir: Path) -> None:
    guest = tutorial_dir / "02-protected-mode.bin"
    r = run("-m", "kvmpy", "run", "--flat", str(guest), "--trace=port:0x3f8,hlt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("real mode: CS=0x1000, addresses are CS*16 + offset\n"
                        "protected mode: CS=0x08, a flat 32-bit segment from the GDT\n")
    where = [w for _, w, _ in trace_lines(r.stderr)]
    first_line = len("real mode: CS=0x1000, addresses are CS*16 + offset\n")
    # the same kind of instruction, first at CS:IP, then at a 32-bit linear address
    assert all(w.startswith("1000:") for w in where[:first_line])
    assert all(w.startswith("0x100") for w in where[first_line:])

    machine, console = flat_machine(guest, Mode.REAL)
    try:
        stop = machine.run()
        sregs = machine.vcpus[0].get_sregs()
    finally:
        machine.close()
    assert stop.kind is StopKind.POWEROFF and "protected mode" in console.text
    assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)  # PE on, paging off
    assert (sregs.cs.selector, sregs.cs.base, sregs.cs.db, sregs.cs.limit) == \
        (0x08, 0, 1, 0xFFFFFFFF)
    assert (sregs.ds.selector, sregs.ss.selector) == (0x10, 0x10)
    assert sregs.gdt.limit == 3 * 8 - 1

    # the chapter's own snippet prints what the chapter shows
    code, shown = chapter_snippet("02-protected-mode.md")
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout == shown


# -- chapter 3: long mode and page tables -----------------------------------------------------

def test_chapter3_long_mode_and_two_mappings_of_one_page(tutorial_dir: Path) -> None:
    guest = tutorial_dir / "03-long-mode.bin"
    line = b"written at 0xffff800000000000, read at 0x60000\n"
    r = run("-m", "kvmpy", "run", "--flat", str(guest), "--mode", "protected", "--trace=hlt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("protected mode, paging off\nlong mode, paging on: CR3=0x70000\n"
                        + line.decode())
    (what, _, insn), = trace_lines(r.stderr)
    assert (what, insn) == ("HLT", "hlt")

    machine, _ = flat_machine(guest, Mode.PROTECTED)
    try:
        assert machine.run().kind is StopKind.POWEROFF
        vcpu, memory = machine.vcpus[0], machine.memory
        sregs = vcpu.get_sregs()
        assert sregs.efer & (1 << 10) and sregs.cs.l == 1  # EFER.LMA, a 64-bit CS
        assert sregs.cr3 == 0x70000
        # the line the guest wrote through the upper-half address is in the physical page
        assert memory.read(0x60000, len(line)) == line
        upper = 0xFFFF_8000_0000_0000
        assert vcpu.translate(upper + 0x123) == 0x60123  # KVM_TRANSLATE
        walk = translate(memory.read_u64, sregs.cr3, upper + 0x123)  # the same walk in Python
        assert walk == Translation(gpa=0x60123, writable=True, user=False, page_size=4096)
        low = translate(memory.read_u64, sregs.cr3, 0x10000)
        assert low is not None and (low.gpa, low.page_size) == (0x10000, 2 << 20)
        assert translate(memory.read_u64, sregs.cr3, 0x4000_0000) is None  # never mapped
    finally:
        machine.close()

    code, shown = chapter_snippet("03-long-mode.md")
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout == shown


# -- chapter 4: interrupts through the in-kernel LAPIC and IO-APIC ----------------------------

def test_chapter4_timer_and_ioapic_interrupts(tutorial_dir: Path) -> None:
    r = run(str(DOCS / "04-interrupts.py"), "--trace")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == ("APIC timer armed; halting\n"
                        "interrupt: vector 0x30 (APIC timer)\n"
                        "IO-APIC pin 5 routed; halting\n"
                        "host: raising GSI 5\n"
                        "interrupt: vector 0x31 (IO-APIC pin 5)\n"
                        "done\n"
                        "host: guest wrote 0 to the debug-exit port\n")
    lines = trace_lines(r.stderr)
    # LAPIC, IO-APIC and PIC accesses and both `hlt`s stay inside KVM: only the UART's
    # ports and the final debug-exit write come out
    assert {what.split(" dev=")[1] for what, _, _ in lines} == {"serial0+0x0", "serial0+0x5",
                                                                 "debug-exit+0x0"}
    assert lines[-1][0] == "IO out port=0xf4 size=1 value=0x00 dev=debug-exit+0x0"
    assert lines[-1][2] == "out 0xf4, al"

    # without an irqchip the same guest's LAPIC writes are MMIO exits nobody claims,
    # and its first `hlt` ends the run
    r = run("-m", "kvmpy", "run", "--flat", str(tutorial_dir / "04-interrupts.bin"),
            "--mode", "long", "--trace=mmio,hlt")
    assert r.returncode == 0 and r.stdout == "APIC timer armed; halting\n"
    lines = trace_lines(r.stderr)
    assert [what.split()[2] for what, _, _ in lines[:-1]] == [
        "addr=0xfee000f0", "addr=0xfee003e0", "addr=0xfee00320", "addr=0xfee00380"]
    assert all(what.endswith("dev=(none)") for what, _, _ in lines[:-1])
    assert lines[-1][::2] == ("HLT", "hlt")


# -- chapter 5: an MMIO device of your own ----------------------------------------------------

def test_chapter5_the_device_alone() -> None:
    """The chapter's device is a pure state machine: plain calls, no VM."""
    device = script("05-mmio-device.py").Crc32Device()
    assert device.read(0x00, 4) == b"CR32"
    device.write(0x04, b"The quick brown fox ")
    device.write(0x04, b"jumps over the lazy dog")
    assert device.read(0x08, 4) == (0x414FA339).to_bytes(4, "little")
    assert device.fed == 43
    device.write(0x0C, b"\0\0\0\0")
    assert device.read(0x08, 4) == bytes(4) and device.fed == 0
    assert device.read(0x10, 4) == b"\xff" * 4  # no register there
    assert device.read(0x00, 2) == b"\xff" * 2  # IDENT is 4 bytes wide only
    device.write(0x800, b"ignored")
    assert device.fed == 0


def test_chapter5_a_guest_uses_the_device(tutorial_dir: Path) -> None:
    r = run(str(DOCS / "05-mmio-device.py"), "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ('crc32("The quick brown fox jumps over the lazy dog") = 0x414fa339\n')
    assert "the device was fed 43 bytes" in r.stderr
    vcpu = json.loads(r.stderr.strip().splitlines()[-1])["vcpus"][0]
    # identity, reset, 43 bytes one by one, the value: 46 MMIO exits, all to our device
    assert vcpu["by_reason"]["MMIO"] == 46
    assert vcpu["by_address"]["mmio:0xe0001000"] == 46
    assert vcpu["by_device"]["crc32"] == 46


# -- chapter 6: a virtqueue by hand -----------------------------------------------------------

def test_chapter6_virtio_rng_driven_by_hand(tutorial_dir: Path) -> None:
    r = run(str(DOCS / "06-virtqueue.py"), "--trace=mmio")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "virtio-rng: DRIVER_OK, queue 0 has 8 descriptors\n" in out
    assert "used.idx = 1, used.ring[0].len = 0x10\n" in out
    guest_hex = re.search(r"^random: ([0-9a-f]{32})$", out, re.M)
    host_hex = re.search(r"^host: guest RAM at 0x83000: ([0-9a-f]{32})$", out, re.M)
    assert guest_hex and host_hex and guest_hex.group(1) == host_hex.group(1)
    assert guest_hex.group(1) != "00" * 16
    assert ("host: virtio-rng at 0xd0000000: status 0xf, queue 0 size 8, desc 0x80000, "
            "avail 0x81000, used 0x82000\n") in out
    assert "host: device popped 1 chain(s), used 1\n" in out

    lines = trace_lines(r.stderr)
    assert all("dev=virtio-rng+" in what for what, _, _ in lines)
    statuses = [int(what.split("value=")[1].split()[0], 16) for what, _, _ in lines
                if what.startswith("MMIO write addr=0xd0000070 ")]
    assert statuses == [0x0, 0x1, 0x3, 0xB, 0xF]  # reset, ACK, DRIVER, FEATURES_OK, DRIVER_OK
    notify = [i for i, (what, _, _) in enumerate(lines) if "addr=0xd0000050" in what]
    assert len(notify) == 1  # one kick; the next exit already sees the buffer used
    assert lines[notify[0] + 1][0].startswith("MMIO read addr=0xd0000060 size=4 value=0x00000001")
