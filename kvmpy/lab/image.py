"""The lab image: Debian's generic kernel and a busybox initramfs that chroots into the host.

Built once into `$KVMPY_CACHE/lab/<recipe hash>/` (`vmlinuz`, `initramfs.cpio.gz`,
`release`, and `vmlinux` when it can be unpacked) and then used as is, without asking
apt again: a cached lab starts without the network. The recipe hash covers the init
script and the module list, so changing either builds a new image; the kernel version is
whatever `linux-image-amd64` depended on at build time.

The init script is the lab's half of the protocol `kvmpy.lab.runner` speaks over the
`kvmpyjob` 9p share (a host temp directory):

- `cmd.sh` (from the host): the command, its working directory and environment, as sh;
- `rw` (from the host): one `<mount tag> <absolute path>` line per `--rw` directory;
- `ready` (from the lab): written when the chroot is ready, so a hung boot can be told
  from a slow command;
- `status` (from the lab): the command's exit status, the last thing before poweroff;
- `error` (from the lab): one line saying why the lab could not run the command.

Output comes back on two virtio-serial ports named `kvmpy.stdout`/`kvmpy.stderr`.
The kernel is booted as its uncompressed ELF `vmlinux` through its PVH entry point
when it has one (Debian's has): under TCG, the bzImage's own XZ decompressor takes ~4 s
of the boot, Python's lzma takes ~1 s once at build time.

This module builds files; it starts no VM.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvmpy import initramfs
from kvmpy.assets import build_lock
from kvmpy.assets.debian import fetch_kernel_image
from kvmpy.cachedir import cache_dir
from kvmpy.errors import KvmpyError
from kvmpy.lab.errors import LabError

KERNEL_META = "linux-image-amd64"
# What the lab needs from the kernel, by module name; their dependencies
# (virtio_ring, 9pnet, netfs, fscache, irqbypass, kvm, ccp, ...) are resolved from depends=.
# tun: /dev/net/tun, for tap devices (the virtio-net lab tests).
LAB_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console", "kvm_amd",
               "tun"]
JOB_TAG = "kvmpyjob"
ROOT_TAG = "hostroot"
PORT_STDOUT = "kvmpy.stdout"
PORT_STDERR = "kvmpy.stderr"
PORT_STDIN = "kvmpy.stdin"  # only with `kvmpy lab --interactive`
ERROR_PREFIX = "kvmpy-lab-error:"
# Space the first build needs in the cache: the kernel .deb (~100 MB) unpacked (~450 MB).
BUILD_SPACE = 700 << 20

_9P = "trans=virtio,version=9p2000.L,msize=512000"

LAB_INIT = f"""#!/bin/sh
# kvmpy lab init: load modules, mount the host, run /job/cmd.sh chrooted, power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() {{
  echo "{ERROR_PREFIX} $*"
  [ -f /job/cmd.sh ] && echo "$*" > /job/error
  sync
  poweroff -f
  sleep 10
}}
{initramfs.LOAD_MODULES_SH}
mkdir -p /job /lower /rw /host
mount -t 9p -o {_9P} {JOB_TAG} /job || die "cannot mount the job share"
[ -f /job/cmd.sh ] || die "the job share has no cmd.sh"
[ -c /dev/kvm ] || die "no /dev/kvm in the lab: kvm_amd did not load (QEMU needs -cpu max)"
# The host root is read-only; a tmpfs overlay makes everything writable and throw-away.
# cache=loose: the host tree is read-mostly during a run, and lookups over 9p are slow.
mount -t 9p -o {_9P},ro,cache=loose {ROOT_TAG} /lower || die "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /host \\
  || die "cannot mount the overlay over the host root"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -o bind /dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs tmpfs /host/run
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up  # loopback: servers in tests, gdb
while read -r tag path; do
  [ -n "$tag" ] || continue
  mkdir -p "/host$path"
  mount -t 9p -o {_9P} "$tag" "/host$path" || die "cannot mount --rw $path"
done < /job/rw
out=/dev/console
err=/dev/console
in=/dev/null
i=0
while [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] || continue
    case "$(cat "$p/name")" in
      {PORT_STDOUT}) out="/dev/${{p##*/}}" ;;
      {PORT_STDERR}) err="/dev/${{p##*/}}" ;;
      {PORT_STDIN}) in="/dev/${{p##*/}}" ;;
    esac
  done
  [ "$out" != /dev/console ] && [ "$err" != /dev/console ] && [ -c "$out" ] && [ -c "$err" ] \\
    && break
  i=$((i + 1))
  sleep 0.05
done
mkdir -p /host/run/kvmpy
cp /job/cmd.sh /host/run/kvmpy/cmd.sh
echo ready > /job/ready
chroot /host /bin/sh /run/kvmpy/cmd.sh < "$in" > "$out" 2> "$err"
echo $? > /job/status
sync
poweroff -f
sleep 10
"""

_RECIPE_VERSION = b"kvmpy-lab-4"  # 2: PVH vmlinux; 3: optional stdin port; 4: loopback


@dataclass(frozen=True)
class LabImage:
    """A built lab: the kernel to boot (`kernel`: vmlinux if PVH, else vmlinuz) and the
    initramfs that runs the job."""

    directory: Path
    kernel: Path
    initramfs: Path
    release: str


# bzImage setup header (Documentation/x86/boot.rst): setup_sects at 0x1f1, the boot
# protocol version at 0x206, payload_offset/payload_length (protocol 2.08+) at 0x248.
def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage (gzip or xz payload), or None if not extractable."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    if struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            elf = lzma.LZMADecompressor().decompress(payload)  # ignores the size trailer
        elif payload[:2] == b"\x1f\x8b":
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        else:
            return None  # LZ4/zstd/...: the stdlib cannot, boot the bzImage instead
    except (lzma.LZMAError, zlib.error, EOFError):
        return None
    return elf if elf[:4] == b"\x7fELF" else None


def has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF64 kernel carries XEN_ELFNOTE_PHYS32_ENTRY (18), QEMU's PVH entry."""
    try:
        (shoff,) = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
        for i in range(shnum):
            at = shoff + i * shentsize
            sh_type, _f, _a, off, size = struct.unpack_from("<IQQQQ", elf, at + 4)
            if sh_type != 7:  # SHT_NOTE
                continue
            pos = off
            while pos + 12 <= off + size:
                namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
                name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and ntype == 18:
                    return True
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    except struct.error:
        return False
    return False


def recipe_hash() -> str:
    h = hashlib.sha256(_RECIPE_VERSION)
    h.update(LAB_INIT.encode())
    h.update(" ".join(LAB_MODULES).encode())
    h.update(KERNEL_META.encode())
    return h.hexdigest()[:12]


def _image(d: Path) -> LabImage:
    kernel = d / "vmlinux" if (d / "vmlinux").exists() else d / "vmlinuz"
    return LabImage(d, kernel, d / "initramfs.cpio.gz", (d / "release").read_text().strip())


def lab_image_path(cache: Path | None = None) -> LabImage | None:
    """The cached lab image for the current recipe, or None (cheap, no network)."""
    d = (cache or cache_dir()) / "lab" / recipe_hash()
    return _image(d) if (d / "release").exists() else None


def build_lab_image(cache: Path | None = None, log=sys.stderr) -> LabImage:
    """The lab image, built on first use (downloads the kernel package, ~100 MB)."""
    cache = cache or cache_dir()
    found = lab_image_path(cache)
    if found:
        return found
    with build_lock("lab", cache):
        found = lab_image_path(cache)
        if found:
            return found
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if free < BUILD_SPACE:
            raise LabError(f"no space to build the lab: {free >> 20} MiB free in {cache}, "
                           f"need {BUILD_SPACE >> 20} MiB")
        print(f"kvmpy: building the lab image in {cache}/lab (once)", file=log, flush=True)
        vmlinuz, modules_dir, release = fetch_kernel_image(KERNEL_META, cache)
        modules = initramfs.resolve_modules(modules_dir, LAB_MODULES)
        image = initramfs.busybox_initramfs(LAB_INIT, modules=modules).to_gzip()
        final = cache / "lab" / recipe_hash()
        tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy2(vmlinuz, tmp / "vmlinuz")
            elf = extract_vmlinux(vmlinuz.read_bytes())
            if elf is not None and has_pvh_note(elf):
                (tmp / "vmlinux").write_bytes(elf)
            (tmp / "initramfs.cpio.gz").write_bytes(image)
            (tmp / "modules").write_text("".join(f"{m.name}\n" for m in modules))
            (tmp / "release").write_text(release + "\n")  # last: marks the image complete
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LabError(f"cannot write the lab image in {final.parent}: {e.strerror}") from None
        _prune_stale_images(final)
        return _image(final)


def _prune_stale_images(current: Path) -> None:
    """Remove lab images of older recipes (each ~75 MB); nothing else uses them."""
    for d in current.parent.iterdir():
        if d != current and d.is_dir() and ".partial-" not in d.name:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":  # `make lab`
    try:
        image = build_lab_image()
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    print(f"{image.kernel}\n{image.initramfs}")
