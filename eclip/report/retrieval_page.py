"""The retrieval report: metrics, the recall@K curve, the worst queries (index.html) and a page of
successes (successes.html), each query with its top results as thumbnails and the true item marked.

Big splits stay cheap: the rank dump is read once, line by line, keeping every rank (for the
curve) but only the `worst` worst and the first `successes` rank-1 queries of each direction."""
from __future__ import annotations

import heapq
import json
from html import escape
from pathlib import Path

from eclip.report import TOP, Thumbnails, figure, model_line, page, table


def write_retrieval_pages(folder: Path, result: dict, ranks_file, records, worst: int, successes: int) -> None:
    caption_of = {r.id: r.caption for r in records}
    thumbs = Thumbnails(folder)
    nav = [("index.html", "metrics and failures"), ("successes.html", "successes")]
    sub = (f"{model_line(result)}: {result['n_texts']} captions, {result['n_images']} images "
           f"(--same-image {result.get('same_image', 'bytes')})")
    body = [_metrics(result)]
    picked = _read_ranks(ranks_file, worst, successes) if ranks_file else None
    if picked is None:
        body.append('<section class="card"><h2>Queries</h2><p class="muted">No rank dump was given, so no '
                     'query is shown.</p></section>')
    else:
        _curve(folder, picked, result)
        body.append('<section class="card" id="curve"><h2>Recall@K</h2>'
                    '<img class="plot" src="recall.png" alt="Recall@K against K, both directions"></section>')
        body.append(_queries("Captions whose image ranked worst (text → image)", "failures-t2i",
                             picked["text_to_image"]["worst"], thumbs, caption_of, result["n_images"]))
        body.append(_queries("Images whose captions ranked worst (image → text)", "failures-i2t",
                             picked["image_to_text"]["worst"][:max(1, worst // 2)], thumbs, caption_of,
                             result["n_texts"]))
    (folder / "index.html").write_text(page("eclip evaluation: retrieval", sub, nav, "\n".join(body)),
                                       encoding="utf-8")
    wins = [] if picked is None else [
        _queries("Captions whose image ranked first (text → image)", "successes-t2i",
                 picked["text_to_image"]["first"], thumbs, caption_of, result["n_images"]),
        _queries("Images whose caption ranked first (image → text)", "successes-i2t",
                 picked["image_to_text"]["first"][:max(1, successes // 2)], thumbs, caption_of, result["n_texts"])]
    (folder / "successes.html").write_text(page("eclip evaluation: successes", sub, nav, "\n".join(wins)),
                                           encoding="utf-8")


def _metrics(result: dict) -> str:
    ks = [k for k in result["text_to_image"] if k.startswith("R@")]
    rows = []
    for name, key in (("text → image", "text_to_image"), ("image → text", "image_to_text")):
        r = result[key]
        rows.append([name, *(f"{r[k]:.2f}" for k in ks), str(r["median_rank"]), f"{r['mean_rank']:.1f}"])
    html = table(["direction", *ks, "median rank", "mean rank"], rows)
    notes = f"rsum {result['rsum']:.2f}"
    if result.get("n_skipped"):
        notes += f"; {result['n_skipped']} unreadable image(s) skipped"
    by_type = ""
    if result.get("by_entity_type"):
        by_type = "<h2>Recall@1 by entity type</h2>" + table(
            ["entity type", "captions", "text → image R@1", "images", "image → text R@1"],
            [[t, r["n"], f"{r['text_to_image_R@1']:.2f}", r["n_images"], f"{r['image_to_text_R@1']:.2f}"]
             for t, r in result["by_entity_type"].items()])
    return (f'<section class="card" id="metrics"><h2>Metrics</h2>{html}<p class="muted">{escape(notes)}</p>'
            f"{by_type}</section>")


def _read_ranks(path, worst: int, successes: int) -> dict:
    """{direction: {"ranks": [...], "worst": [line, ...] worst first, "first": [rank-1 lines]}}."""
    out = {d: {"ranks": [], "heap": [], "first": []} for d in ("text_to_image", "image_to_text")}
    with open(path, encoding="utf-8") as f:
        for order, text in enumerate(f):
            line = json.loads(text)
            d = out[line["direction"]]
            d["ranks"].append(line["rank"])
            if line["rank"] > 1:
                item = (line["rank"], -order, text)            # the worst stay; the earlier query on a tie
                (heapq.heappush if len(d["heap"]) < worst else heapq.heappushpop)(d["heap"], item)
            elif len(d["first"]) < successes:
                d["first"].append(line)
    for d in out.values():
        d["worst"] = [json.loads(t) for _, _, t in sorted(d.pop("heap"), reverse=True)]
    return out


def _curve(folder: Path, picked: dict, result: dict) -> None:
    from eclip.report.plots import recall_curve, recall_png
    curves = {"text → image": recall_curve(picked["text_to_image"]["ranks"], result["n_images"]),
              "image → text": recall_curve(picked["image_to_text"]["ranks"], result["n_texts"])}
    recall_png(curves, folder / "recall.png", title=model_line(result))


def _queries(title: str, anchor: str, lines: list, thumbs, caption_of: dict, n_gallery: int) -> str:
    if not lines:
        return f'<section class="card" id="{anchor}"><h2>{escape(title)}</h2><p class="muted">None.</p></section>'
    rows = [_query(line, thumbs, caption_of, n_gallery) for line in lines]
    return f'<section class="card" id="{anchor}"><h2>{escape(title)}</h2>{"".join(rows)}</section>'


def short_path(path: str) -> str:
    """An image named by its folder and file name (datasets often name files 0.jpg, 1.jpg per folder)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _query(line: dict, thumbs, caption_of: dict, n_gallery: int) -> str:
    """One query: what was asked, its rank, its top results; the true item marked (and shown after
    the top results when it is not among them)."""
    t2i = line["direction"] == "text_to_image"
    positives = set(line["positives"])
    shown = line["top"][:TOP]

    def result_html(item_id, score, true):
        label = f"{'<b>true</b> ' if true else ''}{score:.3f}" if score is not None else "<b>true</b>"
        if t2i:
            return figure(thumbs(item_id), f"{label}<br>{escape(short_path(item_id))}", true)
        return (f'<figure class="caption{" true" if true else ""}">{escape(caption_of.get(item_id, item_id))}'
                f"<figcaption>{label}</figcaption></figure>")
    parts = [result_html(m["id"], m["score"], m["id"] in positives) for m in shown]
    if not positives & {m["id"] for m in shown}:
        first = sorted(positives)[0]
        parts.append('<span class="sep">…</span>' + result_html(first, None, True))
    hit = " hit" if line["rank"] == 1 else ""
    rank = f'<span class="rank">rank {line["rank"]} of {n_gallery}</span>'
    if t2i:
        asked = f'<div class="text">{escape(caption_of.get(line["query"], line["query"]))}{rank}</div>'
    else:
        asked = f'<div class="text">{escape(short_path(line["query"]))}{rank}</div>'
        parts.insert(0, figure(thumbs(line["query"]), "query image") + '<span class="sep">→</span>')
    return f'<div class="query{hit}">{asked}<div class="results">{"".join(parts)}</div></div>'
