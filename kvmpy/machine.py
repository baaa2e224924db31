"""The Machine: one object that owns a VM and builds it, in order, like a recipe.

    memory -> VM and its memory slots -> platform (irqchip, PIT) -> vCPUs
           -> devices on the buses -> boot (flat image or Linux kernel)
           -> an exit loop per vCPU, with whoever watches its exits

Reading `Machine.__init__` top to bottom is reading how kvmpy makes a VM.
Running it runs each vCPU's `VcpuLoop` and waits for a `Stop`.

A machine restored from a snapshot is built by the same recipe from the snapshot's
configuration, with guest RAM mapped from the snapshot and, instead of a boot, every
part given back its saved state (`restore_state`). `pause()` holds the vCPUs and the I/O
thread, `capture_state()` gathers each part's `state()`; kvmpy.state.snapshot writes
them with RAM and disks (docs/snapshots.md). A machine built `incoming` is the same
recipe with neither: fresh RAM, no boot, its state still to come (a live migration's
destination, kvmpy.migration.destination, fills RAM and calls `restore_state`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from kvmpy import layout
from kvmpy.boot.cpuid import boot_msrs, normalize_cpuid
from kvmpy.bus import Bus, IrqLine, NullIrq
from kvmpy.checks import check_config
from kvmpy.cpu import lapic
from kvmpy.cpu.modes import Mode
from kvmpy.devices.debug_exit import DebugExit
from kvmpy.devices.i8042 import I8042
from kvmpy.devices.i8042 import PORT_SPAN as I8042_SPAN
from kvmpy.devices.postcode import PostCode
from kvmpy.devices.rtc import PORT_SPAN as RTC_SPAN
from kvmpy.devices.rtc import Rtc
from kvmpy.devices.serial import Serial
from kvmpy.devices.testdev import TestDevice
from kvmpy.exitloop import ExitObserver, VcpuLoop
from kvmpy.kvm import Kvm, Vcpu
from kvmpy.kvm.detect import require_linux_kvm
from kvmpy.log import get_logger
from kvmpy.memory import GuestMemory
from kvmpy.ratelimit import NO_LIMITS, Limits
from kvmpy.stop import Stop, StopKind
from kvmpy.vcpu_threads import VcpuThreads, run_guarded

if TYPE_CHECKING:
    from kvmpy.boot.linux import LinuxBoot
    from kvmpy.gdb.stub import GdbConfig, GdbStub
    from kvmpy.isolation.jail import Jail
    from kvmpy.isolation.landlock import Rules as LandlockRules
    from kvmpy.state.snapshot import Snapshot
    from kvmpy.trace.stats import ExitStats
    from kvmpy.trace.tracer import Tracer
    from kvmpy.virtio.console import Console as VirtioConsole
    from kvmpy.virtio.device import VirtioDevice
    from kvmpy.virtio.iothread import EventFdWiring, IoThread
    from kvmpy.virtio.mmio import VirtioMmioTransport


@contextlib.contextmanager
def _host_signals(stop: Callable[[Stop], None], report: Callable[[], str]) -> Iterator[None]:
    """SIGINT and SIGTERM stop the VM cleanly (terminal restored by the caller).

    SIGUSR2 prints where every vCPU is (`report`) after the Python stack of every
    thread, which faulthandler prints from the signal itself and then chains here.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = {signal.SIGINT: StopKind.SIGINT, signal.SIGTERM: StopKind.SIGTERM}
    # kvmpy.cli's stack dump, put back at the end (True if there was one; typeshed says None)
    dumping = faulthandler.unregister(signal.SIGUSR2)  # type: ignore[func-returns-value]
    saved = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in (*kinds, signal.SIGUSR2)}

    def handler(signum: int, _frame: object) -> None:
        stop(Stop(kinds[signal.Signals(signum)], f"stopped by signal {signum}"))

    def where(_signum: int, _frame: object) -> None:
        print(f"kvmpy: the vCPUs on SIGUSR2:\n{report()}", file=sys.stderr, flush=True)

    for sig in kinds:
        signal.signal(sig, handler)
    signal.signal(signal.SIGUSR2, where)
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=True)
    try:
        yield
    finally:
        faulthandler.unregister(signal.SIGUSR2)
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        if dumping:
            faulthandler.register(signal.SIGUSR2, all_threads=True)


class FlatConfig(NamedTuple):
    """A raw binary guest (test and tutorial guests)."""

    path: Path
    mode: Mode = Mode.REAL
    entry: int = layout.FLAT_LOAD
    cpl: int = 0
    gprs: Mapping[str, int] | None = None  # initial general registers, e.g. {"rcx": 10}
    # the in-kernel LAPIC and IO-APIC (docs/tutorial/04-interrupts.md); with it a
    # `hlt` waits inside KVM_RUN for an interrupt instead of ending the run
    irqchip: bool = False


class LinuxConfig(NamedTuple):
    """A Linux kernel booted directly (bzImage, or vmlinux by PVH or its 64-bit entry)."""

    kernel: Path
    initrd: Path | None = None
    append: str = ""
    acpi: bool = False  # ACPI tables instead of MP table + command-line devices
    prefer_pvh: bool = True
    # a bzImage boots from its kernel as unpacked by an earlier run, if one was kept
    # (kvmpy.boot.unpack); False: its decompressor every time
    unpack: bool = True


class ConsoleSink(Protocol):
    """Where guest console output goes: stdout's buffer, a file, a ConsoleOutput."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class DiskConfig(NamedTuple):
    path: Path
    read_only: bool = False
    limits: Limits = NO_LIMITS  # bytes/s and requests/s (kvmpy.ratelimit)


class NetConfig(NamedTuple):
    tap: str = ""  # attach to this tap interface; "" lets the kernel name a new one
    mac: str | None = None
    limits: Limits = NO_LIMITS  # bytes/s each way (kvmpy.ratelimit)


class ShareConfig(NamedTuple):
    """A host directory over virtio-9p; the default guest mounts it at /mnt/TAG."""

    path: Path
    tag: str
    read_only: bool = False


class VsockConfig(NamedTuple):
    """virtio-vsock: the guest's CID, and the unix socket its host side listens on."""

    cid: int
    uds: Path


# The configurations are NamedTuples, not dataclasses: a record's class is built
# without generating and compiling code, which is most of `dataclasses`' cost at
# start-up (tens of milliseconds each under emulation, see README "Boot time").
class MachineConfig(NamedTuple):
    mem_size: int = 256 * layout.MiB
    cpus: int = 1
    flat: FlatConfig | None = None
    linux: LinuxConfig | None = None
    disks: Sequence[DiskConfig] = ()
    nets: Sequence[NetConfig] = ()
    rng: bool = False
    virtio_console: bool = False  # hvc0 as the console instead of ttyS0
    shares: Sequence[ShareConfig] = ()
    vsock: VsockConfig | None = None
    # more virtio-console devices, after the console's (hvc1... or from hvc0): each passes
    # what the guest writes to it to its callable (kvmpy sandbox's stdout, stderr, status)
    channels: Sequence[Callable[[bytes], object]] = ()
    stats: bool = False
    trace: Tracer | None = None  # a line per VM exit (kvmpy.trace.tracer)
    gdb: GdbConfig | None = None  # vCPUs start stopped, waiting for gdb (kvmpy.gdb.stub)
    console: ConsoleSink | None = None  # guest console output; None: this process's stdout
    # after set-up, each thread held to the system calls it needs (kvmpy.isolation.seccomp):
    # "kill", "log" or "off" (the API's default: a test process must not be confined)
    seccomp: str = "off"
    # after set-up, the process held to the files it was given (kvmpy.isolation.landlock):
    # these rules (the caller's: QMP socket, snapshot directories) besides the machine's
    # own (Python, disks, shares); None: no Landlock
    landlock: LandlockRules | None = None
    # kvmpy runs in this jail (kvmpy.isolation.jail: entered before the machine is
    # built); at the end of set-up, a new network namespace and the unprivileged user
    jail: Jail | None = None


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




UNPACK_WAIT_S = 30  # how long a run waits at its end for `unpack_for_next_boot`'s thread


def _prepare_for_linux(vcpu: Vcpu) -> None:
    """MSRs, FPU and LAPIC as firmware would leave them before a kernel starts."""
    vcpu.set_msrs(boot_msrs())
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F  # x87 default control word (FNINIT)
    fpu.mxcsr = 0x1F80  # SSE default: all exceptions masked
    vcpu.set_fpu(fpu)
    # LINT0 delivers the 8259's ExtINT, LINT1 delivers NMI, as a PC's firmware leaves them
    page = bytearray(vcpu.get_lapic())
    for reg, mode in ((lapic.LVT_LINT0, lapic.DM_EXTINT), (lapic.LVT_LINT1, lapic.DM_NMI)):
        lapic.write_u32(page, reg, lapic.read_u32(page, reg) & ~lapic.LVT_DELIVERY_MODE | mode)
    vcpu.set_lapic(bytes(page))


class Machine:
    def __init__(self, config: MachineConfig, kvm: Kvm | None = None, *,
                 snapshot: Snapshot | None = None, incoming: bool = False) -> None:
        # 0. every option checked, and this /dev/kvm able to run the guest, before
        #    anything is built (kvmpy.checks: one-line errors naming the option); a
        #    snapshot's CPUID must be what this host gives (the rest was checked when
        #    it was opened: kvmpy.state.snapshot)
        booting = snapshot is None and not incoming
        check_config(config, booting=booting)
        from kvmpy.isolation.seccomp import Seccomp

        self.seccomp = Seccomp(config.seccomp)
        self.locked_down = False  # (lock_down)
        if config.linux is not None:
            require_linux_kvm()
        self.config = config
        self.console: ConsoleSink = config.console or sys.stdout.buffer
        self._own_kvm = kvm is None  # a /dev/kvm fd this machine opened, and closes
        self.kvm = kvm or Kvm()
        supported = self.kvm.supported_cpuid()
        tsc_deadline = bool(self.kvm.check_extension("KVM_CAP_TSC_DEADLINE_TIMER"))
        cpuids = [normalize_cpuid(supported, i, config.cpus, tsc_deadline=tsc_deadline)
                  for i in range(config.cpus)]
        self.cpuids = cpuids  # what each vCPU is told it is (a migration compares them)
        if snapshot is not None:
            try:
                snapshot.check_cpuid(lambda i: cpuids[i])
            except BaseException:
                self._close_kvm()
                raise
        # 1. guest RAM, with the 32-bit MMIO hole left out (a snapshot's: mapped privately)
        self.memory = snapshot.map_ram() if snapshot is not None else GuestMemory.anonymous(
            config.mem_size, hole=(layout.MMIO_HOLE, layout.MMIO_HOLE_END))
        # 2. the VM and its memory slots
        self.vm = self.kvm.create_vm()
        self.vm.map_memory(self.memory)
        # 3. platform: Linux gets the in-kernel PIC/IO-APIC/LAPICs and PIT; flat
        #    guests get none, so that their `hlt` comes back to us
        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.vm.set_identity_map_addr(layout.IDENTITY_MAP)
        if config.linux is not None:
            self.vm.create_irqchip()
            self.vm.create_pit2()
        elif config.flat is not None and config.flat.irqchip:
            self.vm.create_irqchip()
        # 4. vCPUs, each with its CPUID (APIC id, topology, hypervisor leaves)
        self.vcpus = [self.vm.create_vcpu(i) for i in range(config.cpus)]
        for vcpu in self.vcpus:
            vcpu.set_cpuid2(cpuids[vcpu.index])
            if config.linux is not None and booting:
                _prepare_for_linux(vcpu)
        # 5. devices
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.serial = Serial(self.irq(layout.COM1_IRQ), self._console_out)
        self.pio.insert(layout.COM1_PORT, 8, self.serial, "serial0")
        self.postcode = PostCode()
        self.pio.insert(layout.POST_CODE_PORT, 1, self.postcode, "post-code")
        self.pio.insert(layout.DEBUG_EXIT_PORT, 4, DebugExit(self._debug_exit), "debug-exit")
        from kvmpy.isolation.escape import from_environment as test_escape

        self.testdev = TestDevice(console=self._console_write, on_exit=self._debug_exit,
                                  escape=test_escape())
        self.mmio.insert(layout.TEST_DEVICE_BASE, layout.TEST_DEVICE_SIZE, self.testdev,
                         "testdev")
        if config.linux is not None:
            self.i8042 = I8042(on_reset=self._guest_reset, kbd_irq=self.irq(1))
            self.pio.insert(layout.I8042_PORT, I8042_SPAN, self.i8042, "i8042")
            self.rtc = Rtc(ram_below_4g=self.memory.regions[0].size,
                           ram_above_4g=self.memory.size - self.memory.regions[0].size)
            self.pio.insert(layout.RTC_PORT, RTC_SPAN, self.rtc, "rtc")
            if config.linux.acpi:
                from kvmpy.devices.acpi_pm import PM_PORT_LEN, AcpiPm
                from kvmpy.devices.ged import REGISTER_SIZE, Ged

                self.pm = AcpiPm(on_poweroff=self._guest_poweroff, on_reboot=self._guest_reset)
                self.pio.insert(layout.PM_PORT_BASE, PM_PORT_LEN, self.pm, "acpi-pm")
                # the power button (QMP system_powerdown) and the device that presses it
                self.ged = Ged(self.irq(layout.GED_GSI))
                self.pio.insert(layout.GED_PORT, REGISTER_SIZE, self.ged, "ged")
        # virtio-mmio devices, one 4 KiB window and one GSI each; their queue
        # notifications and interrupts go through KVM eventfds to an I/O thread
        self.virtio: list[tuple[VirtioMmioTransport, int, int]] = []  # (transport, gpa, gsi)
        self._wirings: list[EventFdWiring] = []  # their ioeventfds and irqfds, closed at the end
        self.iothread: IoThread | None = None
        self.hvc: VirtioConsole | None = None  # the console, with `virtio_console`
        devices = self._virtio_devices()
        if devices:
            from kvmpy.virtio.iothread import IoThread

            self.iothread = IoThread()  # (started at the end of set-up: lock_down)
            for device in devices:
                self._add_virtio(device, self.iothread)
        self.threads: VcpuThreads | None = None
        self.gdb: GdbStub | None = None  # (step 7; named here for a close() before it)
        self.paused = False
        # who reads KVM's dirty-page log, if anyone: a fast reset's ResetPoint
        # (kvmpy.state.reset) or incremental snapshots' DirtyTracker (kvmpy.state.diff)
        self.dirty_log_owner: Any = None
        self._running = threading.Event()  # clear while paused: console input waits
        self._running.set()
        self._clock: dict[str, Any] | None = None  # kvmclock to put back before vCPUs run
        self._clock_goes_on = False  # ... moved on by the host time since it was read
        self._restored = not booting  # (see _before_run)
        # 6. boot, or every part back as the snapshot has it
        self.linux_boot: LinuxBoot | None = None
        if snapshot is not None:
            try:
                self.restore_state({k: v for k, v in snapshot.sections.items()
                                    if k != "machine"})
            except BaseException:
                self.close()
                raise
        elif incoming:
            pass  # RAM and every part's state come later (restore_state)
        elif config.flat is not None:
            from kvmpy.flat import load_flat, start_flat

            flat = config.flat
            load_flat(self.memory, flat.path)
            start_flat(self.vcpus[0], self.memory, flat.mode, flat.entry, flat.cpl,
                       **(flat.gprs or {}))
        elif config.linux is not None:
            self.linux_boot = self._boot_linux(config.linux)
        # 7. an exit loop per vCPU, and whoever watches its exits (only when asked: a
        #    loop without observers makes no call for them), outermost first: the
        #    tracer, the gdb stub (it parks vCPUs and takes the debug exits), statistics
        self.loops: list[VcpuLoop] = []  # (the gdb stub may ask `stopped` from now on)
        if config.gdb is not None:
            from kvmpy.gdb.stub import GdbStub

            self.gdb = GdbStub(self.vcpus, self.memory, config.gdb, irqchip=self.vm.irqchip,
                               request_stop=self.request_stop, stopped=lambda: self.stopped)
        self.exit_stats: list[ExitStats] = []
        if config.stats:
            from kvmpy.trace.stats import ExitStats

            self.exit_stats = [ExitStats(v.index) for v in self.vcpus]
        self.loops = [VcpuLoop(v, self.memory, self.pio, self.mmio,
                               observers=self._observers(v.index)) for v in self.vcpus]

    def _observers(self, index: int) -> list[ExitObserver]:
        observers: list[ExitObserver] = []
        if self.config.trace is not None:
            observers.append(self.config.trace)
        if self.gdb is not None:
            observers.append(self.gdb.observer(index))
        if self.exit_stats:
            observers.append(self.exit_stats[index])
        return observers

    def _virtio_devices(self) -> list[VirtioDevice]:
        # each imported only when asked for: a VM without virtio devices (or with one
        # kind) should not pay for the others' imports at start-up
        config = self.config
        devices: list[VirtioDevice] = []
        if config.virtio_console:
            from kvmpy.virtio.console import Console

            self.hvc = Console(output=self._console_write)
            devices.append(self.hvc)
        if config.channels:
            from kvmpy.virtio.console import Console

            devices += [Console(output=output) for output in config.channels]
        if config.disks:
            from kvmpy.virtio.blk import Block

            devices += [Block(str(d.path), read_only=d.read_only, limits=d.limits)
                        for d in config.disks]
        if config.nets:
            from kvmpy.virtio.net import Net
            from kvmpy.virtio.tap import Tap

            devices += [Net(Tap(n.tap), n.mac, limits=n.limits) for n in config.nets]
        if config.shares:
            from kvmpy.virtio.ninep import NinePDevice

            devices += [NinePDevice(str(s.path), s.tag, read_only=s.read_only)
                        for s in config.shares]
        if config.vsock is not None:
            from kvmpy.virtio.vsock import Vsock

            devices.append(Vsock(config.vsock.cid, str(config.vsock.uds)))
        if config.rng:
            from kvmpy.virtio.rng import Rng

            devices.append(Rng())
        return devices

    def _add_virtio(self, device: VirtioDevice, iothread: IoThread) -> None:
        from kvmpy.virtio.iothread import wire_eventfds
        from kvmpy.virtio.mmio import VirtioMmioTransport, slot_base, slot_irq

        slot = len(self.virtio)
        gpa, gsi = slot_base(slot), slot_irq(slot)
        transport = VirtioMmioTransport(device, self.memory, self.irq(gsi))
        self.mmio.insert(gpa, layout.VIRTIO_MMIO_SIZE, transport, device.name)
        if self.vm.irqchip:
            self._wirings.append(wire_eventfds(self.vm, iothread, transport, gpa, gsi))
        else:
            iothread.add_device(device)
        self.virtio.append((transport, gpa, gsi))

    def _boot_linux(self, linux: LinuxConfig) -> LinuxBoot:
        # (imported here: the boot protocol's modules are start-up a restore need not pay)
        from kvmpy.boot.linux import BASE_CMDLINE, boot_linux

        devices: list[str] = []
        if self.virtio:
            from kvmpy.virtio.mmio import cmdline_fragment

            devices = [cmdline_fragment(gpa, gsi) for _, gpa, gsi in self.virtio]
        # the console: the 16550 (ttyS0), or virtio-console (hvc0)
        console = "console=hvc0" if self.config.virtio_console else "console=ttyS0"
        acpi = None
        if linux.acpi:
            from kvmpy.acpi.tables import build_acpi

            devices = []  # the DSDT describes them; listing both would probe each twice
            windows = [(gpa, layout.VIRTIO_MMIO_SIZE, gsi) for _, gpa, gsi in self.virtio]
            tables = build_acpi(self.memory, len(self.vcpus), windows, uart=True,
                                power_button=True)
            acpi = (tables.rsdp_gpa, tables.start, tables.end)
        # no tables to find: the kernel should not search for them and complain
        no_acpi = "" if linux.acpi else "acpi=off"
        # the shares, for an init that mounts them (kvmpy's default one, at /mnt/TAG)
        shares = [f"kvmpy.share={s.tag}{',ro' if s.read_only else ''}"
                  for s in self.config.shares]
        # kernel parameters first; the user's may end with `-- init arguments`
        cmdline = " ".join(filter(None, [BASE_CMDLINE, *devices, console, no_acpi, *shares,
                                         linux.append]))
        # a bzImage whose kernel an earlier run unpacked on the host boots from that
        # copy, without its decompressor (imported here: hashlib is start-up a flat
        # guest need not pay)
        from kvmpy.boot import unpack

        unpacked = unpack.kept(linux.kernel) if linux.unpack else None
        boot = boot_linux(self.memory, self.vcpus[0], kernel=linux.kernel, initrd=linux.initrd,
                          cmdline=cmdline, n_cpus=len(self.vcpus), prefer_pvh=linux.prefer_pvh,
                          unpacked=unpacked, acpi=acpi)
        if boot.kernel.unpacked:
            get_logger(__name__).info("%s: its kernel as unpacked by an earlier boot",
                                      linux.kernel)
        return boot

    # -- state ------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        """Every device with a `state()` / `restore(state, where)` pair, by section name."""
        owners: dict[str, Any] = {"serial0": self.serial, "post-code": self.postcode,
                                  "testdev": self.testdev}
        for name, attr in (("i8042", "i8042"), ("rtc", "rtc"), ("acpi-pm", "pm"),
                           ("ged", "ged")):
            if hasattr(self, attr):
                owners[name] = getattr(self, attr)
        for i, (transport, _, _) in enumerate(self.virtio):
            owners[f"virtio{i}"] = transport
        return owners

    def capture_state(self, compact: bool = False, live: bool = False) -> dict[str, Any]:
        """The saved state of every part, a section each (kvmpy.state.stream): the VM,
        each vCPU, each device. Paused machines only (`pause`), or machines not started
        yet. (kvmpy.state.snapshot adds the configuration, from `as_built`.) `compact`:
        the vCPUs' register structs as bytes (a migration's: `capture_vcpu`). kvmclock
        is as it was when the guest stopped; `live` (a live migration's): as it is now,
        read after the vCPUs' TSCs, for a destination that moves both on by the host
        time since (`restorer(live=True)`)."""
        from kvmpy.kvm.state import capture_clock, capture_vcpu, capture_vm

        vcpus = {f"vcpu{vcpu.index}": capture_vcpu(vcpu, compact) for vcpu in self.vcpus}
        clock = self._clock if self._clock is not None and not live else capture_clock(self.vm)
        sections = {"vm": capture_vm(self.vm, clock), **vcpus}
        for name, owner in self.stateful().items():
            sections[name] = owner.state()
        return sections

    def as_built(self) -> MachineConfig:
        """The configuration with what building it settled: each network device's tap
        by the name it got (a tap the kernel named, "") and the MAC it has."""
        if not self.config.nets:
            return self.config
        from kvmpy.virtio.net import Net

        devices = [t.device for t, _, _ in self.virtio if isinstance(t.device, Net)]
        nets = [net._replace(tap=getattr(dev.backend, "name", net.tap), mac=dev.mac.hex(":"))
                for net, dev in zip(self.config.nets, devices, strict=True)]
        return self.config._replace(nets=nets)

    def restore_state(self, sections: dict[str, Any], live: bool = False) -> None:
        """Give every part the state `capture_state` gave (see `restorer`)."""
        self.restorer(sections, live)()

    def restorer(self, sections: dict[str, Any], live: bool = False) -> Callable[[], None]:
        """Check `sections` (as `capture_state` gives them) against this machine; returns
        what gives every part its state, as often as asked (kvmpy.state.reset), in the
        order that keeps each consistent: devices first (their interrupt lines driven to
        their saved levels), then the irqchip and PIT over whatever those lines did,
        then the vCPUs (LAPICs last of all interrupt state); kvmclock just before the
        vCPUs run (`_before_run`). vCPUs must be out of KVM_RUN with nothing pending
        (`settle`). The guest sees no time pass since the capture, unless `live` (a live
        migration's): then kvmclock and each vCPU's TSC go on by the host time since the
        capture (its clock's `realtime`), so its timers keep to the host's time and
        a pause does not lengthen a sleep."""
        from kvmpy.errors import SnapshotError
        from kvmpy.kvm.state import prepare_vcpu, restore_vm
        from kvmpy.state.values import restorer

        owners = self.stateful()
        expected = {"vm", *owners, *(f"vcpu{v.index}" for v in self.vcpus)}
        if set(sections) != expected:
            extra, missing = sorted(set(sections) - expected), sorted(expected - set(sections))
            raise SnapshotError("snapshot state: " + (
                f"{extra[0]} is not part of this machine" if extra else
                f"no state for {missing[0]}") + " (another device set)")
        devices: list[Callable[[], None]] = []
        vcpus: list[Callable[[], None]] = []

        def restore() -> None:
            if not devices:  # every device's state checked before any is put back
                devices.extend([restorer(owner, sections[name], name)
                                for name, owner in owners.items()])
            for put in devices:
                put()
            self._clock = restore_vm(self.vm, sections["vm"])
            self._clock_goes_on = live
            since = self._clock["realtime"] if live else None
            if not vcpus:  # checked on the first restore, after the devices and VM were
                vcpus.extend(prepare_vcpu(v, sections[f"vcpu{v.index}"], f"vcpu{v.index}",
                                          since) for v in self.vcpus)
            for put in vcpus:
                put()

        return restore

    def settle(self) -> None:
        """Let KVM finish what a vCPU's last exit left pending (the data of an MMIO or
        port read goes into a register on the next KVM_RUN): one entry with
        immediate_exit set, which completes it and comes straight back. Before its
        state is read or replaced, for a vCPU that stopped on an exit rather than
        being kicked out (a kick already does this). Not for running vCPUs."""
        for vcpu in self.vcpus:
            vcpu.set_immediate_exit(True)
            try:
                vcpu.run()
            finally:
                vcpu.set_immediate_exit(False)

    def rearm(self) -> None:
        """Make a machine whose run ended runnable again (`run` or `start`), as it is:
        the run's stop forgotten, its finished vCPU threads dropped (kvmpy.state.reset
        puts the state back first)."""
        if self.threads is not None and not self.threads.done.is_set():
            raise RuntimeError("rearm: the machine is still running")
        self.threads = None
        for loop in self.loops:
            loop.stop = None

    def _before_run(self) -> None:
        """kvmclock back to where the guest left it, and a restored device's queues
        looked at once (their last notifications went to another process)."""
        from kvmpy.kvm.state import restore_clock

        if self._clock is not None:
            restore_clock(self.vm, self._clock, advance=self._clock_goes_on)
            self._clock, self._clock_goes_on = None, False
            for vcpu in self.vcpus:
                try:
                    vcpu.kvmclock_ctrl()
                except OSError:
                    pass  # (no kvmclock in this guest)
        if self._restored:
            self._restored = False
            for transport, _, _ in self.virtio:
                transport.process_all()

    def pause(self, timeout: float = 10.0) -> None:
        """Hold every vCPU out of KVM_RUN, stop the I/O thread between two requests,
        and hand every console byte the guest wrote to the console. Console input
        waits. Guest time stops (kvmclock is put back on `resume`)."""
        from kvmpy.errors import KvmpyError

        if self.paused:
            return
        if self.threads is not None and not self.threads.pause(timeout):
            self.threads.resume()
            raise KvmpyError(f"a vCPU did not leave the guest within {timeout:g} s")
        self._running.clear()
        if self.iothread is not None:
            self.iothread.stop()
        self.serial.flush()
        self.console.flush()
        if self._clock is None:  # (a restored machine not run yet keeps its saved clock)
            from kvmpy.kvm.state import capture_clock

            self._clock = capture_clock(self.vm)
        self.paused = True

    def resume(self) -> None:
        """Undo `pause`: guest time goes on from where it stopped."""
        if not self.paused:
            return
        self.paused = False
        if self.threads is not None:
            self._before_run()
        if self.iothread is not None:
            self.iothread.start()
        self._running.set()
        if self.threads is not None:
            self.threads.resume()

    def press_power_button(self) -> bool:
        """QMP's system_powerdown: press the guest's power button (the ACPI one, through the
        Generic Event Device: kvmpy.devices.ged); False if it has none (no ACPI)."""
        ged = getattr(self, "ged", None)
        if ged is None:
            return False
        from kvmpy.devices.ged import POWER_BUTTON

        ged.signal(POWER_BUTTON)
        return True

    def irq(self, gsi: int) -> IrqLine:
        """The interrupt line for `gsi`: the in-kernel irqchip's, or nowhere without one."""
        return KvmIrq(self.vm, gsi) if self.vm.irqchip else NullIrq()

    def _console_out(self, data: bytes) -> None:
        self.console.write(data)
        self.console.flush()

    def _console_write(self, data: bytes) -> None:
        """Console bytes from a device other than the UART, kept in order with it."""
        self.serial.flush()
        self.console.write(data)
        self.console.flush()

    def _guest_reset(self) -> None:
        self.request_stop(Stop(StopKind.REBOOT, "guest rebooted"))

    def _guest_poweroff(self) -> None:
        self.request_stop(Stop(StopKind.POWEROFF, "guest powered off"))

    def _debug_exit(self, status: int) -> None:
        self.request_stop(Stop(StopKind.DEBUG_EXIT, f"guest wrote {status} to the debug-exit "
                               "port", status=status))

    # -- running ----------------------------------------------------------
    @property
    def stopped(self) -> Stop | None:
        """How the VM stopped, once it has (None while it runs or before it starts)."""
        if self.threads is not None:
            return self.threads.stop
        return next((loop.stop for loop in self.loops if loop.stop is not None), None)

    def lock_down(self, *, network: bool = False) -> None:
        """End of set-up (kvmpy.isolation, docs/isolation.md), in this order: in a jail,
        an empty network namespace and the unprivileged user; with Landlock, only the
        files given stay reachable; then every thread held to its system calls. The
        jail's network namespace and Landlock belong to this thread and the threads it
        starts from now on, and a seccomp filter is narrowed per thread, so the I/O
        thread starts here, confining itself first (and is started again if it ran
        before: a `pause` and `resume` during set-up); the vCPU threads narrow
        themselves as they start. Called by `run` and `start`, or earlier by the caller
        (kvmpy.cli, before it starts the QMP server and the console pump). `network`:
        the main thread may open TCP sockets later, for a QMP `migrate` to `tcp:`."""
        if self.locked_down:
            return
        self.locked_down = True
        if self.config.jail is not None:
            from kvmpy.isolation import jail

            jail.drop(self.config.jail)
        if self.config.landlock is not None:
            self._landlock(self.config.landlock)
        self.seccomp.lock_down(network=network)
        if self.iothread is not None:
            self.iothread.on_start = lambda: self.seccomp.enter("io")
            if self.iothread.stop():
                self.iothread.start()

    def _landlock(self, given: LandlockRules) -> None:
        """This thread, and the threads it starts, held to the files the machine was
        given (the kernel and initrd are loaded by now: they are not among them)."""
        from kvmpy.isolation import landlock

        config = self.config
        rules = landlock.python_rules().add(
            read=[d.path for d in config.disks if d.read_only]
            + [s.path for s in config.shares if s.read_only],
            write=[d.path for d in config.disks if not d.read_only]
            + [s.path for s in config.shares if not s.read_only])
        rules = rules.add(read=given.read, write=given.write, sockets=given.sockets)
        if landlock.abi() == 0:
            print("kvmpy: --landlock: this kernel has no Landlock (Linux 5.13+ with landlock "
                  "in its lsm= list): files are not confined", file=sys.stderr)
            return
        landlock.restrict(rules)

    def start(self, *, held: bool = False) -> None:
        """Start one thread per vCPU; returns at once. `held`: started paused, each
        thread ready and waiting before its first entry until `resume` (a migration's
        destination, kvmpy.cli: the guest's state arrives meanwhile)."""
        self.lock_down()
        if held:
            self._running.clear()
            self.paused = True
        else:
            self._before_run()
        self.threads = VcpuThreads(
            self.loops, on_stop=lambda _: self.serial.flush(),
            on_start=lambda loop: self.seccomp.enter("vcpu", f"vcpu{loop.vcpu.index}"))
        self.threads.start(held=held)

    def unpack_for_next_boot(self) -> threading.Thread | None:
        """A bzImage booting through its decompressor (`LinuxConfig.unpack`, and no copy
        kept): unpack its kernel on the host meanwhile, on a thread (which it returns,
        for the caller to wait for), so that the next run boots the copy
        (kvmpy.boot.unpack). None when there is nothing to unpack."""
        linux, boot = self.config.linux, self.linux_boot
        if linux is None or not linux.unpack or boot is None or boot.kernel.protocol != "bzimage":
            return None
        from kvmpy.boot.unpack import unpack_in_background

        return unpack_in_background(linux.kernel)

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

    def describe_vcpus(self, timeout: float = 5.0) -> str:
        """Where every vCPU is now: registers, pending vectors, code, stack (a quiet guest)."""
        if self.threads is None:
            return "  (not started with start(): no vCPU threads to ask)"
        if self.stopped is not None:
            return f"  (the VM has stopped: {self.stopped.reason})"
        from kvmpy.diagnostics import describe_running

        return "\n".join(self.threads.sample(
            lambda loop: describe_running(loop.vcpu, self.memory), timeout))

    def console_input(self, data: bytes) -> None:
        """Give the guest console input, waiting while its receive buffer is full (and
        while the guest is paused: the input arrives after it resumes)."""
        while not self._running.wait(0.1):
            if self.stopped is not None:
                return
        if self.hvc is not None:
            self.hvc.enqueue_input(data)
            return
        while data and self.stopped is None:
            taken = self.serial.enqueue_input(data) if self.serial.ready_for_input else 0
            data = data[taken:]
            if data:
                time.sleep(0.01)

    def run(self, *, threads: bool = False) -> Stop:
        """Run until the VM stops. A single vCPU without irqchip runs on this thread,
        unless `threads` (another thread will pause it: a QMP server). A machine
        started `held` is let go."""
        if self.threads is None and len(self.loops) == 1 and not self.vm.irqchip \
                and not threads:
            self.lock_down()  # (this thread is the vCPU's too: the union of the lists)
            self._before_run()
            try:
                return run_guarded(self.loops[0])
            finally:
                self.serial.flush()
        with _host_signals(self.request_stop, self.describe_vcpus):
            if self.threads is None:
                self.start()
            else:  # started `held`, and let go since, or now
                self.resume()
            stop = self.wait()
        assert stop is not None
        return stop

    def stats(self) -> dict[str, object]:
        """Exit statistics (`MachineConfig.stats`), per vCPU, and the unclaimed accesses."""
        return {"vcpus": [s.snapshot() for s in self.exit_stats],
                "unhandled_pio": {f"{p:#x}": n for p, n in self.pio.unhandled.items()},
                "unhandled_mmio": {f"{a:#x}": n for a, n in self.mmio.unhandled.items()}}

    def close(self) -> None:
        if self.gdb is not None:
            self.gdb.close()  # tells a waiting gdb how the VM ended
        io_stopped = True
        if self.iothread is not None:
            for wiring in self._wirings:
                wiring.unwire(self.vm, self.iothread)
            io_stopped = self.iothread.close()
        for transport, _, _ in self.virtio:
            transport.device.close()
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self._close_kvm()
        if io_stopped:  # else a preadv may still be writing to guest RAM: leave it mapped
            self.memory.close()

    def _close_kvm(self) -> None:
        if self._own_kvm:
            self.kvm.close()
