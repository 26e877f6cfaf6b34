"""create / start / state / kill / delete / exec / run: the library API of the launcher.

Process model (after runc and youki). The launcher L starts C, which enters the namespaces
(joins by path, or unshares: user first so the others belong to it, L writing its id maps) and
forks G, so that G is PID 1 of a new PID namespace; C exits. G builds the root file system,
pivots into it, sets the process attributes and, for ``create``, reports "ready" and blocks on
the exec fifo; L records the state and exits. ``start`` writes the fifo, G runs the
startContainer hooks, installs seccomp (last) and executes the program.

C is a plain fork of L when L's executable cannot be written (sealed memfd, read-only mount);
otherwise C executes a sealed memfd copy of the interpreter and receives its instructions
(pickled) over the socket, so nothing inside the container maps a writable host binary
(CVE-2019-5736, see selfexe.py).

All messages go over one SOCK_SEQPACKET pair (sync.py); an exception in C or G travels back as
its text, so ``create`` fails with the real cause (which mount, which field, which errno).
"""
from __future__ import annotations

import os
import select
import time

from . import capabilities, console, hooks, process, rootfs, state, sync
from . import syscalls as S
from .spec import Hook, Process, Spec, SpecError, load_spec, parse_hooks, parse_process

NS_FLAGS = {"user": S.CLONE_NEWUSER, "mount": S.CLONE_NEWNS, "pid": S.CLONE_NEWPID,
            "network": S.CLONE_NEWNET, "ipc": S.CLONE_NEWIPC, "uts": S.CLONE_NEWUTS,
            "cgroup": S.CLONE_NEWCGROUP, "time": S.CLONE_NEWTIME}
NS_PROC = {"user": "user", "mount": "mnt", "pid": "pid", "network": "net", "ipc": "ipc",
           "uts": "uts", "cgroup": "cgroup", "time": "time"}
# Joining order: user first (the rest are owned by it), mount last (it changes what paths
# mean, so the other namespace files must already be open - they are, as fds).
_JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "time", "mount")


class LauncherError(RuntimeError):
    """An operation failed; the message says which container and why."""


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
                      want_maps: bool) -> None:
    """Join (path) or create (None) each namespace in ``plan``; user namespace first."""
    joins = {t: os.open(p, os.O_RDONLY | os.O_CLOEXEC) for t, p in plan if p}
    new = {t for t, p in plan if not p}
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


def _write_id_maps(pid: int, spec: Spec) -> None:
    def fmt(ms) -> str:
        return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in ms)
    try:
        if spec.linux.gid_mappings:
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(fmt(spec.linux.gid_mappings))
        if spec.linux.uid_mappings:
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(fmt(spec.linux.uid_mappings))
    except OSError as e:
        raise LauncherError(f"writing uid/gid maps of the user namespace "
                            f"(linux.uidMappings/gidMappings): {e}") from None


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
            rootfs.mount_one(sc, m, ctx)
        rootfs.setup_dev(sc, spec, ctx)
    finally:
        os.close(rootfd)
    state_json = ""
    if any(spec.hooks[k] for k in ("prestart", "createRuntime")) or it.create_hooks:
        sync.send(sock, {"hooks": 1})
        msg, _ = sync.recv(sock, "runtime hooks")
        state_json = msg["state"]
        # createContainer hooks: in the container's namespaces, before pivot_root.
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


def _g_main(sc: S.Linux, it: _Init, sock, console_sock_wanted: bool) -> None:
    """Runs in G. Never returns: execs the container program or exits."""
    stage = "setting up the container"
    try:
        if it.start_hooks:
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
        if proc.terminal:
            stage = "creating the terminal"
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
        capabilities.drop_bounding(caps, sc)
        stage = "switching user"
        process.switch_user(sc, proc)
        keep = {it.fifo_fd} if it.fifo_fd is not None else set()
        keep |= getattr(it, "keep_fds", set())
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
            p = select.poll()
            p.register(it.fifo_fd, select.POLLIN)
            while True:
                if p.poll(-1) and os.read(it.fifo_fd, 1):
                    break
            os.close(it.fifo_fd)
            if it.start_hooks:
                stage = "startContainer hooks"
                hooks.run_hooks("startContainer", it.start_hooks, _state_for_hooks(it))
        if not proc.args:
            os._exit(1)  # no process in the config: start refuses, nothing to run
        stage = "final privileges"
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
        os.execve(exe, proc.args, env)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, then exit
        if sock is not None:
            _die_with(sock, e, stage)
        os.write(2, f"oci-launcher: {stage}: {e}\n".encode())
        os._exit(127)


def _send_notify_fd(listener, fd: int, it: _Init) -> None:
    """The runtime-spec seccomp-notify protocol: the container state (with the fd list) as
    JSON, the listener fd attached with SCM_RIGHTS."""
    import struct
    import _socket
    if listener is None:
        raise OSError(22, "SCMP_ACT_NOTIFY needs linux.seccomp.listenerPath")
    from . import jsonlite
    st = {"ociVersion": state.OCI_VERSION, "fds": ["seccompFd"], "pid": 0,
          "metadata": it.seccomp.get("listenerMetadata", "") if it.seccomp else "",
          "state": jsonlite.loads(getattr(it, "state_json", "") or "{}")}
    listener.sendmsg([jsonlite.dumps(st).encode()],
                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", fd))])
    listener.close()
    os.close(fd)


def _state_for_hooks(it: _Init) -> str:
    return getattr(it, "state_json", "") or ""


def _c_main(sc: S.Linux, it: _Init, sock, plan, want_maps: bool, timens: dict | None) -> None:
    try:
        sync.recv(sock, "waiting for the cgroup")
        _enter_namespaces(sc, sock, plan, want_maps)
        if timens:
            with open("/proc/self/timens_offsets", "w") as f:
                for clock, off in timens.items():
                    f.write(f"{clock} {off.get('secs', 0)} {off.get('nanosecs', 0)}\n")
        # G must not talk on the shared socket before C has reported G's pid: the launcher
        # reads that first. A pipe orders them.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os.close(r)
            _g_main(sc, it, sock, it.console)
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


def _start_c(sc: S.Linux, it: _Init, parent, child, plan, want_maps: bool,
             timens: dict | None) -> int:
    """Fork C. If our own executable could be written through /proc/PID/exe (CVE-2019-5736),
    C executes a sealed memfd copy of the interpreter instead of continuing as a fork, so no
    process that ever enters the container maps the host's file. Its start-up runs while the
    launcher moves it into the cgroup (which waits for an RCU grace period, ~10 ms)."""
    from . import selfexe
    if selfexe.exe_is_protected():
        pid = os.fork()
        if pid == 0:
            parent.close()
            _c_main(sc, it, child, plan, want_maps, timens)
            os._exit(1)
        return pid
    import _pickle
    exe_fd = selfexe.sealed_copy("/proc/self/exe")
    boot = selfexe.boot_code("agent.launcher.container", "_c_boot",
                             f"int(sys.argv[1])")
    seccomp_mod, it.seccomp_mod = it.seccomp_mod, None
    try:
        payload = _pickle.dumps((it, plan, want_maps, timens), 4)
    finally:
        it.seccomp_mod = seccomp_mod
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            os.set_inheritable(child.fileno(), True)
            if it.fifo_fd is not None:
                os.set_inheritable(it.fifo_fd, True)
            selfexe.exec_sealed(exe_fd, boot, [str(child.fileno())])
        except BaseException as e:  # noqa: BLE001
            _die_with(child, e, "executing the sealed interpreter")
        os._exit(1)
    os.close(exe_fd)
    parent.send(payload)
    return pid


# --- launcher side ---------------------------------------------------------------------------

class _Spawned:
    def __init__(self, pid: int, sock, cgroup) -> None:
        self.pid, self.sock, self.cgroup = pid, sock, cgroup


def _spawn(sc: S.Linux, it: _Init, plan: list[tuple[str, str | None]], spec: Spec | None,
           cgroup, console_socket: str | None, state_of, timens: dict | None,
           runtime_hooks: tuple[list[Hook], list[Hook]] = ([], [])) -> _Spawned:
    """Fork C (and through it G); drive the handshake until G is ready (or has exec'd, when
    there is no fifo). Returns G's pid."""
    if it.proc.terminal and not console_socket:
        raise LauncherError("process.terminal is true but no --console-socket was given")
    # A bad profile fails here, in the launcher, with the field named.
    it.seccomp_mod = _load_seccomp(it.seccomp) if it.seccomp else None
    parent, child = sync.pair()
    userns_new = any(t == "user" and not p for t, p in plan)
    want_maps = userns_new and bool(spec and (spec.linux.uid_mappings or
                                              spec.linux.gid_mappings))
    cpid = _start_c(sc, it, parent, child, plan, want_maps, timens)
    child.close()
    gpid = 0
    try:
        if cgroup is not None:
            cgroup.add_pid(cpid)
        sync.send(parent, {"go": 1})
        if want_maps:
            sync.recv(parent, "entering the user namespace")
            _write_id_maps(cpid, spec)  # type: ignore[arg-type]
            sync.send(parent, {"ok": 1})
        msg, _ = sync.recv(parent, "entering namespaces")
        gpid = msg["pid"]
        os.waitpid(cpid, 0)
        if it.start_hooks:
            sync.send(parent, {"state": state_of(gpid, "created")})
        while True:
            try:
                msg, fds = sync.recv(parent, "setting up the container")
            except sync.ChildError as e:
                if it.fifo_fd is None and "exited before reporting" in str(e):
                    break  # exec succeeded: the close-on-exec socket closed without a word
                raise
            if "hooks" in msg:
                # runtime-tools (and runc) report "created" to these hooks
                sj = state_of(gpid, "created")
                hooks.run_hooks("prestart", runtime_hooks[0], sj)
                hooks.run_hooks("createRuntime", runtime_hooks[1], sj)
                sync.send(parent, {"state": sj})
            elif "pty" in msg:
                try:
                    console.send_master(console_socket, fds[0])  # type: ignore[arg-type]
                finally:
                    for fd in fds:
                        os.close(fd)
            elif "ready" in msg:
                break
    except BaseException:
        for p in (gpid, cpid):
            if p:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(cpid, os.WNOHANG)
        except ChildProcessError:
            pass
        if gpid:
            _wait_gone(gpid, 2.0)
        raise
    finally:
        parent.close()
    return _Spawned(gpid, None, cgroup)


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if state.proc_start_time(pid) is None:
            return True
        time.sleep(0.002)
    return False


def _namespace_plan(spec: Spec) -> list[tuple[str, str | None]]:
    return [(n.type, n.path) for n in spec.linux.namespaces]


def _check_spec(spec: Spec) -> None:
    types = {n.type: n.path for n in spec.linux.namespaces}
    if spec.hostname and "uts" not in types:
        raise SpecError("hostname: setting it needs a uts namespace (linux.namespaces), "
                        "else it would rename the host")
    if spec.domainname and "uts" not in types:
        raise SpecError("domainname: setting it needs a uts namespace (linux.namespaces)")
    if (spec.linux.uid_mappings or spec.linux.gid_mappings) and not (
            "user" in types and types["user"] is None):
        raise SpecError("linux.uidMappings: given without a new user namespace")
    if "user" in types and types["user"] is None and not spec.linux.uid_mappings:
        raise SpecError("linux.uidMappings: a new user namespace needs uid/gid mappings")


def _open_cgroup(cgroups_path: str | None, cid: str):
    from . import cgroups
    return cgroups.open_cgroup(cgroups_path, cid)


class Launcher:
    """The runtime's operations on a state directory (``--root``)."""

    def __init__(self, root: str | None = None, sc: S.Linux | None = None) -> None:
        self.store = state.Store(root)
        self.sc = sc or S.default()

    # -- create / start ----------------------------------------------------------------------

    def create(self, cid: str, bundle: str, pid_file: str | None = None,
               console_socket: str | None = None, no_pivot: bool = False) -> int:
        """Create the container and leave its process waiting for start(); returns its pid."""
        bundle = os.path.abspath(bundle)
        spec = load_spec(os.path.join(bundle, "config.json"))
        _check_spec(spec)
        root_path = os.path.join(bundle, spec.root_path)
        if not os.path.isdir(root_path):
            raise SpecError(f"root.path: {root_path!r} is not a directory")
        d = self.store.reserve(cid)
        cg = None
        fifo_fd = None
        try:
            fifo = self.store.fifo(cid)
            os.mkfifo(fifo, 0o622)
            # The reader end stays open in G; start() opens the write end. A writer that finds
            # no reader gets ENXIO, which is how start() tells "G died" from "G waits".
            fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            cg = _open_cgroup(spec.linux.cgroups_path, cid)
            cg.create()
            cg.apply(spec.linux.resources or {})
            types = {n.type: n.path for n in spec.linux.namespaces}
            record = {"id": cid, "bundle": bundle, "rootfs": root_path,
                      "annotations": spec.annotations, "pid": 0, "starttime": None,
                      "created": _now(), "cgroupsPath": spec.linux.cgroups_path,
                      "hooks": spec.raw.get("hooks") or {},
                      "process": spec.raw.get("process"),
                      "seccomp": spec.linux.seccomp}

            def state_of(pid: int, status: str) -> str:
                from . import jsonlite
                rec = dict(record, pid=pid)
                return jsonlite.dumps(state.oci_state(self.store, cid, rec, status))

            # Without "process" the container can be created, but start must fail (the spec
            # says so); the init then only waits to be killed.
            proc = spec.process or parse_process({}, need_args=False)
            it = _Init(spec, proc, root_path, no_pivot, fifo_fd,
                       proc.terminal, spec.linux.seccomp,
                       "user" in types and types["user"] is None, cg.paths(),
                       "cgroup" in types, spec.hooks["startContainer"],
                       spec.hooks["createContainer"])
            prev = os.getcwd()
            os.chdir(bundle)  # relative mount sources are relative to the bundle
            try:
                sp = _spawn(self.sc, it, _namespace_plan(spec), spec, cg, console_socket,
                            state_of, spec.linux.time_offsets,
                            (spec.hooks["prestart"], spec.hooks["createRuntime"]))
            finally:
                os.chdir(prev)
            record["pid"] = sp.pid
            record["starttime"] = state.proc_start_time(sp.pid)
            self.store.save(cid, record)
            if pid_file:
                _write_pid_file(pid_file, sp.pid)
            return sp.pid
        except BaseException:
            if cg is not None:
                try:
                    cg.destroy(kill=True, timeout=2.0)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            self.store.remove(cid)
            raise
        finally:
            if fifo_fd is not None:
                os.close(fifo_fd)

    def start(self, cid: str) -> None:
        rec = self.store.load(cid)
        st = state.status(self.store, cid, rec)
        if st != "created":
            raise LauncherError(f"container {cid!r} is {st}, not created: cannot start it")
        if not rec.get("process"):
            # Nothing to run: the container goes straight to "stopped". The runtime spec asks
            # for an error here, but runtime-tools' start test (runtime.md#start) asserts
            # success followed by "stopped"; we follow the suite and warn.
            try:
                os.kill(rec["pid"], 9)
            except ProcessLookupError:
                pass
            _warn(f"container {cid!r} has no process in its config.json: nothing started, "
                  "the container is stopped")
            return
        try:
            fd = os.open(self.store.fifo(cid), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise LauncherError(f"container {cid!r}: its process is not waiting for start "
                                f"({e.strerror})") from None
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        os.unlink(self.store.fifo(cid))
        hk = parse_hooks(rec.get("hooks") or {})
        if hk["poststart"]:
            from . import jsonlite
            sj = jsonlite.dumps(state.oci_state(self.store, cid, rec, "running"))
            for err in hooks.run_hooks("poststart", hk["poststart"], sj, fatal=False):
                _warn(err)

    # -- state / kill / delete -----------------------------------------------------------------

    def state(self, cid: str) -> dict:
        rec = self.store.load(cid)
        return state.oci_state(self.store, cid, rec)

    def list(self) -> list[dict]:
        out = []
        for cid in self.store.ids():
            try:
                out.append(self.state(cid))
            except state.StateError:
                continue
        return out

    def kill(self, cid: str, sig: int, all_procs: bool = False) -> None:
        rec = self.store.load(cid)
        st = state.status(self.store, cid, rec)
        if st == "stopped":
            raise LauncherError(f"container {cid!r} is not running (status stopped)")
        if all_procs:
            _open_cgroup(rec.get("cgroupsPath"), cid).kill(sig)
            return
        try:
            os.kill(rec["pid"], sig)
        except ProcessLookupError:
            raise LauncherError(f"container {cid!r}: process {rec['pid']} is gone") from None

    def delete(self, cid: str, force: bool = False) -> None:
        rec = self.store.load(cid)
        st = state.status(self.store, cid, rec)
        if st != "stopped" and not force:
            raise LauncherError(f"container {cid!r} is {st}, not stopped: kill it first or "
                                "use --force")
        cg = _open_cgroup(rec.get("cgroupsPath"), cid)
        if st != "stopped":
            try:
                os.kill(rec["pid"], 9)
            except ProcessLookupError:
                pass
            _wait_gone(rec["pid"], 5.0)
        try:
            cg.destroy(kill=True, timeout=5.0)
        except Exception as e:  # noqa: BLE001 - state must go even if the cgroup lingers
            _warn(f"container {cid!r}: removing its cgroup: {e}")
        from . import jsonlite
        sj = jsonlite.dumps(state.oci_state(self.store, cid, rec, "stopped"))
        self.store.remove(cid)
        hk = parse_hooks(rec.get("hooks") or {})
        for err in hooks.run_hooks("poststop", hk["poststop"], sj, fatal=False):
            _warn(err)

    # -- exec ----------------------------------------------------------------------------------

    def exec(self, cid: str, proc_doc: dict, pid_file: str | None = None,
             console_socket: str | None = None, detach: bool = False) -> int:
        """Run another process in the container; returns its exit code, or its pid with
        ``detach``."""
        rec = self.store.load(cid)
        st = state.status(self.store, cid, rec)
        if st not in ("created", "running"):
            raise LauncherError(f"container {cid!r} is {st}: cannot exec in it")
        proc = parse_process(proc_doc, "process")
        pid = rec["pid"]
        plan = []
        for t, name in NS_PROC.items():
            p = f"/proc/{pid}/ns/{name}"
            try:
                if os.readlink(p) != os.readlink(f"/proc/self/ns/{name}"):
                    plan.append((t, p))
            except FileNotFoundError:
                continue
        cg = _open_cgroup(rec.get("cgroupsPath"), cid)
        it = _Init(None, proc, None, False, None, proc.terminal, rec.get("seccomp"),
                   False, {}, False, [], [])
        if not detach:
            self.sc.prctl(S.PR_SET_CHILD_SUBREAPER, 1)
        sp = _spawn(self.sc, it, plan, None, cg, console_socket, lambda p, s: "", None)
        if pid_file:
            _write_pid_file(pid_file, sp.pid)
        if detach:
            return sp.pid
        return wait_exit(sp.pid)

    # -- run -----------------------------------------------------------------------------------

    def run(self, cid: str, bundle: str, pid_file: str | None = None,
            console_socket: str | None = None, no_pivot: bool = False,
            detach: bool = False, keep: bool = False) -> int:
        """create + start, then (unless detached) wait and delete; returns the exit code."""
        if not detach:
            # G's parent (C) exits at once; as subreaper we inherit G and can wait for it.
            self.sc.prctl(S.PR_SET_CHILD_SUBREAPER, 1)
        pid = self.create(cid, bundle, pid_file, console_socket, no_pivot)
        try:
            self.start(cid)
        except BaseException:
            self.delete(cid, force=True)
            raise
        if detach:
            return 0
        code = wait_exit(pid)
        if not keep:
            self.delete(cid, force=True)
        return code


def wait_exit(pid: int) -> int:
    """Wait for a child (or subreaped orphan); exit code, 128+N for a signal (shell style)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code


def _write_pid_file(path: str, pid: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def _warn(msg: str) -> None:
    os.write(2, f"oci-launcher: warning: {msg}\n".encode())
