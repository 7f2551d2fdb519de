"""VisualNews (Guardian, BBC, USA Today, Washington Post; Liu et al., EMNLP 2021).

Records: {"id", "caption", "topic", "source", "image_path": "./bbc/images/0537/663.jpg",
"article_path"}. Layouts, in the order they are looked for:
1. the EntityCLIP authors' layout: {train,val,test}.json under the data root, each image at
   images/<image_path> (their reference code joins ROOT/images/ and image_path);
2. {train,val,test}.json beside the official release's origin/ folder, images at
   origin/<image_path>;
3. {train,val,test}.json with image_path relative to the data root (split files put inside
   the release's origin/ folder, which is then the data root);
4. the official release alone: origin/data.json (or data.json in the data root) holding every
   record, images beside it. It has no split, so only `--split all` reads it.

The splits. The official release has no split field and no split files, and the dataset's
repository (README, demo notebook, code) defines none. The splits the EntityCLIP paper reports
on are the {split}.json files its reference code reads, which are not public; public code that
uses the release draws its own (for example a seeded shuffle of data.json cut 80/10/10). So no
split is determinable from public material and eclip invents none: give split files (layouts
1-3), or read every record with --split all.

The EntityCLIP authors' explanation files key a record by its image path, so explanations
are matched on the last 4 parts of the image path (source/images/folder/file).
"""
from __future__ import annotations

from eclip.data.benchmarks import no_layout, split_name, using
from eclip.data.readers import _checked, _has_caption, _inside, _json_list, _root
from eclip.data.records import Record, clean_label
from eclip.errors import EclipError

AUTHORS_KEY_PARTS = 4
LAYOUTS = ("the EntityCLIP authors' layout: {train,val,test}.json with images under images/<image_path>",
           "{train,val,test}.json beside the release's origin/ folder, images under origin/<image_path>",
           "{train,val,test}.json with image_path relative to the data root",
           "the official release origin/data.json or data.json, images beside it (no split: --split all)")


def read(root, split: str = "train", image_folder: str | None = None, paper: bool = False) -> list[Record]:
    root = _root(root, "VisualNews", "; ".join(LAYOUTS))
    if image_folder is not None:
        raise EclipError(f"--image-folder {image_folder}: VisualNews image folders follow from its layout "
                         "(images/, origin/ or the data root); leave the option out")
    name = split_name("VisualNews", split, whole=True)
    release = next((p for p in (root / "origin" / "data.json", root / "data.json") if p.is_file()), None)
    split_file = root / f"{name}.json"
    if name != "all" and split_file.is_file():
        base = next((f for f in ("images", "origin") if (root / f).is_dir()), "")
        using("VisualNews", f"{name}.json with images under {base + '/' if base else 'the data root'}")
        return _records(root, base, split_file, paper)
    if release is not None:
        if name != "all":
            raise EclipError(f"{root}: the VisualNews release ({release.relative_to(root)}) has no train/val/test "
                             f"split and {name}.json is not there; the splits papers report on are not public "
                             "(README, 'Data'): put {train,val,test}.json split files in the data root, or pass "
                             "--split all")
        base = "origin" if release.parent != root else ""
        using("VisualNews", f"every record of {release.relative_to(root)} (the release has no split)")
        return _records(root, base, release, paper)
    raise no_layout(root, "VisualNews", split, LAYOUTS)


def _records(root, base: str, path, paper: bool = False) -> list[Record]:
    """Records whose image_path ("./bbc/images/0537/663.jpg") lies under root/base."""
    items = _json_list(path, ("id", "caption", "image_path"))
    folder = root / base if base else root
    records = []
    for d in items:
        if not isinstance(d["image_path"], str):
            raise EclipError(f"{path}: image_path of record {d['id']!r} is not text")
        if _has_caption(d, path, keep_empty=paper):
            records.append(Record(str(d["id"]), _inside(folder, d["image_path"], path), d["caption"],
                                  label=clean_label(d.get("topic"))))   # its topic: a class
    return _checked(records, path, len(items), number_duplicates=True)
