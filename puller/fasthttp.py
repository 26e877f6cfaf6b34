"""A lean keep-alive HTTP/1.1 path for the plain registry GETs a lazy start waits on.

requests costs about 1 ms of CPU per request (environment and proxy lookups, cookie and
hook machinery, adapters) before a byte is sent; a lazy start makes a handful of small
requests in sequence and its chunk fetches compete for the same interpreter, so that
overhead is a good part of the time to a container's first output.  This module does only
the common case - a GET answered with the wanted status on a kept-alive connection - and
RegistryClient sends everything else (authentication challenges, redirects, retryable
errors, proxies, TLS it cannot verify) down its full requests-based path.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.request
from dataclasses import dataclass


class FastPathUnusable(Exception):
    """The request could not be made on this path; the caller uses its general one."""


@dataclass(frozen=True)
class FastPathConfig:
    host: str  # host[:port] as the registry is addressed
    tls: bool
    ca_file: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    user_agent: str = ""
    max_idle: int = 8


def proxied(host: str, tls: bool) -> bool:
    """True when the environment routes requests for `host` through a proxy (which requests
    would honour): this path then stays out of the way."""
    proxies = urllib.request.getproxies()
    if not proxies.get("https" if tls else "http") and not proxies.get("all"):
        return False
    return not urllib.request.proxy_bypass(host.rsplit(":", 1)[0] if not host.endswith("]") else host)


class FastResponse:
    """One answer on a pooled connection.  The connection goes back to the pool once the body
    was read to its end; `close()` before that drops it (it is mid-message)."""

    def __init__(self, pool: ConnectionPool, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse) -> None:
        self._pool, self._conn, self._resp = pool, conn, resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers

    def header(self, name: str, default: str = "") -> str:
        return self._resp.getheader(name, default) or default

    def readinto(self, buf) -> int:
        try:
            n = self._resp.readinto(buf)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ConnectionError(f"connection to {self._pool.config.host} failed mid-answer: {exc}") from exc
        if n == 0 or self._resp.isclosed():
            self._finish()
        return n

    def read(self, cap: int) -> bytes:
        """The whole body; ValueError if it is longer than `cap` bytes."""
        length = self._resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > cap:
            self.close()
            raise ValueError(f"{length} bytes is more than the {cap} allowed")
        try:
            body = self._resp.read(cap + 1)
            more = self._resp.read(1) if len(body) <= cap and not self._resp.isclosed() else b""
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ConnectionError(f"connection to {self._pool.config.host} failed mid-answer: {exc}") from exc
        if len(body) > cap or more:
            self.close()
            raise ValueError(f"more than the {cap} bytes allowed")
        self._finish()
        return body

    def _finish(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self._resp.isclosed() and not self._resp.will_close:
                self._pool.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
        self._resp.close()

    def __enter__(self) -> FastResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ConnectionPool:
    """Kept-alive connections to one registry, each used by one request at a time."""

    def __init__(self, config: FastPathConfig) -> None:
        self.config = config
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self.disabled = proxied(config.host, config.tls)

    def _new(self) -> http.client.HTTPConnection:
        c = self.config
        if c.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=c.ca_file)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                c.host, timeout=c.connect_timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(c.host, timeout=c.connect_timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(c.read_timeout)
        return conn

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.config.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def get(self, path: str, headers: dict[str, str]) -> FastResponse:
        """GET `path` (absolute, e.g. /v2/...).  FastPathUnusable when no connection could be
        made or TLS failed (the general path then reports or recovers); socket.timeout when the
        registry did not answer in time."""
        if self.disabled:
            raise FastPathUnusable("disabled")
        hdrs = {"User-Agent": self.config.user_agent, **headers} if self.config.user_agent else headers
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle and attempt == 0 else None
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._new()
                conn.request("GET", path, headers=hdrs)
                return FastResponse(self, conn, conn.getresponse())
            except socket.timeout:
                if conn is not None:
                    conn.close()
                raise
            except ssl.SSLError as exc:
                if conn is not None:
                    conn.close()
                self.disabled = True  # e.g. a CA only requests' bundle knows: leave TLS to it
                raise FastPathUnusable(str(exc)) from exc
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                if reused:  # the registry closed an idle connection: one more on a new one
                    continue
                raise FastPathUnusable(str(exc)) from exc
        raise FastPathUnusable("no connection")  # pragma: no cover - the loop returns or raises

    def send(self, path: str, headers: dict[str, str]) -> "Sent | None":
        """Send a GET on a new connection and return without waiting for the answer (None if
        that cannot be done): the answer is read later, possibly by a forked child, which
        inherits the socket."""
        if self.disabled:
            return None
        hdrs = {"User-Agent": self.config.user_agent, **headers} if self.config.user_agent else headers
        conn = None
        try:
            conn = self._new()
            conn.request("GET", path, headers=hdrs)
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            return None
        return Sent(self, conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Sent:
    """A request sent on its own connection whose answer is not read yet."""

    def __init__(self, pool: ConnectionPool, conn: http.client.HTTPConnection) -> None:
        self._pool, self._conn = pool, conn

    def answer(self) -> FastResponse:
        """The answer (ConnectionError if there is none)."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise ConnectionError("answer already taken")
        try:
            return FastResponse(self._pool, conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionError(f"no answer from {self._pool.config.host}: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
