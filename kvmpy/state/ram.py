"""Guest RAM in a snapshot: one file a restore maps privately, zero pages left as holes.

What it is: `save_ram` writes every region of a `GuestMemory` end to end into one
file (region i at the sum of the sizes before it), writing only the pages that hold
something: a page of zeros stays a hole, so a 1 GiB guest that used 40 MiB takes
40 MiB of disk. `map_ram` maps that file back as guest RAM with MAP_PRIVATE, so a
restore reads nothing up front: the host kernel brings each page in when the guest
(or a device) first touches it, and the guest's writes go to private copies, never
to the file, so any number of processes can restore the same snapshot at once.

Only pages the guest may have written are read: for anonymous memory the ones
/proc/self/pagemap says were ever touched (a 1 GiB guest that used 40 MiB costs a scan
of 40 MiB), and of those, the ones that are not all zeros are written.

The file's digest (`digest` in the metadata) is SHA-256 over the runs of non-zero
pages, each preceded by its offset and length: it does not depend on which zero
pages the file system keeps as holes (a copy made without holes has the same
digest). Checking it reads every page the guest used, so a restore does it only
when asked (`verify_ram`); what a restore always checks is the file's size and
region layout, which is what the host's safety depends on. RAM contents are the
guest's own data: a changed page changes what the guest sees, as a guest writing
its own memory would, and cannot reach the host.

What it is not: incremental. Every snapshot writes the whole of what the guest uses
(the dirty-page tracking of a fast reset or a migration is their own business).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kvmpy.errors import SnapshotError
from kvmpy.memory import GuestMemory, Region

PAGE = 4096
SCAN = 64 * 1024  # zero test granularity before going page by page
_ZERO_SCAN = bytes(SCAN)
_ZERO_PAGE = bytes(PAGE)
_RUN = struct.Struct("<QQ")


def layout(spans: Iterable[tuple[int, int]]) -> list[list[int]]:
    """[gpa, size, file offset] of every (gpa, size) region, as the metadata records it."""
    out, offset = [], 0
    for gpa, size in spans:
        out.append([gpa, size, offset])
        offset += size
    return out


def _runs(buf: Any, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every maximal run of non-zero pages in buf[start:end]
    (page-aligned bounds); slicing `buf` (an mmap or bytearray) copies, which is
    far faster to compare than a memoryview."""
    run_start = None
    for chunk in range(start, end, SCAN):
        chunk_end = min(chunk + SCAN, end)
        if chunk_end - chunk == SCAN and buf[chunk:chunk_end] == _ZERO_SCAN:
            if run_start is not None:
                yield run_start, chunk - run_start
                run_start = None
            continue
        for page in range(chunk, chunk_end, PAGE):
            if buf[page:page + PAGE] == _ZERO_PAGE:
                if run_start is not None:
                    yield run_start, page - run_start
                    run_start = None
            elif run_start is None:
                run_start = page
    if run_start is not None:
        yield run_start, end - run_start


def _touched(region: Region) -> list[tuple[int, int]]:
    """[start, end) offsets in `region.buffer` of the pages the process ever touched
    (present or swapped out, says /proc/self/pagemap), for anonymous memory, where any
    other page reads as zeros; the whole region where pagemap cannot be read."""
    first = region.host_address // PAGE
    pages = region.size // PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(first * 8)
            entries = f.read(pages * 8)
    except OSError:
        entries = b""
    if len(entries) != pages * 8:
        return [(region.offset, region.offset + region.size)]
    # bit 63 present, bit 62 swapped: the top byte of each little-endian u64, one per page
    flags = entries[7::8].translate(_TOUCHED)
    return [(region.offset + m.start() * PAGE, region.offset + m.end() * PAGE)
            for m in re.finditer(b"\x01+", flags)]


_TOUCHED = bytes(int(bool(b & 0xC0)) for b in range(256))


def used_runs(memory: GuestMemory, region: Region) -> Iterator[tuple[int, int]]:
    """(offset in `region.buffer`, length) of every run of non-zero pages of `region`:
    of anonymous memory, only the pages ever touched are read."""
    base = region.offset
    spans = _touched(region) if memory.anonymous_backing else [(base, base + region.size)]
    for span in spans:
        yield from _runs(region.buffer, *span)


def save_ram(memory: GuestMemory, path: Path) -> dict[str, Any]:
    """Write `memory` to a new file at `path`; returns the metadata that describes it."""
    import hashlib  # (here: OpenSSL's, fast over megabytes, is start-up a restore skips)

    regions = layout((region.gpa, region.size) for region in memory)
    total = sum(size for _, size, _ in regions)
    digest = hashlib.sha256()
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, total)
        for region, (_, _, file_offset) in zip(memory, regions, strict=True):
            base = region.offset
            for start, length in used_runs(memory, region):
                data = region.view[start - base : start - base + length]
                offset = file_offset + start - base
                digest.update(_RUN.pack(offset, length))
                digest.update(data)
                _pwrite_all(fd, data, offset)
                written += length
    finally:
        os.close(fd)
    return {"file": path.name, "size": total, "regions": regions, "data_bytes": written,
            "digest": digest.hexdigest()}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def map_ram(path: Path, regions: list[list[int]]) -> GuestMemory:
    """The file as guest RAM, each region a private mapping of its part of the file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        maps = [(gpa, mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset))
                for gpa, size, offset in regions]
    finally:
        os.close(fd)
    return GuestMemory(maps)


def verify_ram(path: Path, expected_digest: str, what: str) -> None:
    """Read every data extent of the file and compare its digest; SnapshotError if not."""
    import hashlib

    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        buf: bytes | mmap.mmap = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
        for start, end in _data_extents(fd, size):
            for offset, length in _runs(buf, start, end):
                digest.update(_RUN.pack(offset, length))
                digest.update(buf[offset:offset + length])
    finally:
        os.close(fd)
    if digest.hexdigest() != expected_digest:
        raise SnapshotError(f"{what}: guest RAM does not match its digest (changed since "
                            "the snapshot was taken)")


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Page-aligned [start, end) of the file's data, holes skipped (SEEK_DATA/SEEK_HOLE);
    the whole file where the file system cannot say. A run cannot span a hole, so
    scanning extents finds the same runs as scanning everything."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                return
            yield offset, size
            return
        start = max(offset, start - start % PAGE)  # (never back into the last extent)
        end = min(size, -(-end // PAGE) * PAGE)
        yield start, end
        offset = end
