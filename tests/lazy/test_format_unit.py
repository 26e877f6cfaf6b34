"""The metadata format, the in-memory layer rules and range planning, without root or network."""
from __future__ import annotations

import json

import pytest
import zstandard

from puller.lazy.chunker import ChunkTable, decode_chunk
from puller.lazy.fetcher import plan_ranges
from puller.lazy.format import Chunk, Meta, MetaError, Node, load_meta
from puller.lazy.tree import MergedTree, TreeError
from puller.tarstream import Member

SUBJECT = "sha256:" + "ab" * 32


def member(name: str, typ: bytes = b"0", size: int = 0, mode: int = 0o644, linkname: str = "", **kw) -> Member:
    return Member(name=name, type=typ, mode=mode, uid=kw.get("uid", 0), gid=kw.get("gid", 0), size=size,
                  mtime_ns=kw.get("mtime_ns", 0), linkname=linkname, xattrs=kw.get("xattrs", {}))


def sample_meta() -> Meta:
    import io
    table = ChunkTable(chunk_size=4096)
    out = io.BytesIO()
    a = [table.add(b"x" * 4096, 0, out), table.add(b"y" * 10, 0, out)]
    nodes = [Node("", "dir", 0o755, ino=1), Node("bin", "dir", 0o755, ino=2),
             Node("bin/a", "reg", 0o4755, 0, 0, 5, 4106, chunks=a, xattrs={"security.capability": b"\x01\x02"}, ino=3),
             Node("bin/b", "reg", 0o4755, 0, 0, 5, 4106, chunks=a, xattrs={"security.capability": b"\x01\x02"}, ino=3),
             Node("bin/sh", "lnk", 0o777, target="a", ino=4), Node("null", "chr", 0o666, rdev=(1, 3), ino=5)]
    return Meta(SUBJECT, 4096, [("sha256:" + "cd" * 32, len(out.getvalue()))], table.chunks, nodes)


def raw_doc(meta: Meta) -> dict:
    return json.loads(zstandard.ZstdDecompressor().decompress(meta.to_bytes()))


def pack(doc: dict) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


def test_round_trip_keeps_tree_links_and_attributes():
    m = load_meta(sample_meta().to_bytes(), SUBJECT)
    by = {n.path: n for n in m.nodes}
    assert by["bin/a"].ino == by["bin/b"].ino != by["bin/sh"].ino
    assert by["bin/b"].mode == 0o4755 and by["bin/b"].xattrs == {"security.capability": b"\x01\x02"}
    assert by["bin/a"].size == 4106 and [m.chunks[i].size for i in by["bin/a"].chunks] == [4096, 10]
    assert by["null"].rdev == (1, 3) and by["bin/sh"].target == "a"
    assert raw_doc(sample_meta())["nodes"][3] == {"p": "bin/b", "h": "bin/a"}  # a link is stored once


def test_prefetch_list_travels_in_the_metadata():
    meta = sample_meta()
    assert "prefetch" not in raw_doc(meta)  # absent unless given: older pullers see no change
    meta.prefetch = ["bin/sh", "null"]
    assert load_meta(meta.to_bytes(), SUBJECT).prefetch == ["bin/sh", "null"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(subject="sha256:" + "00" * 32), "not the image"),
    (lambda d: d["nodes"][2].update(p="bin/../../etc"), "'..'"),
    (lambda d: d["nodes"][2].update(p="/abs"), "bad path"),
    (lambda d: d["nodes"][2].update(c=[0, 7]), "chunk index"),
    (lambda d: d["nodes"][2].update(s=5000), "do not add up"),
    (lambda d: d["chunks"][0].__setitem__(2, 1 << 40), "past its blob"),
    (lambda d: d["chunks"][0].__setitem__(0, "zz"), "lowercase hex"),
    (lambda d: d["nodes"].insert(1, {"p": "x/y", "k": "reg", "m": 0, "u": 0, "g": 0, "t": 0, "s": 0, "c": []}),
     "parent"),
    (lambda d: d["nodes"][3].update(h="bin/sh"), "hard link"),
    (lambda d: d["nodes"][4].update(k="sock"), "unknown kind"),
    (lambda d: d["nodes"][2].update(x={"user.a": "%%%"}), "base64"),
    (lambda d: d["nodes"][2].update(m=0o170000), "mode"),
    (lambda d: d["nodes"][1].update(x={"trusted.overlay.opaque": "eQ=="}), "overlayfs-private"),
    (lambda d: d.update(prefetch="bin/a"), "prefetch is not a list"),
    (lambda d: d.update(prefetch=["bin/a", 7]), "prefetch\\[1\\]"),
    (lambda d: d.update(prefetch=["../../etc/shadow"]), "'..'"),
    (lambda d: d.update(prefetch=["/bin/a"]), "bad path"),
])
def test_hostile_metadata_is_refused(mutate, message):
    doc = raw_doc(sample_meta())
    mutate(doc)
    with pytest.raises(MetaError, match=message):
        load_meta(pack(doc), SUBJECT)


def test_not_zstd_or_json_is_refused():
    with pytest.raises(MetaError, match="cannot decode"):
        load_meta(b"not zstd", SUBJECT)
    with pytest.raises(MetaError, match="cannot decode"):
        load_meta(zstandard.ZstdCompressor().compress(b"{nope"), SUBJECT)


def test_decode_chunk_checks_digest_size_and_compression():
    import io
    table = ChunkTable(chunk_size=1 << 16)
    out = io.BytesIO()
    i = table.add(b"a" * 50000, 0, out)  # compressible: stored compressed
    j = table.add(bytes(range(256)) * 4, 0, out)
    c, d = table.chunks[i], table.chunks[j]
    assert c.zstd and c.stored < 1000
    blob = out.getvalue()
    assert decode_chunk(c, blob[c.offset:c.offset + c.stored]) == b"a" * 50000
    bad = bytearray(blob[d.offset:d.offset + d.stored])
    bad[3] ^= 1
    with pytest.raises(ValueError, match=d.digest):
        decode_chunk(d, bytes(bad))
    with pytest.raises(ValueError, match="stored bytes"):
        decode_chunk(d, bytes(bad[:-1]))
    assert table.add(b"a" * 50000, 0, out) == i and table.raw_bytes == 100000 + 1024


def test_tree_applies_whiteouts_opaque_dirs_and_hard_links():
    t = MergedTree()
    t.start_layer()
    for m in [member("./", b"5", mode=0o755), member("./a/", b"5", mode=0o700), member("./a/x", size=3),
              member("./a/sub/y"), member("./o/old"), member("./keep"), member("./h", b"1", linkname="./keep")]:
        t.apply(m.name.removeprefix("./").rstrip("/"), m)
    assert t.nodes["a/sub"].kind == "dir" and t.nodes["a/sub"].mode == 0o755  # implied parent
    assert t.nodes["h"].ino == t.nodes["keep"].ino
    t.start_layer()
    for m in [member("o/new"), member("o/.wh..wh..opq"), member("a/.wh.sub"), member("a/x", b"2", linkname="t")]:
        t.apply(m.name, m)
    assert "o/old" not in t.nodes and "o/new" in t.nodes  # opaque hides lower entries only
    assert "a/sub" not in t.nodes and "a/sub/y" not in t.nodes
    assert t.nodes["a/x"].kind == "lnk" and t.nodes["a"].mode == 0o700
    assert [n.path for n in t.sorted_nodes()][:3] == ["", "a", "a/x"]
    with pytest.raises(TreeError, match="no regular file"):
        t.apply("bad", member("bad", b"1", linkname="a"))
    with pytest.raises(TreeError, match="overlayfs-private"):
        t.apply("x", member("x", xattrs={"trusted.overlay.redirect": b"/etc"}))
    with pytest.raises(TreeError, match="names no entry"):
        t.apply("a/.wh..", member("a/.wh.."))


def test_plan_ranges_merges_close_chunks_of_one_blob_only():
    cs = [Chunk("sha256:" + f"{i:064x}", b, off, n, n, False)
          for i, (b, off, n) in enumerate([(0, 0, 100), (0, 100, 100), (0, 250, 50), (0, 10_000, 10), (1, 300, 10),
                                           (0, 20_000, 100)])]
    runs = plan_ranges(cs, merge_gap=64, max_request=1 << 20)
    assert [[c.offset for c in r] for r in runs] == [[0, 100, 250], [10_000], [20_000], [300]]
    runs = plan_ranges(cs[:3], merge_gap=64, max_request=200)
    assert [[c.offset for c in r] for r in runs] == [[0, 100], [250]]


def test_paths_resolve_through_symlinks_inside_the_image_only():
    from puller.lazy.fs import chunks_of, entrypoint_paths, resolve_path
    nodes = [Node("", "dir", 0o755), Node("bin", "dir", 0o755), Node("bin/busybox", "reg", 0o755, chunks=[0, 1]),
             Node("bin/sh", "lnk", 0o777, target="busybox"), Node("usr", "dir", 0o755),
             Node("usr/bin", "lnk", 0o777, target="/bin"), Node("up", "lnk", 0o777, target="../../../bin/sh"),
             Node("loop", "lnk", 0o777, target="loop"), Node("etc", "dir", 0o755)]
    by_path = {n.path: n for n in nodes}
    assert resolve_path(by_path, "/bin/sh").path == "bin/busybox"
    assert resolve_path(by_path, "/usr/bin/sh").path == "bin/busybox"  # absolute target: from the image root
    assert resolve_path(by_path, "up").path == "bin/busybox"  # ".." stops at the image root
    assert resolve_path(by_path, "/etc/../bin/./busybox").path == "bin/busybox"
    assert resolve_path(by_path, "/loop") is None and resolve_path(by_path, "/nope/sh") is None
    meta = Meta(SUBJECT, 4096, [], [], nodes)
    assert chunks_of(meta, ["/usr/bin/sh", "/etc", "/missing"]) == [0, 1]
    # Entrypoint before Cmd; a bare name is looked up along the image's PATH, in order.
    assert entrypoint_paths({"config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["x"]}}) == ["/bin/sh"]
    assert entrypoint_paths({"config": {"Cmd": ["sh"], "Env": ["A=1", "PATH=/usr/bin:/bin"]}}) == \
        ["/usr/bin/sh", "/bin/sh"]
    assert entrypoint_paths({"config": {}}) == [] and entrypoint_paths({}) == []
    assert entrypoint_paths({"config": {"Cmd": [""]}}) == [] and entrypoint_paths({"config": {"Cmd": "sh"}}) == []
