"""Disk images into and out of a snapshot: reflinked where the file system can, else a
sparse copy.

What it is: `copy_image(src, dst)` makes `dst` a new file with `src`'s content. It asks
the file system for a reflink first (FICLONE: btrfs, XFS, bcachefs share the blocks
until either side writes, so a snapshot of a 10 GiB disk costs nothing), and
otherwise copies only the data extents (SEEK_DATA/SEEK_HOLE, each with
copy_file_range, which the kernel may itself do without a trip through user
space), so the copy keeps the source's holes. The snapshot takes a writable
disk's image this way at the moment of the snapshot, and each restore takes its own
working copy from the snapshot's, so the snapshot itself is never written to.

What it is not: a block-level copy-on-write format (no qcow2, no overlays).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int), <linux/fs.h>
COPY_CHUNK = 1 << 30  # copy_file_range's length per call


def copy_image(src: Path, dst: Path) -> str:
    """Copy `src` to the new file `dst` (which must not exist); returns how: "reflink"
    or "sparse copy". OSError if either file cannot be used."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                return "reflink"
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                                   errno.EBADF, errno.ETXTBSY):
                    raise
            _sparse_copy(src_fd, dst_fd)
            return "sparse copy"
        except BaseException:
            os.close(dst_fd)
            dst_fd = -1
            os.unlink(dst)
            raise
        finally:
            if dst_fd >= 0:
                os.close(dst_fd)
    finally:
        os.close(src_fd)


def _sparse_copy(src_fd: int, dst_fd: int) -> None:
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            start = offset  # no SEEK_DATA here: copy everything
        try:
            end = os.lseek(src_fd, start, os.SEEK_HOLE)
        except OSError:
            end = size
        _copy_range(src_fd, dst_fd, start, end)
        offset = end


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    while start < end:
        length = min(end - start, COPY_CHUNK)
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, start, start)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            data = os.pread(src_fd, min(length, 1 << 20), start)
            n = os.pwrite(dst_fd, data, start) if data else 0
        if n <= 0:
            raise OSError(errno.EIO, f"copy stopped at byte {start} of {end}")
        start += n
