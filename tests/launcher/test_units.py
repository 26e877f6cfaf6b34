"""Logic that needs no privileges: spec parsing, JSON, option and signal parsing, confined
path resolution (openat2 works unprivileged), the system-call layer's error texts."""
from __future__ import annotations

import errno
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import jsonlite
from agent.launcher import capabilities, cli, rootfs, spec, syscalls

from .conftest import base_config


# --- jsonlite -------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_jsonlite_matches_json(value):
    text = jsonlite.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert jsonlite.loads(text) == json.loads(text)
    assert jsonlite.loads(json.dumps(value, indent=2)) == value


@pytest.mark.parametrize("bad", ["", "{", "[1,]", '{"a":1} x', "nul", '"\\x"'])
def test_jsonlite_rejects_what_json_rejects(bad):
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        jsonlite.loads(bad)


def test_jsonlite_refuses_unencodable():
    with pytest.raises(TypeError, match="set"):
        jsonlite.dumps({"a": {1, 2}})
    with pytest.raises(ValueError):
        jsonlite.dumps(float("nan"))


# --- spec -----------------------------------------------------------------------------------

def test_parse_full_config():
    cfg = base_config(["sh"])
    cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 10}]
    cfg["linux"]["devices"] = [{"type": "c", "path": "/dev/fuse", "major": 10, "minor": 229,
                                "fileMode": 0o600}]
    cfg["hooks"] = {"prestart": [{"path": "/bin/true", "timeout": 3}]}
    s = spec.parse_spec(cfg)
    assert s.process.args == ["sh"]
    assert s.process.rlimits[0].type == "RLIMIT_NOFILE"
    assert s.linux.namespace("network").path is None
    assert s.linux.uid_mappings[0].host_id == 1000
    assert s.linux.devices[0].file_mode == 0o600
    assert s.hooks["prestart"][0].timeout == 3
    assert s.hooks["poststop"] == []


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["process"].update(cwd="relative"), "process.cwd"),
    (lambda c: c["process"].update(args=[]), "process.args"),
    (lambda c: c["process"].update(args="sh"), "process.args"),
    (lambda c: c["process"]["user"].update(uid=-1), "process.user.uid"),
    (lambda c: c["process"]["user"].update(uid="0"), "process.user.uid"),
    (lambda c: c["process"].update(env=["NOEQUALS"]), "process.env[0]"),
    (lambda c: c["process"].update(oomScoreAdj=5000), "process.oomScoreAdj"),
    (lambda c: c["process"]["rlimits"][0].pop("hard"), "process.rlimits[0].hard"),
    (lambda c: c["mounts"][1].update(destination="dev"), "mounts[1].destination"),
    (lambda c: c["linux"]["namespaces"].append({"type": "bogus"}), "linux.namespaces[5].type"),
    (lambda c: c["linux"]["namespaces"].append({"type": "pid"}), "linux.namespaces[5].type"),
    (lambda c: c["linux"].update(rootfsPropagation="sideways"), "linux.rootfsPropagation"),
    (lambda c: c["linux"].update(sysctl={"a.b": 1}), "linux.sysctl.a.b"),
    (lambda c: c.update(hooks={"poststop": [{"path": "rel"}]}), "hooks.poststop[0].path"),
    (lambda c: c.update(hooks={"prestart": [{"path": "/x", "timeout": 0}]}),
     "hooks.prestart[0].timeout"),
    (lambda c: c.pop("root"), "config.root"),
    (lambda c: c.pop("ociVersion"), "config.ociVersion"),
    (lambda c: c.update(ociVersion="invalid"), "ociVersion"),
    (lambda c: c.update(ociVersion="2.0.0"), "ociVersion"),
    (lambda c: c["linux"].update(devices=[{"type": "x", "path": "/dev/x"}]),
     "linux.devices[0].type"),
])
def test_spec_errors_name_the_field(mutate, field):
    cfg = base_config(["sh"])
    mutate(cfg)
    with pytest.raises(spec.SpecError) as e:
        spec.parse_spec(cfg)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_unknown_fields_are_accepted():
    cfg = base_config(["sh"])
    cfg["futureField"] = {"x": 1}
    cfg["process"]["somethingNew"] = True
    cfg["annotations"] = {"org.example.unknown": "yes"}
    assert spec.parse_spec(cfg).annotations == {"org.example.unknown": "yes"}


def test_load_spec_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(spec.SpecError, match=str(p)):
        spec.load_spec(str(p))
    with pytest.raises(spec.SpecError, match="no such file"):
        spec.load_spec(str(tmp_path / "missing.json"))


# --- mount options, capabilities, signals ----------------------------------------------------

def test_mount_options():
    o = rootfs.parse_options(["nosuid", "ro", "rbind", "rslave", "mode=755", "size=1m"])
    assert o.flags == syscalls.MS_NOSUID | syscalls.MS_RDONLY | syscalls.MS_BIND | \
        syscalls.MS_REC
    assert o.bind and o.data == "mode=755,size=1m"
    assert o.propagation == [syscalls.MS_SLAVE | syscalls.MS_REC]
    o = rootfs.parse_options(["ro", "rw", "tmpcopyup"], "tmpfs")
    assert o.flags & syscalls.MS_RDONLY == 0 and o.data == "" and not o.bind
    assert rootfs.parse_options([], "bind").bind


def test_capability_masks():
    assert capabilities.mask(["CAP_CHOWN", "CAP_KILL"]) == (1 << 0) | (1 << 5)
    assert capabilities.mask(["net_raw"]) == 1 << 13
    with pytest.raises(ValueError, match="CAP_TEST"):
        capabilities.mask(["CAP_TEST"], "process.capabilities.bounding")


@pytest.mark.parametrize("text, num", [("9", 9), ("KILL", 9), ("SIGTERM", 15), ("sigusr1", 10),
                                       ("RTMIN+2", 36), ("SIGRTMAX-1", 63)])
def test_signal_names(text, num):
    assert cli.parse_signal(text) == num


@pytest.mark.parametrize("text", ["SIGNOPE", "0", "99", ""])
def test_bad_signals(text):
    with pytest.raises(cli.UsageError):
        cli.parse_signal(text)


def test_cli_parser_forms():
    a = cli.parse(["--bundle=/b", "--pid-file", "/p", "--no-pivot", "id1"],
                  cli._CREATE_VALUES, cli._CREATE_FLAGS)
    assert a.opts == {"bundle": "/b", "pid_file": "/p", "no_pivot": True}
    assert a.pos == ["id1"]
    with pytest.raises(cli.UsageError, match="--bogus"):
        cli.parse(["--bogus", "x"], cli._CREATE_VALUES, cli._CREATE_FLAGS)
    a = cli.parse(["-e", "A=1", "--env=B=2", "cid", "sh", "-c", "x"], {"-e": "env",
                  "--env": "env"}, {}, multi={"env"}, stop_at_positional=1)
    assert a.opts["env"] == ["A=1", "B=2"] and a.pos == ["cid", "sh", "-c", "x"]


# --- confined path resolution ----------------------------------------------------------------

def test_ensure_path_stays_inside_root(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "abs").symlink_to(str(outside))          # absolute: must be re-rooted
    (root / "rel").symlink_to("../../outside")       # climbing: must be clamped at root
    (root / "dangling").symlink_to("/made/by/link")  # dangling: created inside, re-rooted
    sc = syscalls.default()
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for dest in ("/abs/x", "/rel/y", "/dangling"):
            fd = rootfs.ensure_path(sc, rfd, dest, True)
            real = os.readlink(f"/proc/self/fd/{fd}")
            os.close(fd)
            assert real.startswith(str(root) + "/"), (dest, real)
        fd = rootfs.ensure_path(sc, rfd, "/a/b/file", False)
        assert os.path.isfile(os.readlink(f"/proc/self/fd/{fd}"))
        os.close(fd)
    finally:
        os.close(rfd)
    assert os.listdir(outside) == []
    # "/abs" -> <outside> is read as <root>/<outside>; "../../outside" stops at the root.
    assert (root / str(outside).lstrip("/") / "x").is_dir()
    assert (root / "outside" / "y").is_dir()
    assert (root / "made" / "by" / "link").is_dir()


def test_symlink_loop_is_an_error(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    rfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            rootfs.ensure_path(syscalls.default(), rfd, "/a/x", True)
        assert e.value.errno == errno.ELOOP
    finally:
        os.close(rfd)


def test_syscall_errors_name_the_call():
    with pytest.raises(OSError) as e:
        syscalls.default().mount("/nonexistent-src", "/nonexistent-dst", None,
                                 syscalls.MS_BIND, None)
    assert "mount('/nonexistent-src', '/nonexistent-dst'" in str(e.value)
    assert e.value.errno in (errno.ENOENT, errno.EPERM)


class RecordingSyscalls(syscalls.Linux):
    """Records mount calls instead of making them: the logic of the masking code, no root."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def mount(self, source, target, fstype, flags, data=None):
        self.calls.append((source, target, fstype, flags))


def test_masking_logic_with_a_recording_layer(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    f = tmp_path / "file"
    f.write_text("x")
    sc = RecordingSyscalls()
    rootfs.mask_paths(sc, [str(d), str(f), str(tmp_path / "missing")])
    assert sc.calls[0] == ("tmpfs", str(d), "tmpfs", syscalls.MS_RDONLY)
    assert sc.calls[1] == ("/dev/null", str(f), None, syscalls.MS_BIND)
    assert sc.calls[2][3] & (syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_BIND) == \
        syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_BIND
    assert len(sc.calls) == 3  # the missing path is skipped
