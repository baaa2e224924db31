"""Check a machine configuration against the host before anything is built.

What it is: `check_config(config)` looks at every choice a user made — RAM size, vCPU
count, files (kernel, initrd, flat image, disks), tap names and MACs, the kernel
command line, how many virtio devices fit — and raises a one-line `ConfigError`
naming the option at fault. The command line and `kvmpy.api.Guest` call it first,
so a bad option is reported the same way on every machine, before kvmpy asks
whether this machine's /dev/kvm can boot Linux at all, and before a byte of guest
RAM is mapped.

What it is not: a loader. Files are opened and their headers read (a kernel's setup
header or ELF program headers, through a read-only mapping); nothing is copied into
a guest, and devices are not opened (a tap is attached by its device, later).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpy import layout
from kvmpy.cpu.modes import Mode
from kvmpy.errors import ConfigError

if TYPE_CHECKING:
    from kvmpy.machine import (
        DiskConfig,
        FlatConfig,
        LinuxConfig,
        MachineConfig,
        NetConfig,
        ShareConfig,
        VsockConfig,
    )

MAX_CPUS = 32
# A flat guest's image sits at FLAT_LOAD and its stack below FLAT_LIMIT; the GDT and
# page tables kvmpy writes for it are below both (kvmpy.layout).
MIN_FLAT_MEM = layout.MiB
# A Linux kernel loads at 1 MiB or above (bzImage: its pref_address, usually 16 MiB)
# and needs room for itself, its initrd and its early allocations; kvmpy refuses
# less than this, and the loaders check that what they place fits.
MIN_LINUX_MEM = 32 * layout.MiB
# The identity map kvmpy builds for a long-mode flat guest covers the first 4 GiB.
LONG_MODE_MAPPED = 4 * layout.GiB
SECTOR = 512


def check_config(config: MachineConfig, *, booting: bool = True) -> None:
    """Raise a one-line ConfigError for the first option this host cannot honour.
    `booting` False (a restore: the guest is in its saved RAM) leaves out the boot
    files: flat image, kernel, initrd."""
    if config.flat is None and config.linux is None:
        raise ConfigError("nothing to run: give a flat image or a Linux kernel")
    if config.flat is not None and config.linux is not None:
        raise ConfigError("a machine runs a flat image or a Linux kernel, not both")
    if not 1 <= config.cpus <= MAX_CPUS:
        raise ConfigError(f"--cpus {config.cpus}: kvmpy supports 1 to {MAX_CPUS} vCPUs")
    check_mem(config.mem_size, linux=config.linux is not None)
    if config.flat is not None and booting:
        check_flat(config.flat, config.mem_size)
    if config.linux is not None and booting:
        check_linux(config.linux)
    for disk in config.disks:
        check_disk(disk)
    for net in config.nets:
        check_net(net)
    check_shares(config.shares)
    if config.vsock is not None:
        check_vsock(config.vsock)
    devices = (len(config.disks) + len(config.nets) + len(config.shares)
               + len(config.channels) + config.rng + config.virtio_console
               + (config.vsock is not None))
    if devices > len(layout.VIRTIO_IRQS):
        raise ConfigError(
            f"{devices} virtio devices asked for ({len(config.disks)} --disk, "
            f"{len(config.nets)} --net, {len(config.shares)} --share, rng, vsock and "
            f"console count one each): kvmpy has {len(layout.VIRTIO_IRQS)} virtio-mmio "
            "slots, one free IO-APIC pin each")


def host_ram() -> int:
    """Bytes of RAM this host has (what guest RAM could ever be backed by)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_mem(size: int, *, linux: bool) -> None:
    """RAM the host can back, in whole pages, and enough for the guest kind."""
    if size <= 0 or size % layout.PAGE_SIZE:
        raise ConfigError(f"--mem {_size(size)}: guest RAM must be a positive multiple of 4 KiB")
    floor = MIN_LINUX_MEM if linux else MIN_FLAT_MEM
    if size < floor:
        what = "a Linux guest" if linux else "a flat guest (image at 0x10000, stack below 0xa0000)"
        raise ConfigError(f"--mem {_size(size)}: {what} needs at least {_size(floor)}")
    ram = host_ram()
    if size > ram:
        # KVM also allocates metadata per guest page (8 bytes each for 4 KiB pages), so a
        # guest bigger than the host costs real host memory before it touches any page.
        raise ConfigError(f"--mem {_size(size)}: more than this host's RAM ({_size(ram)})")


def check_flat(flat: FlatConfig, mem_size: int) -> None:
    """The image is a regular file that fits; the entry is inside RAM the mode can reach."""
    size = regular_file(flat.path, "--flat image")
    if size == 0:
        raise ConfigError(f"--flat {flat.path}: the file is empty")
    room = layout.FLAT_LIMIT - layout.FLAT_LOAD
    if size > room:
        raise ConfigError(f"--flat {flat.path}: {size} bytes; a flat image loads at "
                          f"{layout.FLAT_LOAD:#x} and must end below {layout.FLAT_LIMIT:#x} "
                          f"(at most {room} bytes)")
    if flat.cpl not in (0, 3):
        raise ConfigError(f"--cpl {flat.cpl}: 0 or 3")
    if flat.cpl and flat.mode is not Mode.LONG:
        raise ConfigError("--cpl 3 needs --mode long (kvmpy only builds user mappings there)")
    entry = flat.entry
    reach = {Mode.REAL: layout.MiB, Mode.PROTECTED: 4 * layout.GiB,
             Mode.LONG: LONG_MODE_MAPPED}[flat.mode]
    ram_low = min(mem_size, layout.MMIO_HOLE)  # RAM below the hole, where a flat guest runs
    if not 0 <= entry < min(reach, ram_low):
        where = {Mode.REAL: "below 1 MiB", Mode.PROTECTED: "in guest RAM below 4 GiB",
                 Mode.LONG: "in guest RAM below 4 GiB (kvmpy's identity map)"}[flat.mode]
        raise ConfigError(f"--entry {entry:#x}: a {flat.mode.value}-mode entry must be {where}"
                          f" (guest RAM is {_size(mem_size)}: see --mem)")


def check_linux(linux: LinuxConfig) -> None:
    """The kernel is a kernel kvmpy can boot, the initrd a readable file, the line fits."""
    from kvmpy.boot.kernel import check_kernel_file

    regular_file(linux.kernel, "kernel")
    protocol, cmdline_max = check_kernel_file(linux.kernel)
    if linux.initrd is not None and regular_file(linux.initrd, "initrd") == 0:
        raise ConfigError(f"initrd {linux.initrd}: the file is empty")
    if "\0" in linux.append or "\n" in linux.append:
        raise ConfigError("--append: the kernel command line cannot hold NUL or newline")
    # kvmpy's own parameters and device list come first; leave them room
    room = cmdline_max - 512
    if len(linux.append.encode()) > room:
        raise ConfigError(f"--append is {len(linux.append.encode())} bytes: this {protocol} "
                          f"kernel takes a {cmdline_max}-byte command line, of which kvmpy's "
                          f"own parameters need up to 512")


def check_disk(disk: DiskConfig) -> None:
    """A readable (and, unless ,ro, writable) regular file or block device of whole sectors."""
    path = disk.path
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"--disk {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"--disk {path}: not a regular file or block device")
    mode = os.O_RDONLY if disk.read_only else os.O_RDWR
    try:
        fd = os.open(path, mode | os.O_CLOEXEC)
    except OSError as e:
        how = "read" if disk.read_only else "read and write (add ,ro for read-only)"
        raise ConfigError(f"--disk {path}: cannot {how}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < SECTOR:
        raise ConfigError(f"--disk {path}: {size} bytes, less than one 512-byte sector")


def check_net(net: NetConfig) -> None:
    """A tap name the kernel accepts and a unicast MAC."""
    from kvmpy.virtio.net import parse_mac
    from kvmpy.virtio.tap import IFNAMSIZ

    name = net.tap
    if len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ConfigError(f"--net tap={name}: not an interface name (at most "
                          f"{IFNAMSIZ - 1} bytes, no '/' or spaces)")
    if net.mac is not None:
        parse_mac(net.mac)


def check_shares(shares: Sequence[ShareConfig]) -> None:
    """Each share a directory kvmpy can read, with a tag a mount command can carry, once."""
    if not shares:  # (the 9p server's import is start-up time a VM without shares saves)
        return
    from kvmpy.virtio.ninep import check_tag

    tags = [s.tag for s in shares]
    for share in shares:
        check_tag(share.tag)
        if tags.count(share.tag) > 1:
            raise ConfigError(f"--share: tag {share.tag!r} given twice")
        if not os.path.isdir(share.path):
            raise ConfigError(f"--share {share.path}: not a directory")
        if not os.access(share.path, os.R_OK | os.X_OK):
            raise ConfigError(f"--share {share.path}: not readable")


def check_vsock(vsock: VsockConfig) -> None:
    """A CID the guest may have and a socket path kvmpy can listen on."""
    from kvmpy.virtio.vsock import check_cid
    from kvmpy.virtio.vsock_uds import check_uds_path

    check_cid(vsock.cid)
    check_uds_path(str(vsock.uds))
    if vsock.uds.exists() and not stat.S_ISSOCK(vsock.uds.lstat().st_mode):
        raise ConfigError(f"--vsock uds={vsock.uds}: exists and is not a socket")


def regular_file(path: Path, what: str) -> int:
    """The size of `path`, a readable regular file; ConfigError otherwise.

    A FIFO, a device (/dev/zero) or a directory is refused before it is read, so
    kvmpy never blocks on one or reads without end.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path}: not readable")
    return st.st_size


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f}G"
    return f"{n}"
