"""OCI seccomp -> libseccomp: checked plans, and real filters loaded into forked children."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import sys
import time

import pytest

from agent.launcher import seccomp as sc
from agent.launcher.seccomp import SeccompError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loading without no_new_privs needs "
                                "CAP_SYS_ADMIN")


# -- plans (no kernel involved) ---------------------------------------------------------------


def test_plan_actions_and_errno_defaults():
    p = sc.plan({
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42},
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["kill"], "action": "SCMP_ACT_TRACE"},
            {"names": ["mount"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["umount2"], "action": "SCMP_ACT_NOTIFY"},
        ]})
    assert p.default_action == 0x00050000 | errno.EPERM
    assert p.rules == [
        sc.Rule("uname", 0x00050000 | 42),
        sc.Rule("getpid", 0x7FFF0000),
        sc.Rule("kill", 0x7FF00000 | errno.EPERM),
        sc.Rule("mount", 0x80000000),
        sc.Rule("umount2", 0x7FC00000),
    ]
    assert p.uses_notify


def test_plan_drops_rules_equal_to_default_and_splits_same_index():
    p = sc.plan({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
            {"names": ["openat"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 2, "value": 64, "valueTwo": 64, "op": "SCMP_CMP_MASKED_EQ"},
                      {"index": 1, "value": 0, "op": "SCMP_CMP_NE"}]},
        ]})
    assert [(r.name, r.conditions) for r in p.rules] == [
        ("getpriority", ((0, 4, 1, 0),)),
        ("getpriority", ((0, 4, 2, 0),)),
        ("openat", ((2, 7, 64, 64), (1, 1, 0, 0))),
    ]
    assert not p.uses_notify


@pytest.mark.parametrize("obj, match", [
    ({"defaultAction": "SCMP_ACT_BOGUS"}, "unknown seccomp action 'SCMP_ACT_BOGUS'"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "cannot be the default"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]},
     "unknown architecture 'SCMP_ARCH_Z80'"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]},
     "unknown flag 'SECCOMP_FILTER_FLAG_NOPE'"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ALMOST"}]}]},
     r"syscalls\[0\]\.args\[0\]: unknown operator 'SCMP_CMP_ALMOST'"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "index 6 is not 0..5"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                    "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
     "-1 is not an unsigned 64-bit integer"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]}, "non-empty list"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "errnoRet": 1}]},
     "returns no errno"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}, "errnoRet 70000"),
    ("nope", "must be an object"),
])
def test_plan_errors_name_the_culprit(obj, match):
    with pytest.raises(SeccompError, match=match):
        sc.plan(obj)


def test_allow_list_shape():
    obj = sc.allow_list(["write", "read", "write"], default_errno=errno.ENOSYS)
    assert obj["defaultAction"] == "SCMP_ACT_ERRNO"
    assert obj["defaultErrnoRet"] == errno.ENOSYS
    assert obj["syscalls"] == [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]
    if os.uname().machine == "x86_64":
        assert "SCMP_ARCH_X86" in obj["architectures"]
    p = sc.plan(obj)
    assert [r.name for r in p.rules] == ["read", "write"]
    with pytest.raises(SeccompError):
        sc.allow_list([])


def test_module_import_loads_libseccomp_without_ctypes_util():
    """libseccomp must be loaded at import (install runs after pivot_root), but cheaply: the
    ctypes.util lookup machinery (subprocess, tempfile, shutil) stays out."""
    import subprocess
    code = ("import sys; import agent.launcher.seccomp as s; "
            "print('pyseccomp' in sys.modules, 'ctypes.util' in sys.modules, "
            "'subprocess' in sys.modules); import ctypes.util; "
            "print(ctypes.util.find_library('m') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.stdout.split() == ["True", "False", "False", "True"]


@needs_root
def test_prepare_then_load_after_chroot(tmp_path):
    """The launcher builds before pivot_root and loads after it, where no library is found."""
    def body():
        prepared = sc.prepare({"defaultAction": "SCMP_ACT_ALLOW",
                               "syscalls": [{"names": ["uname"], "action": "SCMP_ACT_ERRNO",
                                             "errnoRet": errno.EXDEV}]})
        os.chroot(str(tmp_path))
        os.chdir("/")
        assert prepared.load() is None
        try:
            os.uname()
            return "allowed"
        except OSError as e:
            return e.errno

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    assert res == {"ok": errno.EXDEV}


# -- real filters in forked children ----------------------------------------------------------


def in_child(fn, *, timeout: float = 20.0) -> tuple[int | None, int | None, object]:
    """Run ``fn`` in a forked child; returns (exit code, killing signal, fn's JSON result)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = fn()
            data = json.dumps({"ok": res}).encode()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            data = json.dumps({"exc": type(e).__name__, "errno": getattr(e, "errno", None),
                               "msg": str(e)}).encode()
        try:
            os.write(w, data)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail("child did not finish in time")
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks)) if chunks else None
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), result
    return os.WEXITSTATUS(status), None, result


@needs_root
def test_errno_rule_denies_and_others_work():
    def body():
        sc.install({"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["uname", "no_such_syscall_xyz"],
                                  "action": "SCMP_ACT_ERRNO", "errnoRet": 42}]})
        out = {"pid": os.getpid() > 0}
        try:
            os.uname()
            out["uname"] = "allowed"
        except OSError as e:
            out["uname"] = e.errno
        return out

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    assert res == {"ok": {"pid": True, "uname": 42}}


@needs_root
@pytest.mark.parametrize("action", ["SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                                    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP"])
def test_kill_and_trap_end_the_process_with_sigsys(action):
    def body():
        sc.install({"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["uname"], "action": action}]})
        os.uname()
        return "survived"

    code, sig, res = in_child(body)
    assert sig == signal.SIGSYS and res is None


@needs_root
def test_allow_list_sets_no_new_privs_and_denies():
    def body():
        names = ["read", "write", "exit", "exit_group", "brk", "mmap", "munmap", "mremap",
                 "madvise", "futex", "rt_sigprocmask", "rt_sigaction", "rt_sigreturn",
                 "getpid", "close", "prctl"]
        sc.install(sc.allow_list(names, default_errno=errno.ENOSYS), set_no_new_privs=True)
        out = {}
        try:
            os.uname()
            out["uname"] = "allowed"
        except OSError as e:
            out["uname"] = e.errno
        libc = ctypes.CDLL(None, use_errno=True)
        out["nnp"] = libc.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
        return out

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    assert res == {"ok": {"uname": errno.ENOSYS, "nnp": 1}}


@needs_root
def test_argument_conditions():
    def body():
        sc.install({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            # two comparisons of the same argument: either one denies
            {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
             "args": [{"index": 0, "value": os.PRIO_PGRP, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": os.PRIO_USER, "op": "SCMP_CMP_EQ"}]},
            # different arguments: both must hold
            {"names": ["setpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
             "args": [{"index": 0, "value": os.PRIO_PROCESS, "op": "SCMP_CMP_EQ"},
                      {"index": 2, "value": 5, "op": "SCMP_CMP_GT"}]},
            {"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
             "args": [{"index": 2, "value": os.O_CREAT, "valueTwo": os.O_CREAT,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
        ]})
        out = {}

        def attempt(key, fn):
            try:
                fn()
                out[key] = "ok"
            except OSError as e:
                out[key] = errno.errorcode[e.errno]

        attempt("prio_process", lambda: os.getpriority(os.PRIO_PROCESS, 0))
        attempt("prio_pgrp", lambda: os.getpriority(os.PRIO_PGRP, 0))
        attempt("prio_user", lambda: os.getpriority(os.PRIO_USER, 0))
        attempt("set_5", lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))
        attempt("set_7", lambda: os.setpriority(os.PRIO_PROCESS, 0, 7))
        attempt("open_ro", lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)))
        attempt("open_creat", lambda: os.open("/tmp/seccomp-test-never", os.O_CREAT | os.O_WRONLY))
        return out

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    assert res == {"ok": {"prio_process": "ok", "prio_pgrp": "EPERM", "prio_user": "EPERM",
                          "set_5": "ok", "set_7": "EACCES", "open_ro": "ok",
                          "open_creat": "EROFS"}}
    assert not os.path.exists("/tmp/seccomp-test-never")


@needs_root
def test_architectures_and_flags_accepted():
    def body():
        sc.install({"defaultAction": "SCMP_ACT_ALLOW",
                    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32",
                                      "SCMP_ARCH_AARCH64"],
                    "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                              "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
                    "syscalls": [{"names": ["uname", "socketcall"], "action": "SCMP_ACT_ERRNO",
                                  "errnoRet": errno.EXDEV}]})
        try:
            os.uname()
            return "allowed"
        except OSError as e:
            return e.errno

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    assert res == {"ok": errno.EXDEV}


@needs_root
def test_wait_killable_recv_loaded_or_refused_by_name():
    def body():
        sc.install({"defaultAction": "SCMP_ACT_ALLOW",
                    "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]})
        return "loaded"

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None)
    # libseccomp < 2.6 has no attribute for it; the error must then name the flag
    assert res == {"ok": "loaded"} or (
        res["exc"] == "SeccompError" and "WAIT_KILLABLE_RECV" in res["msg"]), res


@needs_root
def test_notify_gives_a_listener_fd():
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def body():
        parent_sock.close()
        fd = sc.install({"defaultAction": "SCMP_ACT_ALLOW",
                         "syscalls": [{"names": ["uname"], "action": "SCMP_ACT_NOTIFY"}]})
        assert isinstance(fd, int)
        socket.send_fds(child_sock, [b"fd"], [fd])
        os.close(fd)
        try:
            os.uname()
            return "allowed"
        except OSError as e:
            return e.errno

    pid_result: list = []
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filtered child
        os.close(r)
        try:
            res = body()
        except BaseException as e:  # noqa: BLE001
            res = repr(e)
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    child_sock.close()
    try:
        parent_sock.settimeout(10)
        _, fds, _, _ = socket.recv_fds(parent_sock, 16, 1)
        assert len(fds) == 1
        listener = fds[0]
        ready, _, _ = select.select([listener], [], [], 10)
        assert ready, "no notification arrived for the child's uname"
        ps = sc._ps
        lib = ps._libseccomp
        req = ctypes.POINTER(ps._Notif)()
        resp = ctypes.POINTER(ps._NotifResp)()
        assert lib.seccomp_notify_alloc(ctypes.byref(req), ctypes.byref(resp)) == 0
        try:
            assert lib.seccomp_notify_receive(listener, req) == 0
            assert req.contents.pid == pid
            nr = lib.seccomp_syscall_resolve_name(b"uname")
            assert req.contents.data.nr == nr
            resp.contents.id = req.contents.id
            resp.contents.val = 0
            resp.contents.error = -errno.ENOTSUP
            resp.contents.flags = 0
            assert lib.seccomp_notify_respond(listener, resp) == 0
        finally:
            lib.seccomp_notify_free(req, resp)
            os.close(listener)
        pid_result.append(json.loads(os.read(r, 4096)))
    finally:
        parent_sock.close()
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert pid_result == [errno.ENOTSUP]


@needs_root
def test_install_refused_without_privilege_or_nnp():
    def body():
        # Drop CAP_SYS_ADMIN from the effective set so the kernel insists on no_new_privs.
        libc = ctypes.CDLL(None, use_errno=True)

        class Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        hdr = Hdr(0x20080522, 0)
        data = (Data * 2)()
        assert libc.capget(ctypes.byref(hdr), data) == 0
        data[0].effective &= ~(1 << 21)  # CAP_SYS_ADMIN
        assert libc.capset(ctypes.byref(hdr), data) == 0
        try:
            sc.install({"defaultAction": "SCMP_ACT_ALLOW"})
            return "loaded"
        except SeccompError as e:
            return str(e)

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    assert "no CAP_SYS_ADMIN and no_new_privs unset" in res["ok"], res


def test_listener_fields_kept_in_plan():
    p = sc.plan({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock",
                 "listenerMetadata": "meta"})
    assert (p.listener_path, p.listener_metadata) == ("/run/agent.sock", "meta")



@needs_root
def test_log_allows_and_trace_without_tracer_fails_with_enosys():
    def body():
        sc.install({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["uname"], "action": "SCMP_ACT_LOG"},
            {"names": ["getcwd"], "action": "SCMP_ACT_TRACE", "errnoRet": 77},
        ]})
        out = {"uname": bool(os.uname().sysname)}
        try:
            os.getcwd()
            out["getcwd"] = "allowed"
        except OSError as e:
            out["getcwd"] = errno.errorcode[e.errno]
        return out

    code, sig, res = in_child(body)
    assert (code, sig) == (0, None), res
    # With no ptrace tracer attached the kernel fails a TRACE'd call with ENOSYS.
    assert res == {"ok": {"uname": True, "getcwd": "ENOSYS"}}
