"""A user's choices, from the command line or `kvmpy.api.Guest(...)`, as a MachineConfig.

What it is: the few decisions both faces of kvmpy make the same way — which kernel and
initrd when none is named (kvmpy's minimal kernel and busybox initramfs), ACPI or an
MP table (`kvmpy.acpi.choice`), an initramfs that loads a distribution kernel's
modules, the `PATH[,ro]`, `tap=NAME[,mac=MAC]`, `DIR,tag=TAG[,ro]` and
`CID,uds=PATH` device syntax, sizes given as "256M" — so `kvmpy run --kernel K
--disk D,ro` and `Guest(kernel=K, disks=["D,ro"])` describe the same machine.

What it is not: the checks (`kvmpy.checks`, run by `Machine` before it builds
anything) or the machine itself. It builds nothing but configuration records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvmpy import layout
from kvmpy.checks import regular_file
from kvmpy.cpu.modes import Mode
from kvmpy.errors import ConfigError
from kvmpy.log import get_logger
from kvmpy.machine import (
    DiskConfig,
    FlatConfig,
    LinuxConfig,
    MachineConfig,
    NetConfig,
    ShareConfig,
    VsockConfig,
)
from kvmpy.units import parse_size

DEFAULT_LINUX_MEM = "256M"
DEFAULT_FLAT_MEM = "128M"


def size(value: int | str) -> int:
    """Bytes from 268435456 or "256M"."""
    return value if isinstance(value, int) else parse_size(value)


def virtio_console(console: str) -> bool:
    """Whether the console is virtio-console (hvc0) rather than the UART (ttyS0)."""
    if console not in ("serial", "virtio"):
        raise ConfigError(f"--console {console}: serial (ttyS0) or virtio (hvc0)")
    return console == "virtio"


def disk_config(spec: str | Path | DiskConfig) -> DiskConfig:
    """`PATH[,ro][,bw=MB/s][,iops=N]` (or a DiskConfig, as it is)."""
    from kvmpy.ratelimit import parse_limits

    if isinstance(spec, DiskConfig):
        return spec
    if isinstance(spec, Path):
        return DiskConfig(spec)
    path, *opts = spec.split(",")
    fields = dict(opt.partition("=")[::2] for opt in opts if opt != "ro")
    if set(fields) - {"bw", "iops"}:
        raise ConfigError(f"--disk {spec}: the options are ro, bw=MB/s and iops=N")
    return DiskConfig(Path(path), read_only="ro" in opts,
                      limits=parse_limits(f"--disk {spec}", fields, ops=True))


def net_config(spec: str | NetConfig) -> NetConfig:
    """`tap=NAME[,mac=MAC][,bw=MB/s]` (or a NetConfig, as it is)."""
    from kvmpy.ratelimit import parse_limits

    if isinstance(spec, NetConfig):
        return spec
    fields = dict(item.partition("=")[::2] for item in spec.split(",") if item)
    unknown = set(fields) - {"tap", "mac", "bw"}
    if unknown:
        raise ConfigError(f"--net {spec}: unknown option {sorted(unknown)[0]!r} "
                          "(use tap=NAME[,mac=MAC][,bw=MB/s])")
    return NetConfig(tap=fields.get("tap", ""), mac=fields.get("mac"),
                     limits=parse_limits(f"--net {spec}", fields, ops=False))


def share_config(spec: str | ShareConfig, default_tag: str | None = None) -> ShareConfig:
    """`DIR,tag=TAG[,ro]` (or a ShareConfig, as it is); the tag may be left out when
    `default_tag` is given (kvmpy sandbox mounts shares at their own paths)."""
    if isinstance(spec, ShareConfig):
        return spec
    path, *opts = spec.split(",")
    tag, read_only = default_tag, False
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key == "tag" and eq and value:
            tag = value
        elif opt == "ro":
            read_only = True
        else:
            raise ConfigError(f"--share {spec}: unknown option {opt!r} (use DIR,tag=TAG[,ro])")
    if tag is None:
        raise ConfigError(f"--share {spec}: give the tag the guest mounts it by (,tag=TAG)")
    if not path:
        raise ConfigError(f"--share {spec}: no directory")
    return ShareConfig(Path(path).absolute(), tag, read_only)


def vsock_config(spec: str | VsockConfig) -> VsockConfig:
    """`CID,uds=PATH` (or a VsockConfig, as it is)."""
    if isinstance(spec, VsockConfig):
        return spec
    cid, *opts = spec.split(",")
    fields = dict(opt.partition("=")[::2] for opt in opts)
    if set(fields) != {"uds"} or not fields["uds"] or not cid.isdigit():
        raise ConfigError(f"--vsock {spec}: use CID,uds=PATH (e.g. 3,uds=/tmp/vm.sock)")
    return VsockConfig(int(cid), Path(fields["uds"]).absolute())


def linux_config(kernel: str | Path | None = None, initrd: str | Path | None = None, *,
                 append: str = "", acpi: str = "auto", modules: str | Path | None = None,
                 unpack: bool = True, prefer_pvh: bool = True) -> LinuxConfig:
    """The kernel and initrd to boot: the ones named, or kvmpy's default guest."""

    kernel_path = Path(kernel) if kernel is not None else None
    initrd_path = Path(initrd) if initrd is not None else None
    modules_dir = Path(modules) if modules is not None else None
    if modules_dir is not None:
        initrd_path = _modules_initrd(kernel_path, initrd_path, modules_dir)
    if kernel_path is None:
        from kvmpy import assets

        kernel_path = assets.kernel_path().bzimage
        if initrd_path is None:
            initrd_path = assets.initramfs_path()
    # (imported here: reading a kernel's configuration is start-up a restore skips)
    from kvmpy.acpi.choice import choose_acpi

    regular_file(kernel_path, "kernel")  # before choose_acpi reads it: never a FIFO
    choice = choose_acpi(acpi, kernel_path, modules_dir)
    get_logger(__name__).info("%s", choice.reason)
    return LinuxConfig(kernel=kernel_path, initrd=initrd_path, append=append,
                       acpi=choice.acpi, prefer_pvh=prefer_pvh, unpack=unpack)


def _modules_initrd(kernel: Path | None, initrd: Path | None, modules: Path) -> Path:
    """kvmpy's default guest plus the kernel's virtio modules (built once, cached)."""
    from kvmpy import initramfs
    from kvmpy.acpi.choice import kernel_release
    from kvmpy.cachedir import cache_dir

    if kernel is None or initrd is not None:
        raise ConfigError("--modules needs --kernel (the modules' kernel) and no --initrd: "
                          "it builds the initramfs")
    regular_file(kernel, "kernel")
    tree = initramfs.find_modules_dir(modules, kernel_release(kernel))
    return initramfs.modules_guest_initramfs_path(tree, cache_dir() / "initramfs")


def linux_machine(kernel: str | Path | None = None, initrd: str | Path | None = None, *,
                  append: str = "", cpus: int = 1, mem: int | str = DEFAULT_LINUX_MEM,
                  disks: Sequence[str | Path | DiskConfig] = (),
                  nets: Sequence[str | NetConfig] = (), rng: bool | None = None,
                  shares: Sequence[str | ShareConfig] = (),
                  vsock: str | VsockConfig | None = None,
                  console: str = "serial", acpi: str = "auto",
                  modules: str | Path | None = None, unpack: bool = True,
                  prefer_pvh: bool = True) -> MachineConfig:
    """A Linux guest, as `kvmpy run` describes one. virtio-rng is on by default for
    kvmpy's own guest and for distribution kernels (`modules`), which seed from it."""

    linux = linux_config(kernel, initrd, append=append, acpi=acpi, modules=modules,
                         unpack=unpack, prefer_pvh=prefer_pvh)
    return MachineConfig(mem_size=size(mem), cpus=cpus, linux=linux,
                         disks=[disk_config(d) for d in disks],
                         nets=[net_config(n) for n in nets],
                         rng=(kernel is None or modules is not None) if rng is None else rng,
                         shares=[share_config(s) for s in shares],
                         vsock=vsock_config(vsock) if vsock is not None else None,
                         virtio_console=virtio_console(console))


def flat_machine(path: str | Path, *, mode: str | Mode = Mode.REAL,
                 entry: int = layout.FLAT_LOAD, cpl: int = 0, cpus: int = 1,
                 mem: int | str = DEFAULT_FLAT_MEM,
                 disks: Sequence[str | Path | DiskConfig] = (),
                 nets: Sequence[str | NetConfig] = (), rng: bool = False,
                 shares: Sequence[str | ShareConfig] = (),
                 vsock: str | VsockConfig | None = None,
                 console: str = "serial", irqchip: bool = False) -> MachineConfig:
    """A raw binary guest, as `kvmpy run --flat` describes one (virtio devices allowed:
    a flat guest can drive them itself, as the tutorial's virtqueue chapter does)."""

    try:
        cpu_mode = Mode(mode)
    except ValueError:
        raise ConfigError(f"--mode {mode}: real, protected or long") from None
    flat = FlatConfig(path=Path(path), mode=cpu_mode, entry=entry, cpl=cpl, irqchip=irqchip)
    return MachineConfig(mem_size=size(mem), cpus=cpus, flat=flat,
                         disks=[disk_config(d) for d in disks],
                         nets=[net_config(n) for n in nets], rng=rng,
                         shares=[share_config(s) for s in shares],
                         vsock=vsock_config(vsock) if vsock is not None else None,
                         virtio_console=virtio_console(console))
