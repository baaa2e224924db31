"""The lab: a nested VM with hardware-virtualization KVM, for machines whose /dev/kvm cannot
boot Linux (PVM, CI runners and laptops without nested virtualization).

QEMU's TCG emulates AMD SVM with `-cpu max`, so Debian's kernel inside it loads `kvm_amd`
and offers a real /dev/kvm. `run_in_lab` runs one command there over the host's own file
tree and returns its exit status; `kvmpy lab -- COMMAND` is the same from the shell.

- `run_in_lab(argv, rw=..., mem=..., cpus=...) -> int`: `kvmpy.lab.runner`
- `lab_status()`: `kvmpy.lab.host`; whether Linux boots without the lab
  (`can_boot_linux()`, `linux_kvm_status()`) is `kvmpy.kvm.detect`'s question
- `build_lab_image()`: `kvmpy.lab.image` (cached in $KVMPY_CACHE/lab), from the guest
  assets' parts (`kvmpy.assets`)

The package is not a sandbox and not a general VM launcher.
"""

from __future__ import annotations

from kvmpy.lazy import lazy_exports

# Names are imported on first use: `kvmpy run` registers the `lab` subcommand on every
# start and should not pay for QEMU plumbing it won't use.
_EXPORTS = {
    "LabError": "kvmpy.lab.errors",
    "can_boot_linux": "kvmpy.kvm.detect",
    "lab_status": "kvmpy.lab.host",
    "linux_kvm_status": "kvmpy.kvm.detect",
    "LabImage": "kvmpy.lab.image",
    "build_lab_image": "kvmpy.lab.image",
    "lab_image_path": "kvmpy.lab.image",
    "INSIDE_ENV": "kvmpy.lab.runner",
    "run_in_lab": "kvmpy.lab.runner",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
