"""The one exception hierarchy of kvmpy.

Host-side failures (a missing kernel, an ioctl that fails, a bad size on the
command line) raise a `KvmpyError` subclass and the CLI turns them into one
line on stderr and a non-zero exit. Guest misbehaviour is *not* an exception
that leaves a device: devices handle it as their spec says and the VM goes on.
`GuestMemoryError` is raised by guest-memory accessors so that a device can
catch it at its own boundary and fail the request it was serving.
"""

import os


class KvmpyError(Exception):
    """Base class: anything kvmpy reports to the user as a one-line error."""

    exit_status = 1


class ConfigError(KvmpyError):
    """Bad user input: sizes, paths, options, files that are not what they claim."""

    exit_status = 2


class KvmUnavailable(KvmpyError):
    """/dev/kvm is missing, not accessible, or cannot do what was asked."""

    exit_status = 3


class KvmIoctlError(KvmpyError, OSError):
    """An ioctl failed; carries errno and the ioctl's name."""

    def __init__(self, name: str, errno_: int) -> None:
        OSError.__init__(self, errno_, f"{name}: {os.strerror(errno_)}")
        self.ioctl = name


class GuestMemoryError(KvmpyError):
    """A guest-physical access that leaves or crosses a memory region."""


class LoaderError(ConfigError):
    """A kernel, initrd or flat image that cannot be loaded, with the reason."""


class AssetError(KvmpyError):
    """A guest asset (kvmpy's kernel, its initramfs, a Debian package) is missing or cannot
    be built; the message says why and how to get it, in one line."""

    exit_status = 125  # like `env`/`timeout`: what was asked for never ran


class SnapshotError(ConfigError):
    """A snapshot or saved state that cannot be restored: truncated, edited, of another
    format version, or of another machine than the one asked for. Always one line."""


class GuestFault(KvmpyError):
    """The guest stopped in a way that ends the VM (triple fault, failed entry...)."""

    exit_status = 4
