"""The saved-state stream: a versioned sequence of named sections, for a file or a socket.

What it is: the small state of a VM (vCPUs, the in-kernel irqchip, every device) as
one byte stream. Each owner's `state()` becomes one section, its value JSON-encoded:

    header   8 bytes  b"KVMPYSTA"
             u32      format version (FORMAT_VERSION)
    section  u16      name length          name: [a-z0-9][a-z0-9._-]*, at most 64 bytes
             u32      payload length       at most MAX_SECTION bytes
             u32      CRC-32 of name and payload
             name, then payload (UTF-8 JSON)
    ...
    end      a section named "end" with an empty payload

All integers little-endian. A reader needs no length up front, so the same bytes can
be written to a file (`encode`, `decode`) or sent over a socket and read as they
arrive (`read_sections` on any binary file object); the "end" section tells a
complete stream from a cut one. Guest RAM is not in it: RAM is large and
goes its own way (a file mapped at restore, pages sent in rounds by a migration).

What it is not: a check of what the sections say. Every owner checks its own
values when it restores them (kvmpy.state.values); this module only guarantees
that what comes out is exactly what went in, or a one-line SnapshotError.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

from kvmpy.errors import SnapshotError

MAGIC = b"KVMPYSTA"
FORMAT_VERSION = 1
MAX_SECTION = 16 << 20  # bytes of JSON in one section (an XSAVE area is a few KiB)
MAX_SECTIONS = 1024
MAX_NAME = 64
END = "end"

_HEADER = struct.Struct("<8sI")
_SECTION = struct.Struct("<HII")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")


def check_name(name: str) -> None:
    if not _NAME.match(name) or len(name) > MAX_NAME or name == END:
        raise ValueError(f"section name {name!r}: [a-z0-9][a-z0-9._-]*, at most {MAX_NAME}")


def write_sections(out: BinaryIO, sections: Mapping[str, Any]) -> int:
    """Write the header, every section in order, and the end; returns bytes written."""
    written = out.write(_HEADER.pack(MAGIC, FORMAT_VERSION))
    for name, value in sections.items():
        check_name(name)
        payload = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        if len(payload) > MAX_SECTION:
            raise ValueError(f"section {name}: {len(payload)} bytes, more than {MAX_SECTION}")
        written += _write_section(out, name.encode(), payload)
    return written + _write_section(out, END.encode(), b"")


def _write_section(out: BinaryIO, name: bytes, payload: bytes) -> int:
    crc = zlib.crc32(payload, zlib.crc32(name))
    return out.write(_SECTION.pack(len(name), len(payload), crc) + name + payload)


def read_sections(inp: BinaryIO, what: str = "saved state") -> dict[str, Any]:
    """Read a whole stream up to its end; SnapshotError (one line) for anything else."""
    magic, version = _HEADER.unpack(_exactly(inp, _HEADER.size, what, "its header"))
    if magic != MAGIC:
        raise SnapshotError(f"{what}: not a kvmpy state stream")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{what}: state format version {version}; this kvmpy reads "
                            f"version {FORMAT_VERSION}")
    sections: dict[str, Any] = {}
    while True:
        name_len, length, crc = _SECTION.unpack(
            _exactly(inp, _SECTION.size, what, f"section {len(sections)}"))
        if not 0 < name_len <= MAX_NAME or length > MAX_SECTION:
            raise SnapshotError(f"{what}: section {len(sections)} has a bad header")
        raw_name = _exactly(inp, name_len, what, f"section {len(sections)}")
        payload = _exactly(inp, length, what, f"section {len(sections)}")
        if zlib.crc32(payload, zlib.crc32(raw_name)) != crc:
            raise SnapshotError(f"{what}: section {len(sections)} is damaged (CRC mismatch)")
        name = raw_name.decode("ascii", "replace")
        if name == END:
            if length:
                raise SnapshotError(f"{what}: the end section has a payload")
            return sections
        if not _NAME.match(name) or name in sections or len(sections) >= MAX_SECTIONS:
            raise SnapshotError(f"{what}: bad, repeated or too many sections ({name!r})")
        try:
            sections[name] = json.loads(payload, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise SnapshotError(f"{what}: section {name} is not JSON ({type(e).__name__})") \
                from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a state value")


def _exactly(inp: BinaryIO, n: int, what: str, where: str) -> bytes:
    data = inp.read(n)
    if data is None or len(data) != n:
        raise SnapshotError(f"{what}: ends inside {where} (truncated)")
    return data


def encode(sections: Mapping[str, Any]) -> bytes:
    out = io.BytesIO()
    write_sections(out, sections)
    return out.getvalue()


def decode(data: bytes, what: str = "saved state") -> dict[str, Any]:
    """A stream held in memory (a file read whole); bytes after its end are refused."""
    inp = io.BytesIO(data)
    sections = read_sections(inp, what)
    if inp.tell() != len(data):
        raise SnapshotError(f"{what}: {len(data) - inp.tell()} bytes after the end")
    return sections
