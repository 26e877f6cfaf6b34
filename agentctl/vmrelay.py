"""A ttRPC multiplexer in front of the guest's single virtio-serial channel.

    python -m agentctl.vmrelay --upstream PATH|vsock://CID:PORT --listen PATH

QEMU's chardev socket takes one client at a time, and a client that leaves mid-call can leave
an answer in the channel for the next one. The relay holds the one upstream connection for
the VM's lifetime and accepts any number of ttRPC clients on its own unix socket. Every frame
a client sends gets a relay-wide stream id (odd, as ttRPC clients use); answers travel back
under the client's own id. A stream ends with its response frame; answers for a client that
has gone are dropped. It exits when the upstream closes (the VM is gone) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import trio

from agent.ttrpc.frame import HEADER, HEADER_SIZE, MAX_MESSAGE, TYPE_RESPONSE

MAX_STREAM_ID = (1 << 31) - 1


class Relay:
    def __init__(self, upstream: trio.SocketStream):
        self.up = upstream
        self.up_lock = trio.Lock()
        self.next_id = 1
        # relay stream id -> (client, client's stream id)
        self.routes: dict[int, tuple["Client", int]] = {}

    def _new_id(self) -> int:
        for _ in range(MAX_STREAM_ID // 2):
            sid = self.next_id
            self.next_id = self.next_id + 2 if self.next_id + 2 <= MAX_STREAM_ID else 1
            if sid not in self.routes:
                return sid
        raise RuntimeError("no free stream id")

    async def to_upstream(self, client: "Client", sid: int, rest: bytes) -> None:
        length, _, mtype, flags = HEADER.unpack(rest[:HEADER_SIZE])
        key = client.ids.get(sid)
        if key is None:
            key = self._new_id()
            client.ids[sid] = key
            self.routes[key] = (client, sid)
        async with self.up_lock:
            await self.up.send_all(HEADER.pack(length, key, mtype, flags) + rest[HEADER_SIZE:])

    async def from_upstream(self) -> None:
        """Route every frame from the guest to the client whose stream it belongs to."""
        async for header, body in read_frames(self.up):
            length, key, mtype, flags = HEADER.unpack(header)
            route = self.routes.get(key)
            if route is None:
                continue  # its client has gone
            client, sid = route
            if mtype == TYPE_RESPONSE:  # the last frame of a stream
                del self.routes[key]
                client.ids.pop(sid, None)
            await client.send(HEADER.pack(length, sid, mtype, flags) + body)

    async def serve_client(self, stream: trio.SocketStream) -> None:
        client = Client(stream)
        try:
            async for header, body in read_frames(stream):
                _, sid, _, _ = HEADER.unpack(header)
                await self.to_upstream(client, sid, header + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError):
            pass
        finally:
            for sid, key in client.ids.items():
                self.routes.pop(key, None)
            client.ids.clear()
            client.gone = True
            await stream.aclose()


class Client:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.ids: dict[int, int] = {}  # client stream id -> relay stream id
        self.lock = trio.Lock()
        self.gone = False

    async def send(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            async with self.lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.gone = True


async def read_frames(stream):
    """(header, body) pairs until EOF; a frame over ttRPC's limit is a protocol error."""
    buf = bytearray()
    while True:
        while len(buf) < HEADER_SIZE:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        length = HEADER.unpack(bytes(buf[:HEADER_SIZE]))[0]
        if length > MAX_MESSAGE:
            raise ValueError(f"ttRPC frame of {length} bytes exceeds {MAX_MESSAGE}")
        while len(buf) < HEADER_SIZE + length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        yield bytes(buf[:HEADER_SIZE]), bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
        del buf[:HEADER_SIZE + length]


async def run(upstream: str, listen: str) -> None:
    from agent.ttrpc.transport import connect

    # A path is QEMU's chardev socket; an address may also be vsock://CID:PORT, so a guest on
    # vhost-vsock is reached through the same unix socket any ttRPC client can dial.
    up = await connect(upstream if "://" in upstream else f"unix://{upstream}")
    try:
        os.unlink(listen)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(listen)
    os.chmod(listen, 0o600)
    sock.listen(64)
    relay = Relay(up)
    async with trio.open_nursery() as n:
        async def pump():
            try:
                await relay.from_upstream()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError) as e:
                print(f"vmrelay: upstream failed: {e}", file=sys.stderr)
            n.cancel_scope.cancel()  # the VM is gone: so are we
        n.start_soon(pump)
        await n.start(trio.serve_listeners, relay.serve_client, [trio.SocketListener(sock)])
    try:
        os.unlink(listen)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agentctl.vmrelay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True,
                    help="QEMU's chardev unix socket (a path), or an agent address such as vsock://3:1024")
    ap.add_argument("--listen", required=True, help="unix socket path for clients")
    a = ap.parse_args(argv)
    try:
        trio.run(run, a.upstream, a.listen)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
