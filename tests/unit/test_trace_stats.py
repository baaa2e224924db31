"""Exit statistics: an observer of the loop, counting per reason, port, page and device."""

import json
import threading

from test_trace_fakes import FakeVcpu

from kvmpy.bus import Bus
from kvmpy.exitloop import VcpuLoop
from kvmpy.kvm.exits import SHUTDOWN, Debug, Hlt, IoIn, IoOut, MmioRead, MmioWrite
from kvmpy.memory import GuestMemory
from kvmpy.trace.stats import ExitStats, format_table


class Echo:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([0x5A]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def loop_with_devices() -> tuple[VcpuLoop, ExitStats, Echo]:
    pio, mmio = Bus("pio"), Bus("mmio")
    dev = Echo()
    pio.insert(0x3F8, 8, dev, "serial0")
    mmio.insert(0xE0000000, 0x1000, dev, "testdev")
    stats = ExitStats(0)
    loop = VcpuLoop(FakeVcpu(), GuestMemory.from_buffer(bytearray(0x1000)), pio, mmio,  # type: ignore[arg-type]
                    observers=[stats])
    return loop, stats, dev


def test_counts_and_times_per_reason_port_page_and_device() -> None:
    loop, stats, dev = loop_with_devices()
    for _ in range(3):
        loop.handle(IoOut(0x3F8, 1, b"A"))
    data = memoryview(bytearray(1))
    loop.handle(IoIn(0x3FD, 1, data))
    assert data[0] == 0x5A  # the observed IN still put the device's value in kvm_run
    loop.handle(IoOut(0x80, 1, b"A"))  # nobody's port
    loop.handle(MmioWrite(0xE0000010, b"\x01" * 4))
    loop.handle(MmioRead(0xE0000010, memoryview(bytearray(4))))
    assert loop.handle(Hlt(False)) is not None
    assert len(dev.writes) == 4  # the observed handlers still did their work
    snap = stats.snapshot()
    assert snap["exits"] == 8
    assert snap["by_reason"] == {"IO": 5, "MMIO": 2, "HLT": 1}
    assert snap["by_address"] == {"pio:0x3f8": 3, "mmio:0xe0000000": 2, "pio:0x3fd": 1,
                                  "pio:0x80": 1}
    assert snap["by_device"] == {"serial0": 4, "testdev": 2, "(none)": 1}
    times = snap["handler_us"]
    assert set(times["by_reason"]) == {"IO", "MMIO", "HLT"}
    assert all(t >= 0 for t in times["by_address"].values())
    assert set(times["by_device"]) == {"serial0", "testdev", "(none)"}
    assert snap["wall_s"] >= 0 and snap["mean_exit_us"] is not None
    json.dumps(snap)


def test_table_lists_every_counter() -> None:
    loop, stats, _ = loop_with_devices()
    loop.handle(IoOut(0x3F8, 1, b"A"))
    loop.handle(MmioWrite(0xE0000000, b"\x01" * 4))
    table = format_table({"vcpus": [stats.snapshot()], "unhandled_pio": {"0x80": 2}})
    for word in ("reason", "IO", "MMIO", "pio:0x3f8", "mmio:0xe0000000", "serial0", "testdev",
                 "unclaimed pio accesses: 0x80 x2"):
        assert word in table


def test_stats_can_be_read_while_another_thread_counts() -> None:
    loop, stats, _ = loop_with_devices()
    done = threading.Event()

    def count() -> None:
        for i in range(20000):
            loop.handle(IoOut(0x3F8 + i % 8, 1, b"A"))
        done.set()

    t = threading.Thread(target=count)
    t.start()
    while not done.is_set():
        stats.snapshot()  # must never raise "dictionary changed size during iteration"
    t.join()
    assert stats.snapshot()["by_reason"]["IO"] == 20000


def test_exits_another_observer_takes_are_not_counted() -> None:
    class TakesDebug:
        def before(self, loop, exit):  # type: ignore[no-untyped-def]
            return isinstance(exit, Debug)

        def after(self, loop, exit, stop):  # type: ignore[no-untyped-def]
            pass

    stats = ExitStats(0)
    loop = VcpuLoop(FakeVcpu(), GuestMemory.from_buffer(bytearray(0x1000)),  # type: ignore[arg-type]
                    Bus("pio"), Bus("mmio"), observers=[TakesDebug(), stats])
    assert loop.handle(Debug(1, 0x1000, 0, 0)) is None  # taken: no "unexpected exit" stop
    loop.handle(SHUTDOWN)
    assert stats.snapshot()["by_reason"] == {"SHUTDOWN": 1}
