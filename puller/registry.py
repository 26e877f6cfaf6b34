"""HTTP client of one registry host (Distribution API v2).

Built on oras-py's `Registry`: its requests session (cookie policy, TLS
verification or a custom CA bundle) and its `TokenAuth` backend (parsing the
Bearer challenge, anonymous and basic-authenticated token requests).  We go
around oras for the request loop itself: its `do_request` retries with sleeps
of 2+3**n seconds and no socket timeouts, so a dead registry would hang a pull
for minutes.  Here every request has socket timeouts and all retries of one
request share a bounded time budget.  Basic challenges (htpasswd registries)
are answered here, since oras's TokenAuth only speaks Bearer.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import requests


from .auth import Credentials, credentials_from_docker_config, parse_challenge
from .digest import validate_digest
from .errors import AnswerTooLarge, NotFound, RegistryError, RegistryUnavailable, Unauthorized
from .fasthttp import ConnectionPool, FastPathConfig, FastPathUnusable, FastResponse

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 << 20
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class RegistryOptions:
    """How to reach registries.  `timeout` bounds all retries of one request."""

    plain_http: frozenset[str] = frozenset()  # host[:port] spoken to over plain HTTP
    ca_file: str | None = None  # PEM bundle trusted for TLS instead of the system's
    credentials: Credentials | None = None
    auth_file: str | None = None  # docker config.json
    timeout: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    user_agent: str = "sandbox-agent-puller/0.1"

    def credentials_for(self, host: str) -> Credentials | None:
        if self.credentials is not None:
            return self.credentials
        if self.auth_file:
            return credentials_from_docker_config(self.auth_file, host)
        return None


def _timeout_adapter(timeout: tuple[float, float]):
    """A requests adapter that gives requests made inside oras (token fetches) a socket
    timeout too."""
    import requests.adapters

    class TimeoutAdapter(requests.adapters.HTTPAdapter):
        def __init__(self) -> None:
            super().__init__(max_retries=0, pool_maxsize=16)

        def send(self, request, **kwargs):  # type: ignore[override]
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout
            return super().send(request, **kwargs)

    return TimeoutAdapter()


@dataclass
class SmallAnswer:
    """A whole small answer (manifest, config, referrers list)."""

    body: bytes
    content_type: str
    headers: dict[str, str]  # lower-case names
    url: str


@dataclass
class ManifestResponse:
    body: bytes
    content_type: str
    docker_content_digest: str | None
    url: str


def _error_text(resp: requests.Response) -> str:
    try:
        data = resp.json()
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors:
            return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors if isinstance(e, dict))
    except ValueError:
        pass
    return (resp.text or resp.reason or "")[:200]


def _error_text_of(body: bytes, reason: str) -> str:
    """_error_text for an answer read on the fast path."""
    try:
        data = json.loads(body)
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors:
            return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors if isinstance(e, dict))
    except ValueError:
        pass
    return (body.decode(errors="replace") or reason or "")[:200]


class RangeReader:
    """The body of a range answer, read with readinto() (either path)."""

    def __init__(self, fast: FastResponse | None, slow: requests.Response | None) -> None:
        self._fast, self._slow = fast, slow

    def readinto(self, buf) -> int:
        if self._fast is not None:
            return self._fast.readinto(buf)
        try:
            return self._slow.raw.readinto(buf)
        except Exception as exc:  # urllib3's ProtocolError and friends: a cut connection
            raise ConnectionError(str(exc)) from exc

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        else:
            self._slow.close()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RegistryClient:
    """Talks to one registry host; thread-safe for concurrent blob downloads.

    requests and oras (about 0.13 s of imports) are loaded on the first request the lean
    path cannot make: a lazy start's daemon usually never needs them."""

    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.host = host
        self.options = options or RegistryOptions()
        self._plain = plain = host in self.options.plain_http
        self._verify: bool | str = self.options.ca_file or True
        self.base = f"{'http' if plain else 'https'}://{host}/v2/"
        self._creds = self.options.credentials_for(host)
        self._auth_header: dict[str, str] = {}
        self._oras_registry = None
        self._session_lock = threading.Lock()
        self._fast = ConnectionPool(FastPathConfig(
            host, tls=not plain, ca_file=self.options.ca_file, connect_timeout=self.options.connect_timeout,
            read_timeout=min(self.options.read_timeout, self.options.timeout), user_agent=self.options.user_agent))
        self._fast_blobs = True  # False once a blob GET was redirected (blobs then live elsewhere)

    @property
    def _oras(self):
        """oras-py's Registry: the requests session and the token-auth backend."""
        if self._oras_registry is None:
            with self._session_lock:
                if self._oras_registry is None:
                    import oras.provider
                    reg = oras.provider.Registry(hostname=self.host, insecure=self._plain, tls_verify=self._verify)
                    reg.session.headers["User-Agent"] = self.options.user_agent
                    adapter = _timeout_adapter((self.options.connect_timeout, self.options.read_timeout))
                    reg.session.mount("http://", adapter)
                    reg.session.mount("https://", adapter)
                    if self._creds is not None:
                        reg.auth.set_basic_auth(self._creds.username, self._creds.password)
                    self._oras_registry = reg
        return self._oras_registry

    @property
    def session(self) -> requests.Session:
        return self._oras.session

    # -- fast path ------------------------------------------------------------
    def _fast_get(self, path: str, headers: dict[str, str], ok: tuple[int, ...], what: str) -> FastResponse | None:
        """The GET on the lean path when it gets an `ok` answer; None when the general path
        must do it (no usable connection, a challenge, a redirect, a retryable error)."""
        blob = "/blobs/" in path
        if blob and not self._fast_blobs:
            return None
        try:
            resp = self._fast.get("/v2/" + path, {**headers, **self._auth_header})
        except FastPathUnusable:
            return None
        except socket.timeout:
            raise RegistryUnavailable(f"{what}: registry {self.host} gave no answer within "
                                      f"{self._fast.config.read_timeout:g}s (Timeout waiting for the answer)") from None
        if resp.status in ok:
            return resp
        if resp.status == 404:
            try:
                body = resp.read(64 << 10)
            except (ValueError, ConnectionError):
                body = b""
            raise NotFound(f"{what}: not found on {self.host}: {_error_text_of(body, resp.reason)}", status=404)
        if blob and 300 <= resp.status < 400:
            self._fast_blobs = False
        resp.close()
        return None

    def get_small(self, path: str, *, headers: dict[str, str] | None = None, cap: int, what: str,
                  ok: Iterable[int] = (200,)) -> SmallAnswer:
        """GET a small answer whole (at most `cap` bytes), on the lean path when it can."""
        ok = tuple(ok)
        headers = headers or {}
        resp = self._fast_get(path, headers, ok, what)
        if resp is not None:
            try:
                body = resp.read(cap)
            except ValueError as exc:
                raise AnswerTooLarge(f"{what}: {exc}") from None
            except ConnectionError:
                pass  # cut mid-answer: the general path retries within its time budget
            else:
                return SmallAnswer(body, resp.header("Content-Type").split(";")[0].strip(),
                                   {k.lower(): v for k, v in resp.headers.items()}, self.base + path)
        slow = self.request("GET", path, stream=True, headers=headers, ok=ok, what=what)
        with slow:
            body = _read_capped(slow, cap, what)
        return SmallAnswer(body, slow.headers.get("Content-Type", "").split(";")[0].strip(),
                           {k.lower(): v for k, v in slow.headers.items()}, slow.url)

    def send_range(self, repository: str, digest: str, start: int, end: int):
        """Send the GET of bytes [start, end) of a blob without waiting (see open_range's
        `sent`); None when the lean path cannot."""
        if not self._fast_blobs:
            return None
        return self._fast.send(f"/v2/{repository}/blobs/{digest}",
                               {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity",
                                **self._auth_header})

    def open_range(self, repository: str, digest: str, start: int, end: int, what: str,
                   sent=None) -> RangeReader:
        """Stream bytes [start, end) of a blob (a 206 answer whose length is checked)."""
        path = f"{repository}/blobs/{digest}"
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        fast = None
        if sent is not None:  # the request went out earlier (send_range): its answer, if usable
            try:
                fast = sent.answer()
            except ConnectionError:
                fast = None
            if fast is not None and fast.status != 206:
                fast.close()
                fast = None
        if fast is None:
            fast = self._fast_get(path, headers, (206,), what)
        length = fast.header("Content-Length") if fast is not None else ""
        slow = None
        if fast is None:
            slow = self.request("GET", path, stream=True, ok=(206,), headers=headers, what=what)
            length = slow.headers.get("Content-Length", "")
        reader = RangeReader(fast, slow)
        if length and length.isdigit() and int(length) != end - start:
            reader.close()
            raise RegistryError(f"{what}: registry announces {length} bytes for a range of {end - start}")
        return reader

    # -- request loop -------------------------------------------------------
    def _authenticate(self, resp: requests.Response, headers: dict[str, str]) -> bool:
        """Answer a 401 challenge; True if the request is worth repeating."""
        raw = resp.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(raw) if raw else ("", {})
        if scheme == "basic":
            if self._creds is None:
                return False
            self._auth_header = {"Authorization": f"Basic {self._creds.basic_token()}"}
            return True
        if scheme == "bearer":
            if not params.get("realm", "").startswith(("https://", "http://")):
                raise Unauthorized(f"{self.host}: bearer challenge without a usable realm: {raw[:200]!r}")
            new, ok = self._oras.auth.authenticate_request(resp, dict(headers), refresh=True)
            if not ok or "Authorization" not in new:
                return False
            self._auth_header = {"Authorization": new["Authorization"]}
            return True
        return False

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        ok: Iterable[int] = (200,),
        what: str = "",
    ) -> requests.Response:
        """One API request with bounded retries; raises on a non-`ok` status."""
        import requests
        url = path if path.startswith(("http://", "https://")) else self.base + path
        what = what or f"{method} {url}"
        deadline = time.monotonic() + self.options.timeout
        attempt = 0
        auth_tried = False
        last_error = ""
        ok = tuple(ok)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RegistryUnavailable(
                    f"{what}: registry {self.host} gave no usable answer within "
                    f"{self.options.timeout:g}s ({attempt} attempts; last error: {last_error})"
                )
            attempt += 1
            hdrs = dict(headers or {})
            hdrs.update(self._auth_header)
            timeout = (min(self.options.connect_timeout, remaining), min(self.options.read_timeout, remaining))
            try:
                resp = self.session.request(method, url, headers=hdrs, stream=stream,
                                            timeout=timeout, verify=self._verify, allow_redirects=True)
            except requests.exceptions.SSLError as exc:
                # A certificate problem does not go away by retrying.
                raise RegistryError(f"{what}: TLS error talking to {self.host}: {exc}") from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.debug("%s: attempt %d failed: %s", what, attempt, last_error)
                self._backoff(attempt, deadline)
                continue
            if resp.status_code in ok:
                return resp
            if resp.status_code == 401 and not auth_tried:
                auth_tried = True
                resp.close()
                try:
                    authed = self._authenticate(resp, hdrs)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    last_error = f"token request failed: {exc}"[:300]
                    auth_tried = False
                    self._backoff(attempt, deadline)
                    continue
                if authed:
                    continue
            if resp.status_code in (401, 403):
                raise Unauthorized(f"{what}: {self.host} refused access ({resp.status_code}): {_error_text(resp)}",
                                   status=resp.status_code)
            if resp.status_code == 404:
                raise NotFound(f"{what}: not found on {self.host}: {_error_text(resp)}", status=404)
            if resp.status_code in _RETRY_STATUS:
                last_error = f"HTTP {resp.status_code} {_error_text(resp)}"
                resp.close()
                self._backoff(attempt, deadline)
                continue
            raise RegistryError(f"{what}: {self.host} answered {resp.status_code}: {_error_text(resp)}",
                                status=resp.status_code)

    @staticmethod
    def _backoff(attempt: int, deadline: float) -> None:
        delay = min(0.1 * (2 ** (attempt - 1)), 2.0, max(0.0, deadline - time.monotonic()))
        if delay > 0:
            time.sleep(delay)

    # -- API ------------------------------------------------------------------
    def get_manifest(self, repository: str, selector: str, accept: Iterable[str]) -> ManifestResponse:
        """Fetch raw manifest bytes by tag or digest (digest validated first)."""
        if ":" in selector:
            selector = validate_digest(selector, what=f"manifest digest for {repository}")
        what = f"manifest {repository}:{selector}" if ":" not in selector else f"manifest {repository}@{selector}"
        answer = self.get_small(f"{repository}/manifests/{selector}", headers={"Accept": ", ".join(accept)},
                                cap=MAX_MANIFEST_BYTES, what=what)
        return ManifestResponse(body=answer.body, content_type=answer.content_type,
                                docker_content_digest=answer.headers.get("docker-content-digest"), url=answer.url)

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> requests.Response:
        """Start a streaming GET of a blob (from `offset` with a Range request); the caller
        verifies what it reads."""
        digest = validate_digest(digest, what=f"blob digest in {repository}")
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return self.request("GET", f"{repository}/blobs/{digest}", stream=True, headers=headers,
                            ok=(200, 206) if offset else (200,), what=f"blob {repository}@{digest}")

    def referrers(self, repository: str, digest: str, artifact_type: str | None = None) -> dict | None:
        """The referrers API answer (an image index) or None if not supported."""
        digest = validate_digest(digest, what="subject digest")
        path = f"{repository}/referrers/{digest}"
        params = f"?artifactType={urllib.parse.quote(artifact_type, safe='')}" if artifact_type else ""
        try:
            answer = self.get_small(path + params, headers={"Accept": "application/vnd.oci.image.index.v1+json"},
                                    cap=MAX_MANIFEST_BYTES, what=f"referrers of {repository}@{digest}")
        except NotFound:
            return None
        body, ctype = answer.body, answer.content_type
        if ctype != "application/vnd.oci.image.index.v1+json":
            # Registries without the API may answer 200 with something else.
            return None
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise RegistryError(f"referrers of {repository}@{digest}: answer is not JSON: {exc}") from exc
        return data if isinstance(data, dict) else None

    def close(self) -> None:
        self._fast.close()
        if self._oras_registry is not None:
            self._oras_registry.session.close()


def _read_capped(resp: requests.Response, cap: int, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cap:
        raise AnswerTooLarge(f"{what}: {length} bytes is more than the {cap} allowed")
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_content(65536):
        total += len(chunk)
        if total > cap:
            raise AnswerTooLarge(f"{what}: more than the {cap} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)
