"""`eclip match`: cosine similarity of images and captions, for people and for shell pipelines."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (Checkpoint, Device, Engine, EngineOpt, Json, Model, Precision, PrecisionOpt,
                               Pretrained, Search, SearchOpt, Seed, model_spec, user_errors)


HELP = """Score images against captions (cosine similarity of the CLIP features).

\b
Examples:
  eclip match photo.jpg "Queen Elizabeth II at Windsor"     cosine similarity
  eclip match photo.jpg "a" "b" "c"      scores and softmax over the captions
  eclip match -i a.jpg -i b.jpg "caption" ...                  several images
  eclip match --threshold 0.25 photo.jpg "caption"    exit 0 if the best score
                                                      reaches 0.25, else 1
  eclip match --gallery DIR "caption"     top-K images of an `eclip embed` DIR
  eclip match --gallery DIR photo.jpg            top-K captions for an image
  ... | eclip match -                                 JSON lines, see below

Pipelines: `eclip match -` reads JSON lines {"image": PATH, "text": STR} or {"image": PATH,
"texts": [STR, ...]}, optional "id", and writes one JSON line per input line, in input order,
as soon as it is scored; a bad line becomes {"id", "line", "error"} and the rest go on.

With --gallery, an argument that is an existing file with an image extension is an image
query; anything else is a caption. Without model options, --gallery uses the model recorded
in DIR/manifest.json. Bad input exits with status 2.
"""


@app.command(help=HELP)
def match(
    args: Annotated[Optional[List[str]], typer.Argument(
        help="IMAGE CAPTION..., or CAPTION... with --image, or '-' for JSON lines on stdin, "
             "or QUERY... with --gallery.", show_default=False)] = None,
    image: Annotated[Optional[List[Path]], typer.Option(
        "--image", "-i", show_default=False, help="An image to score (repeat for several); then every argument is a caption.")] = None,
    gallery: Annotated[Optional[Path], typer.Option(
        "--gallery", show_default=False, help="Folder written by `eclip embed`: search it instead of scoring pairs.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Results per query with --gallery.")] = 5,
    search: SearchOpt = Search.auto,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", show_default=False, help="Exit 0 when the best score reaches this value, 1 when not "
                            "(stdin: when every scored line reaches it).")] = None,
    json_: Json = False,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = None,
    precision: PrecisionOpt = Precision.fp32,
    seed: Seed = None,
    engine: EngineOpt = Engine.auto,
):
    args = list(args or [])
    with user_errors():
        from eclip.errors import EclipError
        spec = model_spec(model, pretrained, checkpoint, device, precision, seed)
        engine = engine.value
        if args == ["-"]:
            if image or gallery:
                raise EclipError("match -: reads images and captions from stdin; drop --image / --gallery")
            passed = _stream(spec, engine, threshold)
        elif gallery is not None:
            if image:
                raise EclipError("--gallery: give image queries as arguments, not with --image")
            passed = _gallery(spec, engine, gallery, args, top_k, search.value, threshold, json_)
        else:
            if "-" in args:
                raise EclipError("match: '-' (read stdin) must be the only argument")
            passed = _pairs(spec, engine, list(image or []), args, threshold, json_)
    if threshold is not None:
        raise typer.Exit(0 if passed else 1)


def _pairs(spec, engine, images, args, threshold, json_):
    from eclip.errors import EclipError
    from eclip.match import Matcher, match_pairs, open_images
    if not images:
        if not args:
            raise EclipError("match: give an image and one or more captions (eclip match IMAGE \"caption\" ...)")
        first = args.pop(0)
        if not Path(first).exists():
            raise EclipError(f"{first}: no such image file (the first argument is the image, then captions; "
                             f"or use --image)")
        images = [first]
    if not args:
        raise EclipError("match: give one or more captions after the image")
    from eclip.model.source import resolve_source
    resolve_source(spec)             # bad model options, then a missing, folder or non-image file:
    decoded = open_images(images)    # exit 2 before any model loads
    result = match_pairs(Matcher.from_spec(spec, engine), images, args, decoded=decoded)
    passed = _passed(result["best"]["score"], threshold)
    if json_:
        from eclip.console import print_json
        print_json({**result, "threshold": threshold, "passed": passed})
    elif len(images) == 1 and len(args) == 1:
        typer.echo(f"{result['best']['score']:.4f}")
    else:
        for k, r in enumerate(result["results"]):
            if len(images) > 1:
                typer.echo(("\n" if k else "") + r["image"])
            for m in r["matches"]:
                typer.echo(f"{m['score']:.4f}  {100 * m['prob']:5.1f}%  {m['text']}")
    return passed


def _stream(spec, engine, threshold):
    import json

    from eclip.match import Matcher, match_stream
    matcher = Matcher.from_spec(spec, engine)

    def emit(record):
        try:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        except UnicodeEncodeError:   # a lone surrogate (a "\\ud800" escape echoed back): ASCII escapes stay valid
            sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    try:   # bytes: each line is decoded on its own, so a line that is not UTF-8 fails alone
        counts = match_stream(matcher, getattr(sys.stdin, "buffer", sys.stdin), emit, threshold)
    except BrokenPipeError:   # the reader went away (`| head`): stop quietly, as shell tools do
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0 if threshold is None else 1)
    return counts["below_threshold"] == 0


def _gallery(spec, engine, folder, queries, top_k, method, threshold, json_):
    from eclip.embedstore import open_store
    from eclip.match import Matcher, gallery_query_kinds, gallery_spec, match_gallery
    store = open_store(folder)
    kinds = gallery_query_kinds(store, queries, top_k)   # checked before the model loads
    matcher = Matcher.from_spec(gallery_spec(store, spec), engine)
    result = match_gallery(matcher, store, queries, top_k, method, kinds=kinds)
    passed = _passed(result["best"]["score"] if result["best"] else float("-inf"), threshold)
    if json_:
        from eclip.console import print_json
        print_json({**result, "threshold": threshold, "passed": passed})
        return passed
    for k, r in enumerate(result["results"]):
        total = result["counts"][r["searched"]]
        typer.echo(("\n" if k else "") + f"{r['query']}  (top {len(r['matches'])} of {total} {r['searched']})")
        for m in r["matches"]:
            what = m["path"] if r["searched"] == "images" else f"[{m['id']}] {m['text']}"
            typer.echo(f"{m['rank']:3d}  {m['score']:.4f}  {what}")
    return passed


def _passed(best: float, threshold):
    return None if threshold is None else best >= threshold
