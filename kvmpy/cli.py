"""`kvmpy` on the command line: `run` a guest, run a command in a `sandbox` VM over the
host's files, or run a command in the `lab`.

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
from kvmpy.checks import MAX_CPUS
from kvmpy.cpu.modes import Mode
from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.log import configure_cli
from kvmpy.stop import Stop, StopKind
from kvmpy.units import parse_address

if TYPE_CHECKING:
    from kvmpy.gdb.stub import GdbConfig
    from kvmpy.isolation.jail import Jail
    from kvmpy.isolation.landlock import Rules as LandlockRules
    from kvmpy.machine import MachineConfig
    from kvmpy.state.snapshot import Snapshot, WorkingCopies
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
    run.add_argument("--mode", choices=[m.value for m in Mode],
                     help="CPU mode a flat guest starts in (default: real)")
    run.add_argument("--entry",
                     help=f"entry address of a flat guest (default {layout.FLAT_LOAD:#x})")
    run.add_argument("--cpl", type=int, choices=[0, 3],
                     help="privilege level a long-mode flat guest starts at (default 0)")
    run.add_argument("--kernel", type=Path, metavar="PATH",
                     help="Linux bzImage or vmlinux (default: kvmpy's minimal kernel)")
    run.add_argument("--initrd", type=Path, metavar="PATH",
                     help="initramfs (default: kvmpy's busybox initramfs with the default kernel)")
    run.add_argument("--append", metavar="STR", help="extra kernel command line")
    run.add_argument("--cpus", type=int, help=f"vCPUs (default 1, at most {MAX_CPUS})")
    run.add_argument("--acpi", choices=["auto", "on", "off"],
                     help="describe the machine with ACPI tables (the guest can power off) "
                          "or an MP table and command-line devices; auto (default) picks ACPI "
                          "with --modules or when the kernel's config (beside it) has ACPI")
    run.add_argument("--modules", type=Path, metavar="DIR",
                     help="the kernel's /lib/modules/<release> tree: boot an initramfs that "
                          "loads its virtio modules (a distribution kernel); implies ACPI "
                          "with --acpi auto")
    run.add_argument("--unpack", choices=["on", "off"],
                     help="boot a bzImage from its kernel as unpacked on the host by its first "
                          "boot and kept in the cache, skipping the guest's decompressor (and "
                          "its KASLR); off: the decompressor every time (default on)")
    run.add_argument("--entry64", action="store_true",
                     help="enter a vmlinux at its 64-bit entry even if it has a PVH note")
    run.add_argument("--disk", action="append", default=[],
                     metavar="PATH[,ro][,bw=MB/s][,iops=N]",
                     help="a raw disk image as virtio-blk (repeatable; ,ro for read-only; "
                          "bw, iops: rate limits)")
    run.add_argument("--net", action="append", default=[],
                     metavar="tap=NAME[,mac=MAC][,bw=MB/s]",
                     help="a virtio-net device on a tap interface (repeatable; bw: a rate "
                          "limit each way)")
    add_share_arguments(run)
    run.add_argument("--rng", choices=["on", "off"], default=None,
                     help="virtio-rng fed by the host's getrandom() (default: on for the "
                          "default guest)")
    run.add_argument("--console", choices=["serial", "virtio"],
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
    run.add_argument("--qmp", metavar="unix:PATH",
                     help="a QMP control socket (QEMU's protocol: stop, cont, quit, "
                          "query-status, system_powerdown, x-kvmpy-snapshot-save...)")
    run.add_argument("--restore", type=Path, metavar="DIR",
                     help="resume the guest saved in snapshot DIR (x-kvmpy-snapshot-save): "
                          "its machine, RAM, devices; each writable disk runs on a new copy, "
                          "at the --disk given for it or in a new temporary directory; a "
                          "read-only disk, tap, share or vsock socket must be given again "
                          "(--disk, --net, --share, --vsock): a snapshot's own are refused")
    run.add_argument("--incoming", metavar="unix:PATH|tcp:HOST:PORT",
                     help="build the machine the other options describe and wait there for "
                          "a live migration (QMP migrate on the source, docs/migration.md); "
                          "the guest runs here once it has arrived")
    run.add_argument("--seccomp", choices=["kill", "log", "off"],
                     default=os.environ.get("KVMPY_SECCOMP", "kill"),
                     help="after set-up, hold each thread to the system calls it needs: "
                          "kill (default; env KVMPY_SECCOMP) ends kvmpy with SIGSYS at any "
                          "other, naming it; log lets it through and the kernel logs it "
                          "(docs/isolation.md)")
    run.add_argument("--landlock", choices=["on", "off"], default="off",
                     help="after set-up, let kvmpy reach only the files it was given "
                          "(disks, shares, the QMP socket's directory, --landlock-rw): "
                          "any other open fails with EACCES (Landlock, Linux 5.13+)")
    run.add_argument("--landlock-rw", action="append", default=[], type=Path, metavar="DIR",
                     help="with --landlock: a directory kvmpy may also write, e.g. where "
                          "QMP saves snapshots (repeatable)")
    run.add_argument("--jail", type=Path, metavar="DIR",
                     help="run in new PID, mount, IPC, UTS and (after set-up) network "
                          "namespaces, with DIR as a root that holds only the VM's files, as "
                          "--uid/--gid after set-up, in a cgroup v2 where one is writable "
                          "(root only; docs/isolation.md)")
    run.add_argument("--uid", type=int, help="with --jail: the unprivileged user to run as")
    run.add_argument("--gid", type=int, help="with --jail: the unprivileged group to run as")
    run.set_defaults(func=cmd_run)

    sandbox = sub.add_parser("sandbox", help="run a command in a VM over the host's files "
                             "(its root read-only under a throw-away overlay)")
    add_share_arguments(sandbox, tag_optional=True)
    sandbox.add_argument("--mem", default="512M",
                         help="guest RAM, which also bounds what the command can write "
                              "(default 512M)")
    sandbox.add_argument("--cpus", type=int, default=1,
                         help=f"vCPUs (default 1, at most {MAX_CPUS})")
    sandbox.add_argument("-v", "--sandbox-verbose", dest="sandbox_verbose",
                         action="store_true", help="show the guest kernel's console on stderr")
    sandbox.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                         help="the command to run, after --")
    sandbox.set_defaults(func=cmd_sandbox)

    from kvmpy.fuzz import command as fuzz_command

    fuzz_command.register(sub)

    try:
        from kvmpy.lab import command as lab_command
    except ImportError:  # the lab package is optional for flat guests
        pass
    else:
        lab_command.register(sub)
    return parser


def add_share_arguments(parser: argparse.ArgumentParser, *, tag_optional: bool = False) -> None:
    """--share and --vsock, for `run` and `sandbox`."""
    tag = "[,tag=TAG]" if tag_optional else ",tag=TAG"
    where = "at its own path" if tag_optional else "at /mnt/TAG in kvmpy's default guest"
    parser.add_argument("--share", action="append", default=[], metavar=f"DIR{tag}[,ro]",
                        help=f"share a host directory over virtio-9p (repeatable; ,ro: every "
                             f"write fails with EROFS), mounted {where} (docs/9p.md)")
    parser.add_argument("--vsock", metavar="CID,uds=PATH",
                        help="virtio-vsock with guest CID; host programs connect to the unix "
                             "socket PATH and send `CONNECT <port>`, the guest's connections "
                             "to host port P reach PATH_P (docs/vsock.md)")


# Options that only one kind of guest takes: giving them to the other is an error, not
# something to ignore. (argparse leaves each None or False unless the user gave it.)
FLAT_ONLY = ("mode", "entry", "cpl")
LINUX_ONLY = ("kernel", "initrd", "append", "modules", "acpi", "unpack", "entry64")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return ["--" + n for n in names if getattr(args, n) not in (None, False)]


# What a restored guest already is: options that describe how to boot it are refused with
# --restore, and those that describe the machine must say what the snapshot holds.
BOOT_ONLY = ("flat", *FLAT_ONLY, *LINUX_ONLY)


def restore_config(args: argparse.Namespace
                   ) -> tuple[MachineConfig, Snapshot, WorkingCopies]:
    """The machine in snapshot `args.restore`, checked against the options given with it,
    and the disk copies it runs on."""
    from kvmpy import options
    from kvmpy.state.config import refuse_mismatch
    from kvmpy.state.snapshot import open_snapshot

    wrong = _given(args, BOOT_ONLY)
    if wrong:
        raise ConfigError(f"{wrong[0]}: a restored guest is already running; --restore takes "
                          "its machine from the snapshot")
    snapshot = open_snapshot(args.restore)
    refuse_mismatch(
        snapshot.machine, snapshot.what(), cpus=args.cpus,
        mem_size=None if args.mem is None else options.size(args.mem),
        rng=None if args.rng is None else args.rng == "on",
        virtio_console=None if args.console is None else options.virtio_console(args.console),
        disks=len(args.disk) or None)
    config, copies = snapshot.working_config(
        [options.disk_config(d) for d in args.disk],
        nets=[options.net_config(n) for n in args.net],
        shares=[options.share_config(s) for s in args.share],
        vsock=options.vsock_config(args.vsock) if args.vsock else None)
    return config._replace(stats=args.stats), snapshot, copies


def machine_config(args: argparse.Namespace) -> MachineConfig:
    """The MachineConfig the options describe; `Machine` checks it before building."""
    from kvmpy import options

    devices = {"disks": args.disk, "nets": args.net, "console": args.console or "serial",
               "shares": args.share, "vsock": args.vsock}
    cpus = 1 if args.cpus is None else args.cpus
    if args.flat is not None:
        wrong = _given(args, LINUX_ONLY)
        if wrong:
            raise ConfigError(f"{', '.join(wrong)}: for Linux guests, not a --flat image")
        config = options.flat_machine(
            args.flat, mode=args.mode or Mode.REAL,
            entry=parse_address(args.entry) if args.entry else layout.FLAT_LOAD,
            cpl=args.cpl or 0, cpus=cpus, mem=args.mem or options.DEFAULT_FLAT_MEM,
            rng=args.rng == "on", **devices)
    else:
        wrong = _given(args, FLAT_ONLY)
        if wrong:
            raise ConfigError(f"{', '.join(wrong)}: for --flat images; a Linux guest "
                              "starts where its kernel says")
        config = options.linux_machine(
            args.kernel, args.initrd, append=args.append or "", cpus=cpus,
            mem=args.mem or options.DEFAULT_LINUX_MEM,
            rng=None if args.rng is None else args.rng == "on", acpi=args.acpi or "auto",
            modules=args.modules, unpack=args.unpack != "off", prefer_pvh=not args.entry64,
            **devices)
    return config._replace(stats=args.stats)


def cmd_run(args: argparse.Namespace) -> int:
    from kvmpy.console import StdinPump
    from kvmpy.machine import UNPACK_WAIT_S, Machine

    started = time.perf_counter()
    qmp_path = None
    if args.qmp is not None:
        from kvmpy.qmp import parse_address

        qmp_path = parse_address(args.qmp)
    snapshot = copies = incoming = None
    if args.incoming is not None:
        from kvmpy.migration.wire import parse_address as migration_address

        if args.restore is not None:
            raise ConfigError("--incoming, --restore: the guest comes from one or the other")
        incoming = migration_address(args.incoming, "--incoming")
    if args.restore is not None:
        config, snapshot, copies = restore_config(args)
    else:
        config = machine_config(args)
    trace, gdb = _seeing_inside(args)
    config = config._replace(trace=trace, gdb=gdb, seccomp=args.seccomp,
                             landlock=_landlock_rules(args, qmp_path))
    if args.jail is not None:
        config = config._replace(jail=_jail(args))
        status = _enter_jail(config, args, qmp_path, snapshot)
        if status is not None:  # the parent, outside: the jailed kvmpy has ended
            return status
    elif args.uid is not None or args.gid is not None:
        raise ConfigError("--uid, --gid: with --jail")
    try:
        machine = Machine(config, snapshot=snapshot, incoming=incoming is not None)
    except BaseException:
        if copies is not None:
            copies.discard()
        raise
    if copies is not None:
        copies.keep()
    if incoming is not None:
        _receive(machine, incoming, network=qmp_path is not None)
    # (not in a jail: the cache it would write to is outside)
    unpacking = machine.unpack_for_next_boot() if config.jail is None else None
    try:
        pump = qmp = None
        # set-up is over: the threads started from here inherit it (with QMP, a
        # migration's thread may connect over TCP)
        machine.lock_down(network=qmp_path is not None)
        if config.linux is not None:
            pump = StdinPump(machine.console_input, on_quit=lambda: machine.request_stop(
                Stop(StopKind.SIGINT, "quit from the console (Ctrl-A x)")))
            pump.start()
        if qmp_path is not None:
            from kvmpy.qmp import MachineControl, QmpServer

            control = MachineControl(machine)
            qmp = control.server = QmpServer(qmp_path, control)
            qmp.start()
        try:
            stop = machine.run(threads=qmp is not None)
        finally:
            if pump is not None:
                pump.stop()
            if qmp is not None:
                if machine.stopped is not None:
                    qmp.emit("SHUTDOWN", control.shutdown_event(machine.stopped))
                qmp.close()
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
    finally:
        if machine.stopped is not None and machine.stopped.kind is StopKind.MIGRATED:
            from kvmpy.migration.source import step_aside

            step_aside()
        machine.close()
        if unpacking is not None:  # a run shorter than the unpacking: finish it once
            unpacking.join(UNPACK_WAIT_S)
        if config.trace is not None and config.trace.out is not sys.stderr:
            config.trace.out.close()
    return stop.exit_status


def _receive(machine: Any, address: Any, network: bool) -> None:
    """`--incoming`: the guest arrives into `machine` (closed if it does not), and runs.
    Set-up ends (`lock_down`) and the vCPU threads start, held, while the first round
    comes: the pause then waits for neither."""
    from kvmpy.log import get_logger
    from kvmpy.migration.destination import receive

    log = get_logger("kvmpy.migration")

    def ready() -> None:
        machine.lock_down(network=network)
        machine.start(held=True)

    try:
        got = receive(machine, address, on_agreed=ready, on_listening=lambda: log.info(
            "waiting for a migration on %s", address.text))
    except BaseException:
        machine.request_stop(Stop(StopKind.ERROR, "no guest arrived"))  # (held threads end)
        machine.close()
        raise
    machine.resume()
    got.phases.mark("resumed")
    log.info("migration received: %d pages in %d rounds, %.3f s; %s", got.pages, got.rounds,
             got.seconds, got.phases.text())
def _landlock_rules(args: argparse.Namespace, qmp_path: Path | None) -> LandlockRules | None:
    """The files `--landlock` leaves kvmpy besides the machine's own (kvmpy.machine)."""
    if args.landlock != "on":
        if args.landlock_rw:
            raise ConfigError("--landlock-rw: with --landlock on")
        return None
    from kvmpy.isolation.landlock import Rules

    sockets = () if qmp_path is None else (Path(qmp_path).resolve().parent,)
    return Rules(write=tuple(args.landlock_rw), sockets=sockets)


def _jail(args: argparse.Namespace) -> Jail:
    from kvmpy.isolation.jail import Jail

    return Jail.parse(args.jail, args.uid, args.gid)


def _enter_jail(config: MachineConfig, args: argparse.Namespace,
                qmp_path: Path | None, snapshot: Snapshot | None) -> int | None:
    """Into the jail with the files the machine is given; the parent's status, or None
    in the jailed child (kvmpy.isolation.jail). A restore is given its snapshot's
    directories (its chain's too), and not the boot files the snapshot names: it never
    opens them, and a snapshot is untrusted."""
    from kvmpy.isolation import jail, seccomp

    if config.seccomp in seccomp.MODES[1:]:  # (read where the cache is, not in the jail)
        seccomp.programs(config.seccomp)
    read: list[Path] = [d.path for d in config.disks if d.read_only]
    read += [s.path for s in config.shares if s.read_only]
    if snapshot is not None:
        read += snapshot.directories()
    elif config.flat is not None:
        read.append(config.flat.path)
    elif config.linux is not None:
        read += [p for p in (config.linux.kernel, config.linux.initrd) if p is not None]
    write: list[Path] = [d.path for d in config.disks if not d.read_only]
    write += [s.path for s in config.shares if not s.read_only]
    write += [p.parent for p in (qmp_path, config.vsock and config.vsock.uds) if p]
    write += args.landlock_rw
    devices = [Path("/dev/kvm")] + ([Path("/dev/net/tun")] if config.nets else [])
    assert config.jail is not None
    return jail.enter(config.jail, read=read, write=write, devices=devices,
                      mem_size=config.mem_size, cpus=config.cpus)


def cmd_sandbox(args: argparse.Namespace) -> int:
    """`kvmpy sandbox`: every option checked before anything boots (kvmpy.sandbox)."""
    from kvmpy import checks, options, sandbox

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("give a command after --, e.g. `kvmpy sandbox -- uname -a`")
    shares = [options.share_config(s, default_tag=f"kvmpyshare{i}")
              for i, s in enumerate(args.share)]
    vsock = options.vsock_config(args.vsock) if args.vsock else None
    mem = options.size(args.mem)
    checks.check_mem(mem, linux=True)
    if not 1 <= args.cpus <= MAX_CPUS:
        raise ConfigError(f"--cpus {args.cpus}: kvmpy supports 1 to {MAX_CPUS} vCPUs")
    checks.check_shares(shares)
    if vsock is not None:
        checks.check_vsock(vsock)
    sandbox.check(argv, shares)
    from kvmpy.kvm.detect import can_boot_linux

    if not can_boot_linux():
        return _sandbox_in_lab(args, argv, rw=[str(s.path) for s in shares if not s.read_only])
    return sandbox.run_sandbox(argv, shares=shares, vsock=vsock, mem=mem, cpus=args.cpus,
                               verbose=args.sandbox_verbose)


def _sandbox_in_lab(args: argparse.Namespace, argv: list[str], rw: list[str]) -> int:
    """The same `kvmpy sandbox` inside the lab, where /dev/kvm boots Linux; the read-write
    shares are the lab's --rw directories, so what the command writes there stays."""
    from kvmpy.lab import LabError, run_in_lab

    inner = [sys.executable, "-m", "kvmpy", "sandbox", "--mem", args.mem,
             "--cpus", str(args.cpus)]
    for text in args.share:
        inner += ["--share", text]
    if args.vsock:
        inner += ["--vsock", args.vsock]
    if args.sandbox_verbose:
        inner.append("-v")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        return run_in_lab([*inner, "--", *argv], rw=rw)
    except LabError as e:
        raise LabError(f"the lab (this /dev/kvm cannot boot Linux): {e}") from None


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
    from kvmpy.fuzz.command import libfuzzer_child

    args = build_parser().parse_args(libfuzzer_child(sys.argv[1:] if argv is None else argv))
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
