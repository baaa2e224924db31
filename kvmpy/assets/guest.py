"""kvmpy's Linux guest assets: where they are, and the recipes that build them once.

Three assets, all in `$KVMPY_CACHE` (default ~/.cache/kvmpy), never in the repo:

- kvmpy's minimal kernel, built from Debian's `linux-source-6.1` with `make tinyconfig`
  plus `guests/linux/kvmpy.config`, in `kernel/<source version>-<config hash>/`
  (`bzImage`, `vmlinux` with its symbol table, `config`). A new source version or an
  edited fragment is a new directory; an existing one is never rebuilt. `make
  guest-kernel` also unpacks the bzImage's kernel into `unpacked/` (kvmpy.boot.unpack),
  as its first boot would: in the lab the cache is read-only.
- the default initramfs (`initramfs/default-<hash>.cpio.gz`): busybox, proc/sys/devtmpfs
  mounted, a shell on the console, `poweroff -f` when the shell exits.
- Debian's cloud kernel (`linux-image-cloud-amd64`) with its modules, unpacked, for the
  stock-kernel tests.

The `*_path()` functions only look (cheap, no network) and raise `AssetError` naming the
make target when an asset is missing; the `build_*()` functions make it. `python -m
kvmpy.assets {guest-kernel,guest,stock-kernel,paths}` is what `make` runs (`__main__.py`).
This module does not boot anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmpy import initramfs
from kvmpy.assets.debian import (
    deb_version,
    download,
    fetch_kernel_image,
    require_tool,
    version_key,
)
from kvmpy.boot.kconfig import parse_kconfig
from kvmpy.cachedir import cache_dir
from kvmpy.errors import AssetError

REPO = Path(__file__).resolve().parent.parent.parent
CONFIG_FRAGMENT = REPO / "guests" / "linux" / "kvmpy.config"
SOURCE_PACKAGE = "linux-source-6.1"
STOCK_META = "linux-image-cloud-amd64"
BUILD_DEPS = {"flex": "flex", "bison": "bison", "bc": "bc", "gcc": "gcc", "make": "make"}


@dataclass(frozen=True)
class KernelAssets:
    """A built kernel: `bzImage` for the boot protocol, `vmlinux` (ELF, PVH note, symbols)."""

    directory: Path
    bzimage: Path
    vmlinux: Path
    config: Path


@dataclass(frozen=True)
class StockKernel:
    """Debian's cloud kernel as shipped: LZ4 bzImage and its uncompressed modules."""

    vmlinuz: Path
    modules: Path
    release: str


@contextlib.contextmanager
def build_lock(name: str, cache: Path | None = None) -> Iterator[None]:
    """Serialize builds of one asset across processes (make and a test may race)."""
    locks = (cache or cache_dir()) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- kvmpy's minimal kernel ------------------------------------------------------------------

def config_hash(fragment: Path = CONFIG_FRAGMENT) -> str:
    return hashlib.sha256(fragment.read_bytes()).hexdigest()[:12]


def _kernel_dirs(cache: Path, fragment: Path) -> list[Path]:
    """Built kernels for this fragment, oldest source version first."""
    suffix = f"-{config_hash(fragment)}"
    dirs = [d for d in (cache / "kernel").glob(f"*{suffix}") if (d / "bzImage").exists()]
    return sorted(dirs, key=lambda d: version_key(d.name.removesuffix(suffix)))


def kernel_path(cache: Path | None = None, fragment: Path = CONFIG_FRAGMENT) -> KernelAssets:
    """The built minimal kernel for the current fragment (newest source version)."""
    cache = cache or cache_dir()
    dirs = _kernel_dirs(cache, fragment)
    if not dirs:
        raise AssetError(f"kvmpy's guest kernel is not built for {fragment.name} "
                       f"(hash {config_hash(fragment)}): run `make guest-kernel`")
    return _kernel_assets(dirs[-1])


def _kernel_assets(d: Path) -> KernelAssets:
    return KernelAssets(d, d / "bzImage", d / "vmlinux", d / "config")


def build_kernel(cache: Path | None = None, fragment: Path = CONFIG_FRAGMENT,
                 jobs: int | None = None, log=sys.stderr) -> KernelAssets:
    """Build (or find) the minimal kernel; takes ~5 minutes on 2 cores the first time."""
    cache = cache or cache_dir()
    with build_lock("guest-kernel", cache):
        dirs = _kernel_dirs(cache, fragment)
        if dirs:
            return _kernel_assets(dirs[-1])
        for tool, package in BUILD_DEPS.items():
            require_tool(tool, package)
        deb = download(SOURCE_PACKAGE, cache)
        out = cache / "kernel" / f"{deb_version(deb)}-{config_hash(fragment)}"
        work = cache / "kernel-build" / out.name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        started = time.monotonic()
        try:
            src = _unpack_source(deb, work, log)
            _configure(src, fragment, log)
            jobs = jobs or os.cpu_count() or 1
            print(f"kvmpy: building the guest kernel in {src} (-j{jobs})", file=log, flush=True)
            _make(src, [f"-j{jobs}", "bzImage", "vmlinux"], log)
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy2(src / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
            shutil.copy2(src / "vmlinux", tmp / "vmlinux")
            shutil.copy2(src / ".config", tmp / "config")
            elapsed = time.monotonic() - started
            (tmp / "build-info").write_text(
                f"source={deb.name}\nfragment={fragment}\nseconds={elapsed:.0f}\n")
            tmp.rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"kvmpy: guest kernel built in {elapsed:.0f} s: {out}", file=log, flush=True)
        return _kernel_assets(out)


def _unpack_source(deb: Path, work: Path, log) -> Path:
    """Extract /usr/src/linux-source-6.1.tar.xz from the .deb straight into `work`."""
    require_tool("dpkg-deb", "dpkg")
    print(f"kvmpy: unpacking {deb.name}", file=log, flush=True)
    pkg = work / "deb"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(pkg)], check=True)
    tarballs = list((pkg / "usr" / "src").glob("linux-source-*.tar.xz"))
    if len(tarballs) != 1:
        raise AssetError(f"{deb.name} has no single /usr/src/linux-source-*.tar.xz")
    # GNU tar, not tarfile: `extractall(filter=...)` is missing from Python < 3.11.4
    # (Debian 12's 3.11.2), and tar unpacks the 138 MB .tar.xz faster.
    require_tool("tar", "tar")
    subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(work),
                    "--no-same-owner", "--no-same-permissions"], check=True)
    shutil.rmtree(pkg)
    (src,) = [d for d in work.iterdir() if d.is_dir() and d.name.startswith("linux-source")]
    return src


def _make(src: Path, args: list[str], log) -> None:
    done = subprocess.run(["make", "-C", str(src), *args], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise AssetError(f"kernel `make {' '.join(args)}` failed (status {done.returncode})")


def _configure(src: Path, fragment: Path, log) -> None:
    """tinyconfig + fragment, then check every requested option survived olddefconfig."""
    _make(src, ["-s", "tinyconfig"], log)
    done = subprocess.run(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
        cwd=src, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise AssetError("merge_config.sh failed on the kernel config fragment")
    _make(src, ["-s", "olddefconfig"], log)
    final = parse_kconfig((src / ".config").read_text())
    missing = [f"{k}={v}" for k, v in parse_kconfig(fragment.read_text()).items()
               if final.get(k, "n") != v]
    if missing:
        raise AssetError(f"kernel config options not satisfiable: {' '.join(missing)}")


# --- the default initramfs ------------------------------------------------------------------

def initramfs_path(cache: Path | None = None) -> Path:
    """The default guest initramfs (busybox + shell + poweroff), built by `make guest`."""
    name = f"default-{initramfs.default_recipe_hash()}.cpio.gz"
    path = (cache or cache_dir()) / "initramfs" / name
    if not path.exists():
        raise AssetError(f"the default initramfs is not built ({path}): run `make guest`")
    return path


def build_initramfs(cache: Path | None = None) -> Path:
    """Build (or find) the default initramfs; it takes well under a second."""
    cache = cache or cache_dir()
    path = cache / "initramfs" / f"default-{initramfs.default_recipe_hash()}.cpio.gz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}")
        tmp.write_bytes(initramfs.default_guest_initramfs())
        tmp.rename(path)
    return path


# --- Debian's stock cloud kernel ------------------------------------------------------------

def stock_kernel_path(cache: Path | None = None) -> StockKernel:
    """The unpacked cloud kernel, if `make stock-kernel` fetched it (no network)."""
    cache = cache or cache_dir()
    roots = sorted((cache / "pkgs").glob("linux-image-*-cloud-amd64_*"),
                   key=lambda d: version_key(d.name.split("_")[1]))
    for root in reversed(roots):
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if (root / ".unpacked").exists() and vmlinuz:
            release = vmlinuz[-1].name.removeprefix("vmlinuz-")
            return StockKernel(vmlinuz[-1], root / "lib" / "modules" / release, release)
    raise AssetError("Debian's cloud kernel is not fetched: run `make stock-kernel`")


def fetch_stock_kernel(cache: Path | None = None) -> StockKernel:
    cache = cache or cache_dir()
    with contextlib.suppress(AssetError):
        return stock_kernel_path(cache)
    with build_lock("stock-kernel", cache):
        vmlinuz, modules, release = fetch_kernel_image(STOCK_META, cache)
    return StockKernel(vmlinuz, modules, release)
