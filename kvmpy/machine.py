"""The Machine: one object that owns a VM and builds it, in order, like a recipe.

    memory -> VM and its memory slots -> platform (irqchip, PIT) -> vCPUs
           -> devices on the buses -> boot (flat image or Linux kernel)

Reading `Machine.__init__` top to bottom is reading how kvmpy makes a VM.
Running it hands each vCPU to a `VcpuLoop` and waits for a `Stop`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import BinaryIO

from kvmpy import layout
from kvmpy.boot.cpuid import normalize_cpuid
from kvmpy.bus import Bus, IrqLine, NullIrq
from kvmpy.cpu.modes import Mode
from kvmpy.devices.debug_exit import DebugExit
from kvmpy.devices.postcode import PostCode
from kvmpy.devices.serial import Serial
from kvmpy.devices.testdev import TestDevice
from kvmpy.exitloop import VcpuLoop
from kvmpy.flat import load_flat, start_flat
from kvmpy.kvm import Kvm
from kvmpy.memory import GuestMemory
from kvmpy.stop import Stop, StopKind
from kvmpy.vcpu_threads import VcpuThreads


@contextlib.contextmanager
def _host_signals(stop: Callable[[Stop], None]) -> Iterator[None]:
    """SIGINT and SIGTERM stop the VM cleanly (terminal restored by the caller)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = {signal.SIGINT: StopKind.SIGINT, signal.SIGTERM: StopKind.SIGTERM}
    saved = {sig: signal.getsignal(sig) for sig in kinds}
    for sig, kind in kinds.items():
        signal.signal(sig, lambda n, _f, k=kind: stop(Stop(k, f"stopped by signal {n}")))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class FlatConfig:
    """A raw binary guest (test and tutorial guests)."""

    path: Path
    mode: Mode = Mode.REAL
    entry: int = layout.FLAT_LOAD
    cpl: int = 0
    gprs: dict[str, int] = field(default_factory=dict)


@dataclass
class MachineConfig:
    mem_size: int = 128 * layout.MiB
    cpus: int = 1
    flat: FlatConfig | None = None
    stats: bool = False
    console: BinaryIO = field(default_factory=lambda: sys.stdout.buffer)


class KvmIrq:
    """An interrupt line into the in-kernel irqchip (KVM_IRQ_LINE on a GSI)."""

    def __init__(self, vm, gsi: int) -> None:  # type: ignore[no-untyped-def]
        self.vm = vm
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        self.vm.irq_line(self.gsi, level)

    def pulse(self) -> None:
        self.vm.irq_line(self.gsi, True)
        self.vm.irq_line(self.gsi, False)


class Machine:
    def __init__(self, config: MachineConfig, kvm: Kvm | None = None) -> None:
        self.config = config
        self.kvm = kvm or Kvm()
        # 1. guest RAM, with the 32-bit MMIO hole left out
        self.memory = GuestMemory.anonymous(config.mem_size,
                                            hole=(layout.MMIO_HOLE, layout.MMIO_HOLE_END))
        # 2. the VM and its memory slots
        self.vm = self.kvm.create_vm()
        self.vm.map_memory(self.memory)
        # 3. platform: flat guests get none, so that `hlt` comes back to us
        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.vm.set_identity_map_addr(layout.IDENTITY_MAP)
        # 4. vCPUs
        self.vcpus = [self.vm.create_vcpu(i) for i in range(config.cpus)]
        supported = self.kvm.supported_cpuid()
        for vcpu in self.vcpus:
            vcpu.set_cpuid2([astuple(e) for e in
                             normalize_cpuid(supported, vcpu.index, config.cpus)])
        # 5. devices
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.loops = [VcpuLoop(v, self.memory, self.pio, self.mmio, irqchip=self.vm.irqchip,
                               stats=config.stats) for v in self.vcpus]
        self.serial = Serial(self.irq(layout.COM1_IRQ), config.console)
        self.pio.insert(layout.COM1_PORT, 8, self.serial, "serial0")
        self.postcode = PostCode()
        self.pio.insert(layout.POST_CODE_PORT, 1, self.postcode, "post-code")
        self.pio.insert(layout.DEBUG_EXIT_PORT, 4, DebugExit(self._debug_exit), "debug-exit")
        self.testdev = TestDevice(console=self._console_write, on_exit=self._debug_exit)
        self.mmio.insert(layout.TEST_DEVICE_BASE, layout.TEST_DEVICE_SIZE, self.testdev,
                         "testdev")
        self.threads: VcpuThreads | None = None
        # 6. boot
        if config.flat is not None:
            flat = config.flat
            load_flat(self.memory, flat.path)
            start_flat(self.vcpus[0], self.memory, flat.mode, flat.entry, flat.cpl,
                       **flat.gprs)

    def irq(self, gsi: int) -> IrqLine:
        """The interrupt line for `gsi`: the in-kernel irqchip's, or nowhere without one."""
        return KvmIrq(self.vm, gsi) if self.vm.irqchip else NullIrq()

    def _console_write(self, data: bytes) -> None:
        """Console bytes from a device other than the UART, kept in order with it."""
        self.serial.flush()
        self.config.console.write(data)
        self.config.console.flush()

    def _debug_exit(self, status: int) -> None:
        self.request_stop(Stop(StopKind.DEBUG_EXIT, f"guest wrote {status} to the debug-exit "
                               "port", status=status))

    # -- running ----------------------------------------------------------
    @property
    def stopped(self) -> Stop | None:
        return self.threads.stop if self.threads else None

    def start(self) -> None:
        """Start one thread per vCPU; returns at once."""
        self.threads = VcpuThreads(self.loops, on_stop=lambda _: self.serial.flush())
        self.threads.start()

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Supervise the running VM until it stops (or `timeout` passes)."""
        assert self.threads is not None, "start() first"
        return self.threads.wait(timeout, halt_detection=self.vm.irqchip)

    def request_stop(self, stop: Stop) -> None:
        if self.threads is not None:
            self.threads.finish(stop)
        else:
            for loop in self.loops:
                loop.request_stop(stop)

    def console_input(self, data: bytes) -> None:
        self.serial.enqueue_input(data)

    def run(self) -> Stop:
        """Run until the VM stops. A single vCPU without irqchip runs on this thread."""
        if len(self.loops) == 1 and not self.vm.irqchip:
            try:
                return self.loops[0].run()
            finally:
                self.serial.flush()
        with _host_signals(self.request_stop):
            self.start()
            stop = self.wait()
        assert stop is not None
        return stop

    def stats(self) -> dict[str, object]:
        return {"vcpus": [loop.stats() for loop in self.loops],
                "unhandled_pio": {f"{p:#x}": n for p, n in self.pio.unhandled.items()},
                "unhandled_mmio": {f"{a:#x}": n for a, n in self.mmio.unhandled.items()}}

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.memory.close()
