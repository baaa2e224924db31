"""One host thread per vCPU, and how the VMM gets them back out of KVM_RUN.

KVM_RUN releases the GIL (cffi drops it around every C call), so vCPU
threads run guest code in parallel. To stop or inspect a vCPU, another
thread must "kick" it: set `immediate_exit` in its kvm_run page (so an entry
that has not started yet returns at once) and send its thread a signal (so an
entry in progress returns EINTR). The vCPU thread then runs `on_kick` itself,
because only the thread in KVM_RUN may read its vCPU's registers.

With the in-kernel irqchip, `hlt` never leaves KVM_RUN. A guest whose every
vCPU halted with interrupts off (Linux after "System halted") would hang the
VMM forever, as it does QEMU's and kvmtool's. The supervisor here looks every
quarter second. A vCPU that came back to us since the last look is plainly not
halted, so it is left alone. When every vCPU has gone quiet, it kicks them and
ends the run if all are halted with interrupts off. It does so at the first
quiet look after the guest last exited (a guest that halts usually says so
first, on its console), so such a run ends within about half a second; while
the guest stays quiet it looks again only once a second, because a guest busy
without exits to us (virtio traffic through eventfds, its own timers) pays
each kick with a trip out of KVM_RUN.

`sample()` uses the same kick to ask every vCPU where it is, for a guest that
went quiet: each vCPU thread describes itself (registers, code, stack) between
two entries and goes back in.

`pause()` uses it to hold every vCPU out of KVM_RUN: each thread, kicked, waits
on its own thread until `resume()`. A kick returns from KVM_RUN only after KVM has
finished the instruction in progress (an `in` whose data we supplied completes on
the way back in, before KVM looks at immediate_exit), so a held vCPU's state is
whole and may be read and written from another thread.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from kvmpy.cpu.registers import RFLAGS_IF
from kvmpy.exitloop import VcpuLoop
from kvmpy.kvm.vcpu import MpState
from kvmpy.stop import Stop, StopKind

KICK_SIGNAL = signal.SIGUSR1
HALT_CHECK_INTERVAL_S = 0.25  # how often the supervisor looks
QUIET_LOOK_INTERVAL_S = 1.0  # how often it kicks a guest that stays quiet


def run_guarded(loop: VcpuLoop) -> Stop:
    """`loop.run()`, with a host-side exception (a device bug) turned into the run's Stop.

    The VM must stop, and say in one line what failed and where, instead of hanging
    or ending the process in a traceback that skips closing the machine.
    """
    try:
        return loop.run()
    except Exception as e:
        return Stop(StopKind.ERROR, f"vCPU {loop.vcpu.index}: {host_failure(e)}")


def host_failure(e: BaseException) -> str:
    """'ValueError: boom (kvmpy/devices/serial.py:120, in write)': the innermost kvmpy frame."""
    import traceback
    from pathlib import Path

    package = Path(__file__).resolve().parent
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(package):
            where = f" ({path.relative_to(package.parent)}:{frame.lineno}, in {frame.name})"
            break
    return f"{type(e).__name__}: {e}{where}"


class VcpuThreads:
    def __init__(self, loops: list[VcpuLoop], on_stop: Callable[[Stop], None],
                 on_start: Callable[[VcpuLoop], None] | None = None) -> None:
        self.loops = loops
        self.on_stop = on_stop
        self.on_start = on_start  # run first on each vCPU thread (kvmpy.isolation)
        self.done = threading.Event()
        self.stop: Stop | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # per vCPU: True when it was last seen halted with interrupts off (or never started)
        self._parked = [False] * len(loops)
        # while a `sample()` waits: how to describe a vCPU, and each one's text (None: to do)
        self._describe: Callable[[VcpuLoop], str] | None = None
        self._samples: list[str | None] = [None] * len(loops)
        self._sampled = threading.Condition()
        # pause(): while `_pausing`, a kicked vCPU waits in `_hold` (`_held[i]` True)
        self._pausing = False
        self._held = [False] * len(loops)
        self._holding = threading.Condition()
        for i, loop in enumerate(loops):
            loop.on_kick = lambda i=i: self._on_kick(i)  # type: ignore[misc]

    def start(self, *, held: bool = False) -> None:
        """A thread per vCPU. `held`: each starts paused, waiting before its first entry
        until `resume` (a migration's destination has them ready before the guest
        arrives: starting a thread and narrowing it to its system calls is not left
        for the pause)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)  # only to interrupt KVM_RUN
        self._pausing = held
        for loop in self.loops:
            t = threading.Thread(target=self._run, args=(loop,), name=f"vcpu{loop.vcpu.index}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, loop: VcpuLoop) -> None:
        if self.on_start is not None:
            try:
                self.on_start(loop)
            except Exception as e:
                self.finish(Stop(StopKind.ERROR, f"vCPU {loop.vcpu.index}: {host_failure(e)}"))
                return
        if self._pausing:  # (started held)
            self._hold(loop.vcpu.index)
        self.finish(run_guarded(loop))

    def finish(self, stop: Stop) -> None:
        """End the run (first caller wins) and get every vCPU out of the guest."""
        with self._lock:
            if self.stop is not None:
                return
            self.stop = stop
        self.on_stop(stop)
        for loop in self.loops:
            loop.request_stop(stop)
        with self._holding:  # a held vCPU goes back to its loop, which sees the stop
            self._holding.notify_all()
        self.kick_all()
        self.done.set()

    def kick_all(self) -> None:
        # not strict: a vCPU that stops the run while start() is still starting threads
        # kicks only those started; the rest see their loop's stop before their first entry
        for loop, thread in zip(self.loops, self._threads, strict=False):
            loop.vcpu.set_immediate_exit(True)
            if thread.is_alive() and thread.ident is not None:
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def _on_kick(self, index: int) -> None:
        describe = self._describe
        if describe is not None and self._samples[index] is None:
            try:
                text = describe(self.loops[index])
            except Exception as e:  # a report must never take the vCPU down
                text = f"  (vCPU {index}: no description: {e!r})"
            with self._sampled:
                self._samples[index] = text
                self._sampled.notify_all()
        self._check_parked(index)
        if self._pausing:
            self._hold(index)

    # -- pausing ----------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._pausing

    def pause(self, timeout: float = 10.0) -> bool:
        """Hold every vCPU out of KVM_RUN; False if one did not come out within `timeout`
        (its thread busy in a device). A vCPU whose loop has ended counts as held."""
        import time

        with self._holding:
            self._pausing = True
        deadline = time.monotonic() + timeout
        while True:
            # kicked again until held: a kick that lands between an exit and the next
            # entry is lost when the loop clears immediate_exit
            self.kick_all()
            with self._holding:
                if self._holding.wait_for(self._all_held, 0.05):
                    return True
            if time.monotonic() > deadline:
                return False

    def _all_held(self) -> bool:
        return all(held or not thread.is_alive()
                   for held, thread in zip(self._held, self._threads, strict=False))

    def resume(self) -> None:
        with self._holding:
            self._pausing = False
            self._holding.notify_all()

    def _hold(self, index: int) -> None:
        with self._holding:
            self._held[index] = True
            self._holding.notify_all()
            self._holding.wait_for(lambda: not self._pausing or self.stop is not None)
            self._held[index] = False

    def sample(self, describe: Callable[[VcpuLoop], str], timeout: float = 5.0) -> list[str]:
        """Kick every vCPU and have its own thread run `describe(loop)`; one text each.

        A vCPU that does not come back within `timeout` (its thread busy in a
        device handler, or the host stalled) is reported as such.
        """
        with self._sampled:
            self._samples = [None] * len(self.loops)
            self._describe = describe
        self.kick_all()
        with self._sampled:
            self._sampled.wait_for(lambda: None not in self._samples, timeout)
            self._describe = None
            return [text if text is not None else
                    f"  vCPU {i}: did not leave KVM_RUN within {timeout:g} s"
                    for i, text in enumerate(self._samples)]

    def _check_parked(self, index: int) -> None:
        vcpu = self.loops[index].vcpu
        state = vcpu.get_mp_state()
        if state == MpState.HALTED:
            self._parked[index] = not vcpu.get_regs().rflags & RFLAGS_IF
        else:
            self._parked[index] = state not in (MpState.RUNNABLE, MpState.SIPI_RECEIVED)

    def wait(self, timeout: float | None = None, halt_detection: bool = True) -> Stop | None:
        """Supervise until the run ends (or `timeout`); returns the Stop, if any."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_seen = [-1] * len(self.loops)
        talked = True  # some vCPU exited to us since the last kicks
        last_kicks = 0.0
        while not self.done.wait(HALT_CHECK_INTERVAL_S):
            now = time.monotonic()
            if deadline is not None and now > deadline:
                return None
            if not halt_detection or self._pausing:
                continue  # (a paused guest is held by us, not halted)
            seen = [loop.exits_seen for loop in self.loops]
            if seen != last_seen:
                last_seen, talked = seen, True
                continue  # someone is still talking to us: not all halted
            if not talked and now - last_kicks < QUIET_LOOK_INTERVAL_S:
                continue  # kicked this quiet guest lately, and it said nothing since
            talked, last_kicks = False, now
            self._parked = [False] * len(self.loops)
            self.kick_all()
            if self.done.wait(0.05):
                break
            last_seen = [loop.exits_seen for loop in self.loops]  # the kicks' own exits
            if all(self._parked):
                self.finish(Stop(StopKind.HALTED, "every vCPU halted with interrupts "
                                 "disabled: the guest can never continue"))
                break
        for t in self._threads:
            t.join(timeout=2)
        return self.stop
