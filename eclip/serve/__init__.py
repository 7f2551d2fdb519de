"""`eclip serve`: the model behind an HTTP API and a web page, loaded once.

    from eclip.serve import ServeOptions, serve
    serve(ModelSpec(checkpoint="best.safetensors"), ServeOptions(gallery="gallery/", port=8000))

Starlette routes (`app.py`) on uvicorn; one model thread fed by `batching.Batcher`; the
Host/Origin and token checks, the upload limit and the access log in `guards.py`; the read
deadline and connection cap in `connections.py`; the decoded-pixel budget in `pixels.py`;
the page in `page/`.
Inputs are checked and the port is bound before the model loads, so a mistake or a busy port
is reported at once.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

from eclip.errors import EclipError
from eclip.serve.batching import DEFAULT_MAX_IMAGES, DEFAULT_MAX_WAIT
from eclip.serve.connections import open_file_limit


@dataclass
class ServeOptions:
    gallery: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    token_env: str | None = None        # name of the environment variable holding the token
    max_upload_mb: float = 20.0
    batch_wait_ms: float = DEFAULT_MAX_WAIT * 1000     # how long the model thread waits for requests still arriving
    max_batch: int = DEFAULT_MAX_IMAGES                # images in one forward pass
    search: str = "auto"                # gallery search method (eclip.gallery.METHODS)
    engine: str | None = None           # auto | onnx | torch (eclip.runtime.engine); None: $ECLIP_ENGINE or auto
    allowed_hosts: tuple = field(default_factory=tuple)   # Host names answered besides localhost, IPs and --host
    max_connections: int | None = None  # open connections at most; None: what the open-file limit allows, <= 500
    read_timeout: float = 20.0          # seconds for a request's head, and the longest pause in its body
    decode_megapixels: float = 50.0     # decoded image pixels held at once by all requests together


DEFAULT_MAX_CONNECTIONS = 500
FILES_PER_CONNECTION = 2         # its socket, and the temporary file of an upload spooled to disk
FILES_KEPT = 64                  # for the model, the gallery, the log and the libraries
BACKLOG = 2048                   # the kernel's queue of connections not yet accepted (uvicorn's default)
ACCEPT_BATCH = 128               # connections asyncio accepts in one turn of the loop (connections.ListeningSocket)


def connection_cap(options: ServeOptions) -> int:
    """--max-connections, or the most the open-file limit (`ulimit -n`) leaves room for (at most 500)."""
    limit = open_file_limit()
    room = None if limit is None else max(1, (limit - FILES_KEPT - ACCEPT_BATCH) // FILES_PER_CONNECTION)
    if options.max_connections is None:
        return min(DEFAULT_MAX_CONNECTIONS, room or DEFAULT_MAX_CONNECTIONS)
    if room is not None and options.max_connections > room:
        raise EclipError(f"--max-connections {options.max_connections}: the open-file limit (ulimit -n) is {limit}, "
                         f"room for {room} connections; raise the limit or lower --max-connections")
    return options.max_connections


def check_options(options: ServeOptions) -> str | None:
    """EclipError for options that cannot work; returns the token (None without --token-env)."""
    from eclip.gallery import METHODS
    if not 0 <= options.port <= 65535:
        raise EclipError(f"--port {options.port}: must be between 0 and 65535 (0: any free port)")
    if not options.max_upload_mb > 0:
        raise EclipError(f"--max-upload-mb {options.max_upload_mb}: must be more than 0")
    if options.batch_wait_ms < 0 or options.max_batch < 1:
        raise EclipError("--batch-wait-ms must be 0 or more and --max-batch at least 1")
    if options.search not in METHODS:
        raise EclipError(f"--search {options.search}: one of {', '.join(METHODS)}")
    if options.max_connections is not None and options.max_connections < 1:
        raise EclipError(f"--max-connections {options.max_connections}: must be at least 1")
    if not options.read_timeout > 0 or not options.decode_megapixels > 0:
        raise EclipError("--read-timeout and --decode-megapixels must be more than 0")
    from eclip.serve.guards import split_host
    for entry in options.allowed_hosts:
        if entry != "*" and not split_host(entry)[0]:
            raise EclipError(f"--allowed-host {entry!r}: a host name, NAME:PORT, or '*'")
    connection_cap(options)
    if options.token_env is None:
        return None
    token = os.environ.get(options.token_env, "")
    if not token.strip():
        raise EclipError(f"--token-env {options.token_env}: that environment variable is not set or empty")
    if len(token.strip()) < 16:
        raise EclipError(f"--token-env {options.token_env}: the token is shorter than 16 characters")
    return token.strip()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; EclipError when the address is busy or not ours. It listens at once:
    two servers binding the same port at the same moment may both bind (SO_REUSEADDR), and only
    the first listen() wins, so the loser must find out here, not in uvicorn."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise EclipError(f"--host {host}: cannot resolve ({e.strerror})") from None
    from eclip.serve.connections import ListeningSocket
    family, kind, proto, _, address = infos[0]
    sock = ListeningSocket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise EclipError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def model_info(matcher) -> dict:
    """What /health says about the model: names and digests, no paths of this machine."""
    identity = matcher.model.identity()

    def name(value):
        text = str(value or "")
        if not text or text.startswith("hf-hub:"):
            return value
        if text.startswith("local-dir:"):
            return "local-dir:" + os.path.basename(text[len("local-dir:"):].rstrip("/"))
        return os.path.basename(text.rstrip("/")) if os.sep in text or os.path.exists(text) else text

    return {"name": name(getattr(matcher.model, "name", None)), "engine": getattr(matcher.model, "engine", None),
            "model": name(identity.get("model")),
            "pretrained": name(identity.get("pretrained")), "checkpoint": name(identity.get("checkpoint")),
            "checkpoint_sha256": identity.get("checkpoint_sha256"), "device": str(matcher.device),
            "precision": matcher.precision}


class Server:
    """A bound socket, the app and uvicorn. run() serves until SIGTERM / Ctrl-C (main thread) or stop()."""

    def __init__(self, matcher, options: ServeOptions, store=None, token: str | None = None, sock=None):
        import uvicorn

        from eclip.serve.app import ServerState, build_app
        from eclip.serve.batching import Batcher
        from eclip.serve.connections import protocol
        from eclip.serve.pixels import PixelBudget
        self.socket = sock or bind(options.host, options.port)
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.guarded = bool(token)
        self.socket_is_loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        batcher = Batcher(matcher, max_wait=options.batch_wait_ms / 1000, max_images=options.max_batch)
        if store is not None:   # read the vectors and tables now, not in the first request
            for kind in ("images", "texts"):
                if store.has(kind):
                    store.vectors(kind), store.table(kind)
        self.state = ServerState(batcher, store, options.search, model_info(matcher),
                                 pixels=PixelBudget(options.decode_megapixels * 1e6))
        app = build_app(self.state, token, int(options.max_upload_mb * 2 ** 20), (options.host,), options.allowed_hosts)
        http = protocol(connection_cap(options), options.read_timeout)
        config = uvicorn.Config(app, http=http, log_config=None, log_level="warning", access_log=False,
                                lifespan="on", server_header=False, timeout_graceful_shutdown=10, backlog=ACCEPT_BATCH)
        self._uvicorn = _Uvicorn(config, on_started=self._started)
        self.started = threading.Event()

    def _started(self):
        from eclip.serve.guards import write_line
        write_line(f"eclip serve: listening on {self.url} (Ctrl-C to stop)")
        if not self.guarded and not self.socket_is_loopback:
            write_line("eclip serve: warning: not on a loopback address and no --token-env: anyone who can "
                       "reach this port can use the model and read the gallery")
        self.started.set()

    def run(self) -> None:
        """Serve until stop() or, on the main thread, SIGTERM / Ctrl-C. On the main thread the model
        loop keeps it and uvicorn gets another (the reason: eclip.serve.batching). The model loop
        ends after uvicorn's graceful shutdown, so the requests in flight are answered."""
        batcher, failure = self.state.batcher, []

        def http():
            try:
                self._uvicorn.run(sockets=[self.socket])
            except BaseException as e:   # re-raised by run() below
                failure.append(e)
            finally:
                batcher.stop()           # the model loop ends even when uvicorn never started

        if threading.current_thread() is not threading.main_thread():
            batcher.start()
            http()
        else:
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self._uvicorn.handle_exit) for sig in signals}
            thread = threading.Thread(target=http, name="eclip-serve-http", daemon=True)
            try:
                thread.start()
                batcher.run()
                thread.join()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        self._uvicorn.should_exit = True


class _Uvicorn:
    """uvicorn.Server that announces itself once listening and, after a clean shutdown on SIGTERM
    or Ctrl-C, returns normally (uvicorn re-raises the signal, which would end with status 143/130).
    It never runs on the main thread, so it installs no handlers: Server.run's main thread routes
    the signals to handle_exit."""

    def __new__(cls, config, on_started):
        import asyncio

        import uvicorn

        class Quiet(uvicorn.Server):
            async def startup(self, sockets=None):
                from eclip.serve.connections import quiet_exhaustion
                asyncio.get_running_loop().set_exception_handler(quiet_exhaustion)
                await super().startup(sockets=sockets)
                if self.started:
                    on_started()

            @contextlib.contextmanager
            def capture_signals(self):   # Server.run routes SIGTERM / Ctrl-C to handle_exit
                yield

        return Quiet(config)


def serve(spec, options: ServeOptions) -> None:
    """Check the options, open the gallery, bind, load the model, serve until SIGTERM / Ctrl-C."""
    from eclip.console import note
    token = check_options(options)
    store = None
    if options.gallery:
        from eclip.embedstore import open_store
        from eclip.match import gallery_spec
        store = open_store(options.gallery)
        spec = gallery_spec(store, spec)
    sock = bind(options.host, options.port)
    try:
        from eclip.match import Matcher
        note("eclip serve: loading the model")
        matcher = Matcher.from_spec(spec, options.engine)
        if store is not None:
            store.check_model(matcher.model.identity())
        server = Server(matcher, options, store, token, sock=sock)
    except BaseException:
        sock.close()
        raise
    server.run()
    from eclip.serve.guards import write_line
    write_line("eclip serve: stopped")
