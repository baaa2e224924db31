"""Fetching Debian packages without installing them: `apt-get download` + `dpkg-deb -x`.

The lab's kernel, the stock cloud kernel and the source of kvmpy's own kernel all
come from Debian packages that must not be installed on the host (installing a
kernel package runs hooks, writes /boot and pulls initramfs-tools). So they are
downloaded into `$KVMPY_CACHE/debs/` and unpacked into `$KVMPY_CACHE/pkgs/<name>_<version>/`,
each once. This module is not a package manager: it resolves one level of
dependency (a meta-package such as `linux-image-amd64` to the versioned image it
depends on) and nothing else.

Every failure is an `AssetError` with one line saying what is missing and how to get it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from kvmpy.cachedir import cache_dir
from kvmpy.errors import AssetError


def require_tool(tool: str, package: str) -> str:
    """The path of `tool`, or an AssetError naming the Debian package that provides it."""
    path = shutil.which(tool)
    if path is None:
        raise AssetError(f"{tool} not found: install the Debian package {package} (`make deps`)")
    return path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AssetError(f"{argv[0]} not found: {e}") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise AssetError(f"`{' '.join(argv)}` failed: {last}")
    return done.stdout


def depends_of(meta: str) -> list[str]:
    """The packages `meta` directly depends on, from the local apt lists (no network)."""
    require_tool("apt-cache", "apt")
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", meta])
    deps = re.findall(r"^\s+Depends:\s+(\S+)", out, re.MULTILINE)
    if not deps:
        raise AssetError(f"apt-cache knows no dependency of {meta}: run `apt-get update`")
    return deps


def resolve_image(meta: str, prefix: str = "linux-image-") -> str:
    """The versioned kernel image package a meta-package pulls in (linux-image-6.1.0-NN-...)."""
    for dep in depends_of(meta):
        if dep.startswith(prefix) and dep != meta:
            return dep
    raise AssetError(f"{meta} depends on no {prefix}* package")


def cached_debs(package: str, cache: Path | None = None) -> list[Path]:
    """The downloaded .debs of `package`, oldest version first (by Debian version order)."""
    debs = list(((cache or cache_dir()) / "debs").glob(f"{package}_*.deb"))
    return sorted(debs, key=lambda p: version_key(deb_version(p)))


def deb_version(deb: Path) -> str:
    """The version part of a pool file name `name_version_arch.deb` (epoch `%3a` unquoted)."""
    return deb.name.split("_")[1].replace("%3a", ":")


def version_key(version: str) -> list[tuple[int, object]]:
    """A sort key for Debian versions."""
    # Good enough ordering for Debian kernel versions (6.1.192-2 > 6.1.176-1): numbers
    # compare as numbers, the rest as text. Not a full dpkg --compare-versions.
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|[^\d]+", version)]


def download(package: str, cache: Path | None = None) -> Path:
    """The .deb of `package`: the newest one already downloaded, else `apt-get download`."""
    have = cached_debs(package, cache)
    if have:
        return have[-1]
    debs = (cache or cache_dir()) / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    require_tool("apt-get", "apt")
    # Download into a scratch directory so a half-written file never looks cached.
    partial = debs / f".partial-{package}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _run(["apt-get", "download", "-q", package], cwd=partial)
        got = list(partial.glob(f"{package}_*.deb"))
        if len(got) != 1:
            raise AssetError(f"apt-get download {package} produced {len(got)} files")
        final = debs / got[0].name
        got[0].rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def unpack(deb: Path, cache: Path | None = None) -> Path:
    """The unpacked tree of `deb` (`dpkg-deb -x`), under pkgs/<name>_<version>/, unpacked once."""
    name, version = deb.name.split("_")[:2]
    dest = (cache or cache_dir()) / "pkgs" / f"{name}_{version}"
    if (dest / ".unpacked").exists():
        return dest
    require_tool("dpkg-deb", "dpkg")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    (dest / ".unpacked").touch()
    return dest


def fetch_kernel_image(meta: str, cache: Path | None = None) -> tuple[Path, Path, str]:
    """(vmlinuz, modules dir, kernel release) of the image that `meta` depends on, unpacked."""
    root = unpack(download(resolve_image(meta), cache), cache)
    vmlinuzes = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuzes:
        raise AssetError(f"no /boot/vmlinuz-* in the package unpacked at {root}")
    release = vmlinuzes[-1].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / release
    if not modules.is_dir():
        raise AssetError(f"no /lib/modules/{release} in the package unpacked at {root}")
    return vmlinuzes[-1], modules, release
