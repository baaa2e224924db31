"""Live migration: a running guest moved to another kvmpy process while it keeps working.

- `wire`: the stream's bytes (docs/migration.md) and the `unix:`/`tcp:` addresses.
- `agree`: what both ends compare before any page moves (memory, vCPUs, devices, CPUID).
- `source`: the sending side, a thread beside the vCPUs: pre-copy rounds over KVM's
  dirty log, then a short pause for the rest and the state; the guest stays here
  unless the destination says it runs.
- `destination`: `kvmpy run --incoming`: receives into a machine built without a boot,
  restores every part, says "running", runs.
"""
