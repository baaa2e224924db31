"""`kvmpy fuzz`: the command line of the device fuzzer (docs/fuzzing.md).

    kvmpy fuzz --list
    kvmpy fuzz --target NAME [--runs N] [--seed S] [--no-kvm] [--out DIR] [--timeout SEC]
               [-- LIBFUZZER-FLAGS]
    kvmpy fuzz --replay FILE [--target NAME] [--no-kvm] [--trace]

Exit status: 0 when the runs found nothing, 1 on a finding (one line on stdout that
starts with "finding:", names the oracle and the reproducer's path), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kvmpy.errors import ConfigError

DEFAULT_RUNS = 1000


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fuzz = sub.add_parser("fuzz", help="fuzz a device through the real exit path, with "
                          "oracles beyond exceptions (docs/fuzzing.md)")
    fuzz.add_argument("--list", action="store_true", help="name the targets and exit")
    fuzz.add_argument("--target", metavar="NAME", help="the device to fuzz (see --list)")
    fuzz.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                      help=f"inputs to run (default {DEFAULT_RUNS})")
    fuzz.add_argument("--seed", type=int,
                      help="deterministic: random inputs from this seed instead of "
                           "coverage-guided libFuzzer (atheris)")
    fuzz.add_argument("--no-kvm", action="store_true",
                      help="drive the ops straight into the buses (no VM: faster)")
    fuzz.add_argument("--out", type=Path, metavar="DIR",
                      help="where findings are saved (default $KVMPY_CACHE/fuzz/findings)")
    fuzz.add_argument("--timeout", type=float, default=None, metavar="SEC",
                      help="the hang oracle's limit per input (default 5)")
    fuzz.add_argument("--replay", type=Path, metavar="FILE",
                      help="run one saved input again (its target and mode from FILE.json)")
    fuzz.add_argument("--trace", action="store_true",
                      help="with --replay: print a line per VM exit (kvmpy run --trace)")
    fuzz.add_argument("libfuzzer", nargs="*", metavar="-- LIBFUZZER-FLAGS",
                      help="passed to libFuzzer, e.g. -- -minimize_crash=1 FILE")
    fuzz.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from kvmpy.fuzz.targets import TARGETS

    if args.list:
        width = max(len(name) for name in TARGETS)
        for target in TARGETS.values():
            print(f"{target.name:<{width}}  {target.about}  [kvmpy run {target.options}]")
        return 0
    if args.replay is not None:
        return _replay(args)
    if args.target is None:
        raise ConfigError("kvmpy fuzz: give --target NAME (kvmpy fuzz --list names them)")
    if args.trace:
        raise ConfigError("--trace is for --replay (tracing every exit of a fuzzing run "
                          "would drown it)")
    if args.runs < 1:
        raise ConfigError(f"--runs {args.runs}: at least 1")
    if args.libfuzzer and args.seed is not None:
        raise ConfigError("libFuzzer flags are for the coverage-guided run, not --seed")
    target = _target(args.target)
    from kvmpy.fuzz.oracles import Finding
    from kvmpy.fuzz.runner import Fuzzer, report, run_atheris, run_seeded, save

    out = args.out or _default_out()
    try:
        fuzzer = Fuzzer(target, kvm=not args.no_kvm, timeout=_timeout(args))
    except Finding as early:  # in the prelude, before any input: any input reproduces it
        report(save(out, target, not args.no_kvm, b"", early), early, target)
        return 1
    with fuzzer:
        if args.seed is None:
            try:
                import atheris  # type: ignore[import-not-found]  # noqa: F401
            except ImportError:
                raise ConfigError("coverage-guided fuzzing needs atheris (pip install "
                                  "atheris); or give --seed S for seeded random inputs") \
                    from None
            import json

            parent = ["fuzz", "--target", target.name, "--out", str(out),
                      "--timeout", str(_timeout(args)), *(["--no-kvm"] if args.no_kvm else [])]
            os.environ[CHILD_ENV] = json.dumps(parent)
            run_atheris(fuzzer, args.runs, out, args.libfuzzer)
            return 0  # (libFuzzer exits the process itself)
        found = run_seeded(fuzzer, args.seed, args.runs)
        mode = "KVM-free" if args.no_kvm else "through KVM"
        if found is None:
            print(f"fuzz {target.name} ({mode}, seed {args.seed}): {fuzzer.inputs} inputs, "
                  "no finding")
            return 0
        data, finding = found
        report(save(out, target, fuzzer.kvm, data, finding), finding, target)
        return 1


# libFuzzer's -minimize_crash (and -fork, -merge) run this program again with only their
# own flags: the variable tells such a child which `kvmpy fuzz` it is (runner.run_atheris).
CHILD_ENV = "KVMPY_FUZZ_LIBFUZZER_ARGS"


def libfuzzer_child(argv: list[str]) -> list[str]:
    """`argv`, or for a child libFuzzer started (argv only its -flags and inputs) the
    `kvmpy fuzz` command line of its parent with them after `--`."""
    parent = os.environ.get(CHILD_ENV)
    if parent and argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v",
                                                                      "--verbose"):
        import json  # (here: not on the boot path of `kvmpy run`)

        return [*json.loads(parent), "--", *argv]
    return argv


def _replay(args: argparse.Namespace) -> int:
    from kvmpy.fuzz.oracles import Finding
    from kvmpy.fuzz.runner import Fuzzer, replay_note, report

    try:
        data = args.replay.read_bytes()
    except OSError as e:
        raise ConfigError(f"--replay {args.replay}: {e.strerror}") from None
    note = replay_note(args.replay)
    name = args.target or note.get("target")
    if name is None:
        raise ConfigError(f"--replay {args.replay}: no {args.replay.name}.json beside it to "
                          "name its target; give --target")
    target = _target(name)
    kvm = not args.no_kvm and note.get("kvm", True)
    if args.trace and not kvm:
        raise ConfigError("--trace shows VM exits: replay through KVM (without --no-kvm)")
    trace = None
    if args.trace:
        from kvmpy.trace.filter import TraceFilter
        from kvmpy.trace.tracer import Tracer

        trace = Tracer(TraceFilter.parse(""), sys.stderr)
    try:
        with Fuzzer(target, kvm=kvm, timeout=_timeout(args), trace=trace) as fuzzer:
            fuzzer.one(data)
    except Finding as finding:
        report(args.replay, finding, target)
        return 1
    print(f"replay {args.replay} on {target.name} ({'through KVM' if kvm else 'KVM-free'}): "
          "no finding")
    return 0


def _target(name: str):  # type: ignore[no-untyped-def]
    from kvmpy.fuzz.targets import TARGETS

    if name not in TARGETS:
        raise ConfigError(f"--target {name}: no such target (one of {', '.join(TARGETS)})")
    return TARGETS[name]


def _timeout(args: argparse.Namespace) -> float:
    from kvmpy.fuzz.runner import DEFAULT_TIMEOUT

    if args.timeout is None:
        return DEFAULT_TIMEOUT
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g}: seconds, more than 0")
    return float(args.timeout)


def _default_out() -> Path:
    from kvmpy.cachedir import cache_dir

    return cache_dir() / "fuzz" / "findings"
