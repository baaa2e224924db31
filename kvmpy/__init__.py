"""kvmpy: a micro-VMM in Python on the raw Linux KVM API.

The C shim (`kvmpy._kvm`, built from csrc/) only marshals ioctls; everything
a reader wants to follow (memory, CPU modes, devices, the exit loop, the boot
protocol) is Python in this package.
"""

__version__ = "0.1.0"
