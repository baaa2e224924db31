"""kvmpy.initramfs: the newc writer checked against GNU cpio, the reader, modinfo, module order."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import initramfs
from kvmpy.initramfs import (
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    Archive,
    Entry,
    InitramfsError,
    modinfo,
    read_newc,
    resolve_modules,
    write_newc,
)
from kvmpy.lab.image import LAB_INIT

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None, reason="GNU cpio not installed (make deps)")


def cpio(args: list[str], archive: bytes, cwd: Path | None = None) -> str:
    done = subprocess.run(["cpio", *args], input=archive, capture_output=True, cwd=cwd,
                          check=True)
    return done.stdout.decode()


def sample() -> Archive:
    arc = Archive()
    arc.add_dir("etc")
    arc.add_file("etc/hostname", b"kvmpy\n")
    arc.add_file("/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    arc.add_file("deep/er/still/file.bin", bytes(range(256)) * 3 + b"odd")
    arc.add_file("empty", b"")
    arc.add_symlink("bin/sh", "busybox")
    arc.add_char_device("dev/console", 5, 1)
    return arc


def test_parent_directories_come_first_and_once() -> None:
    names = sample().names()
    assert names.index("deep") < names.index("deep/er") < names.index("deep/er/still/file.bin")
    assert names.count("bin") == 1 and names.index("bin") < names.index("bin/tool")


@needs_cpio
def test_gnu_cpio_lists_exactly_the_archive() -> None:
    arc = sample()
    assert cpio(["-t", "--quiet"], arc.to_cpio()).splitlines() == arc.names()


@needs_cpio
def test_gnu_cpio_extracts_the_same_content_modes_and_links(tmp_path: Path) -> None:
    cpio(["-i", "--quiet", "--make-directories", "--no-absolute-filenames"],
         sample().to_cpio(), cwd=tmp_path)
    assert (tmp_path / "etc/hostname").read_bytes() == b"kvmpy\n"
    assert (tmp_path / "deep/er/still/file.bin").read_bytes() == bytes(range(256)) * 3 + b"odd"
    assert (tmp_path / "empty").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "etc/hostname").stat().st_mode) == 0o644
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    if os.geteuid() == 0:  # only root can make device nodes
        st_ = (tmp_path / "dev/console").lstat()
        assert stat.S_ISCHR(st_.st_mode)
        assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == (5, 1)


def test_gzip_is_deterministic_and_wraps_the_cpio() -> None:
    a, b = sample().to_gzip(), sample().to_gzip()
    assert a == b
    assert gzip.decompress(a) == sample().to_cpio()


def test_header_layout_matches_the_kernel_buffer_format() -> None:
    data = write_newc([Entry("ab", S_IFREG | 0o644, b"xyz")])
    assert data[:6] == b"070701"
    assert int(data[6 + 6 * 8:6 + 7 * 8], 16) == 3  # c_filesize, 7th field
    assert int(data[6 + 11 * 8:6 + 12 * 8], 16) == 3  # c_namesize counts the NUL
    assert data[110:113] == b"ab\0"
    assert data[113:119] == b"\0\0\0xyz"  # header+name = 113 bytes, padded to 116
    assert len(data) % 4 == 0
    assert data.endswith(b"TRAILER!!!\0" + b"\0" * ((4 - (110 + 11) % 4) % 4))


def test_bad_paths_and_duplicates_are_refused() -> None:
    arc = Archive()
    for bad in ("../x", "a/../../b", ""):
        with pytest.raises(InitramfsError):
            arc.add_file(bad, b"")
    arc.add_file("x", b"")
    with pytest.raises(InitramfsError):
        arc.add_file("x", b"again")
    arc.add_dir("d")
    arc.add_dir("d", 0o700)  # a directory may be re-added (to set its mode)


# --- property tests -------------------------------------------------------------------------

_names = st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)
                  .filter(lambda s: s not in (".", "..")), min_size=1, max_size=3)
_entries = st.lists(
    st.tuples(_names, st.sampled_from(["file", "link", "dir"]), st.binary(max_size=300),
              st.integers(0, 0o7777)),
    max_size=12)


def _archive_of(spec: list[tuple[list[str], str, bytes, int]]) -> Archive:
    arc = Archive()
    for parts, kind, data, mode in spec:
        path = "/".join(parts)
        if path in arc.names():
            continue
        try:
            if kind == "file":
                arc.add_file(path, data, mode)
            elif kind == "link":
                arc.add_symlink(path, data.hex() or "x")
            else:
                arc.add_dir(path, mode)
        except InitramfsError:
            pass  # a name used as a file and as a parent directory: refused, fine
    return arc


@given(_entries)
def test_read_newc_inverts_write_newc(spec: list[tuple[list[str], str, bytes, int]]) -> None:
    arc = _archive_of(spec)
    back = read_newc(arc.to_cpio())
    assert back == arc.entries()  # names, modes, data, link targets, nlink: all of it
    for e in back:
        assert e.mode & 0o170000 in (S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR)


@needs_cpio
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_entries)
def test_gnu_cpio_agrees_on_random_archives(spec: list[tuple[list[str], str, bytes, int]]) -> None:
    arc = _archive_of(spec)
    assert cpio(["-t", "--quiet"], arc.to_cpio()).splitlines() == arc.names()


@given(st.binary(max_size=400))
def test_read_newc_on_garbage_raises_only_initramfs_error(data: bytes) -> None:
    try:
        read_newc(data)
    except InitramfsError:
        pass


@given(st.data())
def test_read_newc_on_corrupted_archive(data: st.DataObject) -> None:
    raw = bytearray(sample().to_cpio())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        read_newc(bytes(raw[:cut]))
    except InitramfsError:
        pass


# --- kernel modules -------------------------------------------------------------------------

def fake_module(info: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, as a .ko has."""
    body = b"".join(f"{k}={v}\0".encode() for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    ehdr_size, shdr_size = 64, 64
    body_off = ehdr_size
    strtab_off = body_off + len(body)
    shoff = (strtab_off + len(shstrtab) + 7) & ~7
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, shoff, 0, ehdr_size, 0, 0,
                       shdr_size, 3, 2)
    null = b"\0" * shdr_size
    modinfo_sh = struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, body_off, len(body), 0, 0, 1, 0)
    strtab_sh = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0)
    out = ehdr + body + shstrtab
    return out + b"\0" * (shoff - len(out)) + null + modinfo_sh + strtab_sh


def test_modinfo_reads_repeated_keys() -> None:
    elf = fake_module({"license": "GPL", "depends": "kvm,ccp", "alias": "a1"})
    info = modinfo(elf)
    assert info["depends"] == ["kvm,ccp"]
    assert info["license"] == ["GPL"]


def test_modinfo_rejects_non_elf() -> None:
    with pytest.raises(InitramfsError):
        modinfo(b"MZ" + b"\0" * 100)


@given(st.data())
def test_modinfo_on_corrupted_elf_raises_only_initramfs_error(data: st.DataObject) -> None:
    raw = bytearray(fake_module({"depends": "a,b", "name": "x"}))
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        modinfo(bytes(raw[:data.draw(st.integers(0, len(raw)))]))
    except InitramfsError:
        pass


def write_tree(root: Path, deps: dict[str, str]) -> Path:
    for i, (name, depends) in enumerate(deps.items()):
        d = root / "kernel" / f"sub{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.ko").write_bytes(fake_module({"name": name, "depends": depends}))
    return root


def test_resolve_modules_puts_dependencies_first(tmp_path: Path) -> None:
    tree = write_tree(tmp_path, {"kvm-amd": "kvm,ccp", "kvm": "irqbypass", "ccp": "",
                                 "irqbypass": "", "unrelated": ""})
    order = [initramfs.module_name(p) for p in resolve_modules(tree, ["kvm_amd"])]
    assert order == ["irqbypass", "kvm", "ccp", "kvm_amd"]


def test_resolve_modules_reports_missing_and_cycles(tmp_path: Path) -> None:
    tree = write_tree(tmp_path, {"a": "b", "b": "a", "c": "nothere"})
    with pytest.raises(InitramfsError, match="cycle"):
        resolve_modules(tree, ["a"])
    with pytest.raises(InitramfsError, match="nothere.*needed by c"):
        resolve_modules(tree, ["c"])


def test_resolve_debian_lab_modules_when_fetched() -> None:
    from kvmpy.cachedir import cache_dir
    from kvmpy.lab.image import LAB_MODULES

    trees = sorted((cache_dir() / "pkgs").glob("linux-image-*-amd64_*/lib/modules/*"))
    trees = [t for t in trees if "cloud" not in t.name]
    if not trees:
        pytest.skip("Debian's kernel is not fetched yet (`make lab`)")
    order = resolve_modules(trees[-1], LAB_MODULES)
    names = [initramfs.module_name(p) for p in order]
    for module in order:
        for dep in filter(None, modinfo(module.read_bytes())["depends"][0].split(",")):
            assert names.index(dep.replace("-", "_")) < names.index(initramfs.module_name(module))
    assert {"virtio_ring", "9pnet", "netfs", "fscache", "irqbypass", "kvm", "ccp"} <= set(names)


# --- busybox images -------------------------------------------------------------------------

needs_busybox = pytest.mark.skipif(not initramfs.BUSYBOX.exists(),
                                   reason="busybox-static not installed (make deps)")


@needs_busybox
def test_default_initramfs_has_init_busybox_and_console() -> None:
    entries = {e.name: e for e in read_newc(gzip.decompress(initramfs.default_guest_initramfs()))}
    assert entries["init"].mode == S_IFREG | 0o755
    assert b"poweroff -f" in entries["init"].data
    assert entries["bin/busybox"].data == initramfs.BUSYBOX.read_bytes()
    assert entries["bin/sh"].data == b"../bin/busybox"
    assert entries["sbin/poweroff"].data == b"../bin/busybox"
    console = entries["dev/console"]
    assert console.mode & 0o170000 == S_IFCHR and (console.rdevmajor, console.rdevminor) == (5, 1)


@needs_busybox
@pytest.mark.parametrize("script", [initramfs.DEFAULT_INIT, LAB_INIT], ids=["default", "lab"])
def test_init_scripts_parse_in_busybox_sh(script: str, tmp_path: Path) -> None:
    (tmp_path / "init").write_text(script)
    done = subprocess.run([str(initramfs.BUSYBOX), "sh", "-n", str(tmp_path / "init")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_busybox
def test_modules_are_listed_in_load_order(tmp_path: Path) -> None:
    tree = write_tree(tmp_path, {"b": "", "a": "b"})
    arc = initramfs.busybox_initramfs("#!/bin/sh\n", modules=resolve_modules(tree, ["a"]))
    entries = {e.name: e for e in read_newc(arc.to_cpio())}
    assert entries[initramfs.MODULE_ORDER].data == b"b.ko\na.ko\n"
    assert entries["lib/modules/a.ko"].data == (tmp_path / "kernel/sub1/a.ko").read_bytes()
