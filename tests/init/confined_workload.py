"""A daemon-shaped workload run inside confine(): trio event loop, unix-socket echo server
and client, a worker thread, protobuf encode/decode, fd passing, /proc and run-dir file I/O.

    python confined_workload.py RUN_DIR UID [--no-seccomp] [--no-confine]

Exits 0 and prints a JSON report when everything worked; a denied system call shows as a
Python error (EPERM) or death by SIGSYS.
"""
import json
import os
import socket
import sys

import trio
from google.protobuf import struct_pb2

from agent.daemon.confine import confine


async def echo_handler(stream):
    async with stream:
        async for chunk in stream:
            await stream.send_all(chunk)


async def workload(run_dir: str) -> dict:
    path = os.path.join(run_dir, "echo.sock")
    listeners = await trio.open_unix_listeners(path) if hasattr(trio, "open_unix_listeners") \
        else None
    report = {}
    async with trio.open_nursery() as n:
        if listeners is None:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(path)
            sock.listen(16)
            listeners = [trio.SocketListener(sock)]
        n.start_soon(trio.serve_listeners, echo_handler, listeners)
        total = 0
        for i in range(20):
            s = await trio.open_unix_socket(path)
            async with s:
                msg = struct_pb2.Struct()
                msg.update({"i": i, "text": "x" * 1000})
                data = msg.SerializeToString()
                await s.send_all(data)
                got = b""
                while len(got) < len(data):
                    got += await s.receive_some(65536)
                back = struct_pb2.Struct()
                back.ParseFromString(got)
                assert back["i"] == i
                total += len(got)
        report["echoed_bytes"] = total
        report["thread"] = await trio.to_thread.run_sync(lambda: sum(range(1000)))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        socket.send_fds(a, [b"fd"], [w])
        _, fds, _, _ = socket.recv_fds(b, 16, 1)
        os.write(fds[0], b"via passed fd")
        report["passed_fd"] = os.read(r, 100).decode()
        for fd in (r, w, fds[0]):
            os.close(fd)
        a.close()
        b.close()
        with open(os.path.join(run_dir, "state.json"), "w") as f:
            json.dump(report, f)
        with open("/proc/self/status") as f:
            report["status"] = {k: v.strip() for k, _, v in
                                (line.partition(":") for line in f)
                                if k in ("Uid", "Gid", "CapEff", "CapPrm", "CapInh", "CapBnd",
                                         "CapAmb", "NoNewPrivs", "Seccomp")}
        with open("/proc/meminfo") as f:
            report["memtotal"] = f.readline().split()[1]
        await trio.sleep(0.01)
        n.cancel_scope.cancel()
    return report


def main() -> None:
    run_dir, uid = sys.argv[1], int(sys.argv[2])
    conf = None
    if "--no-confine" not in sys.argv:
        conf = confine(uid, uid, run_dir, seccomp="--no-seccomp" not in sys.argv)
    report = trio.run(workload, run_dir)
    report["landlock_abi"] = conf.landlock_abi if conf else None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
