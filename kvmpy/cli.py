"""`kvmpy` on the command line: `run` a guest, or run a command in the `lab`.

Every failure the user can cause (bad option, missing file, no /dev/kvm)
ends as one line on stderr and a non-zero status; a guest that dies ends with
its diagnostic and the status of its `Stop`.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy import layout
from kvmpy.cpu.modes import Mode
from kvmpy.errors import ConfigError, KvmpyError, KvmUnavailable
from kvmpy.log import configure_cli, get_logger
from kvmpy.stop import Stop, StopKind
from kvmpy.units import parse_address, parse_size

if TYPE_CHECKING:
    from kvmpy.gdb.stub import GdbConfig
    from kvmpy.machine import DiskConfig, LinuxConfig, NetConfig
    from kvmpy.trace.tracer import Tracer


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, told the terminal width: its default asks `shutil`, whose import
    (with zlib, bz2, lzma) is a tenth of a second of start-up under emulation."""

    def __init__(self, prog: str) -> None:
        try:
            columns = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError):
            columns = 80
        super().__init__(prog, width=columns - 2)


class _Parser(argparse.ArgumentParser):
    """kvmpy's parsers (the subcommands' too) format help with `_HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmpy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log device events")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a guest")
    run.add_argument("--flat", type=Path, metavar="FILE", help="a raw binary guest")
    run.add_argument("--mode", choices=[m.value for m in Mode], default="real",
                     help="CPU mode a flat guest starts in (default: real)")
    run.add_argument("--entry", default=hex(layout.FLAT_LOAD),
                     help=f"entry address of a flat guest (default {layout.FLAT_LOAD:#x})")
    run.add_argument("--cpl", type=int, choices=[0, 3], default=0,
                     help="privilege level a long-mode flat guest starts at")
    run.add_argument("--kernel", type=Path, metavar="PATH",
                     help="Linux bzImage or vmlinux (default: kvmpy's minimal kernel)")
    run.add_argument("--initrd", type=Path, metavar="PATH",
                     help="initramfs (default: kvmpy's busybox initramfs with the default kernel)")
    run.add_argument("--append", default="", metavar="STR", help="extra kernel command line")
    run.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    run.add_argument("--acpi", choices=["auto", "on", "off"], default="auto",
                     help="describe the machine with ACPI tables instead of an MP table and "
                          "command-line devices; auto (default) picks ACPI with --modules or "
                          "when the kernel's config (beside it) lacks X86_MPPARSE or "
                          "VIRTIO_MMIO_CMDLINE_DEVICES")
    run.add_argument("--modules", type=Path, metavar="DIR",
                     help="the kernel's /lib/modules/<release> tree: boot an initramfs that "
                          "loads its virtio modules (a distribution kernel); implies ACPI "
                          "with --acpi auto")
    run.add_argument("--unpack", choices=["on", "off"], default="on",
                     help="boot a bzImage from its kernel as unpacked on the host by its first "
                          "boot and kept in the cache, skipping the guest's decompressor (and "
                          "its KASLR); off: the decompressor every time (default on)")
    run.add_argument("--entry64", action="store_true",
                     help="enter a vmlinux at its 64-bit entry even if it has a PVH note")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                     help="a raw disk image as virtio-blk (repeatable; ,ro for read-only)")
    run.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                     help="a virtio-net device on a tap interface (repeatable)")
    run.add_argument("--rng", choices=["on", "off"], default=None,
                     help="virtio-rng fed by the host's getrandom() (default: on for the "
                          "default guest)")
    run.add_argument("--console", choices=["serial", "virtio"], default="serial",
                     help="guest console: the 16550 UART (ttyS0) or virtio-console (hvc0)")
    run.add_argument("--mem", default=None,
                     help="guest RAM (default 128M for flat guests, 256M for Linux)")
    run.add_argument("--stats", action="store_true",
                     help="print exit statistics on stderr at the end: a table, then one "
                          "JSON line")
    run.add_argument("--trace", nargs="?", const="", default=None, metavar="FILTER",
                     help="print a line per VM exit with the guest instruction; FILTER is "
                          "comma-separated reasons (io,mmio,hlt...), port:LO-HI, addr:LO-HI, "
                          "dev:LABEL (use --trace=FILTER)")
    run.add_argument("--trace-file", metavar="PATH", help="write --trace lines here, not stderr")
    run.add_argument("--gdb", metavar="[HOST:]PORT",
                     help="serve gdb on 127.0.0.1:PORT; the guest waits at its first "
                          "instruction until gdb continues")
    run.set_defaults(func=cmd_run)

    try:
        from kvmpy.lab import command as lab_command
    except ImportError:  # the lab package is optional for flat guests
        pass
    else:
        lab_command.register(sub)
    return parser


def parse_disk(text: str) -> DiskConfig:
    """`PATH` or `PATH,ro`."""
    from kvmpy.machine import DiskConfig

    path, _, opts = text.partition(",")
    if opts not in ("", "ro"):
        raise ConfigError(f"--disk {text}: the only option is ',ro'")
    return DiskConfig(Path(path), read_only=opts == "ro")


def parse_net(text: str) -> NetConfig:
    """`tap=NAME[,mac=MAC]`."""
    from kvmpy.machine import NetConfig

    fields = dict(item.partition("=")[::2] for item in text.split(",") if item)
    unknown = set(fields) - {"tap", "mac"}
    if unknown:
        raise ConfigError(f"--net {text}: unknown option {sorted(unknown)[0]!r} "
                          "(use tap=NAME[,mac=MAC])")
    return NetConfig(tap=fields.get("tap", ""), mac=fields.get("mac"))


def linux_config(args: argparse.Namespace) -> LinuxConfig:
    """The kernel and initrd to boot: the user's, or kvmpy's default guest."""
    from kvmpy.lab.host import linux_kvm_status
    from kvmpy.machine import LinuxConfig

    can_boot, why = linux_kvm_status()
    if not can_boot:
        raise KvmUnavailable(f"cannot boot Linux here: {why} (`make run` boots it in the lab)")
    kernel, initrd = args.kernel, args.initrd
    if args.modules is not None:
        initrd = _modules_initrd(args)
    if kernel is None:
        from kvmpy import guest_assets

        kernel = guest_assets.kernel_path().bzimage
        if initrd is None:
            initrd = guest_assets.initramfs_path()
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{what} {path}: no such file")
    from kvmpy.acpi.choice import choose_acpi

    choice = choose_acpi(args.acpi, kernel, args.modules)
    get_logger(__name__).info("%s", choice.reason)
    return LinuxConfig(kernel=kernel, initrd=initrd, append=args.append,
                       acpi=choice.acpi, prefer_pvh=not args.entry64,
                       unpack=args.unpack == "on")


def _modules_initrd(args: argparse.Namespace) -> Path:
    """kvmpy's default guest plus the kernel's virtio modules (built once, cached)."""
    from kvmpy import initramfs
    from kvmpy.acpi.choice import kernel_release
    from kvmpy.lab.debian import cache_dir

    if args.kernel is None or args.initrd is not None:
        raise ConfigError("--modules needs --kernel (the modules' kernel) and no --initrd: "
                          "it builds the initramfs")
    if not args.kernel.is_file():
        raise ConfigError(f"kernel {args.kernel}: no such file")
    tree = initramfs.find_modules_dir(args.modules, kernel_release(args.kernel))
    return initramfs.modules_guest_initramfs_path(tree, cache_dir() / "initramfs")


def cmd_run(args: argparse.Namespace) -> int:
    from kvmpy.console import StdinPump
    from kvmpy.machine import FlatConfig, Machine, MachineConfig

    started = time.perf_counter()
    if args.flat is not None:
        flat = FlatConfig(path=args.flat, mode=Mode(args.mode),
                          entry=parse_address(args.entry), cpl=args.cpl)
        config = MachineConfig(mem_size=parse_size(args.mem or "128M"), flat=flat,
                               stats=args.stats, cpus=args.cpus)
    else:
        rng = args.rng == "on" if args.rng else (args.kernel is None or bool(args.modules))
        config = MachineConfig(mem_size=parse_size(args.mem or "256M"),
                               linux=linux_config(args), stats=args.stats, cpus=args.cpus,
                               disks=[parse_disk(d) for d in args.disk],
                               nets=[parse_net(n) for n in args.net], rng=rng,
                               virtio_console=args.console == "virtio")
    trace, gdb = _seeing_inside(args)
    config = config._replace(trace=trace, gdb=gdb)
    machine = Machine(config)
    pump = None
    if config.linux is not None:
        pump = StdinPump(machine.console_input, on_quit=lambda: machine.request_stop(
            Stop(StopKind.SIGINT, "quit from the console (Ctrl-A x)")))
        pump.start()
    try:
        stop = machine.run()
    finally:
        if pump is not None:
            pump.stop()
    if stop.details or stop.kind.value not in (0, -1):
        print(f"kvmpy: {stop.reason}", file=sys.stderr)
        if stop.details:
            print(stop.details, file=sys.stderr)
    if args.stats:
        import json

        from kvmpy.trace.stats import format_table

        stats = machine.stats()
        stats["process_s"] = round(time.perf_counter() - started, 6)
        stats["stop"] = stop.reason
        print(format_table(stats), file=sys.stderr)
        print(json.dumps(stats), file=sys.stderr)
    machine.close()
    if config.trace is not None and config.trace.out is not sys.stderr:
        config.trace.out.close()
    return stop.exit_status


def _seeing_inside(args: argparse.Namespace) -> tuple[Tracer | None, GdbConfig | None]:
    """The tracer and gdb stub settings `--trace`, `--trace-file` and `--gdb` ask for."""
    tracer = gdb = None
    if args.trace is not None or args.trace_file:
        from kvmpy.trace.filter import TraceFilter
        from kvmpy.trace.tracer import Tracer, open_output

        tracer = Tracer(TraceFilter.parse(args.trace), open_output(args.trace_file))
    if args.gdb is not None:
        from kvmpy.gdb.stub import GdbConfig

        gdb = GdbConfig.parse(args.gdb)
    return tracer, gdb


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cli(args.verbose)
    # `kill -USR2` prints every thread's Python stack: for a VMM that seems stuck,
    # even one whose threads hold the GIL (the dump runs in the signal handler).
    # While vCPU threads run, it also prints where each vCPU is (kvmpy.machine).
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
    try:
        return int(args.func(args))
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("kvmpy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
