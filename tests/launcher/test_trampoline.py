"""The sealed exec trampoline (agent/launcher/trampoline.py): its machine code, its behaviour as
a program, and what it protects in a container started with `run`."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time

import pytest

from agent.launcher import seccomp, trampoline

from .conftest import assert_sealed_against_writes, file_sha256, needs_busybox, needs_root

x86_64 = pytest.mark.skipif(not trampoline.available(), reason="the trampoline is x86-64 code")


def _exe_file(tmp_path) -> str:
    path = str(tmp_path / "tramp")
    with open(path, "wb") as f:
        f.write(trampoline.build())
    os.chmod(path, 0o755)
    return path


def test_elf_header_and_segment():
    img = trampoline.build()
    assert img[:4] == b"\x7fELF" and img[4] == 2 and img[5] == 1  # ELF64, little-endian
    assert int.from_bytes(img[16:18], "little") == 2  # ET_EXEC: no loader, no relocation
    assert int.from_bytes(img[18:20], "little") == 0x3E  # x86-64
    entry = int.from_bytes(img[24:32], "little")
    assert entry == 0x400000 + 64 + 56  # code right after the headers
    p_type, p_flags = int.from_bytes(img[64:68], "little"), int.from_bytes(img[68:72], "little")
    assert (p_type, p_flags) == (1, 5)  # one PT_LOAD, read + execute, never writable
    assert int.from_bytes(img[96:104], "little") == len(img)  # p_filesz: the whole file
    assert len(img) < 400


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")
def test_machine_code_is_what_the_comments_say(tmp_path):
    """Disassemble the code and compare with the instruction text next to each byte string."""
    path = str(tmp_path / "code.bin")
    with open(path, "wb") as f:
        f.write(trampoline.build()[120:])
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "-M", "intel",
                          path], capture_output=True, text=True, check=True).stdout
    got = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip().endswith(":"):
            got.append(" ".join(parts[2].split("#")[0].split()))
    want = [" ".join(t.replace(", ", ",").split()) for _, t in trampoline._CODE_HEAD]
    n = len(want)
    assert [g.replace(", ", ",") for g in got[:n]] == want
    assert got[n].startswith("lea rsi,[rip+")  # the message address
    tail = [" ".join(t.replace(", ", ",").split()) for _, t in trampoline._CODE_TAIL]
    assert [g.replace(", ", ",") for g in got[n + 1:n + 1 + len(tail)]] == tail


@x86_64
def test_execs_its_arguments_with_the_environment(tmp_path):
    t = _exe_file(tmp_path)
    p = subprocess.run([t, "/bin/sh", "sh", "-c", 'echo "$0 $1 $X"', "zero", "one"],
                       capture_output=True, text=True, env={"X": "env-kept"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == "zero one env-kept\n"
    if os.path.exists("/bin/busybox"):  # busybox picks its applet by argv[0]: kept as given
        p = subprocess.run([t, "/bin/busybox", "echo", "by-argv0"], capture_output=True,
                           text=True)
        assert p.stdout == "by-argv0\n"


@x86_64
def test_failure_reports_errno_and_exits_127(tmp_path):
    t = _exe_file(tmp_path)
    p = subprocess.run([t, str(tmp_path / "missing"), "x"], capture_output=True, text=True)
    assert p.returncode == 127
    assert p.stderr == ("oci-launcher: executing the container process failed: "
                        "errno 002\n")  # ENOENT
    d = tmp_path / "d"
    d.mkdir()
    p = subprocess.run([t, str(d), "x"], capture_output=True, text=True)
    assert (p.returncode, p.stderr[-4:]) == (127, "013\n")  # EACCES: a directory


@x86_64
def test_sealed_fd_cannot_be_changed():
    fd = trampoline.sealed_fd()
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    w = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            os.write(w, b"#!/bin/sh\n")
    finally:
        os.close(w)
    assert os.pread(fd, 4, 0) == b"\x7fELF"


def test_seccomp_plan_decides_whether_execveat_passes():
    allow_all = seccomp.plan({"defaultAction": "SCMP_ACT_ALLOW"})
    assert trampoline.usable_with(allow_all) and trampoline.usable_with(None)
    deny = seccomp.plan({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["execveat"], "action": "SCMP_ACT_ERRNO"}]})
    assert not trampoline.usable_with(deny)
    listed = seccomp.plan({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read", "execveat"], "action": "SCMP_ACT_ALLOW"}]})
    assert trampoline.usable_with(listed)
    conditional = seccomp.plan({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["execveat"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 4, "value": 0, "op": "SCMP_CMP_EQ"}]}]})
    assert not trampoline.usable_with(conditional)
    unlisted = seccomp.plan({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["execve"], "action": "SCMP_ACT_ALLOW"}]})
    assert not trampoline.usable_with(unlisted)


# --- in a container ----------------------------------------------------------------------------


@needs_root
@needs_busybox
@x86_64
def test_run_entry_point_proc_self_exe_reaches_only_the_sealed_trampoline(runtime, make_bundle):
    """CVE-2019-5736 through `run`: the container's entry point is `#!/proc/self/exe`. The
    kernel resolves that while the trampoline is the current executable, so the container
    runs (and can grab) the sealed trampoline, never the host's interpreter."""
    interp = os.path.realpath("/proc/self/exe")
    before = file_sha256(interp)
    b = make_bundle(["/evil"])
    with open(os.path.join(b.rootfs, "evil"), "w") as f:
        f.write("#!/proc/self/exe\n")
    os.chmod(os.path.join(b.rootfs, "evil"), 0o755)
    pid_file = os.path.join(b.path, "pid")
    cid = runtime.new_id()
    b.write()
    runtime.cmd("run", "--detach", "--pid-file", pid_file, "--bundle", b.path, cid)
    with open(pid_file) as f:
        pid = int(f.read())
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        assert exe.startswith("/memfd:oci-launcher-exec"), exe
        fd = os.open(f"/proc/{pid}/exe", os.O_PATH)
        try:
            assert_sealed_against_writes(fd)
        finally:
            os.close(fd)
    finally:
        runtime.cmd("delete", "--force", cid)
    assert file_sha256(interp) == before


@needs_root
@needs_busybox
@x86_64
def test_run_two_execs_leave_the_attributes_of_one(runtime, make_bundle):
    """Going through the trampoline adds an exec: the program must still get exactly the
    spec's capability sets (root and non-root with ambient ones), no_new_privs, and be
    itself at /proc/self/exe."""
    from agent.launcher import capabilities
    from .conftest import DEFAULT_CAPS
    script = ("readlink /proc/self/exe; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|"
              "NoNewPrivs)' /proc/self/status")
    p = runtime.run(make_bundle(["sh", "-c", script]))
    lines = p.stdout.splitlines()
    assert lines[0] == "/bin/busybox"
    st = dict(line.split(":\t") for line in lines[1:])
    want = capabilities.mask(DEFAULT_CAPS)
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == want
    assert int(st["CapAmb"], 16) == 0 and st["NoNewPrivs"] == "1"
    b = make_bundle(["sh", "-c", script])
    caps = ["CAP_NET_BIND_SERVICE", "CAP_KILL"]
    b.config["process"]["user"] = {"uid": 1000, "gid": 1000}
    b.config["process"]["capabilities"] = {k: caps for k in (
        "bounding", "effective", "permitted", "inheritable", "ambient")}
    st = dict(line.split(":\t") for line in runtime.run(b).stdout.splitlines()[1:])
    want = capabilities.mask(caps)
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[k], 16) == want, (k, st)


@needs_root
@needs_busybox
def test_run_falls_back_when_seccomp_denies_execveat(runtime, make_bundle):
    """A profile that refuses execveat would stop the trampoline; `run` must then use the
    sealed interpreter copy instead, and the container still starts (and is filtered)."""
    b = make_bundle(["sh", "-c", "echo started"])
    b.config["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["execveat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    t = time.monotonic()
    p = runtime.run(b)
    assert p.stdout == "started\n", p.stderr
    assert time.monotonic() - t < 20


@needs_root
@needs_busybox
@x86_64
def test_run_without_proc_in_the_container(runtime, make_bundle):
    """The trampoline is executed by fd (execveat with AT_EMPTY_PATH): no /proc needed."""
    b = make_bundle(["sh", "-c", "test -e /proc/self || echo no-proc"])
    b.config["mounts"] = [m for m in b.config["mounts"] if m["destination"] != "/proc"]
    b.config["linux"]["maskedPaths"] = []
    b.config["linux"]["readonlyPaths"] = []
    p = runtime.run(b)
    assert p.stdout == "no-proc\n", p.stderr
