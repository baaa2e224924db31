"""cffi build script for kvmpy's C shim (API mode).

Run by setuptools through `cffi_modules` in setup.py, so `pip install .`
compiles `kvmpy._kvm`. The shim only marshals: see kvm_shim.h.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "kvm_shim.cdef").read_text())
ffibuilder.set_source(
    "kvmpy._kvm",
    '#include "kvm_shim.h"\n#include "sigsys.h"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
