"""A gdb remote-protocol stub for kvmpy guests (`kvmpy run --gdb PORT`).

- `kvmpy.gdb.stub`: the server thread and the packets (GdbStub, GdbConfig).
- `kvmpy.gdb.control`: parking vCPUs on their own threads while gdb looks at them.
- `kvmpy.gdb.debugregs`: breakpoints and watchpoints in DR0-DR3/DR7.
- `kvmpy.gdb.registers`: the target description and register packing.
- `kvmpy.gdb.protocol`: packet framing.
"""
