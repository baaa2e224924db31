"""Devices: pure state machines behind a bus offset, an interrupt line and guest memory.

Each module is one device a student can read top to bottom. None of them imports
the KVM layer; the VMM places them on a `kvmpy.bus.Bus` and hands them a
`kvmpy.bus.IrqLine`, so unit tests and fuzzers drive them directly.
"""
