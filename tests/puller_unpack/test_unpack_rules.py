"""Layer rules: our unpacker against GNU tar on real layers, plus the OCI-specific rules."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile

import pytest

from puller.unpack import Limits, UnpackError, WhiteoutMode, unpack_layer
from unpack_helpers import (
    CAP_NET_BIND_SERVICE_XATTR, NonSeekable, archive, describe, entry, gnu_long, gnu_tar,
    gnu_untar, header, pad, pax,
)

RESOLVERS = [pytest.param(None, id="openat2"), pytest.param(False, id="walk")]


def _build_tree(src: str) -> None:
    os.makedirs(f"{src}/etc/ssl", mode=0o755)
    os.makedirs(f"{src}/tmp")
    os.chmod(f"{src}/tmp", 0o1777)
    os.makedirs(f"{src}/home/user/private")
    os.chown(f"{src}/home/user", 1000, 1000)
    os.chmod(f"{src}/home/user/private", 0o700)
    os.chown(f"{src}/home/user/private", 1000, 1000)
    with open(f"{src}/etc/passwd", "w") as f:
        f.write("root:x:0:0::/root:/bin/sh\n")
    os.makedirs(f"{src}/usr/bin")
    with open(f"{src}/usr/bin/su", "wb") as f:
        f.write(b"\x7fELF" + os.urandom(3000))
    os.chmod(f"{src}/usr/bin/su", 0o4755)
    with open(f"{src}/usr/bin/wall", "wb") as f:
        f.write(b"wall")
    os.chown(f"{src}/usr/bin/wall", 0, 5)
    os.chmod(f"{src}/usr/bin/wall", 0o2755)
    with open(f"{src}/usr/bin/ping", "wb") as f:
        f.write(b"ping")
    os.chmod(f"{src}/usr/bin/ping", 0o755)
    os.setxattr(f"{src}/usr/bin/ping", "security.capability", CAP_NET_BIND_SERVICE_XATTR)
    with open(f"{src}/home/user/notes", "wb") as f:
        f.write(b"n" * 10000)
    os.chown(f"{src}/home/user/notes", 1000, 1000)
    os.setxattr(f"{src}/home/user/notes", "user.comment", b"\x00binary\xff value")
    os.link(f"{src}/home/user/notes", f"{src}/home/user/notes.hard")
    os.link(f"{src}/home/user/notes", f"{src}/etc/notes.hard2")
    os.symlink("../etc/passwd", f"{src}/usr/passwd.rel")
    os.symlink("/etc/passwd", f"{src}/usr/passwd.abs")
    os.symlink("does/not/exist", f"{src}/usr/dangling")
    os.lchown(f"{src}/usr/dangling", 7, 8)
    os.makedirs(f"{src}/dev")
    os.mknod(f"{src}/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(f"{src}/dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chown(f"{src}/dev/loop0", 0, 6)
    os.mkfifo(f"{src}/dev/initctl", 0o600)
    deep = f"{src}/" + "/".join(["d" * 60] * 5)
    os.makedirs(deep)
    with open(f"{deep}/{'f' * 200}", "wb") as f:
        f.write(b"long name")
    os.symlink("t" * 150, f"{deep}/longlink")
    with open(f"{src}/big.bin", "wb") as f:
        f.write(os.urandom(3 << 20))
    with open(f"{src}/empty", "wb"):
        pass
    # old and odd times, directories included (must be set after their children)
    for i, p in enumerate(["etc", "etc/passwd", "usr/bin", "usr/bin/su", "home/user", "tmp", "."]):
        os.utime(f"{src}/{p}", ns=(1_000_000_000 + i, 946_684_800_000_000_000 + i * 1_000_000_007))
    os.utime(f"{src}/usr/passwd.rel", ns=(5, 123_456_789_000_000_000), follow_symlinks=False)


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_gnu_tar_layer_matches_tar_x(tmp_path, fmt, resolver):
    src, ours, ref = (str(tmp_path / n) for n in ("src", "ours", "ref"))
    for d in (src, ours, ref):
        os.mkdir(d)
    _build_tree(src)
    tarball = str(tmp_path / "layer.tar")
    gnu_tar(src, tarball, fmt)
    with open(tarball, "rb") as f:
        stats = unpack_layer(NonSeekable(f.read()), ours, layer="L1", use_openat2=resolver)
    gnu_untar(tarball, ref)

    mine = describe(ours)
    theirs = describe(ref)
    if fmt == "gnu":
        # the gnu format has no sub-second times and GNU tar does not store its xattrs there
        for d in list(mine.values()) + list(theirs.values()):
            d.pop("xattrs")
    assert mine == theirs
    src_desc = describe(src)
    if fmt == "posix":
        # GNU tar stores ns times in pax headers: the source tree comes back exactly
        assert mine == src_desc
        assert mine["usr/bin/ping"]["xattrs"] == {"security.capability": CAP_NET_BIND_SERVICE_XATTR}
        assert mine["home/user/notes"]["xattrs"] == {"user.comment": b"\x00binary\xff value"}
    assert mine["usr/bin/su"]["mode"] == 0o4755
    assert mine["usr/bin/wall"]["mode"] == 0o2755 and mine["usr/bin/wall"]["gid"] == 5
    assert mine["tmp"]["mode"] == 0o1777
    assert mine["home/user/private"]["uid"] == 1000
    assert mine["dev/null"]["rdev"] == (1, 3)
    assert mine["dev/loop0"]["type"] == stat.S_IFBLK
    assert mine["etc/notes.hard2"]["link_group"] == mine["home/user/notes"]["link_group"]
    assert os.lstat(f"{ours}/usr/passwd.rel").st_mtime_ns // 10**9 == 123_456_789
    assert stats.hardlinks == 2 and stats.devices == 2 and stats.fifos == 1
    assert stats.bytes == sum(d.get("size", 0) for r, d in src_desc.items()
                              if "link_group" not in d or d["link_group"] == r)
    assert stats.tar_bytes == os.path.getsize(tarball)


def test_non_seekable_short_reads_give_same_tree(tmp_path):
    src = str(tmp_path / "src")
    os.mkdir(src)
    _build_tree(src)
    tarball = str(tmp_path / "l.tar")
    gnu_tar(src, tarball)
    data = open(tarball, "rb").read()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.mkdir(a)
    os.mkdir(b)
    unpack_layer(io.BytesIO(data), a)
    unpack_layer(NonSeekable(data, max_read=700), b)
    assert describe(a) == describe(b)


def test_missing_end_blocks_tolerated_but_truncated_data_refused(tmp_path):
    # as umoci insert writes them: the last member's data is complete, padding and the two
    # zero blocks are not there
    body = entry("dir/", type=b"5", mode=0o755) + header("dir/file", size=5) + b"hello"
    dest = tmp_path / "d"
    dest.mkdir()
    st = unpack_layer(NonSeekable(body), dest, layer="umoci")
    assert (dest / "dir/file").read_bytes() == b"hello"
    assert st.clean_end is False

    dest2 = tmp_path / "d2"
    dest2.mkdir()
    with pytest.raises(UnpackError) as ei:
        unpack_layer(NonSeekable(header("file", size=100) + b"x" * 60), dest2, layer="cut")
    assert ei.value.member == "file" and "truncated" in str(ei.value)
    assert "layer cut" in str(ei.value)


def test_umoci_written_layer(tmp_path):
    """A layer written by `umoci insert` (the real tool) unpacks."""
    import shutil
    import subprocess

    if not shutil.which("umoci"):
        pytest.skip("umoci not installed")
    img = str(tmp_path / "img")
    subprocess.run(["umoci", "init", "--layout", img], check=True)
    subprocess.run(["umoci", "new", "--image", f"{img}:t"], check=True)
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "hello.txt").write_bytes(b"hello from umoci\n" * 5)
    subprocess.run(["umoci", "insert", "--image", f"{img}:t", str(payload), "/opt/p"], check=True)
    import gzip
    import json

    idx = json.load(open(f"{img}/index.json"))
    mdig = idx["manifests"][0]["digest"].split(":")[1]
    manifest = json.load(open(f"{img}/blobs/sha256/{mdig}"))
    layer = manifest["layers"][-1]
    raw = gzip.decompress(open(f"{img}/blobs/sha256/{layer['digest'].split(':')[1]}", "rb").read())
    dest = tmp_path / "d"
    dest.mkdir()
    unpack_layer(NonSeekable(raw), dest, layer=layer["digest"])
    assert (dest / "opt/p/hello.txt").read_bytes() == b"hello from umoci\n" * 5


def test_pax_and_gnu_long_names(tmp_path):
    long_dir = "/".join(["x" * 90] * 3)
    long_name = long_dir + "/" + "n" * 240
    long_target = "../" + "t" * 300
    data = archive(
        pax({"path": long_name, "mtime": "1234567890.5", "uid": "4000000", "gid": "4000001"})
        + header("placeholder", size=3) + pad(b"abc"),
        gnu_long(b"L", long_dir + "/gnu-" + "g" * 200) + header("ignored", size=2) + pad(b"hi"),
        gnu_long(b"K", long_target) + gnu_long(b"L", long_dir + "/sym")
        + header("ignored2", type=b"2", linkname="short"),
        pax({"linkpath": long_name, "path": long_dir + "/hard"}) + header("x", type=b"1"),
    )
    dest = tmp_path / "d"
    dest.mkdir()
    stats = unpack_layer(NonSeekable(data), dest)
    f = dest / long_name
    assert f.read_bytes() == b"abc"
    st = f.stat()
    assert st.st_mtime_ns == 1_234_567_890_500_000_000
    assert (st.st_uid, st.st_gid) == (4_000_000, 4_000_001)
    assert (dest / long_dir / ("gnu-" + "g" * 200)).read_bytes() == b"hi"
    assert os.readlink(dest / long_dir / "sym") == long_target
    assert (dest / long_dir / "hard").stat().st_ino == st.st_ino
    assert stats.files == 2 and stats.symlinks == 1 and stats.hardlinks == 1


def test_base256_numbers_and_ustar_prefix(tmp_path):
    h = bytearray(header("file", size=4, prefix=b"some/prefix/dir"))
    # uid 2**40 in GNU base-256 (top bit marks it)
    h[108:116] = bytes([0x80, 0, 0, 1, 0, 0, 0, 0])
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(UnpackError) as ei:  # beyond uid_t
        unpack_layer(NonSeekable(archive(bytes(h) + pad(b"data"))), dest)
    assert ei.value.member == "some/prefix/dir/file"
    h[108:116] = bytes([0x80, 0, 0, 0, 0, 0, 0x30, 0x39])  # 12345
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    unpack_layer(NonSeekable(archive(bytes(h) + pad(b"data"))), dest)
    assert (dest / "some/prefix/dir/file").stat().st_uid == 12345


def test_implicit_parents_and_root_entry(tmp_path):
    data = archive(entry("./", type=b"5", mode=0o750, uid=3, gid=4, mtime=1000),
                   entry("a/b/c/file", b"x"))
    dest = tmp_path / "d"
    dest.mkdir()
    unpack_layer(NonSeekable(data), dest)
    st = dest.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o750, 3, 4, 1000)
    assert stat.S_IMODE((dest / "a/b").stat().st_mode) == 0o755
    assert (dest / "a/b/c/file").read_bytes() == b"x"


def test_directory_times_set_after_children(tmp_path):
    data = archive(entry("d/", type=b"5", mode=0o755, mtime=1000),
                   entry("d/f1", b"1", mtime=2000),
                   entry("d/sub/", type=b"5", mode=0o700, mtime=3000),
                   entry("d/sub/f2", b"2", mtime=4000),
                   entry("d/l", type=b"2", linkname="f1", mtime=5000),
                   entry(".wh.gone", mtime=6000))
    dest = tmp_path / "d"
    dest.mkdir()
    unpack_layer(NonSeekable(data), dest)
    assert (dest / "d").stat().st_mtime == 1000
    assert (dest / "d/sub").stat().st_mtime == 3000
    assert (dest / "d/f1").stat().st_mtime == 2000
    assert os.lstat(dest / "d/l").st_mtime == 5000
    assert (dest / "d/f1").stat().st_mtime == 2000  # not touched through the symlink


def test_later_entry_wins(tmp_path):
    data = archive(
        entry("a/", type=b"5", mode=0o755), entry("a/inner", b"old"),
        entry("a", b"now a file"),                      # file replaces a dir with content
        entry("b", b"file first"), entry("b/", type=b"5", mode=0o711),  # dir replaces file
        entry("c", type=b"2", linkname="a"), entry("c", b"c data"),     # file replaces symlink
        entry("d", b"one"), entry("d", b"two"),
        entry("e", b"e"), entry("h", type=b"1", linkname="e"), entry("h", b"own"),
    )
    dest = tmp_path / "d"
    dest.mkdir()
    unpack_layer(NonSeekable(data), dest)
    assert (dest / "a").read_bytes() == b"now a file"
    assert (dest / "b").is_dir() and stat.S_IMODE((dest / "b").stat().st_mode) == 0o711
    assert not (dest / "c").is_symlink() and (dest / "c").read_bytes() == b"c data"
    assert (dest / "d").read_bytes() == b"two"
    assert (dest / "h").read_bytes() == b"own" and (dest / "e").read_bytes() == b"e"


def test_overlay_whiteouts_recorded_for_overlayfs(tmp_path):
    data = archive(
        entry("etc/", type=b"5", mode=0o755),
        entry("etc/.wh.motd"),
        entry("var/cache/", type=b"5", mode=0o755),
        entry("var/cache/.wh..wh..opq"),
        entry("var/cache/new", b"n"),
        entry(".wh.opt"), entry("opt/", type=b"5", mode=0o755),      # whiteout, then own dir
        entry("srv/", type=b"5", mode=0o755), entry(".wh.srv"),       # own dir, then whiteout
        entry("root/.wh..wh.plnk"),                                    # aufs metadata: ignored
    )
    dest = tmp_path / "d"
    dest.mkdir()
    st = unpack_layer(NonSeekable(data), dest, whiteouts=WhiteoutMode.OVERLAY)
    motd = os.lstat(dest / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == 0
    assert os.getxattr(dest / "var/cache", "trusted.overlay.opaque") == b"y"
    assert (dest / "var/cache/new").read_bytes() == b"n"
    assert (dest / "opt").is_dir() and os.getxattr(dest / "opt", "trusted.overlay.opaque") == b"y"
    assert (dest / "srv").is_dir() and os.getxattr(dest / "srv", "trusted.overlay.opaque") == b"y"
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(dest) for n in ds + fs)
    assert not (dest / "root").exists()
    assert st.whiteouts == 3 and st.opaque_dirs == 1


def test_delete_mode_applies_whiteouts_to_lower_content(tmp_path):
    dest = tmp_path / "merged"
    (dest / "etc").mkdir(parents=True)
    (dest / "etc/motd").write_text("lower")
    (dest / "etc/keep").write_text("lower")
    (dest / "var/cache/old").mkdir(parents=True)
    (dest / "var/cache/old/f").write_text("lower")
    (dest / "var/cache/lowerfile").write_text("lower")
    (dest / "opt/lowerdir").mkdir(parents=True)
    data = archive(
        entry("etc/.wh.motd"),
        entry("var/cache/mine", b"this layer"),   # before the opaque marker: must survive
        entry("var/cache/.wh..wh..opq"),
        entry("var/cache/after", b"after"),
        entry("opt/", type=b"5", mode=0o755), entry(".wh.opt"),  # own entry beats own whiteout
        entry(".wh.nothing-there"),
    )
    st = unpack_layer(NonSeekable(data), dest, whiteouts=WhiteoutMode.DELETE)
    assert not (dest / "etc/motd").exists() and (dest / "etc/keep").exists()
    assert sorted(os.listdir(dest / "var/cache")) == ["after", "mine"]
    assert (dest / "opt").is_dir()
    assert st.whiteouts == 3


def test_drain_consumes_the_whole_stream(tmp_path):
    body = archive(entry("f", b"x")) + b"\0" * 20480  # tar's record padding
    s = NonSeekable(body)
    st = unpack_layer(s, tmp_path, drain=True)
    assert s.consumed == len(body) == st.tar_bytes
    long_tail = archive(entry("f", b"x")) + b"\0" * (8 << 20)
    s2 = NonSeekable(long_tail)
    os.unlink(tmp_path / "f")
    unpack_layer(s2, tmp_path, drain=False)
    assert s2.consumed < len(long_tail)


def test_python_tarfile_pax_layer_with_xattrs(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("bin/tool")
        payload = os.urandom(70000)
        ti.size = len(payload)
        ti.mode = 0o4750
        ti.uid, ti.gid = 0, 50
        ti.mtime = 1_700_000_000.25
        ti.pax_headers = {"SCHILY.xattr.user.k": "v", "SCHILY.xattr.trusted.t": "tv"}
        t.addfile(ti, io.BytesIO(payload))
    dest = tmp_path / "d"
    dest.mkdir()
    st = unpack_layer(NonSeekable(buf.getvalue()), dest)
    p = dest / "bin/tool"
    assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(payload).digest()
    s = p.stat()
    assert stat.S_IMODE(s.st_mode) == 0o4750 and s.st_gid == 50
    assert s.st_mtime_ns == 1_700_000_000_250_000_000
    assert os.getxattr(p, "user.k") == b"v" and os.getxattr(p, "trusted.t") == b"tv"
    assert st.xattrs == 2


def test_entry_limit_counts_every_member(tmp_path):
    data = archive(*[entry(f"f{i}", b"") for i in range(50)])
    with pytest.raises(UnpackError) as ei:
        unpack_layer(NonSeekable(data), tmp_path, limits=Limits(max_entries=20), layer="many")
    assert "20 entries" in str(ei.value) and ei.value.member == "f20"


def test_many_directories_and_cross_directory_hardlinks(tmp_path):
    """More directories than the fd cache holds, hardlinks reaching back to the first ones."""
    members = []
    for i in range(700):
        members.append(entry(f"d{i:03d}/", type=b"5", mode=0o755, mtime=100 + i))
        members.append(entry(f"d{i:03d}/f", str(i).encode(), mtime=5))
        members.append(entry(f"d{i:03d}/link-to-first", type=b"1", linkname=f"d{i % 3:03d}/f"))
    dest = tmp_path / "d"
    dest.mkdir()
    st = unpack_layer(NonSeekable(archive(*members)), dest)
    assert st.dirs == 700 and st.files == 700 and st.hardlinks == 700
    assert (dest / "d699/link-to-first").read_bytes() == b"0"
    assert (dest / "d699/link-to-first").stat().st_ino == (dest / "d000/f").stat().st_ino
    assert (dest / "d000/f").stat().st_nlink == 1 + 234
    assert (dest / "d500").stat().st_mtime == 600


def test_no_fd_leak_on_success_or_refusal(tmp_path):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    members = [entry(f"a{i}/b/c", b"x") for i in range(300)]
    unpack_layer(NonSeekable(archive(*members)), tmp_path)
    with pytest.raises(UnpackError):
        unpack_layer(NonSeekable(archive(*members, entry("../x", b""))), tmp_path)
    assert fds() == before


def test_pax_global_header_applies_to_following_members(tmp_path):
    glob = pax({"uid": "77", "mtime": "1000"})
    glob = header("GlobalHead", type=b"g", size=len(glob) - 512) + glob[512:]
    data = archive(glob, entry("a", b"1"), pax({"uid": "5"}) + entry("b", b"2"), entry("c", b"3"))
    unpack_layer(NonSeekable(data), tmp_path)
    assert [(tmp_path / n).stat().st_uid for n in "abc"] == [77, 5, 77]
    assert (tmp_path / "c").stat().st_mtime == 1000
