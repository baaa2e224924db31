"""Confinement of a running kvmpy: what a device model subverted by its guest can still
do to the host (docs/isolation.md).

- `seccomp`: each thread held to the system calls its work needs, after set-up.
- `landlock`: the process held to the files it was given, after set-up.
- `escape`: the test-only hook that tries what such a device model would.
"""
