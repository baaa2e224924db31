"""Fuzz harness for kvmpy's 9P2000.L server: raw bytes in, one hostile 9p client out.

What it is: `TestOneInput(data)` (atheris/libFuzzer) and `run_one(data)`, which decode
the bytes into a session against a `NinePServer` over a fresh small tree, with no KVM
and no virtio (the guest-controlled input of virtio-9p is the message itself; the
transport's own chains are fuzzed by fuzz/virtio_fuzz.py's `9p` device):

    then, until the bytes run out, messages:
      type       mostly one Linux sends, sometimes any byte
      fields     each drawn from the message's real layout (fids from a small set,
                 names from a dictionary of escapes: "..", "/", absolute and relative
                 symlinks, NUL, long names...) or raw bytes, with string lengths and
                 the size field sometimes lying
      room       the reply room: mostly ample, sometimes below a header

What is checked after every message: `handle` returned (never raised); the reply is a
well-formed message (its size field is its length, its type Rlerror or the request's
plus one, an Rlerror is 11 bytes, it fits the room and msize); nothing was logged at
ERROR (the server's "bug" path); and, the point of the share, nothing outside it
changed: the canary directory beside the share keeps its files and bytes, and no new
entry appears beside the share. At the end, a Tversion must give back every host fd.

Run it (see mk/fuzz.mk):

    .venv/bin/python fuzz/ninep_fuzz.py --engine hypothesis --runs 20000
    .venv/bin/python fuzz/ninep_fuzz.py -runs=100000                      # atheris
    make fuzz-harness FUZZ_DEVICES=9p
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from virtio_fuzz import Failure, Input, _trap, install_trap  # noqa: E402

from kvmpy.ninep import wire  # noqa: E402
from kvmpy.ninep.server import BufferTransfer, NinePServer  # noqa: E402

MAX_MESSAGES = 48
# (zero bytes, which generators like, pick the first: the attached root, a walk)
FIDS = (1, 2, 3, 4, 0, 5, 77, wire.NOFID)
NAMES = (b"sub", b"file", b"..", b".", b"", b"/", b"a/b", b"../canary/new", b"abs", b"rel",
         b"dir_link", b"fifo", b"new", b"x\0y", b"canary", b"sub2", b"n" * 300, b"\xff\xfe")
# (message type, its fields: d u32, q u64, w u16, b u8, s string, f fid, n name, m mode)
LAYOUTS = {
    wire.TVERSION: "ds", wire.TATTACH: "ffssd", wire.TWALK: "ffW", wire.TLOPEN: "fd",
    wire.TLCREATE: "fnddd", wire.TREAD: "fqd", wire.TWRITE: "fqdX", wire.TCLUNK: "f",
    wire.TREMOVE: "f", wire.TGETATTR: "fq", wire.TSETATTR: "fdmddqqqqq",
    wire.TREADDIR: "fqd", wire.TSTATFS: "f", wire.TMKDIR: "fnmd", wire.TSYMLINK: "fnsd",
    wire.TMKNOD: "fnmddd", wire.TREADLINK: "f", wire.TLINK: "ffn", wire.TRENAME: "ffn",
    wire.TRENAMEAT: "fnfn", wire.TUNLINKAT: "fnd", wire.TFSYNC: "fd", wire.TFLUSH: "w",
    wire.TXATTRWALK: "ffn", wire.TXATTRCREATE: "fnqd", wire.TLOCK: "fbdqqds",
    wire.TGETLOCK: "fbqqds", wire.TAUTH: "fssd",
}
TYPES = (wire.TWALK, wire.TLOPEN, wire.TREAD, wire.TGETATTR, wire.TREADDIR, wire.TLCREATE,
         wire.TWRITE, wire.TCLUNK, wire.TMKDIR, wire.TSYMLINK, wire.TREADLINK, wire.TSETATTR,
         wire.TRENAMEAT, wire.TUNLINKAT, wire.TLINK, wire.TRENAME, wire.TREMOVE, wire.TMKNOD,
         wire.TSTATFS, wire.TFSYNC, wire.TLOCK, wire.TGETLOCK, wire.TXATTRWALK,
         wire.TXATTRCREATE, wire.TFLUSH, wire.TVERSION, wire.TATTACH, wire.TAUTH)
MODES = (0o100644, 0o040755, 0o020666, 0o060600, 0o010600, 0o140600, 0o4755, 0o777, 0)

stats: Counter[str] = Counter()


def _string(inp: Input, value: bytes) -> bytes:
    if inp.u8() < 230:
        return struct.pack("<H", len(value)) + value
    return struct.pack("<H", inp.u16()) + value  # a length that lies


def _field(inp: Input, letter: str) -> bytes:
    if letter == "f":
        return struct.pack("<I", inp.choice(FIDS) if inp.u8() < 240 else inp.u32())
    if letter == "n":
        name = NAMES[inp.u8() % len(NAMES)] if inp.u8() < 220 else inp.take(inp.u8() % 16)
        return _string(inp, name)
    if letter == "s":
        return _string(inp, inp.take(inp.u8() % 24))
    if letter == "m":
        return struct.pack("<I", inp.choice(MODES) if inp.u8() < 230 else inp.u32())
    if letter == "W":  # Twalk's name list
        count = inp.u8() % 20
        return struct.pack("<H", count) + b"".join(_field(inp, "n") for _ in range(count))
    if letter == "X":  # Twrite's payload
        return inp.take(inp.u8())
    size = {"b": 1, "w": 2, "d": 4, "q": 8}[letter]
    small = inp.u8()
    value = small % 64 if small < 200 else int.from_bytes(inp.take(size), "little")
    return value.to_bytes(size, "little")


def _message(inp: Input) -> tuple[bytes, int]:
    b = inp.u8()
    mtype = inp.choice(TYPES) if b < 245 else inp.u8()
    body = b"".join(_field(inp, letter) for letter in LAYOUTS.get(mtype, "dd"))
    msg = wire.HEADER.pack(wire.HEADER_SIZE + len(body), mtype, inp.u16()) + body
    lie = inp.u8()
    if lie >= 240:  # the size field lies, or the message is cut
        msg = struct.pack("<I", inp.u32() % (len(msg) + 64)) + msg[4:]
    elif lie >= 230:
        msg = msg[:inp.u8() % max(1, len(msg))]
    room = 65536 if inp.u8() < 230 else inp.u8()
    return msg, room


class Tree:
    """share/ and canary/ side by side in a private directory, rebuilt for each input."""

    def __init__(self) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.base = Path(tempfile.mkdtemp(prefix="kvmpy-9pfuzz-", dir=folder))
        self.share, self.canary = self.base / "share", self.base / "canary"

    def rebuild(self) -> None:
        for path in (self.share, self.canary):
            if path.exists():
                _make_writable(path)
                shutil.rmtree(path)
        for entry in set(os.listdir(self.base)) - {"share", "canary"}:
            (self.base / entry).unlink()
        self.canary.mkdir()
        (self.canary / "secret").write_bytes(b"host secret\n")
        (self.share / "sub").mkdir(parents=True)
        (self.share / "file").write_bytes(b"data in the share\n")
        (self.share / "abs").symlink_to(self.canary / "secret")
        (self.share / "rel").symlink_to("../canary/secret")
        (self.share / "dir_link").symlink_to(self.canary)
        os.mkfifo(self.share / "fifo")
        self.before = self.snapshot()

    def snapshot(self) -> tuple[object, ...]:
        files = sorted((p.name, p.lstat().st_mode, p.lstat().st_nlink,
                        p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
                       for p in self.canary.iterdir())
        return tuple(sorted(os.listdir(self.base))), tuple(files), os.stat(self.canary).st_mode

    def close(self) -> None:
        _make_writable(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def _make_writable(path: Path) -> None:
    """The guest may chmod what it made to 000; the next rebuild must still remove it."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o755)
            except OSError:
                pass


_tree: Tree | None = None


def check_reply(msg: bytes, room: int, head: bytes, placed: int, msize: int) -> None:
    if not head:
        if placed or room >= 11:
            raise Failure(f"no reply with {room} bytes of room")
        return
    size, rtype, _tag = wire.HEADER.unpack_from(head)
    mtype = msg[4] if len(msg) > 4 else -1
    if size != len(head) + placed or size > room:
        raise Failure(f"reply size {size} for {len(head)}+{placed} bytes, room {room}")
    if rtype not in (wire.RLERROR, (mtype + 1) & 0xFF):
        raise Failure(f"reply type {rtype} to type {mtype}")
    if rtype == wire.RLERROR and size != 11:
        raise Failure(f"Rlerror of {size} bytes")
    if msize and size >= msize:
        raise Failure(f"reply of {size} bytes with msize {msize}")


def run_one(data: bytes) -> None:
    """One input against a fresh server and tree; raises Failure on a bug."""
    global _tree
    install_trap()
    if _tree is None:
        _tree = Tree()
    tree = _tree
    tree.rebuild()
    fds_before = len(os.listdir("/proc/self/fd"))
    inp = Input(data)
    server = NinePServer(str(tree.share), read_only=bool(inp.u8() & 1))
    try:
        if inp.u8() < 200:  # usually a session first, so later messages reach deep
            for msg in (wire.HEADER.pack(21, wire.TVERSION, wire.NOTAG)
                        + struct.pack("<IH", 65536, 8) + b"9P2000.L",
                        wire.HEADER.pack(23, wire.TATTACH, 1)
                        + struct.pack("<IIHHI", 1, wire.NOFID, 0, 0, 0)):
                head, _ = server.handle(msg, BufferTransfer(msg, 65536))
                if head[4] != msg[4] + 1:
                    raise Failure(f"the session's own message failed: {head!r}")
        for _ in range(MAX_MESSAGES):
            if inp.exhausted:
                break
            msg, room = _message(inp)
            io = BufferTransfer(msg, room)
            head, placed = server.handle(msg, io)  # raising is the first failure
            check_reply(msg, room, head, placed, server.msize)
            stats["replies"] += 1
            stats["rlerror" if head[4:5] == bytes([wire.RLERROR]) else "ok"] += 1
            if _trap.records:
                record = _trap.records[0]
                _trap.records.clear()
                trace = (logging.Formatter().formatException(record.exc_info)
                         if record.exc_info else "")
                raise Failure(f"the server logged an error: {record.getMessage()}\n{trace}")
            if tree.snapshot() != tree.before:
                raise Failure(f"something outside the share changed: {tree.snapshot()} "
                              f"(was {tree.before})")
        server.reset()
        if len(os.listdir("/proc/self/fd")) != fds_before + 2:  # the root and /proc/self/fd
            raise Failure("host fds left open after every fid was clunked")
        stats["inputs"] += 1
    finally:
        server.close()


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris looks for)
    run_one(data)


def run_hypothesis(runs: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=runs, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=64, max_size=2048))
    def prop(data: bytes) -> None:
        run_one(data)

    prop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default="atheris")
    parser.add_argument("--runs", type=int, default=100_000)
    args, rest = parser.parse_known_args()
    start = time.monotonic()
    try:
        if args.engine == "atheris":
            import atheris  # type: ignore[import-not-found]

            atheris.instrument_all()
            atheris.Setup([sys.argv[0], f"-runs={args.runs}", *rest], TestOneInput)
            atheris.Fuzz()
            return
        run_hypothesis(args.runs)
    finally:
        if _tree is not None:
            _tree.close()
    print(f"9p fuzz (hypothesis): {stats['inputs']} inputs in "
          f"{time.monotonic() - start:.0f} s without a failure; {stats['replies']} replies, "
          f"{stats['ok']} of them not errors", flush=True)


if __name__ == "__main__":
    main()
