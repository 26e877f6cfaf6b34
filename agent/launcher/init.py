"""The container side of the launcher: C (enters the namespaces, forks G) and G (becomes
the container's PID 1: root file system, process attributes, exec fifo, seccomp, execve).

Everything here runs in forked or freshly executed processes and reports back over the sync
socket; see container.py for the launcher side and the overall process model.
"""
from __future__ import annotations

import os

from . import capabilities, process, rootfs, state, sync
from . import syscalls as S
from .spec import Hook, Process, Spec

NS_FLAGS = {"user": S.CLONE_NEWUSER, "mount": S.CLONE_NEWNS, "pid": S.CLONE_NEWPID,
            "network": S.CLONE_NEWNET, "ipc": S.CLONE_NEWIPC, "uts": S.CLONE_NEWUTS,
            "cgroup": S.CLONE_NEWCGROUP, "time": S.CLONE_NEWTIME}
NS_PROC = {"user": "user", "mount": "mnt", "pid": "pid", "network": "net", "ipc": "ipc",
           "uts": "uts", "cgroup": "cgroup", "time": "time"}
# Joining order: user first (the rest are owned by it), mount last (it changes what paths
# mean, so the other namespace files must already be open - they are, as fds).
_JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "time", "mount")


def _die_with(sock, exc: BaseException, prefix: str) -> None:
    msg = f"{prefix}: {exc}" if prefix else str(exc)
    try:
        sync.send(sock, {"error": msg})
    except OSError:
        os.write(2, (msg + "\n").encode())
    os._exit(1)


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive execve, so a container
    # process would inherit them. SIGINT gets Python's handler, reset to default by exec anyway.
    import _signal
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


# --- the namespace stage (process C) ---------------------------------------------------------

def _enter_namespaces(sc: S.Linux, sock, plan: list[tuple[str, str | None]],
                      want_maps: bool, defer_cgroupns: bool = False) -> None:
    """Join (path) or create (None) each namespace in ``plan``; user namespace first.
    ``defer_cgroupns``: leave a new cgroup namespace to G (_join_cgroups), which creates it
    once it is in its cgroups."""
    joins = {t: os.open(p, os.O_RDONLY | os.O_CLOEXEC) for t, p in plan if p}
    new = {t for t, p in plan if not p}
    if defer_cgroupns:
        new.discard("cgroup")
    if "user" in joins:
        sc.setns(joins.pop("user"), S.CLONE_NEWUSER)
    elif "user" in new:
        sc.unshare(S.CLONE_NEWUSER)
    if want_maps:
        sync.send(sock, {"userns": 1})
        sync.recv(sock, "waiting for id maps")
    if "user" in new or "user" in dict(plan) and dict(plan)["user"]:
        # Become the namespace's root (if mapped) so the setup below is privileged there.
        try:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        except OSError:
            pass
    for t in _JOIN_ORDER:
        if t in joins:
            sc.setns(joins.pop(t), NS_FLAGS[t])
    flags = 0
    for t in new - {"user"}:
        flags |= NS_FLAGS[t]
    if flags:
        sc.unshare(flags)


# --- the container-side stage (process G) ----------------------------------------------------

class _Init:
    """Everything G needs; built by the launcher before forking."""

    def __init__(self, spec: Spec | None, proc: Process, rootfs_path: str | None,
                 no_pivot: bool, fifo_fd: int | None, console: bool,
                 seccomp: dict | None, userns: bool, cgroup_paths: dict[str, str],
                 cgroupns: bool, start_hooks: list[Hook], create_hooks: list[Hook]) -> None:
        self.spec, self.proc, self.rootfs_path, self.no_pivot = spec, proc, rootfs_path, no_pivot
        self.fifo_fd, self.console, self.seccomp, self.userns = fifo_fd, console, seccomp, userns
        self.cgroup_paths, self.cgroupns = cgroup_paths, cgroupns
        self.start_hooks, self.create_hooks = start_hooks, create_hooks


def _join_cgroups(sc: S.Linux, it: _Init) -> None:
    """Self-attach (container.py, _spawn_once): G was created in its cgroup2 directory; here
    it moves itself into each v1 hierarchy ("0" = this thread, G has no other) and then, in
    its cgroups, creates the cgroup namespace. First thing G does, unless the v1 directories
    are still being made (then _cgroup_ready calls it)."""
    if getattr(it, "self_attach", None) is None or getattr(it, "cgroup_pending", False):
        return
    for path in it.self_attach:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        except OSError as e:
            raise OSError(e.errno, f"joining cgroup {os.path.dirname(path)}: {e.strerror}")
        finally:
            os.close(fd)
    if it.cgroupns:
        sc.unshare(S.CLONE_NEWCGROUP)


def _cgroup_ready(sc: S.Linux, it: _Init, sock) -> None:
    """When G was started before its v1 cgroups existed (container.py, _spawn_once: the
    launcher makes them while G mounts), wait for the launcher's word, then join them. Called
    before anything that needs the cgroup or counts against it: a cgroup mount, device nodes,
    hooks, pivot_root (so before any of the container's own code)."""
    if not getattr(it, "cgroup_pending", False):
        return
    sync.recv(sock, "waiting for the cgroup")
    it.cgroup_pending = False
    _join_cgroups(sc, it)


def _build_rootfs(sc: S.Linux, it: _Init, sock) -> None:
    spec = it.spec
    assert spec is not None and it.rootfs_path is not None
    own_mountns = spec.linux.namespace("mount") is not None
    if own_mountns:
        rootfs.prepare_root(sc, it.rootfs_path, spec.linux.rootfs_propagation)
    # else: the spec shares the caller's mount namespace. Like runc we then mount into it
    # (the mounts are visible to the caller) and enter the root with chroot, since
    # pivot_root would move the root of every process in that namespace.
    rootfd = os.open(it.rootfs_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ctx = rootfs.MountContext(it.rootfs_path, rootfd, it.userns, it.cgroup_paths,
                                  it.cgroupns)
        for m in spec.mounts:
            if m.type in ("cgroup", "cgroup2"):
                _cgroup_ready(sc, it, sock)
            rootfs.mount_one(sc, m, ctx)
        _cgroup_ready(sc, it, sock)
        rootfs.setup_dev(sc, spec, ctx)
    finally:
        os.close(rootfd)
    state_json = ""
    if any(spec.hooks[k] for k in ("prestart", "createRuntime")) or it.create_hooks:
        sync.send(sock, {"hooks": 1})
        msg, _ = sync.recv(sock, "runtime hooks")
        state_json = msg["state"]
        # createContainer hooks: in the container's namespaces, before pivot_root.
        from . import hooks  # imported by the launcher before the fork (preimport_for)
        hooks.run_hooks("createContainer", it.create_hooks, state_json)
    if own_mountns:
        rootfs.pivot(sc, it.rootfs_path, it.no_pivot)
        rootfs.after_pivot_propagation(sc, spec.linux.rootfs_propagation)
    else:
        os.chdir(it.rootfs_path)
        sc.chroot(".")
        os.chdir("/")
    if spec.hostname is not None:
        sc.sethostname(spec.hostname)
    if spec.domainname is not None:
        sc.setdomainname(spec.domainname)
    rootfs.write_sysctls(spec.linux.sysctl)


def _finish_rootfs(sc: S.Linux, spec: Spec) -> None:
    rootfs.mask_paths(sc, spec.linux.masked_paths)
    rootfs.readonly_paths(sc, spec.linux.readonly_paths)
    if spec.root_readonly:
        rootfs.readonly_root(sc)


def _g_main(sc: S.Linux, it: _Init, sock) -> None:
    """Runs in G. Never returns: execs the container program or exits."""
    stage = "setting up the container"
    try:
        stage = "joining the cgroup"
        _join_cgroups(sc, it)
        stage = "setting up the container"
        if _needs_state(it):
            msg, _ = sync.recv(sock, "waiting for the state")
            it.state_json = msg["state"]  # type: ignore[attr-defined]
        os.umask(0)
        sc.prctl(S.PR_SET_DUMPABLE, 0)
        proc = it.proc
        listener = None
        if it.seccomp and it.seccomp.get("listenerPath"):
            # The seccomp agent's socket is a host path: connect while we can still see it.
            stage = "connecting to the seccomp listener"
            import _socket
            listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            listener.connect(it.seccomp["listenerPath"])
            it.keep_fds = {listener.fileno()}
        if it.spec is not None:
            stage = "building the root file system"
            _build_rootfs(sc, it, sock)
        _cgroup_ready(sc, it, sock)
        if proc.terminal:
            stage = "creating the terminal"
            from . import console  # imported by the launcher before the fork
            master, slave = console.open_pty(proc.console_size)
            if it.spec is not None and os.path.exists("/dev/console"):
                try:
                    sc.mount(f"/proc/self/fd/{slave}", "/dev/console", None, S.MS_BIND, None)
                except OSError:
                    pass
            sync.send(sock, {"pty": 1}, [master])
            os.close(master)
            console.make_controlling(slave)
            if slave > 2:
                os.close(slave)
        if it.spec is not None:
            stage = "masking paths"
            _finish_rootfs(sc, it.spec)
        stage = "process attributes"
        process.set_rlimits(proc.rlimits)
        try:
            process.set_oom_score_adj(proc.oom_score_adj)
        except OSError as e:
            raise OSError(e.errno, f"process.oomScoreAdj {proc.oom_score_adj}: {e.strerror}")
        caps = capabilities.CapSets(proc.capabilities)
        capabilities.check_obtainable(caps, sc)
        capabilities.drop_bounding(caps, sc)
        stage = "switching user"
        process.switch_user(sc, proc)
        keep = {it.fifo_fd} if it.fifo_fd is not None else set()
        keep |= getattr(it, "keep_fds", set())
        if getattr(it, "trampoline_fd", None) is not None:
            keep.add(it.trampoline_fd)
        if sock is not None:
            keep.add(sock.fileno())
        process.close_fds_except(sc, keep)  # type: ignore[arg-type]
        stage = "changing directory"
        try:
            os.chdir(proc.cwd)
        except OSError as e:
            raise OSError(e.errno, f"process.cwd {proc.cwd!r}: {e.strerror}") from None
        process.check_cwd_inside()
        env = process.env_dict(proc.env)
        exe = process.find_executable(proc.args[0], env) if proc.args else ""
        # Every fd we hold is close-on-exec; make sure of it for any we inherited (the launcher's
        # caller's fds must not reach the container: CVE-2024-21626).
        sc.close_range(3, 0xFFFFFFFF, S.CLOSE_RANGE_CLOEXEC)
        seccomp_mod = it.seccomp_mod
        if it.fifo_fd is not None:
            sync.send(sock, {"ready": 1})
            sock.close()
            sock = None
            stage = "waiting for start"
            # The fifo is open for reading and writing (container.py, create), so this read
            # blocks until start writes its byte instead of seeing end-of-file.
            os.set_blocking(it.fifo_fd, True)
            while not os.read(it.fifo_fd, 1):
                pass
            os.close(it.fifo_fd)
            if it.start_hooks:
                stage = "startContainer hooks"
                from . import hooks
                hooks.run_hooks("startContainer", it.start_hooks, _state_for_hooks(it))
        if not proc.args:
            os._exit(1)  # no process in the config: start refuses, nothing to run
        stage = "final privileges"
        process.set_apparmor_profile(proc.apparmor_profile)
        _reset_signals()
        notify_fd = None
        if proc.no_new_privileges:
            sc.prctl(S.PR_SET_NO_NEW_PRIVS, 1)
            capabilities.apply_final(caps, sc)
            if seccomp_mod is not None:
                notify_fd = seccomp_mod.install(it.seccomp)
        else:
            # Without no_new_privs the kernel only lets CAP_SYS_ADMIN load a filter: load it
            # while we still hold that, then drop to the final sets.
            if seccomp_mod is not None:
                # setuid to non-root cleared the effective set (permitted was kept).
                _eff, perm, inh = sc.capget()
                sc.capset(perm, perm, inh)
                notify_fd = seccomp_mod.install(it.seccomp)
            capabilities.apply_final(caps, sc)
        if notify_fd is not None:
            _send_notify_fd(listener, notify_fd, it)
        tfd = getattr(it, "trampoline_fd", None)
        if tfd is not None:
            from . import trampoline
            trampoline.execve(tfd, exe, proc.args, env)
        os.execve(exe, proc.args, env)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, then exit
        if sock is not None:
            _die_with(sock, e, stage)
        os.write(2, f"oci-launcher: {stage}: {e}\n".encode())
        os._exit(127)


def preimport_for(it: _Init) -> None:
    """Import what G will need after pivot_root, when it can no longer find modules: the
    console code with a terminal, the hook runner with container-side hooks."""
    if it.proc.terminal:
        from . import console  # noqa: F401
    if it.start_hooks or it.create_hooks:
        from . import hooks  # noqa: F401


def _needs_state(it: _Init) -> bool:
    """G needs the state JSON (with its host pid) for startContainer hooks and seccomp notify."""
    return bool(it.start_hooks or (it.seccomp or {}).get("listenerPath"))


def _send_notify_fd(listener, fd: int, it: _Init) -> None:
    """The runtime-spec seccomp-notify protocol: the container state (with the fd list) as
    JSON, the listener fd attached with SCM_RIGHTS."""
    import struct
    import _socket
    if listener is None:
        raise OSError(22, "SCMP_ACT_NOTIFY needs linux.seccomp.listenerPath")
    from .. import jsonlite
    cstate = jsonlite.loads(getattr(it, "state_json", "") or "{}")
    st = {"ociVersion": state.OCI_VERSION, "fds": ["seccompFd"],
          "pid": cstate.get("pid", 0),  # type: ignore[union-attr]
          "metadata": it.seccomp.get("listenerMetadata", "") if it.seccomp else "",
          "state": cstate}
    listener.sendmsg([jsonlite.dumps(st).encode()],
                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", fd))])
    listener.close()
    os.close(fd)


def _state_for_hooks(it: _Init) -> str:
    return getattr(it, "state_json", "") or ""


def _c_main(sc: S.Linux, it: _Init, sock, plan, want_maps: bool, timens: dict | None) -> None:
    try:
        selfatt = getattr(it, "self_attach", None) is not None
        if not selfatt:
            sync.recv(sock, "waiting for the cgroup")
        _enter_namespaces(sc, sock, plan, want_maps, defer_cgroupns=selfatt)
        if timens:
            with open("/proc/self/timens_offsets", "w") as f:
                for clock, off in timens.items():
                    f.write(f"{clock} {off.get('secs', 0)} {off.get('nanosecs', 0)}\n")
        # G must not talk on the shared socket before C has reported G's pid: the launcher
        # reads that first. A pipe orders them.
        r, w = os.pipe()
        cg_fd = getattr(it, "cgroup_fd", None)
        if cg_fd is not None:
            try:
                pid = sc.clone_into_cgroup(cg_fd)
            except OSError as e:
                # E.g. a kernel before 5.7, or a refusal after the kernel took pid 1 of the
                # new pid namespace, which then takes no process at all: the launcher starts
                # over with a fresh C that it attaches itself.
                sync.send(sock, {"retry": f"clone3 into the container's cgroup: {e}"})
                os._exit(0)
        else:
            pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os.close(r)
            _g_main(sc, it, sock)
        sync.send(sock, {"pid": pid})
        os.write(w, b"1")
        os._exit(0)
    except BaseException as e:  # noqa: BLE001
        _die_with(sock, e, "entering namespaces")


def _c_boot(sock_fd: int) -> None:
    """Entry of C when it was started from the sealed interpreter copy (see _start_c)."""
    import _pickle
    import _socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, sock_fd)
    try:
        data = sock.recv(1 << 22)
        it, plan, want_maps, timens = _pickle.loads(data)
        os.set_inheritable(sock_fd, False)
        if it.fifo_fd is not None:
            os.set_inheritable(it.fifo_fd, False)
        it.seccomp_mod = _load_seccomp(it.seccomp) if it.seccomp else None
        preimport_for(it)
    except BaseException as e:  # noqa: BLE001
        _die_with(sock, e, "starting the container process")
    _c_main(S.default(), it, sock, plan, want_maps, timens)
    os._exit(1)


def _load_seccomp(profile: dict):
    """Check the profile, import the seccomp module and load libseccomp now: after
    pivot_root G cannot see the host's Python packages or libraries any more."""
    from . import seccomp as seccomp_mod
    seccomp_mod.plan(profile)
    preload = getattr(seccomp_mod, "_import_pyseccomp", None)
    if preload is not None:
        preload()
    else:
        import pyseccomp  # noqa: F401
    return seccomp_mod
