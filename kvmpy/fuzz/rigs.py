"""Rigs: a target's devices in a machine that runs one decoded input, then goes back.

Two rigs run the same ops against the same devices, built by the same target code:

- `KvmRig`: a real VM (`kvmpy.machine.Machine`) whose guest is the op interpreter
  (guests/tests/fuzz_interp.S). kvmpy writes the op list into guest RAM and runs the
  vCPU; every access is a real VM exit through the exit loop to the device, and the
  run ends when the interpreter writes the test device's exit register. Between
  inputs, a fast reset (kvmpy.state.reset) puts back RAM pages, vCPU and devices.
  The interpreter runs at CPL0: port I/O needs it, and on this PVM /dev/kvm an MMIO
  exit from (emulated) CPL0 code costs ~21 us against ~65 us from native CPL3 code,
  whose every MMIO access is a shadow page fault first. Its RAM writes go through
  `OpCopier` (one exit) rather than an emulated `rep movsb` (~1.3 us a byte).
- `BusRig`: no KVM. The same buses and devices over anonymous guest RAM; the ops go
  straight into `Bus.read/write` and `GuestMemory.write`. Its reset is the same
  `kvmpy.state.reset` code, over a stand-in for the VM whose dirty log is empty (the
  devices' and the ops' writes are all in `GuestMemory.written`).

What a rig leaves to its caller (kvmpy.fuzz.runner): which oracles to check, and what
to do with a finding.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmpy import layout
from kvmpy.bus import Bus, NullIrq
from kvmpy.errors import ConfigError
from kvmpy.fuzz import ops as fops
from kvmpy.fuzz.oracles import DiskWatch, Finding, Guards, Integrity, check_virtio
from kvmpy.fuzz.targets import ConsoleSink, Target, disk_image
from kvmpy.memory import GuestMemory
from kvmpy.state.reset import ResetPoint
from kvmpy.stop import Stop, StopKind
from kvmpy.virtio.device import VirtioDevice
from kvmpy.virtio.mmio import VirtioMmioTransport, slot_base

FUZZ_MEM = layout.FUZZ_RAM
INTERPRETER = "fuzz_interp.bin"


def interpreter_path() -> Path:
    """The op interpreter, built by `make guests` into the cache."""
    from kvmpy.cachedir import cache_dir

    path = cache_dir() / "guests" / INTERPRETER
    if not path.is_file():
        raise ConfigError(f"the fuzz op interpreter {path} is not built: run `make guests`")
    return path


class _Rig:
    """What both rigs share: the target's devices, their windows, the oracles on them."""

    point: ResetPoint
    target: Target
    memory: GuestMemory
    pio: Bus
    mmio: Bus
    workdir: Path
    console: ConsoleSink

    def _setup(self, target: Target, workdir: Path | None) -> None:
        self.target = target
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(
            prefix="kvmpy-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.transports: list[VirtioMmioTransport] = []
        self.power_request: str | None = None
        self.windows = target.build(self)
        self.disks = DiskWatch()
        if target.disk is not None:  # as the target says, whatever the device thinks
            self.disks.watch(disk_image(self.workdir), read_only=target.disk == "ro")
        self.guards = Guards(self.memory)

    # -- Parts (kvmpy.fuzz.targets) -----------------------------------------------------
    def add_pio(self, section: str, attr: str, base: int, span: int, device: Any) -> None:
        self.pio.insert(base, span, device, section)
        self._register(section, attr, device)

    def add_virtio(self, device: VirtioDevice) -> tuple[int, VirtioMmioTransport]:
        gpa = slot_base(len(self.transports))
        transport = VirtioMmioTransport(device, self.memory, NullIrq())
        self.mmio.insert(gpa, layout.VIRTIO_MMIO_SIZE, transport, device.name)
        self.transports.append(transport)
        self._register_virtio(transport, gpa)
        return gpa, transport

    def power(self, what: str) -> Callable[[], None]:
        """A device's reboot or poweroff line: noted, and the run ends as the VM's would."""
        def pressed() -> None:
            self.power_request = what
            self._stop(Stop(StopKind.REBOOT if what == "reboot" else StopKind.POWEROFF,
                            f"a device asked for {what}"))
        return pressed

    def add_serial(self) -> None: ...

    def _register(self, section: str, attr: str, device: Any) -> None: ...

    def _register_virtio(self, transport: VirtioMmioTransport, gpa: int) -> None: ...

    def _stop(self, stop: Stop) -> None: ...

    # -- after an input -----------------------------------------------------------------
    def reset(self) -> None:
        """Back to the mark. Restoring state is VMM code the guest's input has fed (a
        device's restore may look at its rings): an exception here is a finding too."""
        try:
            self.point.reset()
        except Exception as e:
            from kvmpy.vcpu_threads import host_failure

            raise Finding("exception", f"{host_failure(e)}, in the reset after the input") \
                from None

    def check(self) -> None:
        """The oracles on the devices and memory (the runner checks logs and RSS)."""
        self.guards.check()
        self.disks.check()
        check_virtio(self.transports)

    def power_stop(self, stop: Stop) -> None:
        """A stop by a device's power line: fine for a target whose devices have one."""
        if not self.target.power:
            raise Finding("vmm-stop", f"{stop.reason}, on a target whose devices cannot "
                          "power off or reboot")

    def close(self) -> None:
        for t in self.transports:
            t.device.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class KvmRig(_Rig):
    """The target's devices in a real VM, driven by the op interpreter."""

    def __init__(self, target: Target, workdir: Path | None = None, trace: Any = None) -> None:
        from kvmpy.machine import Machine
        from kvmpy.options import flat_machine

        image = interpreter_path()
        self.console = ConsoleSink()
        config = flat_machine(image, mode="long", mem=FUZZ_MEM)
        self.machine = Machine(config._replace(console=self.console, trace=trace))
        self.memory, self.pio, self.mmio = self.machine.memory, self.machine.pio, \
            self.machine.mmio
        self.mmio.insert(layout.FUZZ_COPIER, layout.FUZZ_COPIER_SIZE, OpCopier(self.memory),
                         "fuzz-copier")
        try:
            self._setup(target, workdir)
            from kvmpy.state.reset import mark

            self.integrity = Integrity(self.memory, image.stat().st_size)
            self.run(fops.prelude(self.windows))
            self.machine.rearm()  # (a reset does this after each input)
            self.point = mark(self.machine)
        except BaseException:
            self.machine.close()
            raise

    def _register(self, section: str, attr: str, device: Any) -> None:
        setattr(self.machine, attr, device)  # Machine.stateful() finds it by this name

    def add_serial(self) -> None:
        pass  # every Machine has COM1

    def _register_virtio(self, transport: VirtioMmioTransport, gpa: int) -> None:
        self.machine.virtio.append((transport, gpa, 0))

    def _stop(self, stop: Stop) -> None:
        self.machine.request_stop(stop)

    def run(self, ops: list[fops.Op]) -> None:
        encoded = fops.encode(ops)
        self.memory.write(layout.FUZZ_OPS, encoded)
        self.integrity.ops = encoded
        self.power_request = None
        stop = self.machine.run()
        self._judge(stop)

    def _judge(self, stop: Stop) -> None:
        if stop.kind is StopKind.DEBUG_EXIT and stop.status == 0:
            return  # the interpreter's own end
        if stop.kind is StopKind.ERROR:
            raise Finding("exception", stop.reason)
        if self.power_request is not None:
            self.power_stop(stop)
            return
        if stop.kind in (StopKind.FAULT, StopKind.POWEROFF) and not self.integrity.intact():
            return  # the guest pointed a device at its own code or tables: its own doing
        raise Finding("vmm-stop", f"the guest stopped: {stop.reason}"
                      + (" (its code, tables and op list intact)"
                         if stop.kind in (StopKind.FAULT, StopKind.POWEROFF) else ""))

    def hang_is_guests(self) -> bool:
        """After a hang: whether the guest looped because it wrote over itself."""
        return not self.integrity.intact()

    def close(self) -> None:
        self.point.close()
        super().close()
        _unmapping(self.machine.close)


class OpCopier:
    """The interpreter's RAM writes: a doorbell that takes the guest address of a RAM_WRITE
    op in the op list and does it and the RAM writes right after it (one exit for the
    lot), inside the arena only (the decoder never asks for more; a corrupted op list
    gets nothing else)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        memory, unpack, op_size = self.memory, fops.HEADER.unpack_from, fops.OP_SIZE
        gpa = int.from_bytes(data, "little")
        region = next((r for r in memory if r.gpa <= gpa < r.end), None)
        if region is None:
            return
        ops = memory._view(gpa, region.end - gpa)  # the list from this op on: one window
        pos, end = 0, len(ops)
        while pos + op_size <= end:
            kind, _, _, count, address, _ = unpack(ops, pos)
            pos += op_size
            if kind != fops.RAM_WRITE or pos + count > end:
                return
            if layout.FUZZ_ARENA <= address and address + count <= layout.FUZZ_ARENA_END:
                # one copy, window to window (a memoryview copy is a memmove: a
                # corrupted list that reaches into the arena still copies right)
                memory.view(address, count)[:] = ops[pos : pos + count]
            pos += count + -count % 8


class BusRig(_Rig):
    """The target's devices on buses, without KVM; the ops run in Python."""

    def __init__(self, target: Target, workdir: Path | None = None) -> None:
        from kvmpy.state.reset import mark

        self.memory = GuestMemory.anonymous(FUZZ_MEM, hole=(layout.MMIO_HOLE,
                                                            layout.MMIO_HOLE_END))
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.console = ConsoleSink()
        self.owners: dict[str, Any] = {}
        self.stopped: Stop | None = None
        self.vm = _NoKvm(self.memory)
        self.threads = None
        self.paused = False
        self._setup(target, workdir)
        self.run(fops.prelude(self.windows))
        self.point = mark(self)  # type: ignore[arg-type]

    def _register(self, section: str, attr: str, device: Any) -> None:
        self.owners[section] = device

    def add_serial(self) -> None:
        from kvmpy.devices.serial import Serial

        self.add_pio("serial0", "serial", layout.COM1_PORT, 8,
                     Serial(NullIrq(), self.console.write))

    def _register_virtio(self, transport: VirtioMmioTransport, gpa: int) -> None:
        self.owners[f"virtio{len(self.transports) - 1}"] = transport

    def _stop(self, stop: Stop) -> None:
        if self.stopped is None:
            self.stopped = stop

    def run(self, ops: list[fops.Op]) -> None:
        self.power_request = None
        self.stopped = None
        memory, pio, mmio = self.memory, self.pio, self.mmio
        for op in ops:
            kind, size, times, address, value, data = op
            try:
                if kind == fops.RAM_WRITE:
                    memory.write(address, data)
                    continue
                bus = pio if kind in (fops.PIO_WRITE, fops.PIO_READ) else mmio
                # the device, found once for all of the op's accesses, as a vCPU's
                # exit finds it (kvmpy.exitloop); an address without one goes to the
                # bus, which counts it
                hit = bus.lookup(address)
                device: Any = bus if hit is None else hit[0]
                offset = address if hit is None else hit[1]
                if kind in (fops.PIO_WRITE, fops.MMIO_WRITE):
                    mask = (1 << 8 * size) - 1
                    for i in range(times):
                        device.write(offset, ((value + i) & mask).to_bytes(size, "little"))
                        if self.stopped:
                            break
                else:
                    read = device.read
                    for _ in range(times):
                        read(offset, size)
            except Exception as e:
                from kvmpy.vcpu_threads import host_failure

                raise Finding("exception", f"{host_failure(e)}, on {_describe(op)}") from None
            if self.stopped is not None:
                self.power_stop(self.stopped)
                return

    def hang_is_guests(self) -> bool:
        return False  # no guest code here to loop

    # -- what kvmpy.state.reset asks of a machine -----------------------------------------
    def settle(self) -> None:
        pass

    def rearm(self) -> None:
        pass

    def capture_state(self) -> dict[str, Any]:
        return {name: owner.state() for name, owner in self.owners.items()}

    def restorer(self, sections: dict[str, Any]) -> Callable[[], None]:
        from kvmpy.state.values import restorer

        puts = [restorer(owner, sections[name], name) for name, owner in self.owners.items()]

        def restore() -> None:
            for put in puts:
                put()
        return restore

    def close(self) -> None:
        self.point.close()
        super().close()
        _unmapping(self.memory.close)


class _NoKvm:
    """The VM as kvmpy.state.reset sees it, with no KVM: slots, and a dirty log that is
    always clean (nothing but kvmpy writes this RAM, and those writes are tracked)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.fd = -1
        self.memory_slots = [(i, r.gpa, r.size, 0) for i, r in enumerate(memory)]

    def dirty_log(self, slot: int, pages: int) -> bytes:
        return bytes(-(-pages // 8))

    def log_dirty_pages(self, on: bool) -> None:
        pass


def _unmapping(close: Callable[[], None]) -> None:
    """`close`, which unmaps guest RAM, once the tracebacks of what the run caught (cycles
    through frames that hold windows on it) are collected; if something still holds
    one, the mapping stays until the process ends."""
    import gc

    gc.collect()
    try:
        close()
    except BufferError:
        pass


def _describe(op: fops.Op) -> str:
    names = {fops.PIO_WRITE: "port write", fops.PIO_READ: "port read",
             fops.MMIO_WRITE: "MMIO write", fops.MMIO_READ: "MMIO read"}
    value = f" of {op.value:#x}" if op.kind in (fops.PIO_WRITE, fops.MMIO_WRITE) else ""
    return f"{names.get(op.kind, 'op')} {op.size} at {op.address:#x}{value}"
