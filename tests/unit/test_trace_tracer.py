"""--trace lines: what the exit was, which device took it, and the instruction behind it."""

import io

import pytest
from test_trace_fakes import CODE, machine

from kvmpy.kvm.exits import SHUTDOWN, Hlt, IoIn, IoOut, MmioWrite
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

pytest.importorskip("capstone")
# mov dx, 0x3f8; out dx, al; in al, dx; movabs rax, imm64; mov [rbx+0x10], rax; hlt
CODE_BYTES = bytes.fromhex("66 ba f8 03 ee ec 48 b8 88 77 66 55 44 33 22 11 48 89 43 10 f4")
OUT, IN, STORE, HLT = CODE + 4, CODE + 5, CODE + 16, CODE + 20


class Device:
    def read(self, offset: int, size: int) -> bytes:
        return b"\x21" * size

    def write(self, offset: int, data: bytes) -> None:
        self.last = data


def traced(mode: str = "long", filter: str = ""):  # type: ignore[no-untyped-def]
    out = io.StringIO()
    tracer = Tracer(TraceFilter.parse(filter), out)
    vcpu, memory, loop = machine(mode, CODE_BYTES, observers=[tracer])
    loop.pio.insert(0x3F8, 8, Device(), "serial0")
    loop.mmio.insert(0xE0000000, 0x1000, Device(), "testdev")
    return vcpu, loop, out


def io_exit(vcpu, loop, direction: int, rip: int, value: int = 0x41) -> bytearray:  # type: ignore[no-untyped-def]
    """An IN (direction 0) or OUT (1) of one byte on port 0x3f8; returns the IN's data."""
    vcpu.set_rip(rip, rdx=0x3F8)
    data = bytearray([value])
    loop.handle(IoOut(0x3F8, 1, bytes(data)) if direction else IoIn(0x3F8, 1, memoryview(data)))
    return data


def test_emulated_out_leaves_rip_after_the_instruction() -> None:
    vcpu, loop, out = traced()
    io_exit(vcpu, loop, 1, OUT + 1)  # KVM's emulator: RIP already past the `out`
    line = out.getvalue()
    assert "vcpu0 IO out port=0x3f8 size=1 value=0x41 'A' dev=serial0+0x0" in line
    assert line.rstrip().endswith(f"| {OUT:#x}: out dx, al")


def test_fast_pio_out_leaves_rip_at_the_instruction() -> None:
    vcpu, loop, out = traced()
    io_exit(vcpu, loop, 1, OUT)  # hardware fast PIO: RIP still at the `out`
    assert out.getvalue().rstrip().endswith(f"| {OUT:#x}: out dx, al")


def test_in_shows_the_value_the_device_returned() -> None:
    vcpu, loop, out = traced()
    io_exit(vcpu, loop, 0, IN, value=0)
    line = out.getvalue()
    assert "IO in port=0x3f8 size=1 value=0x21 '!'" in line
    assert line.rstrip().endswith(f"| {IN:#x}: in al, dx")


def test_mmio_write_names_the_whole_instruction() -> None:
    vcpu, loop, out = traced()
    vcpu.set_rip(STORE + 4)
    loop.handle(MmioWrite(0xE0000010, (0x1122334455667788).to_bytes(8, "little")))
    line = out.getvalue()
    assert "MMIO write addr=0xe0000010 size=8 value=0x1122334455667788 dev=testdev+0x10" in line
    assert line.rstrip().endswith(f"| {STORE:#x}: mov qword ptr [rbx + 0x10], rax")


def test_hlt_is_found_before_rip() -> None:
    vcpu, loop, out = traced()
    vcpu.set_rip(HLT + 1)
    loop.handle(Hlt(False))
    assert out.getvalue().rstrip().endswith(f"vcpu0 HLT | {HLT:#x}: hlt")


def test_real_mode_addresses_are_cs_ip() -> None:
    vcpu, loop, out = traced("real")
    io_exit(vcpu, loop, 1, OUT + 1 - CODE)
    assert out.getvalue().rstrip().endswith("| 1000:0004: out dx, al")


def test_filtered_out_exits_are_handled_but_not_traced() -> None:
    vcpu, loop, out = traced(filter="mmio")
    before = vcpu.ioctls
    data = io_exit(vcpu, loop, 0, IN, value=0)
    assert out.getvalue() == ""
    assert data[0] == 0x21  # the IN still happened
    assert vcpu.ioctls == before + 1  # set_rip's read only: no registers read for a trace
    assert loop.handle(Hlt(False)) is not None
    assert out.getvalue() == "" and vcpu.ioctls == before + 1


def test_fatal_exits_are_traced_before_the_handler_reads_state() -> None:
    vcpu, loop, out = traced()
    vcpu.set_rip(CODE)
    stop = loop.handle(SHUTDOWN)
    assert stop is not None and "triple fault" in stop.reason
    assert "vcpu0 SHUTDOWN |" in out.getvalue()
