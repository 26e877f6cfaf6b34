"""Hostile layers: each is refused with an UnpackError naming layer and member, or (for the
'through a symlink' cases) neutralised, and in every case nothing outside dest changes (the
`arena` fixture compares the outside tree and the temp dir's listing before and after)."""

from __future__ import annotations

import gzip
import io
import os
import stat

import pytest

from puller.unpack import Limits, UnpackError, WhiteoutMode, unpack_layer
from unpack_helpers import NonSeekable, archive, entry, header, pad, pax, pax_records

RESOLVERS = [pytest.param(None, id="openat2"), pytest.param(False, id="walk")]


def refused(arena, data: bytes, member: str | None, *, resolver=None, mode=WhiteoutMode.OVERLAY,
            limits: Limits = Limits(), reason: str = "") -> UnpackError:
    with pytest.raises(UnpackError) as ei:
        unpack_layer(NonSeekable(data), arena.dest, layer="sha256:bad", use_openat2=resolver,
                     whiteouts=mode, limits=limits)
    err = ei.value
    assert err.layer == "sha256:bad" and "layer sha256:bad" in str(err)
    if member is not None:
        assert err.member == member, str(err)
        assert repr(member) in str(err)
    assert reason in str(err), str(err)
    arena.assert_outside_untouched()
    return err


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("mode", list(WhiteoutMode))
@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../escape", "a/b/../../../x"])
def test_dotdot_names(arena, resolver, mode, name):
    refused(arena, archive(entry(name, b"pwned")), name, resolver=resolver, mode=mode,
            reason="'..'")


def test_absolute_name(arena):
    name = os.path.join(arena.base, "escape")
    refused(arena, archive(entry(name, b"pwned")), name, reason="absolute")


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("how", ["absolute", "relative", "chain"])
def test_symlinked_parent_pointing_outside(arena, resolver, how):
    if how == "absolute":
        links = [entry("evil", type=b"2", linkname=arena.outside)]
    elif how == "relative":
        links = [entry("evil", type=b"2", linkname="../outside")]
    else:  # a hop inside that ends outside
        links = [entry("sub/", type=b"5", mode=0o755),
                 entry("sub/up", type=b"2", linkname=".."),
                 entry("evil", type=b"2", linkname="sub/up/up/../outside"),
                 entry("sub/up/up", type=b"2", linkname="../..")]
    data = archive(*links, entry("evil/pwned", b"pwned"))
    refused(arena, data, "evil/pwned", resolver=resolver, reason="outside")


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_symlinked_parent_inside_is_followed(arena, resolver):
    """Resolution is beneath dest, not 'no symlinks at all': usr-merge style links work."""
    data = archive(entry("usr/lib/", type=b"5", mode=0o755),
                   entry("lib", type=b"2", linkname="usr/lib"),
                   entry("lib/libc.so", b"elf"))
    unpack_layer(NonSeekable(data), arena.dest, use_openat2=resolver)
    assert open(os.path.join(arena.dest, "usr/lib/libc.so"), "rb").read() == b"elf"


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("target", ["../outside/secret", "/outside/secret", "evil/secret",
                                    "a/../../outside/secret"])
def test_hardlink_to_outside(arena, resolver, target):
    if target.startswith("/"):
        target = arena.outside + "/secret"
    data = archive(entry("evil", type=b"2", linkname="../outside"),
                   entry("stolen", type=b"1", linkname=target))
    refused(arena, data, "stolen", resolver=resolver)
    assert os.stat(os.path.join(arena.outside, "secret")).st_nlink == 1


def test_hardlink_to_directory_or_missing_target(arena):
    refused(arena, archive(entry("d/", type=b"5", mode=0o755), entry("l", type=b"1", linkname="d")),
            "l", reason="directory")
    refused(arena, archive(entry("l2", type=b"1", linkname="nowhere")), "l2",
            reason="does not exist")


@pytest.mark.parametrize("kind", ["dir", "file", "fifo", "chr", "hardlink"])
def test_no_chmod_chown_utime_through_a_symlink(arena, kind):
    """A symlink at the name is replaced, never followed, whatever the later entry is."""
    secret = os.path.join(arena.outside, "secret")
    later = {
        "dir": entry("s", type=b"5", mode=0o777, uid=1234, mtime=5),
        "file": entry("s", b"pwned", mode=0o4777, uid=1234, mtime=5),
        "fifo": entry("s", type=b"6", mode=0o777, uid=1234, mtime=5),
        "chr": entry("s", type=b"3", mode=0o777, devmajor=1, devminor=3, uid=1234, mtime=5),
        "hardlink": entry("t", b"other", mode=0o777, uid=1234) + entry("s", type=b"1", linkname="t"),
    }[kind]
    data = archive(entry("s", type=b"2", linkname=secret), later,
                   entry("d", type=b"2", linkname=arena.outside + "/dir"),
                   entry("d/", type=b"5", mode=0o777, uid=1234, mtime=5))
    unpack_layer(NonSeekable(data), arena.dest)
    s = os.lstat(os.path.join(arena.dest, "s"))
    assert not stat.S_ISLNK(s.st_mode)
    assert os.path.isdir(os.path.join(arena.dest, "d"))
    arena.assert_outside_untouched()


def test_directory_replaced_by_symlink_keeps_final_time_pass_inside(arena):
    # the dir's mtime is applied at the end; by then the name is a symlink to outside
    data = archive(entry("d/", type=b"5", mode=0o755, mtime=7),
                   entry("d", type=b"2", linkname=arena.outside + "/dir"))
    unpack_layer(NonSeekable(data), arena.dest)
    assert os.path.islink(os.path.join(arena.dest, "d"))
    arena.assert_outside_untouched()


def test_symlink_loop_as_parent(arena):
    data = archive(entry("a", type=b"2", linkname="b"), entry("b", type=b"2", linkname="a"),
                   entry("a/x", b"x"))
    refused(arena, data, "a/x")


def test_decompression_bomb_capped_by_bytes(arena):
    # 64 MiB of zeros in a member compress to ~64 KiB; the cap stops reading at 8 MiB
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        gz.write(header("bomb", size=64 << 20))
        zeros = b"\0" * (1 << 20)
        for _ in range(64):
            gz.write(zeros)
        gz.write(b"\0" * 1024)
    assert len(raw.getvalue()) < 200_000
    raw.seek(0)
    stream = gzip.GzipFile(fileobj=raw, mode="rb")
    with pytest.raises(UnpackError) as ei:
        unpack_layer(stream, arena.dest, layer="sha256:bad", limits=Limits(max_bytes=8 << 20))
    assert ei.value.member == "bomb" and "8388608" in str(ei.value)
    arena.assert_outside_untouched()


def test_many_empty_entries_capped(arena):
    data = archive(*[header(f"e{i}") for i in range(300)])
    refused(arena, data, "e100", limits=Limits(max_entries=100), reason="entries")


def test_huge_pax_header_capped(arena):
    big = pax_records({"comment": "x" * (2 << 20)})
    data = archive(header("PaxHeader", type=b"x", size=len(big)) + pad(big) + entry("f", b"x"))
    err = refused(arena, data, "<header at offset 0>", limits=Limits(max_meta=1 << 20))
    assert "metadata header" in str(err)


def test_size_lie_is_truncation(arena):
    data = header("liar", size=1 << 30) + b"short"
    refused(arena, data, "liar", reason="truncated")


def test_bad_checksum(arena):
    data = archive(entry("ok", b"1"), header("bad", size=0, bad_checksum=True))
    err = refused(arena, data, "<header at offset 1024>", reason="checksum")
    assert err.member.startswith("<header")


def test_overlay_private_xattrs_refused(arena):
    data = archive(pax({"SCHILY.xattr.trusted.overlay.redirect": "/etc"})
                   + entry("d/", type=b"5", mode=0o755))
    refused(arena, data, "d/", reason="overlayfs-private")


def test_nul_in_pax_path(arena):
    data = archive(pax({"path": b"a\0b"}) + entry("x", b"1"))
    refused(arena, data, "a\0b", reason="NUL")


def test_invalid_whiteout_names(arena):
    refused(arena, archive(entry(".wh.")), ".wh.", reason="whiteout")
    refused(arena, archive(entry("d/.wh...")), "d/.wh...", reason="whiteout")


def test_sparse_and_unknown_types_refused(arena):
    refused(arena, archive(entry("s", type=b"S")), "s", reason="unsupported")
    refused(arena, archive(pax({"GNU.sparse.major": "1"}) + entry("p", b"")), "p",
            reason="sparse")


def test_non_directory_root_refused(arena):
    refused(arena, archive(entry("./", b"data")), "./", reason="root")


def test_file_where_a_parent_should_be(arena):
    refused(arena, archive(entry("f", b"1"), entry("f/g", b"2")), "f/g", reason="not a directory")


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("mode", list(WhiteoutMode))
@pytest.mark.parametrize("marker", [".wh.secret", ".wh..wh..opq"])
def test_whiteout_through_symlinked_parent(arena, resolver, mode, marker):
    """In merged mode a whiteout deletes: through a symlink it would delete outside."""
    data = archive(entry("evil", type=b"2", linkname="../outside"), entry(f"evil/{marker}"))
    refused(arena, data, f"evil/{marker}", resolver=resolver, mode=mode, reason="outside")
    assert os.path.exists(os.path.join(arena.outside, "secret"))


@pytest.mark.parametrize("value", ["1_0", "+10", " 10", "-1", "0x10", "１０"])
def test_lax_numbers_refused_in_pax(arena, value):
    """Parser differentials: a size another tar reader would read differently is refused."""
    data = archive(pax({"size": value}) + header("f", size=0) + pad(b"x" * 10))
    refused(arena, data, "f", reason="bad pax size")


@pytest.mark.parametrize("field", [b"-0000012\0", b"0_00012\0", b"0000019\0", b"+000012\0"])
def test_lax_numbers_refused_in_header(arena, field):
    h = bytearray(header("f", size=0))
    h[124:136] = field.rjust(12, b" ")
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    refused(arena, archive(bytes(h) + pad(b"x" * 10)), "<header at offset 0>", reason="size")
