"""A bzImage's kernel unpacked on the host once and kept, so later boots skip its decompressor.

Why: a bzImage is a small decompressor with the real kernel, an ELF vmlinux, compressed
inside it, and every boot runs that decompressor in the guest. For kvmpy's minimal
kernel (16 MB of vmlinux in xz) that is about half a second of every boot in the lab,
most of the time from the first KVM_RUN to the kernel's first words. The boot protocol
provides for a loader doing it instead: `payload_offset` and `payload_length` (2.08+)
locate the compressed vmlinux, and its magic number names the format
(Documentation/arch/x86/boot.rst, "Details of header fields").

How: Python's standard library decompresses gzip, xz, lzma and bzip2 (lz4, lzo and zstd
kernels keep their own decompressor). Doing it at boot would cost more than it saves
(xz takes a second under emulation), so it happens once per image and off the boot's
path, as two explicit steps:

- `kept(path)`: the ELF an earlier run unpacked from the bzImage at `path`, if any. The
  machine boots it (`LinuxConfig.unpack`): the loader loads that ELF's segments and
  enters its 64-bit entry (startup_64) with the bzImage's own setup header in
  boot_params, which is where and how the decompressor would have entered it.
- `unpack_in_background(path)`: a thread that unpacks a copy into
  `$KVMPY_CACHE/unpacked/`. `Machine.unpack_for_next_boot()` starts it when a bzImage
  boots through its decompressor; `kvmpy run` and `Guest` call that, and wait for the
  thread at the end; `make guest-kernel` runs `unpack_file`.

A copy is named by a hash of the whole bzImage, so a changed file never boots a stale
kernel, and it gets its name only when complete, so no boot ever reads half of one.

What changes for the guest: the decompressor is also what randomises where the kernel
runs (KASLR). An unpacked kernel runs at its link address, as a vmlinux booted by PVH,
or by Firecracker, does. `LinuxConfig(unpack=False)` (`--unpack off`) boots the bzImage
through its decompressor every time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from kvmpy.boot.bzimage import SetupHeader, parse_setup_header
from kvmpy.boot.elf import ELF_MAGIC
from kvmpy.cachedir import cache_dir
from kvmpy.log import get_logger

PAYLOAD_VERSION = 0x0208  # the first protocol with payload_offset / payload_length
_FORMATS = (  # the magic numbers boot.rst says identify the payload's format
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
)

log = get_logger(__name__)


def unpacked_dir() -> Path:
    return cache_dir() / "unpacked"


def _name(image: bytes) -> str:
    return hashlib.blake2b(image, digest_size=16).hexdigest() + ".elf"


def payload(image: bytes, header: SetupHeader) -> bytes | None:
    """The compressed vmlinux the header locates in `image`, or None if it locates none."""
    if header.version < PAYLOAD_VERSION:
        return None
    start = header.setup_size + header.field("payload_offset")
    length = header.field("payload_length")
    if length < 4 or start + length > len(image):
        return None
    return image[start : start + length]


def decompress(data: bytes) -> bytes | None:
    """The vmlinux compressed in `data`, or None: a format left to the kernel, or bad data.

    The build appends the uncompressed size as four bytes after the stream
    (scripts/Makefile.lib, size_append). The output is held to that size, so a
    truncated stream is told from a whole one and a hostile one cannot fill memory.
    """
    fmt = next((name for magic, name in _FORMATS if data.startswith(magic)), None)
    if fmt is None or len(data) < 8:
        return None
    (size,) = struct.unpack_from("<I", data, len(data) - 4)
    try:
        if fmt == "gzip":
            gz = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out, done = gz.decompress(data, size + 1), gz.eof
        elif fmt == "bzip2":
            import bz2

            bz = bz2.BZ2Decompressor()
            out, done = bz.decompress(data, size + 1), bz.eof
        else:
            import lzma

            xz = lzma.LZMADecompressor()
            out, done = xz.decompress(data, size + 1), xz.eof
    except Exception as e:  # zlib.error, lzma.LZMAError, OSError, EOFError, MemoryError
        log.info("payload does not decompress (%s): %s", fmt, e)
        return None
    if not done or len(out) != size or not out.startswith(ELF_MAGIC):
        return None
    return out


def cached(image: bytes) -> Path | None:
    """Where the unpacked kernel of `image` is, if an earlier boot kept one."""
    path = unpacked_dir() / _name(image)
    return path if path.is_file() else None


def kept(path: Path) -> Path | None:
    """The unpacked kernel of the bzImage at `path`, if an earlier run kept one.

    None for anything else, an unreadable file included: loading it says what is wrong.
    """
    try:
        image = path.read_bytes()
    except OSError:
        return None
    return cached(image) if image[0x202:0x206] == b"HdrS" else None


def unpack_to_cache(image: bytes, header: SetupHeader) -> Path | None:
    """Unpack `image`'s kernel into the cache; its path, or None if it cannot be done.

    Never raises: a format kvmpy does not decompress, a bad payload, a cache that is
    read-only (the lab's) all just mean the guest keeps decompressing its kernel. The
    file is opened before anything is decompressed, so an unwritable cache costs nothing.
    """
    directory = unpacked_dir()
    target = directory / _name(image)
    if target.exists():
        return target
    data = payload(image, header)
    if data is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _new_file(target) as (f, publish):
            elf = decompress(data)
            if elf is None:
                return None
            f.write(elf)
            f.flush()
            publish()
    except OSError as e:
        log.info("cannot keep an unpacked kernel in %s: %s", directory, e)
        return None
    return target


@contextlib.contextmanager
def _new_file(target: Path) -> Iterator[tuple[BinaryIO, Callable[[], None]]]:
    """A file that appears as `target` only when `publish()` is called, whole.

    O_TMPFILE where the file system has it: unnamed until linked, so a VMM killed
    mid-way leaves nothing behind. Elsewhere (overlayfs before Linux 6.6, the lab's
    /tmp) a hidden temporary name renamed over `target`, which a kill can leave behind.
    """
    dir_fd = os.open(target.parent, os.O_DIRECTORY | os.O_RDONLY)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o644, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            temp = target.with_name(f".{target.name}.{os.getpid()}.partial")
            with open(temp, "wb") as f:
                try:
                    yield f, lambda: os.replace(temp, target)
                finally:
                    temp.unlink(missing_ok=True)
            return
        with os.fdopen(fd, "wb") as f:

            def publish() -> None:
                # a dir_fd makes this linkat(..., AT_SYMLINK_FOLLOW): the file, not the link
                try:
                    os.link(f"/proc/self/fd/{fd}", target.name, dst_dir_fd=dir_fd)
                except FileExistsError:
                    pass  # another VMM unpacked the same image first

            yield f, publish
    finally:
        os.close(dir_fd)


def unpack_file(path: Path) -> Path | None:
    """`unpack_to_cache` for the bzImage at `path` (LoaderError if it is not one)."""
    image = path.read_bytes()
    return unpack_to_cache(image, parse_setup_header(image))


def unpack_in_background(path: Path) -> threading.Thread:
    """Unpack the bzImage at `path` into the cache on a daemon thread (which it returns).

    The decompressors release the GIL, so the thread runs beside the guest's vCPUs.
    """

    def work() -> None:
        try:
            unpack_file(path)
        except Exception as e:  # a cache is an optimisation: never let it take the VMM down
            log.info("unpacking %s failed: %s", path, e)

    thread = threading.Thread(target=work, name="unpack-kernel", daemon=True)
    thread.start()
    return thread
