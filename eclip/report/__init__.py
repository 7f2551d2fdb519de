"""`eclip evaluate --report DIR`: a self-contained HTML page of one evaluation."""
from __future__ import annotations

from pathlib import Path

from eclip.errors import EclipError


def check_report_dir(folder) -> Path:
    """The report goes into a new or empty folder: EclipError when it is a file or holds anything."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EclipError(f"--report {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise EclipError(f"--report {folder}: the folder exists and is not empty; give a new or empty folder")
    return folder


WORST = 20          # failed queries shown, worst first (per direction: captions; half as many images)
SUCCESSES = 20      # rank-1 queries on the successes page
TOP = 5             # results shown per query
THUMB_PX = 160      # thumbnails: longest side, made once per image


def write_report(folder, result: dict, *, ranks_file=None, records=None, worst: int = WORST,
                 successes: int = SUCCESSES) -> Path:
    """Write the report of one evaluation (`eclip.evaluate.evaluate` or `eclip.classify.classify`
    result) into `folder` (new or empty), whole or not at all; -> its index.html.

    Retrieval reads each query's rank and top results from `ranks_file` (`--dump-ranks` lines, read
    once, not copied: on a large split it is large); `records` (the evaluated records) give the
    captions shown. Thumbnails go to thumbs/, one per image, shared by every page."""
    return _whole_folder(folder, lambda tmp: _fill(tmp, result, ranks_file, records, worst, successes))


def write_grid_report(folder, grid: dict, ranks_files: dict, records: dict) -> Path:
    """The report of a many-models table (eclip.evaluate_grid): index.html with the table, each cell
    linking to its own report (one folder per model and dataset, as `write_report` writes it).
    ranks_files / records: {(model index, dataset index): path / [Record]}."""
    from html import escape

    from eclip.evaluate_grid import grid_rows

    def fill(tmp: Path):
        links = {}
        for m, row in enumerate(grid["results"]):
            for d, result in enumerate(row):
                sub = f"model{m + 1}-dataset{d + 1}"
                (tmp / sub).mkdir()
                _fill(tmp / sub, result, ranks_files.get((m, d)), records.get((m, d)), WORST, SUCCESSES)
                links[(m, d)] = f"{sub}/index.html"
        header, rows = grid_rows(grid)
        per = len(grid["columns"])
        cells = []
        for m, row in enumerate(rows):
            tds = [f"<td>{escape(str(row[0]))}</td>"]
            for i, v in enumerate(row[1:]):
                text = "-" if v is None else f"{v:.2f}"
                if i % per == 0:
                    text = f'<a href="{links[(m, i // per)]}">{text}</a>'
                tds.append(f"<td>{text}</td>")
            cells.append("<tr>" + "".join(tds) + "</tr>")
        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        body = (f'<section class="card" id="metrics"><h2>Results</h2><table class="metrics"><thead><tr>{head}'
                f'</tr></thead><tbody>{"".join(cells)}</tbody></table><p class="muted">Each cell\'s first number '
                "links to its own report.</p></section>")
        what = "retrieval" if grid["task"] == "retrieval" else "classification"
        (tmp / "index.html").write_text(page(f"eclip evaluation: {what}", f"{len(grid['models'])} model(s) x "
                                             f"{len(grid['datasets'])} dataset(s)", [], body), encoding="utf-8")
    return _whole_folder(folder, fill)


def _fill(tmp: Path, result: dict, ranks_file, records, worst: int, successes: int) -> None:
    if result.get("task") == "classify":
        from eclip.report.classify_page import write_classify_pages
        write_classify_pages(tmp, result)
        return
    from eclip.report.retrieval_page import write_retrieval_pages
    write_retrieval_pages(tmp, result, ranks_file, records or [], worst, successes)


def _whole_folder(folder, fill) -> Path:
    """fill(a temporary folder beside `folder`), then rename it to `folder` (new or empty)."""
    import os
    import shutil
    import tempfile
    folder = check_report_dir(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(tmp)
        if folder.is_dir():
            folder.rmdir()                      # empty: check_report_dir said so
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "index.html"


class Thumbnails:
    """thumbs/<hash>.jpg for an image path, made once; None for a file that cannot be read."""

    def __init__(self, folder: Path, size: int = THUMB_PX):
        self.folder, self.size, self.made = Path(folder) / "thumbs", size, {}

    def __call__(self, path: str):
        if path not in self.made:
            self.made[path] = self._make(path)
        return self.made[path]

    def _make(self, path: str):
        import hashlib

        from PIL import Image
        name = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:20] + ".jpg"
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((self.size, self.size))
                self.folder.mkdir(parents=True, exist_ok=True)
                image.save(self.folder / name, quality=82)
        except (OSError, ValueError):
            return None
        return f"thumbs/{name}"


def page(title: str, subtitle: str, nav: list, body: str) -> str:
    """The report's HTML frame (page.html) around `body`; nav: [(href, text)]."""
    from html import escape
    from importlib.resources import files
    from string import Template

    from eclip import __version__
    frame = Template((files("eclip.report") / "page.html").read_text(encoding="utf-8"))
    return frame.substitute(title=escape(title), subtitle=f"<p>{escape(subtitle)}</p>" if subtitle else "",
                            nav=" ".join(f'<a href="{escape(h)}">{escape(t)}</a>' for h, t in nav),
                            body=body, version=escape(__version__))


def table(header: list, rows: list, css: str = "metrics") -> str:
    """An HTML table of already formatted cells (escaped here)."""
    from html import escape
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(src, caption_html: str, true: bool = False) -> str:
    """One thumbnail with a caption below; a green frame when it is the true item."""
    from html import escape
    img = f'<img src="{escape(src)}" alt="">' if src else '<div class="missing">unreadable</div>'
    return f'<figure class="{"true" if true else ""}">{img}<figcaption>{caption_html}</figcaption></figure>'


def model_line(result: dict) -> str:
    what = result.get("checkpoint") or result.get("model") or "model"
    where = result.get("dataset") or "data"
    return f"{what} on {where}" + (f" / {result['split']}" if result.get("split") else "")
