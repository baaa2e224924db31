"""`kvmpy lab [--mem SIZE] [--cpus N] [--rw DIR]... [-v] -- COMMAND...`: the lab from the shell.

Registered into the main CLI by `register(subparsers)`; also runnable on its own as
`python -m kvmpy.lab.command ...`. The exit status is COMMAND's; when the lab itself
fails (cannot boot, missing package, no space) one line says why and the status is 125.
"""

from __future__ import annotations

import argparse
import sys

from kvmpy.errors import KvmpyError
from kvmpy.lab.host import DEFAULT_CPUS, DEFAULT_MEM
from kvmpy.units import parse_size

HELP = "run a command in the lab (nested hardware-virtualization KVM under QEMU TCG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mem", type=parse_size, default=DEFAULT_MEM,
                        help=f"lab RAM, also the limit of its writable overlay "
                             f"(default {DEFAULT_MEM >> 20}M)")
    parser.add_argument("--cpus", type=int, default=DEFAULT_CPUS,
                        help=f"lab vCPUs (default {DEFAULT_CPUS})")
    parser.add_argument("--rw", action="append", default=[], metavar="DIR",
                        help="share DIR read-write, so what the command writes there stays "
                             "(repeatable); everything else is a throw-away overlay")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="kill the lab after this long")
    parser.add_argument("--quiet-timeout", type=float, default=None, metavar="SECONDS",
                        help="kill the lab when the command prints nothing for this long "
                             "(a lab that stops making progress is noticed anyway, by its "
                             "heartbeat)")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="give the command this terminal's input (e.g. a guest's shell)")
    parser.add_argument("-v", "--lab-verbose", dest="lab_verbose", action="store_true",
                        help="show the lab's kernel console on stderr")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                        help="the command to run inside, after --")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("lab", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("kvmpy lab: give a command after --, e.g. `kvmpy lab -- uname -a`", file=sys.stderr)
        return 2
    from kvmpy.lab.runner import run_in_lab

    sys.stdout.flush()
    sys.stderr.flush()
    return run_in_lab(argv, rw=args.rw, mem=args.mem, cpus=args.cpus, timeout=args.timeout,
                      verbose=args.lab_verbose, interactive=args.interactive,
                      quiet_timeout=args.quiet_timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmpy lab", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvmpyError as e:
        print(f"kvmpy lab: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
