"""What stands between a client and the routes (plain ASGI middleware, outermost first):
the access log, the Host and Origin check, the token check, and the upload limit enforced
while the body is read."""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import sys
import time

PUBLIC_PATHS = {"/health"}
PAGE_PATHS = ("/", "/static/")   # a browser asks for these itself: answer 401 with a Basic challenge
DRAIN_MAX = 16 * 1024 * 1024     # bytes read and dropped after an over-limit upload, so the client sees the 413
CLOSE = (b"connection", b"close")   # after a 413 the connection ends: the rest of the body is never read


class UploadTooLarge(Exception):
    """The request body went over --max-upload-mb (raised from inside receive())."""

    def __init__(self, limit: int):
        super().__init__(f"upload larger than {limit / 2 ** 20:g} MB (--max-upload-mb)")


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def write_line(text: str) -> None:
    """One line on stderr: the server's log (its own output, so ECLIP_QUIET does not silence it)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class AccessLog:
    """One line per request on stderr: client, request line, status, bytes, milliseconds.

    Only the path is written (no query string, no header), so neither captions typed into a
    search nor the token ever reach the log."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, size, logged = time.perf_counter(), [0], [0], [False]

        def log():
            if not logged[0]:
                logged[0] = True
                host, port = scope.get("client") or ("-", 0)
                ms = 1000 * (time.perf_counter() - start)
                write_line(f'{host}:{port} "{scope["method"]} {scope["path"]} HTTP/{scope["http_version"]}" '
                           f'{status[0] or 500} {size[0]} {ms:.1f}ms')

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                size[0] += len(message.get("body", b""))
                if not message.get("more_body"):
                    log()          # before the client has its answer: the log never lags behind it
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            log()


LOCAL_NAMES = ("localhost",)


def split_host(value: str) -> tuple[str, int | None]:
    """'Name:port', '[::1]:port' or a bare name -> (lower-case name without brackets or a final
    dot, port or None); ('', None) when it is not a host at all."""
    value = value.strip().lower()
    port = None
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return "", None
        port = int(rest[1:]) if rest else None
    else:
        name, colon, rest = value.rpartition(":")
        if not colon:
            name = value
        elif rest.isdigit() and ":" not in name:
            port = int(rest)
        else:
            return "", None
    name = name.rstrip(".")
    if not name or any(c in name for c in "/\\@ ?#"):
        return "", None
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


class HostCheck:
    """Answer only requests addressed to this server, as Jupyter does (DNS rebinding).

    A page on another site whose name the attacker points at 127.0.0.1 is same-origin with
    this server in the browser, which then sends `Host: that-name`: refused (403) unless the
    name is localhost, the --host name, an --allowed-host entry ('NAME' any port, 'NAME:PORT'
    that port, '*' any name), or an IP address (a name the browser resolved cannot arrive as an
    IP literal). A request with an `Origin` (browsers send one with every cross-origin request
    and every POST) must come from the origin it is addressed to, or from an --allowed-host name
    (a proxy that rewrites the Host): a page elsewhere can neither send uploads nor read answers."""

    def __init__(self, app, names=(), entries=()):
        self.app = app
        self.names = {split_host(n)[0] for n in (*LOCAL_NAMES, *names)} - {""}
        self.any = "*" in entries
        self.entries = {split_host(e) for e in entries if e != "*"}

    def allowed(self, host: str) -> bool:
        name, port = split_host(host)
        if not name:
            return False
        return (self.any or _is_ip(name) or name in self.names or (name, None) in self.entries
                or (name, port) in self.entries)

    def origin_allowed(self, origin: str, host: str) -> bool:
        """`Origin: http://NAME[:PORT]` names the same host and port as the `Host` header, or an
        --allowed-host entry ('*' is no origin's name: it only widens the Host check)."""
        scheme, sep, rest = origin.strip().lower().partition("://")
        if not sep or scheme not in ("http", "https"):
            return False             # 'null' (a sandboxed or file:// page) and anything odd
        default = 443 if scheme == "https" else 80
        (name, port), (host_name, host_port) = split_host(rest), split_host(host)
        if not name:
            return False
        port = port or default
        return ((name, port) == (host_name, host_port or default) or (name, None) in self.entries
                or (name, port) in self.entries)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host")      # HTTP/1.1 always has one (h11 refuses a request without)
        if host is not None and not self.allowed(host.decode("latin-1")):
            return await send_json(send, 403, {"error": "this server does not answer to that Host name "
                                                        "(start it with --allowed-host NAME to add one)"})
        origin = headers.get(b"origin")
        if origin is not None and not self.origin_allowed(origin.decode("latin-1"), (host or b"").decode("latin-1")):
            return await send_json(send, 403, {"error": "cross-origin request refused: the page must come "
                                                        "from this server"})
        return await self.app(scope, receive, send)


class TokenAuth:
    """Every path but /health needs `Authorization: Bearer TOKEN` (constant-time comparison).

    A browser cannot add a Bearer header to the page it navigates to, so HTTP Basic with the
    token as the password (any user name) is accepted too: the browser asks once and sends it
    with every later request of the page."""

    def __init__(self, app, token: str):
        self.app, self._token = app, token.encode()

    def _allowed(self, header: bytes) -> bool:
        scheme, _, value = header.strip().partition(b" ")
        value = value.strip()
        if scheme.lower() == b"basic":
            try:
                value = base64.b64decode(value, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value, self._token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if self._allowed(header):
            return await self.app(scope, receive, send)
        page = scope["path"] == "/" or scope["path"].startswith(PAGE_PATHS[1])
        challenge = b'Basic realm="eclip"' if page else b'Bearer realm="eclip"'
        await send_json(send, 401, {"error": "missing or wrong token: send Authorization: Bearer TOKEN"},
                        [(b"www-authenticate", challenge)])


class BodyLimit:
    """Refuse a request body over `limit` bytes: at once when Content-Length says so, else as
    soon as the bytes read cross the limit (nothing past it is kept). Routes see UploadTooLarge
    raised from receive(); a declared length is answered here without reading the body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.limit:
            if b"100-continue" not in headers.get(b"expect", b"").lower() and int(declared) <= self.limit + DRAIN_MAX:
                await _drain(receive, DRAIN_MAX)   # the client is sending it anyway; let it finish and read our answer
            await send_json(send, 413, {"error": str(UploadTooLarge(self.limit))}, [CLOSE])
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body"):
                        await _drain(receive, DRAIN_MAX)
                    raise UploadTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


async def _drain(receive, most: int) -> None:
    """Read and drop up to `most` bytes of the rest of a request body."""
    dropped = 0
    while dropped <= most:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body"):
            return
