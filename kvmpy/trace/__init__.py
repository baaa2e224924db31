"""Seeing what a guest does: exit tracing, exit statistics, disassembly, linear memory.

- `kvmpy.trace.tracer`: `--trace`, one line per VM exit (installed only when asked).
- `kvmpy.trace.stats`: `--stats`, counts and handler time per reason, port, device.
- `kvmpy.trace.filter`: the `--trace=FILTER` language.
- `kvmpy.trace.disasm`: capstone in the width the vCPU is executing.
- `kvmpy.trace.vmem`: guest linear addresses through the guest's page tables.

Nothing here is on the exit loop's path unless it is switched on: the tracer and
the statistics are observers (kvmpy.exitloop.ExitObserver) a loop is given at
construction, and a loop without observers makes no call for them.
"""
