"""cffi build script for kvmpy's C shim (API mode).

Run by setuptools through `cffi_modules` in setup.py, so `pip install .`
compiles `kvmpy._kvm`. The shim only marshals: see kvm_shim.h.
"""
import ctypes
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SYSCALLS = 512  # the report's table: numbers 0 .. SYSCALLS - 1 (x86-64 has ~460)


def syscall_names() -> list[str | None]:
    """This architecture's system call names by number, as libseccomp (which the
    filters are built with) knows them; none if it is missing here. Asked at build
    time, one call a number: at run time the SIGSYS report (sigsys.h) only indexes
    the table."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return []
    resolve = lib.seccomp_syscall_resolve_num_arch
    resolve.restype = ctypes.c_char_p  # (malloc'd: a few KB left to the build's exit)
    resolve.argtypes = [ctypes.c_uint32, ctypes.c_int]
    return [(name.decode() if (name := resolve(0, nr)) else None) for nr in range(SYSCALLS)]


def syscall_table() -> str:
    names = syscall_names()
    rows = "".join(f'    "{n}",\n' if n else "    0,\n" for n in names)
    return (f"static const char *const kvmpy_syscall_names[] = {{\n{rows}    0\n}};\n"
            f"#define KVMPY_SYSCALLS {len(names)}\n")


ffibuilder = FFI()
ffibuilder.cdef((HERE / "kvm_shim.cdef").read_text())
ffibuilder.set_source(
    "kvmpy._kvm",
    '#include "kvm_shim.h"\n' + syscall_table() + '#include "sigsys.h"',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
