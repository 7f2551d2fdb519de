"""The three benchmarks, read in the layouts people have on disk.

Each reader looks at the files under the data root, picks the layout they form, says which
on stderr, and returns `Record`s. When no layout fits, one error lists every layout it
looked for. Readers never open images (train / embed / evaluate skip and count bad ones).

`AUTHORS_KEY_PARTS` in each module: how many trailing path parts of a record's image the
EntityCLIP authors' explanation files (`CapDsc_mistral_{split}.json`) key it by.
"""
from __future__ import annotations

from importlib import import_module

from eclip.errors import EclipError

BENCHMARKS = ("n24news", "visualnews", "goodnews")


def read_benchmark(name: str, root, split: str, image_folder: str | None = None, paper: bool = False) -> list:
    """Records of benchmark `name` (one of BENCHMARKS) under `root`, split `split`; `paper`: as the
    reference code reads them (--protocol paper: empty captions kept; GoodNews test keeps the
    images in broken_images.txt)."""
    return _module(name).read(root, split, image_folder, paper=paper)


def authors_key_parts(name: str) -> int:
    return _module(name).AUTHORS_KEY_PARTS


def _module(name: str):
    if name not in BENCHMARKS:
        raise EclipError(f"--dataset {name}: not a benchmark ({', '.join(BENCHMARKS)})")
    return import_module(f"eclip.data.benchmarks.{name}")


def split_name(benchmark: str, split: str, val: str = "val", whole: bool = False) -> str:
    """train / val (or dev) / test -> the benchmark's own file name part; 'all' where a layout has
    every record in one file."""
    names = {"train": "train", "val": val, "dev": val, "test": "test"}
    if whole:
        names["all"] = "all"
    name = names.get(str(split).lower())
    if name is None:
        raise EclipError(f"{benchmark}: unknown split {split!r} (train, val/dev, test"
                         + (", or all" if whole else "") + ")")
    return name


def using(benchmark: str, layout: str) -> None:
    """Say on stderr which layout a reader found."""
    from eclip.console import note
    note(f"{benchmark}: reading {layout}")


def no_layout(root, benchmark: str, split: str, layouts) -> EclipError:
    """The one error for a data root that fits none of `layouts` (descriptions, in search order)."""
    looked = "; ".join(f"({i}) {text}" for i, text in enumerate(layouts, start=1))
    return EclipError(f"{root}: no {benchmark} layout found for split {split!r}; looked for {looked}")


def image_folder_choice(root, benchmark: str, chosen: str | None, allowed, default) -> str:
    """The image folder under `root`: `chosen` (--image-folder), else the first of `default` that exists."""
    if chosen is not None:
        if chosen not in allowed:
            raise EclipError(f"--image-folder {chosen}: {benchmark} images are in one of "
                             f"{', '.join(a + '/' for a in allowed)}")
        if not (root / chosen).is_dir():
            raise EclipError(f"--image-folder {chosen}: {root / chosen} is not a folder")
        return chosen
    found = next((f for f in default if (root / f).is_dir()), None)
    if found is None:
        other = next((f for f in allowed if (root / f).is_dir()), None)
        raise EclipError(f"{root}: {benchmark} image folder not found (expected "
                         f"{' or '.join(f + '/' for f in default)} under the data root"
                         + (f"; {other}/ is there: pass --image-folder {other} to read it)" if other else ")"))
    return found
