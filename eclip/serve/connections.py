"""Connections that cannot hold the server: a read deadline, a connection cap, and one log line
when the process runs out of file descriptors.

uvicorn's own knobs do not cover these: `timeout_keep_alive` only starts after a first answer,
`limit_concurrency` answers 503 only to a request whose head has arrived (a half-open connection
never gets that far, and keeps its file descriptor). So `protocol(...)` is uvicorn's own h11
protocol (which `uvicorn.Config(http=)` takes as a class) with a timer and a count.

Out of file descriptors, asyncio (3.11, 3.12) logs a traceback for each failed accept() and
goes on trying up to `backlog` times in the same turn of the loop (2048 tracebacks a second
under uvicorn), each failure also scheduling a retry; `ListeningSocket` makes the second failure
in a row look like an empty queue, which ends that turn, and `quiet_exhaustion` (the loop's
exception handler) writes one line instead of the traceback.
"""
from __future__ import annotations

import errno
import json
import socket
import time

from eclip.serve.guards import write_line

EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
FD_RESERVE = 32                    # descriptors accept() never takes (see ListeningSocket.accept)
EXHAUSTION_LOG_EVERY = 60.0        # seconds between two lines about the same shortage


def _answer(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def protocol(max_connections: int, read_timeout: float):
    """An H11Protocol class for uvicorn.Config(http=...):

    - past `max_connections` open connections a new one is answered 503 and closed at once,
      so a flood of idle sockets cannot use up the file descriptors;
    - a request's head must arrive whole within `read_timeout` seconds of its first byte (or of
      the connection), and its body may pause no longer than that between two reads (unless the
      server itself stopped reading): else 408 (head) or the connection is closed (body)."""
    busy = _answer("503 Service Unavailable", f"too many connections (--max-connections {max_connections}); "
                                              "try again")
    late = _answer("408 Request Timeout", f"the request did not arrive within {read_timeout:g} s (--read-timeout)")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _read_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch(data)

        def on_response_complete(self) -> None:
            self._stop_watch()   # the next request's deadline starts with its first byte
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._stop_watch()
            super().connection_lost(exc)

        def _watch(self, data: bytes = b"") -> None:
            """Arm the deadline that fits where the client is: the head (never re-armed), the body
            (re-armed at every read), or nothing (the request is in: answering is our part)."""
            state = self.conn.their_state
            if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
                self._stop_watch()
            elif state is h11.SEND_BODY:
                self._arm("body")
            elif self._read_timer is None and (data or self.cycle is None):
                self._arm("head")

        def _arm(self, phase: str) -> None:
            self._stop_watch()
            self._read_timer = self.loop.call_later(read_timeout, self._timed_out, phase)

        def _stop_watch(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self, phase: str) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            if phase == "body" and self.flow.read_paused:   # we stopped reading, not the client
                return self._arm("body")
            if phase == "head" and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(late)
            self.transport.close()

    return GuardedH11


class ListeningSocket(socket.socket):
    """A listening socket whose accept() fails once when the process is out of resources, then
    reports an empty queue until asyncio's retry a second later (see the module's docstring).

    Its first listen() sets the kernel's queue; later ones (asyncio's create_server calls it
    again with the `backlog` it also uses as the number of accepts in one turn of the loop) are
    ignored, so the queue stays long while the accepts in one turn stay few: connections over
    the cap are closed before the next turn accepts more, and cannot pile up past the limit."""

    _failed = _listening = False

    def listen(self, *backlog):
        if not self._listening:
            super().listen(*backlog)
            self._listening = True

    def accept(self):
        if self._failed:
            self._failed = False
            raise BlockingIOError(errno.EAGAIN, "retry later")
        try:
            conn, address = super().accept()
        except OSError as e:
            self._failed = e.errno in EXHAUSTION
            raise
        # New descriptors take the lowest free number, so a high one means the table is nearly
        # full: under load the loop can accept again before the connections over the cap are
        # closed. Shed this one (the client sees a reset) and end the turn, keeping FD_RESERVE
        # descriptors free for the model, the log and uploads.
        limit = open_file_limit()
        if limit is not None and conn.fileno() >= limit - FD_RESERVE:
            conn.close()
            raise BlockingIOError(errno.EAGAIN, "near the open-file limit")
        return conn, address


def open_file_limit() -> int | None:
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def quiet_exhaustion(loop, context) -> None:
    """Event-loop exception handler: 'out of file descriptors' (or buffers, or memory) while
    accepting is one line, then at most one a minute; asyncio itself retries the accept a second
    later. Everything else goes to asyncio's default handler."""
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno in EXHAUSTION:
        now, last = time.monotonic(), getattr(loop, "_eclip_exhaustion_logged", None)
        if last is None or now - last >= EXHAUSTION_LOG_EVERY:
            loop._eclip_exhaustion_logged = now
            write_line(f"eclip serve: cannot accept connections: {error.strerror} (new connections wait; "
                       f"raise the limit, `ulimit -n`, or lower --max-connections); said once a minute at most")
        return
    handle = context.get("handle")
    if isinstance(error, ValueError) and getattr(getattr(handle, "_callback", None), "__name__", "") == "_start_serving":
        return   # asyncio's retry of an accept, due after the server closed its socket: nothing to serve
    loop.default_exception_handler(context)
