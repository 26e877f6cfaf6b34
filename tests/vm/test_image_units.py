"""The guest build's pieces without booting anything: vmlinux extraction, module ordering, the
cpio writer, and the QEMU command line agentctl vm builds."""
from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
from pathlib import Path

import pytest

from agentctl import vm

GUEST_IMAGE = Path(__file__).resolve().parents[2] / "guest-image"

FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


@pytest.mark.parametrize("compress", [
    lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    lambda d: gzip.compress(d, mtime=0),
], ids=["xz", "gzip"])
def test_extract_vmlinux_finds_the_compressed_elf(compress, kernel_py):
    kernel = kernel_py
    # A bzImage-like blob: setup code, a decoy magic that does not decompress, the payload,
    # and trailing bytes after it (as the real image has).
    decoy = b"\xfd7zXZ\x00garbage" + b"\x1f\x8b\x08garbage"
    image = b"MZ" + os.urandom(3000) + decoy + compress(FAKE_ELF) + b"\0" * 100 + b"tail"
    assert kernel.extract_vmlinux(image) == FAKE_ELF


def test_extract_vmlinux_rejects_an_image_without_kernel(kernel_py):
    kernel = kernel_py
    with pytest.raises(kernel.KernelError, match="no compressed ELF kernel"):
        kernel.extract_vmlinux(b"MZ" + b"\0" * 5000 + gzip.compress(b"not an elf"))


def test_module_order_puts_dependencies_first(kernel_py):
    kernel = kernel_py
    deps = {"virtio_pci": "virtio_ring,virtio_pci_modern_dev,virtio",
            "virtio_pci_modern_dev": "", "virtio_ring": "", "virtio": "",
            "virtiofs": "fuse,virtio,virtio_ring", "fuse": "", "overlay": ""}
    index = {n: n for n in deps}
    order = kernel.module_order(["virtiofs", "virtio_pci", "overlay"], index,
                                depends=lambda p: deps[p])
    assert sorted(order) == sorted(deps)
    for name, ds in deps.items():
        for d in filter(None, ds.split(",")):
            assert order.index(d) < order.index(name), (d, name, order)
    assert order[-1] == "overlay"


def test_module_order_reports_missing_and_cycles(kernel_py):
    kernel = kernel_py
    with pytest.raises(kernel.KernelError, match=r"'nope' \(needed by a\)"):
        kernel.module_order(["a"], {"a": "a"}, depends=lambda p: "nope")
    with pytest.raises(kernel.KernelError, match="cycle: a -> b -> a"):
        kernel.module_order(["a"], {"a": "a", "b": "b"},
                            depends=lambda p: {"a": "b", "b": "a"}[p])


def test_modules_list_names_what_the_agent_needs(kernel_py):
    kernel = kernel_py
    names = kernel.read_list(str(GUEST_IMAGE / "modules.txt"))
    for needed in ("virtio_pci", "virtio_console", "vmw_vsock_virtio_transport", "overlay",
                   "fuse", "virtiofs", "virtio_net", "virtio_blk"):
        assert needed in names


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("hello\n")
    os.symlink("usr/bin", root / "bin")
    return root


def test_cpio_is_reproducible_and_complete(tmp_path, cpio_py):
    cpio = cpio_py
    root = _tree(tmp_path)
    a, b = io.BytesIO(), io.BytesIO()
    console = cpio.Node("dev/console", stat.S_IFCHR | 0o600, (5, 1))
    cpio.write(str(root), a, 0, [console])
    os.utime(root / "etc/motd", (12345, 12345))  # file times must not matter
    cpio.write(str(root), b, 0, [console])
    assert a.getvalue() == b.getvalue()
    entries = {name: (mode, data) for name, mode, data in cpio.read_names(a.getvalue())}
    assert entries["etc/motd"] == (stat.S_IFREG | 0o644, b"hello\n")
    assert entries["bin"] == (stat.S_IFLNK | 0o777, b"usr/bin")
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert stat.S_ISDIR(entries["usr"][0])
    # hard links: the data travels once, with the last name
    assert entries["usr/bin/tool"][1] == b"" and entries["usr/bin/tool2"][1].startswith(b"#!")
    assert list(entries) == sorted(entries)


def test_cpio_unpacks_with_another_cpio(tmp_path, cpio_py):
    cpio = cpio_py
    import shutil
    import subprocess
    tool = (["cpio"] if shutil.which("cpio") else
            ["busybox", "cpio"] if shutil.which("busybox") else None)
    if tool is None:
        pytest.skip("neither GNU cpio nor busybox is installed")
    root = _tree(tmp_path)
    buf = io.BytesIO()
    cpio.write(str(root), buf, 0)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(tool + ["-id"], input=buf.getvalue(), cwd=out, check=True)
    assert (out / "usr/bin/tool2").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.stat(out / "usr/bin/tool").st_ino == os.stat(out / "usr/bin/tool2").st_ino
    assert os.readlink(out / "bin") == "usr/bin"


def test_channel_cmdline_replaces_any_channel_setting():
    base = "console=ttyS0 agent.channel=x agent.server_addr=unix:///y agent.log=debug"
    assert vm.channel_cmdline(base, "virtio-serial") == \
        "console=ttyS0 agent.log=debug agent.channel=agent.channel.0"
    assert vm.channel_cmdline(base, "vsock").endswith("agent.server_addr=vsock://-1:1024")


def test_qemu_argv_serial_channel(tmp_path):
    spec = vm.VMSpec(kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0",
                     memory_mib=256, cpus=2)
    argv = vm.qemu_argv(spec, tmp_path, "tcg", "virtio-serial")
    s = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-M") + 1] == "q35" and argv[argv.index("-kernel") + 1] == "/k"
    assert f"socket,id=agent,path={tmp_path}/agent.sock,server=on,wait=off" in s
    assert "virtserialport,bus=vser0.0,chardev=agent,name=agent.channel.0" in s
    assert "-netdev user,id=net0" in s and "virtio-net-pci,netdev=net0" in s
    assert argv[argv.index("-append") + 1].endswith("agent.channel=agent.channel.0")
    assert "vhost-vsock" not in s
    kvm = vm.qemu_argv(spec, tmp_path, "kvm", "vsock")
    assert kvm[kvm.index("-cpu") + 1] == "host"
    cid = vm.vsock_cid(tmp_path)
    assert cid >= 3 and f"vhost-vsock-pci,guest-cid={cid}" in " ".join(kvm)
    assert vm.vsock_cid(tmp_path) == cid and vm.vsock_cid(tmp_path / "other") != cid
    assert "virtserialport" not in " ".join(kvm)


def test_vm_status_and_down_without_a_vm(tmp_path):
    assert vm.status(tmp_path) == ("absent", None)
    assert vm.down(tmp_path) == "not running"


def test_guest_files_says_what_is_missing(tmp_path):
    with pytest.raises(vm.VMError, match="kernel .* does not exist.*rootfs-build.sh"):
        vm.guest_files(str(tmp_path / "nope"), str(tmp_path / "nope2"))


def test_staging_is_reproducible(tmp_path, guest_dir, cpio_py):
    """Two stagings of the same inputs archive to the same bytes (pyc included): fixed hash
    seed, unchecked-hash pycs, sorted entries, fixed times."""
    import hashlib
    import subprocess
    digests = []
    for n in ("a", "b"):
        out = tmp_path / n
        subprocess.run(["/usr/bin/python3.11",
                        str(GUEST_IMAGE / "stage.py"), "--repo", str(GUEST_IMAGE.parent),
                        "--site", str(GUEST_IMAGE.parent / ".venv/lib/python3.11/site-packages"),
                        "--modules-order", str(guest_dir / "cache/modules.order"),
                        "--out", str(out)], check=True, capture_output=True)
        buf = io.BytesIO()
        cpio_py.write(str(out), buf, 0)
        digests.append(hashlib.sha256(buf.getvalue()).hexdigest())
    assert digests[0] == digests[1]


def test_agentctl_vm_cli_without_a_vm(tmp_path, capsys):
    from agentctl.cli import main
    assert main(["vm", "status", "--state-dir", str(tmp_path)]) == 3
    assert capsys.readouterr().out == "absent\n"
    assert main(["vm", "down", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "not running\n"
    assert main(["vm", "up", "--state-dir", str(tmp_path), "--kernel", str(tmp_path / "k"),
                 "--initrd", str(tmp_path / "i")]) == 1
    assert "does not exist" in capsys.readouterr().err
