"""A stand-in comms daemon for init's tests: the real privsep channel and confinement, but
instead of ttRPC a tiny line-JSON control protocol on the listening socket init hands over.

Per connection: one JSON line (fds beside it with SCM_RIGHTS) -> one JSON line (+ fds).
    {"cmd": "call", "op": OP, "args": {...}}  forward to init (with the fds)
    {"cmd": "raw", "hex": HEX}                send these bytes to init as one packet
    {"cmd": "events"}                         events init pushed so far
    {"cmd": "wait", "pid": PID}               exit code, once known (ExitWatcher)
    {"cmd": "bench", "n": N}                  N privsep round trips, median/p99 seconds
    {"cmd": "hello"}                          pid, generation, the table init gave at start,
                                              this process's /proc status fields
"""
import json
import os
import socket
import sys

import trio

from agent.daemon.supervise import ExitWatcher, start_from_env
from agent.privsep.client import InitError, open_client

MAX_FDS = 8


def status_fields() -> dict:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)
                if k in ("Uid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")}


async def main(env) -> None:
    events: list[dict] = []
    watcher = ExitWatcher()
    async with open_client(env.privsep_fd) as init:
        initial = (await init.call("table")).result
        print(json.dumps({"level": "info", "source": "daemon", "msg": "dummy daemon serving",
                          "fields": {"generation": env.generation}}), file=sys.stderr,
              flush=True)
        watcher.load_table(initial)

        async def collect():
            async for ev in init.events:
                events.append(ev)
                watcher.on_event(ev)

        async def handle(conn: trio.socket.SocketType):
            with conn:
                data, anc, _, _ = await conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * MAX_FDS))
                fds = []
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds += [int.from_bytes(payload[i:i + 4], "little")
                                for i in range(0, len(payload) - len(payload) % 4, 4)]
                while not data.endswith(b"\n"):
                    more = await conn.recv(1 << 20)
                    if not more:
                        break
                    data += more
                req = json.loads(data)
                out_fds: list[int] = []
                if req["cmd"] == "call":
                    try:
                        rep = await init.call(req["op"], req.get("args", {}), fds)
                        out = {"ok": True, "result": rep.result}
                        out_fds = rep.fds
                    except InitError as e:
                        out = {"ok": False, "field": e.field, "msg": e.msg}
                    finally:
                        for fd in fds:
                            os.close(fd)
                elif req["cmd"] == "raw":
                    await init.send_raw(bytes.fromhex(req["hex"]), fds)
                    for fd in fds:
                        os.close(fd)
                    out = {"ok": True}
                elif req["cmd"] == "wait":
                    out = {"ok": True, "exit_code": await watcher.wait(req["pid"])}
                elif req["cmd"] == "bench":  # round trips to init, timed from here
                    lat = []
                    for _ in range(int(req.get("n", 100))):
                        t0 = trio.current_time()
                        await init.call(req.get("op", "table"))
                        lat.append(trio.current_time() - t0)
                    lat.sort()
                    out = {"ok": True, "median_s": lat[len(lat) // 2], "p99_s":
                           lat[min(len(lat) - 1, int(len(lat) * 0.99))]}
                elif req["cmd"] == "events":
                    out = {"ok": True, "events": events}
                elif req["cmd"] == "hello":
                    out = {"ok": True, "pid": os.getpid(), "generation": env.generation,
                           "initial_table": initial, "status": status_fields()}
                else:
                    out = {"ok": False, "msg": f"unknown cmd {req['cmd']!r}"}
                line = json.dumps(out).encode() + b"\n"
                if out_fds:
                    await conn.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 b"".join(fd.to_bytes(4, "little")
                                                          for fd in out_fds))])
                    for fd in out_fds:
                        os.close(fd)
                else:
                    await conn.send(line)

        listener = trio.socket.from_stdlib_socket(env.listen_socket())
        async with trio.open_nursery() as n:
            n.start_soon(collect)
            while True:
                conn, _ = await listener.accept()
                n.start_soon(handle, conn)


if __name__ == "__main__":
    daemon_env = start_from_env()  # confined before the first byte from the host
    trio.run(main, daemon_env)
    sys.exit(0)
