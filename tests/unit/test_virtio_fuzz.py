"""The fuzz harness itself: it runs clean on seeds and random bytes, and it catches bugs.

The 100,000-input runs live in `make fuzz`; this keeps a few hundred per device in CI.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.virtio.device import (
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_FAILED,
    VIRTIO_STATUS_FEATURES_OK,
)
from kvmpy.virtio.rng import Rng
from tests.fuzz_plants import plant_live_after_failed, plant_log_per_value, plant_whole_copy

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "virtio_fuzz.py"


@pytest.fixture(scope="module")
def harness() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("virtio_fuzz", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["virtio_fuzz"] = module
    spec.loader.exec_module(module)
    yield module
    module.uninstall_trap()
    del sys.modules["virtio_fuzz"]


# mode 0 (init), keep all features, queue size 2^8, then op 2 (valid request) ...
VALID = bytes([0, 128, 8])
SEEDS = {
    "blk": VALID + bytes([2, 0, 0, 3, 2, 2, 1, 1, 5, 2] + [7] * 512 + [3, 0, 0, 1]),
    "net": VALID + bytes([2, 0, 0, 0, 100, 2, 0, 1, 20] + [1] * 21 + [10, 0, 200]),
    "console": VALID + bytes([2, 0, 0, 9, 2, 0, 1, 5, 65, 66, 67, 68, 69, 10, 0, 3, 72, 73, 74]),
    "rng": VALID + bytes([2, 0, 10, 2, 1, 200, 0, 0, 0, 0, 1, 3]),
    # Tversion, Tattach, Twalk: requests 0, 1, 2 of the harness's 9p messages
    "9p": VALID + bytes([2, 0, 0, 0, 0, 2, 0, 1, 0, 0, 2, 0, 2, 0, 0]),
    # a REQUEST from guest port 5 to host port 1 (nothing listens: RST), then rx buffers
    "vsock": VALID + bytes([2, 0, 1, 0, 5, 1, 0, 0, 1, 0] + [0] * 9 + [2, 0, 0, 0]),
}


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_seed_inputs_do_real_work(harness: ModuleType, kind: str) -> None:
    harness.stats.clear()
    harness.run_one(kind, SEEDS[kind])
    assert harness.stats["init-ok"] == 1 and harness.stats["used"] >= 1


def test_a_planted_device_bug_is_caught(harness: ModuleType,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Rng, index: int) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(Rng, "process_queue", broken)
    with pytest.raises(harness.Failure, match="planted"):
        harness.run_one("rng", SEEDS["rng"])


def test_test_one_input_picks_the_device_from_the_first_byte(harness: ModuleType,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.delenv("KVMPY_FUZZ_DEVICE", raising=False)
    harness.stats.clear()
    harness.TestOneInput(bytes([3]) + SEEDS["rng"])  # 3 -> rng
    harness.TestOneInput(b"")
    assert harness.stats["inputs"] == 1


@pytest.mark.parametrize("kind", ["blk", "net", "console", "rng"])
def test_random_bytes(harness: ModuleType, kind: str) -> None:
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=8, max_size=1024))
    def prop(data: bytes) -> None:
        harness.run_one(kind, data)

    prop()


# op 11: a burst of 4,096 writes to QueueNotify (REGISTERS[11]) of queues 100, 101, ...
NOTIFY_BURST = VALID + bytes([11, 11, 0xFF, 0x0F, 100, 0, 0, 0])
# op 12: on the transmit queue, 1,024 indirect descriptors naming one 64 KiB buffer
CONSOLE_REPEAT = VALID + bytes([12, 1, 0, 0xFF, 0x03, 0xFF, 0xFF, 0])


def test_the_planted_log_flood_is_caught_by_the_log_oracle(
        harness: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old "log once": a key per guest-chosen value, no cap."""
    harness.run_one("rng", NOTIFY_BURST)  # the real code: a few lines
    plant_log_per_value(monkeypatch)
    with pytest.raises(harness.Failure, match=r"log flooding: \d+ lines"):
        harness.run_one("rng", NOTIFY_BURST)


def test_the_planted_memory_amplification_is_caught_by_the_memory_oracle(
        harness: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old console: a transmit chain copied whole into one bytes object."""
    monkeypatch.setattr(harness, "MEMORY_EVERY", 1)  # every input under tracemalloc
    harness.run_one("console", CONSOLE_REPEAT)  # the real code: pieces of 64 KiB
    plant_whole_copy(monkeypatch)
    with pytest.raises(harness.Failure, match="host memory: one input allocated"):
        harness.run_one("console", CONSOLE_REPEAT)


def test_the_planted_driver_ok_after_failed_is_caught(harness: ModuleType,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The old status machine: FAILED, then DRIVER_OK, and the device goes live."""
    ok = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
    # mode 1 (no init), then register writes (op 4): Status (REGISTERS[14]) 0, 1, 3;
    # DriverFeaturesSel (REGISTERS[6]) 1 and DriverFeatures ([5]) 1: VERSION_1; Status
    # FEATURES_OK, FAILED, FAILED|DRIVER_OK
    writes = [(14, 0), (14, 1), (14, 3), (6, 1), (5, 1), (14, ok),
              (14, ok | VIRTIO_STATUS_FAILED), (14, ok | VIRTIO_STATUS_FAILED | 4)]
    data = bytes([1]) + b"".join(bytes([4, 0, reg, 0, 0, value]) for reg, value in writes)
    harness.run_one("rng", data)
    plant_live_after_failed(monkeypatch)
    with pytest.raises(harness.Failure, match="device live with status 0x8f"):
        harness.run_one("rng", data)
