"""The classification report: headline metrics, the confusion matrix (PNG), per-class scores and
the most confused class pairs with example images (bounded by eclip.classify's CONFUSED_PAIRS and
EXAMPLES_PER_PAIR)."""
from __future__ import annotations

from html import escape
from pathlib import Path

from eclip.report import Thumbnails, figure, model_line, page, table


def write_classify_pages(folder: Path, result: dict) -> None:
    from eclip.report.plots import confusion_png

    def pct(v):
        return "-" if v is None else f"{v:.2f}"
    confusion_png(result, folder / "confusion.png")
    thumbs = Thumbnails(folder)
    sub = (f"{model_line(result)}: {result['mode']} classification of {result['n']} records "
           f"({result['inputs']}), {result['n_classes']} classes")
    head = table(["top-1", "top-5", "mean per-class recall", "records", "classes"],
                 [[pct(result["top1"]), pct(result["top5"]), pct(result["mean_per_class_recall"]), result["n"],
                   result["n_classes"]]])
    how = (f"linear probe: C = {result['C']:g} chosen on {result['val_split']} (val top-1 {result['val_top1']:.2f})"
           if result["mode"] == "linear-probe" else
           "templates: " + "; ".join(result.get("templates", [])))
    per = table(["class", "precision", "recall", "F1", "support"],
                [[r["class"], pct(r["precision"]), pct(r["recall"]), pct(r["f1"]), r["support"]]
                 for r in result["per_class"]])
    pairs = []
    for p in result["confused_pairs"]:
        shots = "".join(figure(thumbs(e["image"]), escape(e["caption"][:120])) for e in p["examples"])
        pairs.append(f'<div class="query"><div class="text">{escape(p["true"])} → predicted '
                     f'{escape(p["predicted"])}<span class="rank">{p["count"]} record(s)</span></div>'
                     f'<div class="results">{shots}</div></div>')
    body = (f'<section class="card" id="metrics"><h2>Metrics</h2>{head}<p class="muted">{escape(how)}</p></section>'
            '<section class="card" id="confusion"><h2>Confusion matrix</h2>'
            '<img class="plot" src="confusion.png" alt="confusion matrix, rows normalised"></section>'
            f'<section class="card" id="confused"><h2>Most confused classes</h2>'
            f'{"".join(pairs) or "<p class=muted>None: every record was classified right.</p>"}</section>'
            f'<section class="card" id="per-class"><h2>Per class</h2>{per}</section>')
    (folder / "index.html").write_text(page("eclip evaluation: classification", sub, [], body), encoding="utf-8")
