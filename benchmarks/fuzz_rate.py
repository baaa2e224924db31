"""Fuzz inputs per second: `kvmpy fuzz` through KVM (op interpreter, a VM exit per access,
fast reset between inputs) and KVM-free (the same ops into the buses), beside the
device harness it grew from (fuzz/virtio_fuzz.py: one device, no bus, no reset, a
fresh device per input), all in the same run, on the same seeded random inputs.

Every target `kvmpy fuzz --list` names, each with its inputs/s both ways and the
accesses and VM exits an input makes on average (what an input costs through KVM is
mostly its exits: ~15 us each on this PVM /dev/kvm), and the slowest target each way.
The harness (for the virtio devices it knows) runs its own decoding of the same
bytes, so its inputs do other work: the comparison is of rates a user gets, not of
identical work. Targets: >= 500 inputs/s through KVM, >= 2,000 KVM-free, for every
target. No lab: `.venv/bin/python benchmarks/fuzz_rate.py [TARGET...]`.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any

from common import ROOT, median

from kvmpy.fuzz import ops
from kvmpy.fuzz.runner import Fuzzer, seeded_inputs
from kvmpy.fuzz.targets import TARGETS

INPUTS = 400  # per round
ROUNDS = 3
SEED = 1


def rate(one: object, inputs: list[bytes]) -> float:
    start = time.perf_counter()
    for data in inputs:
        one(data)  # type: ignore[operator]
    return len(inputs) / (time.perf_counter() - start)


def kvmpy_rates(name: str, kvm: bool, inputs: list[bytes]) -> tuple[float, float, float]:
    """(inputs/s, accesses per input, VM exits per input) over ROUNDS rounds."""
    with Fuzzer(TARGETS[name], kvm=kvm) as fuzzer:
        fuzzer.one(inputs[0])  # warm: first imports, first pages
        rates = [rate(fuzzer.one, inputs) for _ in range(ROUNDS)]
        accesses = sum(op.times for data in inputs for op in ops.decode(data, fuzzer.rig.windows)
                       if op.kind != ops.RAM_WRITE) / len(inputs)
        exits = 0.0
        if kvm:
            loop = fuzzer.rig.machine.loops[0]  # type: ignore[union-attr]
            before = loop.exits_seen
            for data in inputs:
                fuzzer.one(data)
            exits = (loop.exits_seen - before) / len(inputs)
    return median(rates), accesses, exits


def load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("virtio_fuzz", ROOT / "fuzz" / "virtio_fuzz.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    sys.modules["virtio_fuzz"] = harness
    spec.loader.exec_module(harness)
    return harness


def harness_rate(harness: Any, kind: str, inputs: list[bytes]) -> float:
    return median([rate(lambda data: harness.run_one(kind, data), inputs)
                   for _ in range(ROUNDS)])


def main(names: list[str] | None = None) -> dict[str, object]:
    inputs = list(seeded_inputs(SEED, INPUTS))
    figures: dict[str, dict[str, float]] = {}
    harness = load_harness()
    try:
        for name in names or TARGETS:
            kvm, accesses, exits = kvmpy_rates(name, True, inputs)
            free, _, _ = kvmpy_rates(name, False, inputs)
            figures[name] = {"through_kvm_inputs_per_s": round(kvm, 1),
                             "kvm_free_inputs_per_s": round(free, 1),
                             "accesses_per_input": round(accesses, 1),
                             "vm_exits_per_input": round(exits, 1)}
            if name in harness.DEVICES:
                figures[name]["virtio_fuzz_harness_inputs_per_s"] = round(
                    harness_rate(harness, name, inputs), 1)
    finally:
        harness.uninstall_trap()
    slowest = {}
    for mode, target in (("through_kvm", TARGET_KVM), ("kvm_free", TARGET_KVM_FREE)):
        key = f"{mode}_inputs_per_s"
        name = min(figures, key=lambda n: figures[n][key])
        slowest[f"slowest_{mode}"] = {"target": name, "inputs_per_s": figures[name][key],
                                      "below_target": sorted(n for n in figures
                                                             if figures[n][key] < target)}
    return {"inputs_per_round": INPUTS, "rounds": ROUNDS, "seed": SEED,
            "input_bytes_mean": round(sum(map(len, inputs)) / len(inputs)), **figures,
            **slowest, "target_through_kvm_min": TARGET_KVM,
            "target_kvm_free_min": TARGET_KVM_FREE}


TARGET_KVM, TARGET_KVM_FREE = 500, 2000


if __name__ == "__main__":
    import json

    print(json.dumps(main(sys.argv[1:]), indent=2))
