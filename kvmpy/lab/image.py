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
- `error` (from the lab): one line saying why the lab could not run the command;
- `modules` (from the lab): its /proc/modules, so a stalled lab's RIP can be named;
- `want-kallsyms` (from the host) and `kallsyms` (from the lab): the kernel's code
  symbols, asked once per image (Debian's System.map is a placeholder) and kept in it.

Output comes back on two virtio-serial ports named `kvmpy.stdout`/`kvmpy.stderr`. A
third, `kvmpy.heartbeat`, carries a line a second from each lab CPU ("CPU UPTIME", a
shell loop pinned to that CPU, started as soon as the port exists): the host takes a
CPU whose line stops coming for a lab that stopped making progress
(`kvmpy.lab.runner`). A fourth, `kvmpy.kick`, goes the other way: a byte a second from
the host, which the lab reads and drops; its interrupt wakes a lab CPU that QEMU let
miss one (`kvmpy.lab.runner`, `_Kick`).
The kernel is booted as its uncompressed ELF `vmlinux` through its PVH entry point
when it has one (Debian's has): under TCG, the bzImage's own XZ decompressor takes ~4 s
of the boot, Python's lzma takes ~1 s once at build time.

This module builds files; it starts no VM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvmpy import initramfs
from kvmpy.assets import build_lock
from kvmpy.assets.debian import fetch_kernel_image
from kvmpy.boot import unpack
from kvmpy.boot.bzimage import parse_setup_header
from kvmpy.boot.elf import parse_elf
from kvmpy.cachedir import cache_dir
from kvmpy.errors import KvmpyError, LoaderError
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
PORT_HEARTBEAT = "kvmpy.heartbeat"
PORT_KICK = "kvmpy.kick"
ERROR_PREFIX = "kvmpy-lab-error:"
# Space the first build needs in the cache: the kernel .deb (~100 MB) unpacked (~450 MB).
BUILD_SPACE = 700 << 20
STALE_AFTER_S = 7 * 86400  # images of other recipes are removed when this old

_9P = initramfs.NINEP_MOUNT_OPTIONS  # the same 9p mount as kvmpy's own guests'

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
# The virtio-serial ports, by name (virtio_console is one of the modules above).
out=
err=
in=/dev/null
beat=
kick=
i=0
while [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] || continue
    case "$(cat "$p/name")" in
      {PORT_STDOUT}) out="/dev/${{p##*/}}" ;;
      {PORT_STDERR}) err="/dev/${{p##*/}}" ;;
      {PORT_STDIN}) in="/dev/${{p##*/}}" ;;
      {PORT_HEARTBEAT}) beat="/dev/${{p##*/}}" ;;
      {PORT_KICK}) kick="/dev/${{p##*/}}" ;;
    esac
  done
  [ -c "$out" ] && [ -c "$err" ] && [ -c "$beat" ] && [ -c "$kick" ] && break
  i=$((i + 1))
  sleep 0.05
done
[ -n "$out" ] || out=/dev/console
[ -n "$err" ] || err=/dev/console
# The kick: a byte a second from the host, read and dropped; its interrupt is the point
# (kvmpy.lab.runner, `_Kick`).
[ -c "$kick" ] && cat "$kick" > /dev/null 2>&1 &
# The heartbeat: "CPU UPTIME" once a second from a loop pinned to each CPU. The port is
# opened once, for all of them (a virtio-serial port has one opener at a time); `read -t`
# on a FIFO nobody writes is the shell's own sleep, so a beat forks nothing.
if [ -c "$beat" ]; then
  mkfifo /run/beat.fifo
  (
    cpu=0
    while [ $cpu -lt "$(grep -c ^processor /proc/cpuinfo)" ]; do
      taskset -c $cpu sh -c 'exec 3<>/run/beat.fifo
        while :; do read -r up rest < /proc/uptime; echo "$0 $up"; read -t 1 x <&3; done' \\
        $cpu &
      cpu=$((cpu + 1))
    done
  ) > "$beat" 2>/dev/null
fi
mkdir -p /job /lower /rw /host
mount -t 9p -o {_9P} {JOB_TAG} /job || die "cannot mount the job share"
[ -f /job/cmd.sh ] || die "the job share has no cmd.sh"
cat /proc/modules > /job/modules
# once per image (the host asks): the kernel's code symbols, to name a stalled CPU's RIP
[ -f /job/want-kallsyms ] && grep ' [tTwW] ' /proc/kallsyms > /job/kallsyms.part \\
  && mv /job/kallsyms.part /job/kallsyms
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
mkdir -p /host/run/kvmpy
cp /job/cmd.sh /host/run/kvmpy/cmd.sh
echo ready > /job/ready
chroot /host /bin/sh /run/kvmpy/cmd.sh < "$in" > "$out" 2> "$err"
echo $? > /job/status
sync
poweroff -f
sleep 10
"""

_RECIPE_VERSION = b"kvmpy-lab-6"  # 2: PVH vmlinux; 3: optional stdin port; 4: loopback;
# 5: heartbeat, modules, kallsyms; 6: the kick port


@dataclass(frozen=True)
class LabImage:
    """A built lab: the kernel to boot (`kernel`: vmlinux if PVH, else vmlinuz) and the
    initramfs that runs the job."""

    directory: Path
    kernel: Path
    initramfs: Path
    release: str
    # the kernel's code symbols and the /proc/modules they were read with, from the
    # image's first run (kvmpy.lab.symbols); absent until then
    kallsyms: Path


def pvh_vmlinux(vmlinuz: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage if it has a PVH entry, else None (boot the bzImage).

    The loader's own parsers: the setup header locates the payload, boot.unpack
    decompresses it (formats the stdlib lacks give None), the ELF parser finds the note.
    """
    try:
        elf = unpack.decompress(unpack.payload(vmlinuz, parse_setup_header(vmlinuz)) or b"")
        return elf if elf is not None and parse_elf(elf).pvh_entry is not None else None
    except LoaderError:
        return None


def recipe_hash() -> str:
    h = hashlib.sha256(_RECIPE_VERSION)
    h.update(LAB_INIT.encode())
    h.update(" ".join(LAB_MODULES).encode())
    h.update(KERNEL_META.encode())
    return h.hexdigest()[:12]


def _image(d: Path) -> LabImage:
    kernel = d / "vmlinux" if (d / "vmlinux").exists() else d / "vmlinuz"
    return LabImage(d, kernel, d / "initramfs.cpio.gz", (d / "release").read_text().strip(),
                    d / "kallsyms")


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
            elf = pvh_vmlinux(vmlinuz.read_bytes())
            if elf is not None:
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


def _prune_stale_images(current: Path, keep_s: float = STALE_AFTER_S) -> None:
    """Remove lab images of other recipes (each ~80 MB) built more than `keep_s` ago.

    Not at once: checkouts of two branches that share a cache (a shared machine) each
    have their own recipe, and would otherwise remove the other's image at every build."""
    now = time.time()
    for d in current.parent.iterdir():
        if (d != current and d.is_dir() and ".partial-" not in d.name
                and now - d.stat().st_mtime > keep_s):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":  # `make lab`
    try:
        image = build_lab_image()
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    print(f"{image.kernel}\n{image.initramfs}")
