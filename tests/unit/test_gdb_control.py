"""Parking vCPUs for gdb: requests run on the vCPU's thread, resume sets guest debug."""

import threading
from collections.abc import Callable
from typing import Any

import pytest
from test_trace_fakes import CODE, fake_vcpu

from kvmpy.bus import Bus
from kvmpy.exitloop import VcpuLoop
from kvmpy.gdb.control import SIGSEGV, SIGTRAP, DebugControl, NotStopped
from kvmpy.gdb.debugregs import HwPoint
from kvmpy.kvm.exits import INTERRUPTED, RUN_IMMEDIATE_EXIT, SHUTDOWN, Debug, VcpuExit
from kvmpy.kvm.ioctl import lib

ENABLE, STEP, HW = lib.KVM_GUESTDBG_ENABLE, lib.KVM_GUESTDBG_SINGLESTEP, lib.KVM_GUESTDBG_USE_HW_BP
DR6_B0, DR6_BS = 0xFFFF0FF1, 0xFFFF4FF0


class VcpuThread:
    """Handles one exit on its own thread, as the vCPU's loop would."""

    def __init__(self, loop: VcpuLoop, exit: VcpuExit) -> None:
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(loop.handle, exit), daemon=True)
        self.thread.start()

    def _run(self, handle: Callable[[VcpuExit], Any], exit: VcpuExit) -> None:
        self.result = handle(exit)

    def join(self) -> Any:
        self.thread.join(5)
        assert not self.thread.is_alive(), "the vCPU did not resume"
        return self.result


def setup(code: bytes = b"\x90\x90\xf4"):  # type: ignore[no-untyped-def]
    vcpu, memory = fake_vcpu("long", code)
    loops: list[VcpuLoop] = []
    control = DebugControl([vcpu], memory, irqchip=False,  # type: ignore[list-item]
                           stopped=lambda: loops[0].stop)
    loops.append(VcpuLoop(vcpu, memory, Bus("pio"), Bus("mmio"),  # type: ignore[arg-type]
                          observers=[control.observer(0)]))
    control.stop_at_start()
    return vcpu, loops[0], control


def debug_exit(vcpu, loop, dr6: int) -> VcpuThread:  # type: ignore[no-untyped-def]
    return VcpuThread(loop, Debug(1, CODE, dr6, 0))


def test_install_stops_every_vcpu_at_its_first_instruction() -> None:
    vcpu, loop, control = setup()
    assert vcpu.page[RUN_IMMEDIATE_EXIT] == 1  # the first KVM_RUN returns at once
    t = VcpuThread(loop, INTERRUPTED)  # ... with EINTR
    assert control.wait_all_parked(5)
    assert control.first_event() is None  # stopped, but for no reason of its own
    assert control.call(0, lambda v: v.get_regs().rip) == CODE
    assert vcpu.page[RUN_IMMEDIATE_EXIT] == 0  # the loop's own on_intr cleared it
    control.resume({0: "c"})
    assert t.join() is None
    assert vcpu.guest_debug[-1] == (0, [])  # no breakpoints: guest debug off, full speed
    with pytest.raises(NotStopped):
        control.call(0, lambda v: None)


def test_requests_run_on_the_vcpus_own_thread() -> None:
    _, loop, control = setup()
    t = VcpuThread(loop, INTERRUPTED)
    control.wait_all_parked(5)
    assert control.call(0, lambda v: threading.get_ident()) == t.thread.ident
    with pytest.raises(ZeroDivisionError):  # errors come back to the caller
        control.call(0, lambda v: 1 // 0)
    control.resume({0: "c"})
    t.join()


def test_breakpoint_then_step_off_it_then_continue() -> None:
    vcpu, loop, control = setup()
    control.points.insert(HwPoint("hw", CODE))
    t = debug_exit(vcpu, loop, DR6_B0)
    control.wait_all_parked(5)
    index, event = control.first_event()  # type: ignore[misc]
    assert (index, event.signal, event.reason) == (0, SIGTRAP, "hwbreak")
    control.resume({0: "c"})
    t.join()
    # RIP is on the breakpoint: step off it with breakpoints out...
    assert vcpu.guest_debug[-1] == (ENABLE | STEP, [])
    # ... and when that step ends, put them back and run on without stopping
    t = debug_exit(vcpu, loop, DR6_BS)
    assert t.join() is None and not control.all_parked()
    assert vcpu.guest_debug[-1] == (ENABLE | HW, [CODE, 0, 0, 0, 0, 0, 0, 0x401])


def test_single_step_keeps_breakpoints_elsewhere() -> None:
    vcpu, loop, control = setup()
    control.points.insert(HwPoint("sw", CODE + 1))
    t = VcpuThread(loop, INTERRUPTED)
    control.wait_all_parked(5)
    control.resume({0: "s"})
    t.join()
    assert vcpu.guest_debug[-1][0] == ENABLE | STEP | HW
    vcpu.set_rip(CODE + 1)
    t = debug_exit(vcpu, loop, DR6_BS)
    control.wait_all_parked(5)
    assert control.first_event()[1].reason == "step"  # type: ignore[index]
    control.resume({0: "c"})
    t.join()


def test_stepping_a_hlt_runs_it_for_real_without_an_irqchip() -> None:
    vcpu, loop, control = setup(b"\xf4")
    t = VcpuThread(loop, INTERRUPTED)
    control.wait_all_parked(5)
    control.resume({0: "s"})
    t.join()
    assert vcpu.guest_debug[-1] == (0, [])  # no single-step: KVM would skip the halt


def test_a_dying_vcpu_stops_for_the_debugger_first() -> None:
    vcpu, loop, control = setup()
    control.attached = True
    t = VcpuThread(loop, SHUTDOWN)
    control.wait_all_parked(5)
    event = control.first_event()[1]  # type: ignore[index]
    assert (event.signal, event.what) == (SIGSEGV, "triple fault")
    control.resume({0: "c"})
    stop = t.join()
    assert stop is not None and "triple fault" in stop.reason


def test_a_parked_vcpu_leaves_when_the_vm_is_stopped() -> None:
    _, loop, control = setup()
    t = VcpuThread(loop, INTERRUPTED)
    control.wait_all_parked(5)
    from kvmpy.stop import Stop, StopKind

    loop.request_stop(Stop(StopKind.POWEROFF, "host"))
    t.join()
    assert control.vm_ended()
