"""The stub's packets, answered for a fake vCPU parked on its own thread (no KVM, no gdb)."""

import io
import threading

import pytest
from test_trace_fakes import CODE, fake_vcpu

from kvmpy.bus import Bus
from kvmpy.errors import ConfigError
from kvmpy.exitloop import VcpuLoop
from kvmpy.gdb import registers
from kvmpy.gdb.stub import GdbConfig, GdbStub
from kvmpy.kvm.exits import INTERRUPTED
from kvmpy.stop import Stop, StopKind

CODE_BYTES = bytes.fromhex("48 c7 c0 34 12 00 00 f4")


@pytest.fixture
def stub():  # type: ignore[no-untyped-def]
    vcpu, memory = fake_vcpu("long", CODE_BYTES)
    stops: list[Stop] = []
    loops: list[VcpuLoop] = []
    stub = GdbStub([vcpu], memory, GdbConfig(0), irqchip=False,  # type: ignore[list-item]
                   request_stop=stops.append, stopped=lambda: loops[0].stop, log=io.StringIO())
    loop = VcpuLoop(vcpu, memory, Bus("pio"), Bus("mmio"),  # type: ignore[arg-type]
                    observers=[stub.observer(0)])
    loops.append(loop)
    parked = threading.Thread(target=loop.handle, args=(INTERRUPTED,), daemon=True)
    parked.start()  # the first KVM_RUN returned EINTR: the vCPU parks
    assert stub.control.wait_all_parked(5)
    yield stub, vcpu, loop
    loop.stop = Stop(StopKind.POWEROFF, "test end")  # a parked vCPU leaves when the VM ends
    stub.close()
    parked.join(5)
    assert not parked.is_alive()


def test_gdb_config() -> None:
    assert GdbConfig.parse("1234") == GdbConfig(1234, "127.0.0.1")
    assert GdbConfig.parse("0.0.0.0:1234") == GdbConfig(1234, "0.0.0.0")
    for bad in ("x", "1234x", "-1", "65536"):
        with pytest.raises(ConfigError):
            GdbConfig.parse(bad)


def test_a_long_mode_guest_gets_the_x86_64_layout(stub) -> None:  # type: ignore[no-untyped-def]
    s, _, _ = stub
    assert s.layout is registers.X86_64
    xml = s.dispatch("qXfer:features:read:target.xml:0,ffff")
    assert xml.startswith("l<?xml") and "<architecture>i386:x86-64</architecture>" in xml
    first = s.dispatch("qXfer:features:read:target.xml:0,10")
    assert first == "m" + registers.target_xml()[:16]


def test_registers_and_memory(stub) -> None:  # type: ignore[no-untyped-def]
    s, vcpu, _ = stub
    g = bytes.fromhex(s.dispatch("g"))
    assert len(g) == registers.X86_64.packet_bytes
    assert g[16 * 8 : 17 * 8] == CODE.to_bytes(8, "little")  # rip
    assert s.dispatch("P0=efbeadde00000000") == "OK"
    assert vcpu.get_regs().rax == 0xDEADBEEF
    assert s.dispatch("p0") == "efbeadde00000000"
    assert s.dispatch(f"m{CODE:x},8") == CODE_BYTES.hex()
    assert s.dispatch(f"M{CODE + 7:x},1:90") == "OK"
    assert s.dispatch(f"m{CODE + 7:x},1") == "90"
    assert s.dispatch("m200000000,4") == "E14"  # not mapped by kvmpy's tables
    assert s.dispatch("pff") == "E45"


def test_breakpoints_fill_the_debug_registers(stub) -> None:  # type: ignore[no-untyped-def]
    s, _, _ = stub
    for i in range(4):
        assert s.dispatch(f"Z0,{CODE + i:x},1") == "OK"
    assert s.dispatch(f"Z1,{CODE + 9:x},1") == "E28"
    assert s.dispatch(f"z0,{CODE:x},1") == "OK"
    assert s.dispatch("Z3,1000,4") == ""  # no read-only watchpoints on x86


def test_threads_and_stop_reply(stub) -> None:  # type: ignore[no-untyped-def]
    s, _, _ = stub
    assert s.dispatch("qfThreadInfo") == "m1" and s.dispatch("qsThreadInfo") == "l"
    assert s.dispatch("?") == "T05thread:1;"
    assert s.dispatch("Hg1") == "OK" and s.dispatch("Hg5") == "E01"
    assert s.dispatch("T1") == "OK" and s.dispatch("T2") == "E01"
    assert bytes.fromhex(s.dispatch("qThreadExtraInfo,1")) == b"vCPU 0 (64-bit long mode)"
    assert s.dispatch("qC") == "QC1"
    assert s.dispatch("vCont;s:9") == "E01"
    assert s.dispatch("unknown-packet") == ""


def test_continue_resumes_and_sets_guest_debug(stub) -> None:  # type: ignore[no-untyped-def]
    s, vcpu, _ = stub
    assert s.dispatch(f"Z0,{CODE:x},1") == "OK"
    assert s.dispatch("c") is None  # the reply comes when the vCPU stops
    assert s.running
    for _ in range(100):
        if vcpu.guest_debug:
            break
        threading.Event().wait(0.01)
    # RIP sits on the breakpoint: the vCPU steps off it first, breakpoints out
    assert vcpu.guest_debug[-1][0] == 1 | 2


def test_malformed_packets_get_errors_not_exceptions(stub) -> None:  # type: ignore[no-untyped-def]
    s, _, _ = stub
    sent: list[bytes] = []

    class Conn:
        def sendall(self, data: bytes) -> None:
            sent.append(data)

    for packet in (b"Gzz", b"P1=zz", b"mzz,1", b"Z0,zz,1", b"Mzz", b"qXfer:features:read:x:0,1"):
        s._on_event(Conn(), "packet", packet)
    replies = [d for d in sent if d != b"+"]
    assert all(r.startswith(b"$E") for r in replies), replies
