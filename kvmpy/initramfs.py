"""Initramfs images built in Python: a gzip'd "newc" cpio archive, busybox, an init, modules.

The kernel unpacks an initramfs in the format of Documentation/driver-api/early-userspace/
buffer-format.rst: "newc" cpio entries (magic 070701, thirteen 8-digit hex fields, a
NUL-terminated name, data, each padded to 4 bytes) ending with the entry "TRAILER!!!",
optionally compressed (kvmpy uses gzip, CONFIG_RD_GZIP). Writing it here instead of
running `cpio` means no host tool, no files staged on disk, and byte-identical output for
identical input (all mtimes are 0, gzip carries no timestamp), so an image can be cached
by a hash of its recipe.

Kernel modules are taken from an unpacked Debian kernel tree. Debian ships no
`modules.dep` (depmod runs at install time), so dependencies come from each module's own
`depends=` entry in its ELF `.modinfo` section, and `resolve_modules` returns them in a
load order (dependencies first). The init then `insmod`s them in that order; busybox's
insmod does no dependency handling of its own.

This module is not a general cpio library: it writes newc only (and reads it back, for
tests and for checking), and knows no hard links beyond nlink=1 files.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kvmpy.errors import ConfigError

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# st_mode file types (sys/stat.h)
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000
_TYPE_MASK = 0o170000
_HEADER = struct.Struct("6s" + "8s" * 13)  # magic + 13 hex fields = 110 bytes

BUSYBOX = Path("/bin/busybox")


class InitramfsError(ConfigError):
    """An archive, a module or a busybox that is not what it claims to be."""


@dataclass(frozen=True)
class Entry:
    """One cpio member. `data` is the file content, or the target of a symlink."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    nlink: int = 1


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def encode_entry(entry: Entry, ino: int) -> bytes:
    """One newc header + name + data, both padded to a 4-byte boundary."""
    name = entry.name.encode() + b"\0"
    fields = (ino, entry.mode, entry.uid, entry.gid, entry.nlink, entry.mtime, len(entry.data),
              0, 0, entry.rdevmajor, entry.rdevminor, len(name), 0)
    for f in fields:
        if not 0 <= f <= 0xFFFFFFFF:
            raise InitramfsError(f"cpio field {f} of {entry.name!r} does not fit 32 bits")
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out = header + name + b"\0" * _pad4(len(header) + len(name))
    return out + entry.data + b"\0" * _pad4(len(entry.data))


def write_newc(entries: Iterable[Entry]) -> bytes:
    """An uncompressed newc archive of `entries` in order, with the trailer."""
    parts = [encode_entry(e, ino) for ino, e in enumerate(entries, start=1)]
    parts.append(encode_entry(Entry(TRAILER, 0, nlink=1), 0))
    return b"".join(parts)


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (uncompressed) up to its trailer; raises InitramfsError if malformed."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if pos + _HEADER.size > len(data):
            raise InitramfsError(f"truncated cpio header at offset {pos}")
        magic, *hexes = _HEADER.unpack_from(data, pos)
        if magic != NEWC_MAGIC:
            raise InitramfsError(f"bad cpio magic {magic!r} at offset {pos}")
        try:
            (_ino, mode, uid, gid, nlink, mtime, filesize, _maj, _min, rmaj, rmin, namesize,
             _check) = (int(h, 16) for h in hexes)
        except ValueError:
            raise InitramfsError(f"non-hex cpio header field at offset {pos}") from None
        name_end = pos + _HEADER.size + namesize
        if namesize == 0 or name_end > len(data) or data[name_end - 1] != 0:
            raise InitramfsError(f"bad cpio name at offset {pos}")
        try:
            name = data[pos + _HEADER.size:name_end - 1].decode()
        except UnicodeDecodeError:
            raise InitramfsError(f"cpio name at offset {pos} is not UTF-8") from None
        start = name_end + _pad4(_HEADER.size + namesize)
        end = start + filesize
        if end > len(data):
            raise InitramfsError(f"cpio member {name!r} runs past the end of the archive")
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, data[start:end], uid, gid, mtime, rmaj, rmin, nlink))
        pos = end + _pad4(filesize)


class Archive:
    """An initramfs being assembled: parent directories are added implicitly, once."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def _put(self, entry: Entry) -> None:
        path = PurePosixPath(entry.name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise InitramfsError(f"bad archive path {entry.name!r}: relative, no '..'")
        name = str(path)
        for parent in reversed(path.parents[:-1]):
            self._entries.setdefault(str(parent), Entry(str(parent), S_IFDIR | 0o755, nlink=2))
        old = self._entries.get(name)
        if old is not None and not (old.mode & _TYPE_MASK == S_IFDIR == entry.mode & _TYPE_MASK):
            raise InitramfsError(f"{name!r} added twice")
        self._entries[name] = Entry(name, entry.mode, entry.data, nlink=entry.nlink,
                                    rdevmajor=entry.rdevmajor, rdevminor=entry.rdevminor)

    @staticmethod
    def _rel(path: str) -> str:
        return path.lstrip("/")

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(Entry(self._rel(path), S_IFDIR | mode, nlink=2))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(Entry(self._rel(path), S_IFREG | mode, data))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(Entry(self._rel(path), S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(Entry(self._rel(path), S_IFCHR | mode, rdevmajor=major, rdevminor=minor))

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def to_cpio(self) -> bytes:
        return write_newc(self.entries())

    def to_gzip(self) -> bytes:
        # mtime=0: identical recipes give identical bytes, so images can be cached by hash.
        return gzip.compress(self.to_cpio(), compresslevel=9, mtime=0)


# --- kernel modules -------------------------------------------------------------------------

_ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes; Debian 6.1 ships plain .ko, newer kernels .ko.xz."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    return raw


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The `key=value` strings of an ELF64 module's `.modinfo` section, by key.

    A key may repeat (alias=, parm=), so each maps to a list in order.
    """
    if len(elf) < _ELF64_EHDR.size or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise InitramfsError("not a little-endian ELF64 kernel module")
    (_ident, _type, _machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize,
     _phnum, shentsize, shnum, shstrndx) = _ELF64_EHDR.unpack_from(elf)
    if shentsize != _ELF64_SHDR.size or shstrndx >= shnum:
        raise InitramfsError("bad ELF section header table in module")

    def section(i: int) -> tuple[int, bytes]:
        off = shoff + i * shentsize
        if off + shentsize > len(elf):
            raise InitramfsError("ELF section header out of range in module")
        name, _t, _f, _a, offset, size, *_ = _ELF64_SHDR.unpack_from(elf, off)
        if offset + size > len(elf):
            raise InitramfsError("ELF section out of range in module")
        return name, elf[offset:offset + size]

    _, shstrtab = section(shstrndx)
    for i in range(shnum):
        name_off, body = section(i)
        end = shstrtab.find(b"\0", name_off)
        if shstrtab[name_off:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in body.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise InitramfsError("module has no .modinfo section")


def module_name(path: Path) -> str:
    """The name the kernel uses: file name without .ko[.xz], '-' read as '_'."""
    name = path.name
    for suffix in (".xz", ".gz", ".ko"):
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Every module under a /lib/modules/<release> tree, by kernel name."""
    found: dict[str, Path] = {}
    for pattern in ("*.ko", "*.ko.xz", "*.ko.gz"):
        for path in modules_dir.rglob(pattern):
            found.setdefault(module_name(path), path)
    return found


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """`wanted` and all they depend on (`depends=` in .modinfo), dependencies first."""
    index = index_modules(modules_dir)
    order: list[Path] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise InitramfsError(f"module dependency cycle: {' -> '.join(chain + (key,))}")
        path = index.get(key)
        if path is None:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise InitramfsError(f"kernel module {key} not found in {modules_dir}{via}")
        state[key] = "visiting"
        deps = modinfo(module_bytes(path)).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            visit(dep, chain + (key,))
        state[key] = "done"
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


# --- busybox initramfs ----------------------------------------------------------------------

MODULES_DIR = "lib/modules"
MODULE_ORDER = f"{MODULES_DIR}/order"
# Shell the init scripts source to insert the modules in the archive, in dependency order.
LOAD_MODULES_SH = f"""\
if [ -f /{MODULE_ORDER} ]; then
  while read m; do
    insmod "/{MODULES_DIR}/$m" || echo "init: insmod $m failed"
  done < /{MODULE_ORDER}
fi
"""


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """Paths (relative, e.g. 'bin/sh') of the applets this busybox provides."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise InitramfsError(f"{busybox} cannot list its applets ({e}): "
                             "install busybox-static") from None
    return [line.strip() for line in out.splitlines() if line.strip()]


def busybox_initramfs(init: str, busybox: Path = BUSYBOX, modules: Iterable[Path] = (),
                      files: Mapping[str, bytes] | None = None,
                      executables: Mapping[str, bytes] | None = None) -> Archive:
    """An archive with a static busybox and its applet links, `/init`, modules and files.

    `modules` are inserted by `LOAD_MODULES_SH` in the order given (pass the output
    of `resolve_modules`). `files` are added 0644, `executables` 0755.
    """
    if not busybox.exists():
        raise InitramfsError(f"{busybox} not found: install busybox-static")
    arc = Archive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc",
              "root", "mnt"):
        arc.add_dir(d)
    # The kernel opens /dev/console before /init runs; devtmpfs is not mounted yet then.
    arc.add_char_device("dev/console", 5, 1)
    arc.add_char_device("dev/null", 1, 3, 0o666)
    arc.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet != "bin/busybox":
            depth = applet.count("/")
            arc.add_symlink(applet, "../" * depth + "bin/busybox")
    names = []
    for path in modules:
        names.append(path.name.removesuffix(".xz").removesuffix(".gz"))
        arc.add_file(f"{MODULES_DIR}/{names[-1]}", module_bytes(path))
    if names:
        arc.add_file(MODULE_ORDER, ("\n".join(names) + "\n").encode())
    for name, data in (files or {}).items():
        arc.add_file(name, data)
    for name, data in (executables or {}).items():
        arc.add_file(name, data, 0o755)
    arc.add_file("init", init.encode(), 0o755)
    return arc


# The marker tests look for: proves the kernel unpacked the initramfs and ran /init.
INIT_MARKER = "kvmpy-guest: init running"

# 9p mount options for kvmpy's shares: msize=512000 is the most Linux's virtio transport
# takes (PAGE_SIZE * (VIRTQUEUE_NUM - 3)), so a 1 MiB read is two requests, not eight.
NINEP_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"

# Mount each `kvmpy.share=TAG[,OPTIONS]` of the kernel command line (kvmpy adds one per
# --share, with ",ro" for a read-only one) at /mnt/TAG; extra options go to mount -o.
MOUNT_SHARES_SH = f"""\
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    --) break ;;
    kvmpy.share=*)
      spec=${{arg#kvmpy.share=}}; tag=${{spec%%,*}}; opts=
      [ "$spec" != "$tag" ] && opts=,${{spec#*,}}
      mkdir -p "/mnt/$tag"
      mount -t 9p -o "{NINEP_MOUNT_OPTIONS}$opts" "$tag" "/mnt/$tag" \\
        || echo "kvmpy-guest: cannot mount share $tag"
      ;;
  esac
done
set +f
"""

# kvmpy's default guest. Kernel arguments after `--` reach /init as "$@": with them it
# runs that one command (non-interactive tests), without them a shell on the console.
# The kernel groups words in double quotes only (lib/cmdline.c next_arg):
# `-- sh -c "echo a; echo b"` works, single quotes do not.
DEFAULT_INIT = f"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=${{TERM:-linux}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
{MOUNT_SHARES_SH}echo "{INIT_MARKER}"
if [ $# -gt 0 ]; then
  "$@"
  echo "kvmpy-guest: exit status $?"
else
  echo "kvmpy-guest: shell on the console; exit it to power off"
  setsid cttyhack sh -l
fi
sync
poweroff -f
"""

_RECIPE_VERSION = b"kvmpy-default-initramfs-1"


def default_recipe_hash(busybox: Path = BUSYBOX) -> str:
    """A key for the default initramfs: changes when the init, busybox or format changes."""
    h = hashlib.sha256(_RECIPE_VERSION)
    h.update(DEFAULT_INIT.encode())
    h.update(hashlib.sha256(busybox.read_bytes()).digest() if busybox.exists() else b"none")
    return h.hexdigest()[:12]


def default_guest_initramfs(busybox: Path = BUSYBOX) -> bytes:
    """The default guest initramfs, gzip'd: busybox, mounts, a shell, poweroff on exit."""
    return busybox_initramfs(DEFAULT_INIT, busybox).to_gzip()


# --- a distribution kernel's guest: the default init, plus its virtio modules ----------------

# What a modular kernel (Debian's cloud kernel) needs to reach kvmpy's devices: the
# virtio-mmio transport (found through the DSDT's LNRO0005 devices) and a driver for each
# virtio device kvmpy emulates. `resolve_modules` adds virtio, virtio_ring, failover...
VIRTIO_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng")


def find_modules_dir(path: Path, release: str | None = None) -> Path:
    """The /lib/modules/<release> tree `path` names: that tree, or /lib/modules above it.

    With a parent directory, `release` (the kernel's, from its bzImage) picks the
    subdirectory; a single subdirectory is taken as it is. A tree for another
    release is refused: the kernel would reject every module (vermagic).
    """
    if not path.is_dir():
        raise InitramfsError(f"--modules {path}: no such directory")
    if not ((path / "kernel").is_dir() or (path / "modules.order").exists()):
        subdirs = [d for d in path.iterdir() if (d / "kernel").is_dir()]
        chosen = [d for d in subdirs if d.name == release] if release else subdirs
        if len(chosen) != 1:
            names = ", ".join(sorted(d.name for d in subdirs)) or "none"
            raise InitramfsError(f"--modules {path}: which kernel's modules? "
                                 f"(release {release or 'unknown'}; trees here: {names})")
        path = chosen[0]
    if release and path.name[:1].isdigit() and path.name != release:
        raise InitramfsError(f"--modules {path} is for {path.name}, the kernel is {release}")
    return path


# A console that comes as a module (virtio_console's hvc0 with console=hvc0) did not
# exist when the kernel opened /dev/console for /init: open it again now that it does.
REOPEN_CONSOLE_SH = """\
if (: </dev/console) 2>/dev/null; then exec </dev/console >/dev/console 2>&1; fi
"""


def modules_init(init: str = DEFAULT_INIT) -> str:
    """`init` with the modules inserted after the mounts, before the init marker.

    Loading them first means that when the marker shows, every virtio device the
    kernel found is already probed (insmod returns after the driver's probe).
    """
    marker = f'echo "{INIT_MARKER}"'
    if marker not in init:
        raise InitramfsError("the init has no marker line to load the modules before")
    return init.replace(marker, LOAD_MODULES_SH + REOPEN_CONSOLE_SH + marker, 1)


def modules_guest_initramfs(modules_dir: Path, wanted: Iterable[str] = VIRTIO_MODULES,
                            busybox: Path = BUSYBOX) -> bytes:
    """The default guest, gzip'd, that also inserts `wanted` from `modules_dir` (and deps)."""
    modules = resolve_modules(modules_dir, wanted)
    return busybox_initramfs(modules_init(), busybox, modules).to_gzip()


def modules_guest_initramfs_path(modules_dir: Path, directory: Path,
                                 wanted: Iterable[str] = VIRTIO_MODULES,
                                 busybox: Path = BUSYBOX) -> Path:
    """`modules_guest_initramfs` written once into `directory`, named by a hash of its recipe.

    The key covers the default recipe and its init, the module tree's path and the
    modules' sizes and mtimes, so a re-unpacked kernel gets a new image.
    """
    wanted = tuple(wanted)
    h = hashlib.sha256(default_recipe_hash(busybox).encode())
    h.update(modules_init().encode())
    h.update(str(modules_dir.resolve()).encode())
    for path in resolve_modules(modules_dir, wanted):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    path = directory / f"modules-{modules_dir.name}-{h.hexdigest()[:12]}.cpio.gz"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_bytes(modules_guest_initramfs(modules_dir, wanted, busybox))
        tmp.rename(path)
    return path
