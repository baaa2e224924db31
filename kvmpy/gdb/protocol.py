"""The gdb remote serial protocol's framing: packets, checksums, escapes, acks.

    $<payload>#<two hex digits of the payload's byte sum mod 256>

What it is: `PacketReader` turns the bytes gdb sends into events (a packet
with a good checksum, a bad one to NAK, an ack, or the 0x03 byte that means
Ctrl-C), and `frame` builds a packet to send, escaping the four bytes the
protocol reserves. GDB manual, Appendix E "GDB Remote Serial Protocol",
sections "Overview" (framing, escapes, run-length encoding) and "Interrupts".

What it is not: the meaning of a packet. The stub (kvmpy.gdb.stub) decides
that. This module is pure, so the parser is fuzzed with hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

ESCAPE = 0x7D  # '}': the next byte is XOR 0x20
RESERVED = frozenset(b"#$}*")
INTERRUPT = 0x03  # Ctrl-C outside a packet
MAX_PACKET = 64 * 1024  # longer packets are dropped (gdb keeps to our PacketSize)


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(payload: bytes) -> bytes:
    out = bytearray()
    for b in payload:
        if b in RESERVED:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo `escape` (binary data in X packets and in packets generally)."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def expand_rle(data: bytes) -> bytes:
    """Expand run-length encoding: `X*n` repeats X (ord(n) - 29) more times."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == ord("*") and out and i + 1 < len(data):
            out += bytes([out[-1]]) * max(0, data[i + 1] - 29)
            i += 2
            continue
        out.append(b)
        i += 1
    return bytes(out)


def frame(payload: bytes) -> bytes:
    body = escape(payload)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode()


@dataclass(frozen=True)
class Event:
    kind: str  # "packet", "bad", "ack", "nak", "interrupt"
    payload: bytes = b""


class PacketReader:
    """Incremental parser: feed it whatever recv() returned, iterate the events."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_packet = False

    def feed(self, data: bytes) -> Iterator[Event]:
        self._buf += data
        while True:
            event = self._next()
            if event is None:
                return
            yield event

    def _next(self) -> Event | None:
        buf = self._buf
        while buf and not self._in_packet:
            b = buf[0]
            if b == ord("$"):
                self._in_packet = True
                break
            del buf[0]
            if b == ord("+"):
                return Event("ack")
            if b == ord("-"):
                return Event("nak")
            if b == INTERRUPT:
                return Event("interrupt")
            # anything else between packets is line noise: skip it
        if not self._in_packet:
            return None
        end = buf.find(b"#")
        if end < 0:
            if len(buf) > MAX_PACKET:
                del buf[:]
                self._in_packet = False
                return Event("bad")
            return None
        if len(buf) < end + 3:
            return None
        body = bytes(buf[1:end])
        sent = bytes(buf[end + 1 : end + 3])
        del buf[: end + 3]
        self._in_packet = False
        try:
            ok = int(sent, 16) == checksum(body)
        except ValueError:
            ok = False
        if not ok:
            return Event("bad")
        return Event("packet", unescape(expand_rle(body)))


def hex_to_bytes(text: str | bytes) -> bytes:
    return bytes.fromhex(text.decode() if isinstance(text, bytes) else text)


def parse_hex(text: str) -> int:
    """A gdb hex number; raises ValueError on anything else."""
    if not text or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"not a hex number: {text!r}")
    return int(text, 16)
