"""Explain a dead vCPU in words: what it was doing, and the most likely reason it died.

- `kvmpy.diagnostics.report`: the vCPU's state rendered for people (`describe_vcpu`
  under a fatal Stop, `describe_running` for a guest gone quiet, `diagnose`).
- `kvmpy.diagnostics.cause`: the most likely cause, by rules a person would apply
  (`find_cause`, `check_entry_state`), as a structured `Cause`.

Imported only by a dying or inspected vCPU: it brings capstone, and start-up is measured.
"""

from kvmpy.diagnostics.cause import Cause, Snapshot, check_entry_state
from kvmpy.diagnostics.report import (
    Diagnosis,
    describe_running,
    describe_vcpu,
    diagnose,
    snapshot,
)

__all__ = ["Cause", "Diagnosis", "Snapshot", "check_entry_state", "describe_running",
           "describe_vcpu", "diagnose", "snapshot"]
