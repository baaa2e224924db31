"""virtio-blk against a temporary image file, driven through the MMIO transport."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import log as kvmpy_log
from kvmpy.bus import NullIrq
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory
from kvmpy.virtio import blk as blkmod
from kvmpy.virtio.blk import (
    QUEUE_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    Block,
)
from kvmpy.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET, LogOnce
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.mmio import VirtioMmioTransport

SECTORS = 64
PATTERN = bytes((i * 7) & 0xFF for i in range(SECTORS * 512))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(PATTERN)
    return path


def attach(path: Path, **kw: object) -> tuple[Block, GuestDriver]:
    dev = Block(str(path), **kw)  # type: ignore[arg-type]
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    t = VirtioMmioTransport(dev, mem, NullIrq())
    d = GuestDriver(t, mem)
    assert d.init()
    return dev, d


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def request(d: GuestDriver, out: list[bytes], in_: list[int], **kw: bool
            ) -> tuple[int, list[bytes]]:
    """Submit one request; returns (used length, writable buffers)."""
    d.add_chain(0, out, in_, **kw)
    [(_, length, bufs)] = d.used(0)
    return length, bufs


def test_config_space_and_features(image: Path) -> None:
    dev, d = attach(image)
    assert struct.unpack("<Q", d.config(0, 8))[0] == SECTORS
    assert struct.unpack("<I", d.config(12, 4))[0] == QUEUE_SIZE - 2  # seg_max: header, status
    assert struct.unpack("<I", d.config(20, 4))[0] == 512  # blk_size
    assert not d.acked & (1 << VIRTIO_BLK_F_RO)
    assert d.acked & (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    dev.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_read_sectors_into_scattered_buffers(image: Path, indirect: bool) -> None:
    dev, d = attach(image)
    length, bufs = request(d, [header(VIRTIO_BLK_T_IN, 3)], [512, 1024, 1], indirect=indirect)
    assert length == 1537
    assert bufs[0] + bufs[1] == PATTERN[3 * 512 : 6 * 512]
    assert bufs[2] == bytes([VIRTIO_BLK_S_OK])
    dev.close()


def test_write_then_read_back(image: Path) -> None:
    dev, d = attach(image)
    data = os.urandom(1024)
    # header and data in one readable descriptor, data split differently: layout-agnostic
    length, bufs = request(d, [header(VIRTIO_BLK_T_OUT, 10) + data[:100], data[100:]], [1])
    assert (length, bufs) == (1, [b"\0"])
    assert image.read_bytes()[10 * 512 : 12 * 512] == data
    _, bufs = request(d, [header(VIRTIO_BLK_T_IN, 10)], [1025])  # data and status together
    assert bufs[0] == data + b"\0"
    dev.close()


def test_requests_use_guest_memory_directly(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel copies the file into the guest's own pages: one preadv, whose iovec
    names the request's data buffer by its host address in guest RAM."""
    dev, d = attach(image)
    seen: list[tuple[int, int]] = []
    real = blkmod.preadv

    def spy(fd: int, iov: int, count: int, offset: int) -> int:
        entries = (ctypes.c_uint64 * (2 * count)).from_address(iov)
        seen.extend(zip(entries[0::2], entries[1::2], strict=True))
        return real(fd, iov, count, offset)

    monkeypatch.setattr(blkmod, "preadv", spy)
    request(d, [header(VIRTIO_BLK_T_IN, 0)], [4096, 1])
    region = d.mem.regions[0]
    (address, length), = seen
    assert length == 4096
    assert ctypes.string_at(address, 4096) == PATTERN[:4096]
    assert region.host_address <= address <= region.host_address + region.size - 4096
    dev.close()


def test_read_only_disk_refuses_writes(image: Path) -> None:
    dev, d = attach(image, read_only=True)
    assert d.acked & (1 << VIRTIO_BLK_F_RO)
    assert not d.acked & (1 << VIRTIO_BLK_F_DISCARD)
    _, bufs = request(d, [header(VIRTIO_BLK_T_OUT, 0), b"x" * 512], [1])
    assert bufs == [bytes([VIRTIO_BLK_S_IOERR])]
    assert image.read_bytes() == PATTERN
    _, bufs = request(d, [header(VIRTIO_BLK_T_IN, 0)], [512, 1])
    assert bufs == [PATTERN[:512], b"\0"]
    dev.close()


@pytest.mark.parametrize("out, in_, status", [
    ([header(VIRTIO_BLK_T_IN, SECTORS - 1)], [1024, 1], VIRTIO_BLK_S_IOERR),  # past the end
    ([header(VIRTIO_BLK_T_IN, 2**64 - 1)], [512, 1], VIRTIO_BLK_S_IOERR),
    ([header(VIRTIO_BLK_T_IN, 0)], [100, 1], VIRTIO_BLK_S_IOERR),  # not whole sectors
    ([header(VIRTIO_BLK_T_OUT, SECTORS), b"y" * 512], [1], VIRTIO_BLK_S_IOERR),
    ([header(99, 0)], [1], VIRTIO_BLK_S_UNSUPP),
    ([header(VIRTIO_BLK_T_FLUSH, 0)], [1], VIRTIO_BLK_S_OK),
])
def test_request_status(image: Path, out: list[bytes], in_: list[int], status: int) -> None:
    dev, d = attach(image)
    _, bufs = request(d, out, in_)
    assert bufs[-1][-1] == status
    assert image.read_bytes() == PATTERN
    dev.close()


def test_get_id(image: Path) -> None:
    dev, d = attach(image, serial="kvmpy-disk-0")
    length, bufs = request(d, [header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert bufs[0] == b"kvmpy-disk-0".ljust(20, b"\0") and length == 21
    dev.close()


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def test_discard_and_write_zeroes(image: Path) -> None:
    dev, d = attach(image)
    if not dev.can_punch:
        pytest.skip("file system cannot punch holes")
    _, bufs = request(d, [header(VIRTIO_BLK_T_DISCARD), segment(8, 8)], [1])
    assert bufs == [b"\0"]
    _, bufs = request(d, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(20, 2)], [1])
    assert bufs == [b"\0"]
    _, bufs = request(d, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(30, 1, 1)], [1])  # unmap
    assert bufs == [b"\0"]
    content = image.read_bytes()
    assert content[8 * 512 : 16 * 512] == bytes(8 * 512)
    assert content[20 * 512 : 22 * 512] == bytes(1024)
    assert content[30 * 512 : 31 * 512] == bytes(512)
    assert content[:8 * 512] == PATTERN[:8 * 512] and len(content) == len(PATTERN)
    # §5.2.6.2: unmap on a discard, unknown flags -> UNSUPP; too many segments -> IOERR
    for out, status in (([segment(0, 1, 1)], VIRTIO_BLK_S_UNSUPP),
                        ([segment(0, 1, 4)], VIRTIO_BLK_S_UNSUPP),
                        ([segment(0, 1), segment(2, 1)], VIRTIO_BLK_S_IOERR),
                        ([segment(SECTORS, 1)], VIRTIO_BLK_S_IOERR)):
        _, bufs = request(d, [header(VIRTIO_BLK_T_DISCARD), *out], [1])
        assert bufs == [bytes([status])]
    dev.close()


def test_write_zeroes_without_zero_range(image: Path) -> None:
    dev, d = attach(image)
    dev.can_zero_range = False
    _, bufs = request(d, [header(VIRTIO_BLK_T_WRITE_ZEROES), segment(1, 3)], [1])
    assert bufs == [b"\0"]
    assert image.read_bytes()[512 : 4 * 512] == bytes(3 * 512)
    dev.close()


@pytest.mark.parametrize("out, in_", [
    ([b"short"], [1]),  # no 16-byte header
    ([header(VIRTIO_BLK_T_IN)], []),  # no status byte
])
def test_unanswerable_request_needs_reset(image: Path, out: list[bytes], in_: list[int]) -> None:
    dev, d = attach(image)
    d.add_chain(0, out, in_)
    assert d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    assert d.used(0) == []
    dev.close()


def test_unusable_disks_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        Block(str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match="not a regular file"):
        Block(str(tmp_path), read_only=True)


blk_requests = st.lists(st.tuples(
    st.sampled_from([0, 1, 4, 8, 11, 13, 14, 99, 2**32 - 1]),
    st.integers(0, SECTORS + 2) | st.integers(0, 2**64 - 1),
    st.lists(st.integers(0, 1100), max_size=3),  # readable payload sizes
    st.lists(st.integers(0, 1100), max_size=3),  # writable sizes (status is the last byte)
    st.booleans(),
), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(reqs=blk_requests, read_only=st.booleans())
def test_random_requests_complete_or_reset(tmp_path_factory: pytest.TempPathFactory,
                                           reqs, read_only) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("blk") / "d.img"
    path.write_bytes(PATTERN)
    dev, d = attach(path, read_only=read_only)
    for rtype, sector, outs, ins, indirect in reqs:
        d.reset_heap()
        out = [header(rtype, sector)] + [os.urandom(n) for n in outs]
        if not ins:
            ins = [1]
        d.add_chain(0, out, ins, indirect=indirect)
        done = d.used(0)
        if d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET:
            break
        [(_, length, bufs)] = done
        status = b"".join(bufs)[-1] if sum(ins) else None
        assert status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, None)
        assert 0 <= length <= sum(ins)
    assert os.path.getsize(path) == len(PATTERN)
    if read_only:
        assert path.read_bytes() == PATTERN
    dev.close()


def test_unknown_request_types_log_a_bounded_number_of_lines(
        image: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest-chosen 32-bit request type is not a log key: 2,000 types, a few lines."""
    monkeypatch.setattr(kvmpy_log, "_cli_level", None)
    dev, d = attach(image)
    with caplog.at_level("INFO", logger="kvmpy"):
        for rtype in range(1000, 3000):
            assert request(d, [header(rtype)], [1])[1] == [bytes([VIRTIO_BLK_S_UNSUPP])]
            d.reset_heap()
    assert len(caplog.records) == LogOnce.PER_SITE + 1
    assert sum(map(len, dev.warn.seen.values())) == LogOnce.PER_SITE + 1
