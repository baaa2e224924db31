"""Exit statistics: installed as wrapping handlers, counted per reason, port, page, device."""

import json
import threading

from test_trace_fakes import FakeVcpu, machine

from kvmpy.bus import Bus
from kvmpy.exitloop import VcpuLoop
from kvmpy.kvm.exits import ExitReason
from kvmpy.memory import GuestMemory
from kvmpy.trace.stats import ExitStats, format_table

IO_OUT, IO_IN = 1, 0
DATA = 0x200  # where the fake kvm_run page keeps port data


class Echo:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([0x5A]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def loop_with_devices(stats: bool) -> tuple[FakeVcpu, VcpuLoop, Echo]:
    vcpu = FakeVcpu()
    pio, mmio = Bus("pio"), Bus("mmio")
    dev = Echo()
    pio.insert(0x3F8, 8, dev, "serial0")
    mmio.insert(0xE0000000, 0x1000, dev, "testdev")
    loop = VcpuLoop(vcpu, GuestMemory.from_buffer(bytearray(0x1000)), pio, mmio,  # type: ignore[arg-type]
                    stats=stats)
    return vcpu, loop, dev


def exit_io(vcpu: FakeVcpu, loop: VcpuLoop, port: int, direction: int = IO_OUT) -> None:
    vcpu.set_exit(ExitReason.IO, "<BBHIQ", direction, 1, port, 1, DATA)
    vcpu.page[DATA] = 0x41
    loop.handlers[ExitReason.IO]()


def exit_mmio(vcpu: FakeVcpu, loop: VcpuLoop, gpa: int, write: bool) -> None:
    vcpu.set_exit(ExitReason.MMIO, "<Q8sIB", gpa, b"\x01" * 8, 4, int(write))
    loop.handlers[ExitReason.MMIO]()


def test_without_stats_the_handlers_are_the_loops_own_methods() -> None:
    _, loop, _ = loop_with_devices(stats=False)
    assert loop.exit_stats is None
    assert loop.handlers[ExitReason.IO] == loop.on_io
    assert loop.handlers[ExitReason.MMIO] == loop.on_mmio


def test_counts_and_times_per_reason_port_page_and_device() -> None:
    vcpu, loop, dev = loop_with_devices(stats=True)
    for _ in range(3):
        exit_io(vcpu, loop, 0x3F8)
    exit_io(vcpu, loop, 0x3FD, IO_IN)
    assert vcpu.page[DATA] == 0x5A  # the wrapped IN still put the device's value in kvm_run
    exit_io(vcpu, loop, 0x80)  # nobody's port
    exit_mmio(vcpu, loop, 0xE0000010, write=True)
    exit_mmio(vcpu, loop, 0xE0000010, write=False)
    vcpu.set_exit(ExitReason.HLT)
    assert loop.handlers[ExitReason.HLT]() is not None
    assert len(dev.writes) == 4  # the wrapped handlers still did their work
    stats = loop.stats()
    assert stats["exits"] == 8
    assert stats["by_reason"] == {"IO": 5, "MMIO": 2, "HLT": 1}
    assert stats["by_address"] == {"pio:0x3f8": 3, "mmio:0xe0000000": 2, "pio:0x3fd": 1,
                                   "pio:0x80": 1}
    assert stats["by_device"] == {"serial0": 4, "testdev": 2, "(none)": 1}
    times = stats["handler_us"]
    assert set(times["by_reason"]) == {"IO", "MMIO", "HLT"}
    assert all(t >= 0 for t in times["by_address"].values())
    assert set(times["by_device"]) == {"serial0", "testdev", "(none)"}
    json.dumps(stats)


def test_table_lists_every_counter() -> None:
    vcpu, loop, _ = loop_with_devices(stats=True)
    exit_io(vcpu, loop, 0x3F8)
    exit_mmio(vcpu, loop, 0xE0000000, write=True)
    table = format_table({"vcpus": [loop.stats()], "unhandled_pio": {"0x80": 2}})
    for word in ("reason", "IO", "MMIO", "pio:0x3f8", "mmio:0xe0000000", "serial0", "testdev",
                 "unclaimed pio accesses: 0x80 x2"):
        assert word in table


def test_stats_can_be_read_while_another_thread_counts() -> None:
    vcpu, loop, _ = loop_with_devices(stats=True)
    done = threading.Event()

    def count() -> None:
        for i in range(20000):
            exit_io(vcpu, loop, 0x3F8 + i % 8)
        done.set()

    t = threading.Thread(target=count)
    t.start()
    while not done.is_set():
        loop.stats()  # must never raise "dictionary changed size during iteration"
    t.join()
    assert loop.stats()["by_reason"]["IO"] == 20000


def test_handlers_added_later_are_not_counted() -> None:
    _, _, loop = machine()
    stats = ExitStats.install(loop)
    loop.handlers[ExitReason.DEBUG] = lambda: None
    loop.handlers[ExitReason.DEBUG]()
    assert ExitReason.DEBUG not in stats.exits
