"""`kvmpy` on the command line: `run` a guest, or run a command in the `lab`.

Every failure the user can cause (bad option, missing file, no /dev/kvm)
ends as one line on stderr and a non-zero status; a guest that dies ends with
its diagnostic and the status of its `Stop`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kvmpy import layout
from kvmpy.cpu.modes import Mode
from kvmpy.errors import KvmpyError
from kvmpy.units import parse_address, parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmpy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log device events")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a guest")
    run.add_argument("--flat", type=Path, metavar="FILE", help="a raw binary guest")
    run.add_argument("--mode", choices=[m.value for m in Mode], default="real",
                     help="CPU mode a flat guest starts in (default: real)")
    run.add_argument("--entry", default=hex(layout.FLAT_LOAD),
                     help=f"entry address of a flat guest (default {layout.FLAT_LOAD:#x})")
    run.add_argument("--cpl", type=int, choices=[0, 3], default=0,
                     help="privilege level a long-mode flat guest starts at")
    run.add_argument("--mem", default="128M",
                     help="guest RAM (default 128M)")
    run.add_argument("--stats", action="store_true",
                     help="print exit statistics as one JSON line on stderr at the end")
    run.set_defaults(func=cmd_run)

    try:
        from kvmpy.lab import command as lab_command
    except ImportError:  # the lab package is optional for flat guests
        pass
    else:
        lab_command.register(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from kvmpy.machine import FlatConfig, Machine, MachineConfig

    if args.flat is None:
        raise KvmpyError("kvmpy run: give --flat FILE")
    started = time.perf_counter()
    flat = FlatConfig(path=args.flat, mode=Mode(args.mode), entry=parse_address(args.entry),
                      cpl=args.cpl)
    machine = Machine(MachineConfig(mem_size=parse_size(args.mem), flat=flat, stats=args.stats))
    stop = machine.run()
    if stop.details or stop.kind.value not in (0, -1):
        print(f"kvmpy: {stop.reason}", file=sys.stderr)
        if stop.details:
            print(stop.details, file=sys.stderr)
    if args.stats:
        stats = machine.stats()
        stats["process_s"] = round(time.perf_counter() - started, 6)
        stats["stop"] = stop.reason
        print(json.dumps(stats), file=sys.stderr)
    machine.close()
    return stop.exit_status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="kvmpy: %(message)s")
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
