"""`eclip serve`: the model (and a gallery) behind an HTTP API and a web page."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (Checkpoint, Device, Engine, EngineOpt, Model, Precision, PrecisionOpt, Pretrained,
                               Search, SearchOpt, Seed, model_spec, user_errors)

HELP = """Serve matching and gallery search over HTTP, with a web page at /.

\b
Endpoints:
  POST /match     image=@FILE (1+), caption=TEXT (1+), threshold
                  -> the JSON of `eclip match --json`
  GET  /search    ?q=CAPTION&k=N -> top-K gallery images, thumbnail URLs
  POST /search    image=@FILE, k, target=images|texts
  GET  /image/ID  thumbnail of gallery image row ID
  GET  /health    model, gallery size, version (no token needed)
  GET  /          the page: score a photo, search the gallery

\b
Examples:
  eclip serve --checkpoint best.safetensors
  eclip serve --gallery gallery/ --port 8080     the gallery's own model
  eclip serve --host 0.0.0.0 --token-env TOKEN   token from $TOKEN

Binds 127.0.0.1 unless --host says otherwise. With --token-env NAME every endpoint but /health
needs `Authorization: Bearer TOKEN` (a browser may use Basic auth with the token as password).
Answers only requests addressed to localhost, an IP address, the --host name or an
--allowed-host name, and only from its own page when a browser sends an Origin.
Stops cleanly on SIGTERM or Ctrl-C; one access-log line per request on stderr.
"""


@app.command(help=HELP)
def serve(
    gallery: Annotated[Optional[Path], typer.Option(
        "--gallery", show_default=False, help="Folder written by `eclip embed` to search; without model options, its model is used.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, printed at start).")] = 8000,
    token_env: Annotated[Optional[str], typer.Option(
        "--token-env", show_default=False, help="Name of an environment variable holding a token that clients must send "
                            "(Authorization: Bearer TOKEN). The token itself never goes on the command line.")] = None,
    max_upload_mb: Annotated[float, typer.Option(
        "--max-upload-mb", help="Largest request body accepted, in MB; a larger upload gets 413.")] = 20.0,
    batch_wait_ms: Annotated[float, typer.Option(
        "--batch-wait-ms", help="How long the model waits for requests that are still arriving, to encode "
                                "them in one batch (a lone request never waits).")] = 10.0,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Images encoded in one forward pass at most.")] = 32,
    allowed_host: Annotated[Optional[List[str]], typer.Option(
        "--allowed-host", show_default=False, help="Another Host name clients use to reach the server (NAME, NAME:PORT, "
                                                  "or '*' for any; repeatable). Refused otherwise: DNS rebinding.")] = None,
    max_connections: Annotated[Optional[int], typer.Option(
        "--max-connections", show_default=False, help="Open connections at most; more are answered 503 and closed "
                                                     "[default: 500, or what `ulimit -n` leaves room for].")] = None,
    read_timeout: Annotated[float, typer.Option(
        "--read-timeout", help="Seconds a request's head may take to arrive, and the longest pause within its "
                               "body; a slower connection is closed.")] = 20.0,
    decode_megapixels: Annotated[float, typer.Option(
        "--decode-megapixels", help="Decoded image pixels (millions) held at once by all requests together; "
                                    "more waits (a larger single image waits until it is alone).")] = 50.0,
    search: SearchOpt = Search.auto,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = None,
    precision: PrecisionOpt = Precision.fp32,
    seed: Seed = None,
    engine: EngineOpt = Engine.auto,
):
    with user_errors():
        from eclip.serve import ServeOptions
        from eclip.serve import serve as run_server
        options = ServeOptions(gallery=str(gallery) if gallery else None, host=host, port=port, token_env=token_env,
                               max_upload_mb=max_upload_mb, batch_wait_ms=batch_wait_ms, max_batch=max_batch,
                               search=search.value, engine=engine.value, allowed_hosts=tuple(allowed_host or ()),
                               max_connections=max_connections, read_timeout=read_timeout,
                               decode_megapixels=decode_megapixels)
        run_server(model_spec(model, pretrained, checkpoint, device, precision, seed), options)
