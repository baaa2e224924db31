"""A machine's configuration in saved state: a MachineConfig as plain values, and back.

What it is: `describe(config)` gives the parts of a `MachineConfig` that decide what
the machine is made of (RAM, vCPUs, flat image or Linux kernel, irqchip, devices),
and `machine_config(value)` reads such a description back into a MachineConfig,
checking every field. A snapshot's metadata and its state stream both carry it: a
restore builds exactly that machine, so the saved state of each part has a part to
go into, and a restore asked to differ (another vCPU count, memory size or device
set) is refused before anything is built.

What is left out, and why: how the guest was booted (kernel command line, entry,
initial registers) no longer matters once it runs, and is kept only to be shown;
how the host watches it (tracing, statistics, gdb, the console's sink) belongs to
each run, not to the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy import layout
from kvmpy.errors import SnapshotError
from kvmpy.state.values import U64, StateReader, shown

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kvmpy.machine import MachineConfig, NetConfig, ShareConfig, VsockConfig

MAX_DEVICES = 64


def describe(config: MachineConfig) -> dict[str, Any]:
    if config.channels:
        # a channel hands the guest's output to a callable of this process
        raise SnapshotError("snapshots of a machine with a sandbox's channels are not "
                            "supported")
    flat, linux = config.flat, config.linux
    described: dict[str, Any] = {
        "mem_size": config.mem_size,
        "cpus": config.cpus,
        "flat": None if flat is None else {
            "path": str(flat.path), "mode": flat.mode.value, "entry": flat.entry,
            "cpl": flat.cpl, "irqchip": flat.irqchip},
        "linux": None if linux is None else {
            "kernel": str(linux.kernel),
            "initrd": None if linux.initrd is None else str(linux.initrd),
            "append": linux.append, "acpi": linux.acpi},
        "disks": [{"path": str(d.path), "read_only": d.read_only} for d in config.disks],
        "nets": [{"tap": n.tap, "mac": n.mac} for n in config.nets],
        "rng": config.rng,
        "virtio_console": config.virtio_console,
    }
    # (only when there are some: a machine without them is described as before they
    # could be saved, so its snapshot stays readable by a kvmpy that cannot)
    if config.shares:
        described["shares"] = [{"path": str(s.path), "tag": s.tag, "read_only": s.read_only}
                               for s in config.shares]
    if config.vsock is not None:
        described["vsock"] = {"cid": config.vsock.cid, "uds": str(config.vsock.uds)}
    return described


def machine_config(value: object, where: str = "machine") -> MachineConfig:
    """The MachineConfig a `describe` value says; SnapshotError naming a bad field."""
    from kvmpy.cpu.modes import Mode
    from kvmpy.machine import (
        DiskConfig,
        FlatConfig,
        LinuxConfig,
        MachineConfig,
        NetConfig,
        ShareConfig,
        VsockConfig,
    )

    r = StateReader(value, where)
    mem_size = r.int("mem_size", layout.PAGE_SIZE, U64)
    cpus = r.int("cpus", 1, 1024)
    flat = linux = None
    if not r.null("flat"):
        f = r.sub("flat")
        try:
            mode = Mode(f.str("mode", 16))
        except ValueError:
            raise f.fail("mode", "not real, protected or long") from None
        flat = FlatConfig(path=Path(f.str("path", 4096)), mode=mode,
                          entry=f.int("entry", 0, U64), cpl=f.int("cpl", 0, 3),
                          irqchip=f.bool("irqchip"))
        f.done()
    if not r.null("linux"):
        lx = r.sub("linux")
        kernel = Path(lx.str("kernel", 4096))
        initrd = None if lx.null("initrd") else Path(lx.str("initrd", 4096))
        linux = LinuxConfig(kernel=kernel, initrd=initrd, append=lx.str("append", 1 << 16),
                            acpi=lx.bool("acpi"))
        lx.done()
    if (flat is None) == (linux is None):
        raise r.fail("flat", "a machine runs a flat image or a Linux kernel: exactly one")
    disks = []
    for d in r.subs("disks", MAX_DEVICES):
        disks.append(DiskConfig(Path(d.str("path", 4096)), read_only=d.bool("read_only")))
        d.done()
    nets = []
    for n in r.subs("nets", MAX_DEVICES):
        nets.append(NetConfig(tap=n.str("tap", 64), mac=None if n.null("mac")
                              else n.str("mac", 17)))
        n.done()
    shares = []
    for sh in r.subs("shares", MAX_DEVICES) if r.has("shares") else ():
        shares.append(ShareConfig(Path(sh.str("path", 4096)), sh.str("tag", 64),
                                  read_only=sh.bool("read_only")))
        sh.done()
    vsock = None
    if r.has("vsock"):
        v = r.sub("vsock")
        vsock = VsockConfig(v.int("cid", 0, 0xFFFF_FFFF), Path(v.str("uds", 4096)))
        v.done()
    config = MachineConfig(mem_size=mem_size, cpus=cpus, flat=flat, linux=linux, disks=disks,
                           nets=nets, rng=r.bool("rng"), virtio_console=r.bool("virtio_console"),
                           shares=shares, vsock=vsock)
    r.done()
    return config


def refuse_mismatch(saved: MachineConfig, what: str, **asked: object) -> None:
    """One line for the first option asked for that is not what the snapshot holds:
    `asked` is cpus=, mem_size=, rng=, virtio_console= or disks= (a count); None
    means not asked."""
    have = {"cpus": saved.cpus, "mem_size": saved.mem_size, "rng": saved.rng,
            "virtio_console": saved.virtio_console, "disks": len(saved.disks)}
    options = {"cpus": "--cpus", "mem_size": "--mem", "rng": "--rng", "virtio_console":
               "--console", "disks": "--disk"}
    for key, value in asked.items():
        if value is not None and value != have[key]:
            raise SnapshotError(f"{options[key]}: {what} has {_say(key, have[key])}, not "
                                f"{_say(key, value)}")


def _say(key: str, value: object) -> str:
    if key == "mem_size":
        return f"{value} bytes of RAM"
    if key == "cpus":
        return f"{value} vCPU{'s' if value != 1 else ''}"
    if key == "rng":
        return "virtio-rng" if value else "no virtio-rng"
    if key == "virtio_console":
        return "the virtio console" if value else "the serial console"
    return f"{value} {'disk' if key == 'disks' else 'network device'}" + ("s" if value != 1
                                                                            else "")


def on_this_host(saved: MachineConfig, what: str, *, nets: Sequence[NetConfig] = (),
                 shares: Sequence[ShareConfig] = (), vsock: VsockConfig | None = None
                 ) -> MachineConfig:
    """The saved machine on the taps, shared directories and vsock socket the user
    names. A snapshot is untrusted input: one that chose these itself would hand its
    guest a host directory to write in, a host network or a socket path, all from a
    file someone sent. So, as a QEMU migration's destination names its own backends, a
    restore takes the devices from the snapshot and their host ends from its caller
    (`--net`, `--share`, `--vsock`); the refusal says what the snapshot was saved with.
    What the guest holds stays the saved: its MAC, its CID, its shares (a 9P session's
    files are checked to be the same ones, so a share is the same directory, as it was
    shared)."""
    if len(nets) != len(saved.nets):
        hint = " ".join(f"--net tap={shown(n.tap)}" for n in saved.nets)
        raise SnapshotError(f"--net: {what} has {_say('nets', len(saved.nets))}"
                            + (f": a restore attaches each to the tap it is given (saved "
                               f"on: {hint})" if saved.nets else f", not {len(nets)}"))
    for net, asked in zip(saved.nets, nets, strict=True):
        if asked.mac is not None and asked.mac.lower() != (net.mac or "").lower():
            raise SnapshotError(f"--net mac={asked.mac}: the guest of {what} has MAC "
                                f"{shown(net.mac or '')}")
    given = sorted(s.tag for s in shares)
    if given != sorted(s.tag for s in saved.shares) or len(set(given)) != len(given):
        hint = " ".join(f"--share {_share_option(s)}" for s in saved.shares)
        raise SnapshotError(f"--share: {what} has "
                            + (f"shares, and a restore gives its guest only the directories "
                               f"it is given (saved with: {hint})" if saved.shares
                               else "no shares"))
    by_tag = {s.tag: s for s in shares}
    for share in saved.shares:
        mine = by_tag[share.tag]
        if (Path(mine.path).resolve(), mine.read_only) != (Path(share.path).resolve(),
                                                            share.read_only):
            raise SnapshotError(f"--share {_share_option(mine)}: {what} was saved with "
                                f"--share {_share_option(share)}; a restored share is that "
                                "directory, as it was shared")
    if saved.vsock is not None and vsock is None:
        raise SnapshotError(f"--vsock: {what} has a vsock device, whose socket a restore "
                            f"puts only where it is told (saved with: --vsock "
                            f"{saved.vsock.cid},uds={shown(str(saved.vsock.uds))})")
    if vsock is not None:
        if saved.vsock is None:
            raise SnapshotError(f"--vsock: {what} has no vsock device")
        if vsock.cid != saved.vsock.cid:
            raise SnapshotError(f"--vsock: {what} has guest CID {saved.vsock.cid}, not "
                                f"{vsock.cid}")
    return saved._replace(
        nets=[old._replace(tap=new.tap, limits=new.limits)
              for old, new in zip(saved.nets, nets, strict=True)], vsock=vsock)


def _share_option(share: ShareConfig) -> str:
    return f"{shown(str(share.path))},tag={shown(share.tag)}" + (",ro" if share.read_only
                                                                  else "")

