"""The lab: a nested VM with hardware-virtualization KVM, for machines whose /dev/kvm cannot
boot Linux (PVM, CI runners and laptops without nested virtualization).

QEMU's TCG emulates AMD SVM with `-cpu max`, so Debian's kernel inside it loads `kvm_amd`
and offers a real /dev/kvm. `run_in_lab` runs one command there over the host's own file
tree and returns its exit status; `kvmpy lab -- COMMAND` is the same from the shell.

- `run_in_lab(argv, rw=..., mem=..., cpus=...) -> int`: `kvmpy.lab.runner`
- `can_boot_linux() -> bool`, `linux_kvm_status()`, `lab_status()`: `kvmpy.lab.host`
- `build_lab_image()`: `kvmpy.lab.image` (cached in $KVMPY_CACHE/lab)

The package is not a sandbox and not a general VM launcher.
"""

from kvmpy.lab.debian import LabError
from kvmpy.lab.host import can_boot_linux, lab_status, linux_kvm_status
from kvmpy.lab.image import LabImage, build_lab_image, lab_image_path
from kvmpy.lab.runner import INSIDE_ENV, run_in_lab

__all__ = ["INSIDE_ENV", "LabError", "LabImage", "build_lab_image", "can_boot_linux",
           "lab_image_path", "lab_status", "linux_kvm_status", "run_in_lab"]
