"""What stands between a client and the routes (plain ASGI middleware, outermost first):
the access log, the token check, and the upload limit enforced while the body is read."""
from __future__ import annotations

import base64
import hmac
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
