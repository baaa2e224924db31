"""The fuzzing loop: inputs in, oracles checked, the first finding saved and reported.

What it is: `Fuzzer(target, kvm=...)` holds one rig (kvmpy.fuzz.rigs) and the
process-wide oracles (log lines, host memory); `Fuzzer.one(data)` decodes one input,
runs it under the time limit, checks every oracle and resets the machine, raising
`Finding` on a bug. Two engines feed it: `run_seeded` (random inputs from a seed:
deterministic, what the tests and `make fuzz` use) and `run_atheris` (coverage-guided
libFuzzer through atheris, its flags passed through). A finding is saved as the raw
input (what libFuzzer reads back, for -minimize_crash) plus a JSON note of the target,
mode and oracle, so `kvmpy fuzz --replay FILE` needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from kvmpy.fuzz.ops import decode
from kvmpy.fuzz.oracles import Finding, LogWatch, MemoryWatch, TimeLimit, time_limit
from kvmpy.fuzz.rigs import FUZZ_MEM, BusRig, KvmRig
from kvmpy.fuzz.targets import Target

MAX_LEN = 512  # bytes per input: about MAX_OPS decoded operations fit
DEFAULT_TIMEOUT = 5.0  # seconds per input before the hang oracle fires


class Fuzzer:
    def __init__(self, target: Target, *, kvm: bool = True, timeout: float = DEFAULT_TIMEOUT,
                 trace: Any = None) -> None:
        self.target = target
        self.kvm = kvm
        self.timeout = timeout
        with time_limit(timeout):  # (the rig runs the prelude: device code too)
            self.rig: KvmRig | BusRig = KvmRig(target, trace=trace) if kvm else BusRig(target)
        self.logs = LogWatch()
        self.logs.install()
        self.memory = MemoryWatch(FUZZ_MEM)
        self.limit = TimeLimit(timeout)
        self.limit.install()
        self.inputs = 0

    def one(self, data: bytes) -> None:
        """Run one input; raises `Finding` if an oracle fires."""
        ops = decode(data, self.rig.windows)
        self.inputs += 1
        self.logs.begin()
        try:
            with self.limit:
                self.rig.run(ops)
        except Finding as finding:
            if finding.oracle != "hang" or not self.rig.hang_is_guests():
                # without the frames it came through: they hold windows on guest RAM,
                # which could not be unmapped while a caller keeps the finding
                raise finding.with_traceback(None) from None
        self.logs.check()
        self.rig.check()
        self.memory.check()
        self.rig.reset()

    def close(self) -> None:
        self.limit.uninstall()
        self.logs.uninstall()
        self.memory.close()
        self.rig.close()

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def seeded_inputs(seed: int, runs: int, max_len: int = MAX_LEN) -> Any:
    """`runs` inputs of random length and bytes from `seed`: the same list every time."""
    rng = random.Random(seed)
    for _ in range(runs):
        yield rng.randbytes(rng.randrange(1, max_len + 1))


def run_seeded(fuzzer: Fuzzer, seed: int, runs: int, max_len: int = MAX_LEN
               ) -> tuple[bytes, Finding] | None:
    for data in seeded_inputs(seed, runs, max_len):
        try:
            fuzzer.one(data)
        except Finding as finding:
            return data, finding
    return None


def run_atheris(fuzzer: Fuzzer, runs: int, out: Path, libfuzzer_args: list[str]) -> None:
    """libFuzzer over `fuzzer.one`, coverage from atheris' instrumentation of kvmpy's
    bytecode. Does not return: libFuzzer exits 0 after `runs` inputs; a finding is
    saved and reported here, then raised to libFuzzer as a crash (its -minimize_crash
    minimizes those)."""
    import atheris  # type: ignore[import-not-found]

    started: list[bool] = []

    def test_one_input(data: bytes) -> None:
        if not started:  # the instrumentation and libFuzzer's start-up took memory too
            started.append(True)
            fuzzer.memory.rearm()
        try:
            fuzzer.one(data)
        except Finding as finding:
            report(save(out, fuzzer.target, fuzzer.kvm, data, finding), finding, fuzzer.target)
            # an uncaught exception is a crash to libFuzzer: it writes its own artifact
            # (-exact_artifact_path, which -minimize_crash needs) and exits non-zero
            raise RuntimeError(str(finding)) from None

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-max_len={MAX_LEN}", *libfuzzer_args],
                  test_one_input)
    atheris.Fuzz()


def save(out: Path, target: Target, kvm: bool, data: bytes, finding: Finding) -> Path:
    """The reproducer: the input's bytes, and beside it (.json) what replays it."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{target.name}-{finding.oracle}-{hashlib.sha1(data).hexdigest()[:12]}"
    path = out / name
    path.write_bytes(data)
    note = {"target": target.name, "kvm": kvm, "oracle": finding.oracle,
            "message": finding.message, "found": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}
    path.with_suffix(".json").write_text(json.dumps(note, indent=1) + "\n")
    return path


def report(path: Path | None, finding: Finding, target: Target) -> None:
    """The one line a finding gets on stdout (its message on one line too)."""
    message = " ".join(finding.message.split())
    where = f"; reproducer {path}" if path is not None else ""
    print(f"finding: {finding.oracle} in {target.name}: {message}{where}", flush=True)


def replay_note(path: Path) -> dict[str, Any]:
    """The JSON note saved beside a reproducer, or {} if there is none."""
    note = path.with_suffix(".json")
    try:
        return dict(json.loads(note.read_text()))
    except (OSError, ValueError):
        return {}
