"""GoodNews (New York Times; Biten et al., CVPR 2019).

Layouts, in the order they are looked for:
1. the EntityCLIP authors' split files: new_goodnews_capim_{train,val,test}.json, each a list
   of {"image_id": "<article_id>_<index>.jpg", "captioning", "title"}, with broken_images.txt
   (one image file name a line) and images in images/. Read as their reference code reads
   them: images listed in broken_images.txt are left out (kept in test under --protocol paper,
   as the reference's test reader keeps them); in captions "\\r\\n" becomes a
   space and a lone "\\r" is dropped.
2. the GoodNews release: the captions file under any of its names (captioning_dataset.json,
   which the repository's combine script writes to data/; article+caption.json, the download;
   article_caption.json, transform-and-tell's name) in the data root or in data/, and
   img_splits.json ({"<article_id>_<index>[.jpg]": "train"|"val"|"test"}) in the data root
   or in data/; images in images/ as <article_id>_<index>.jpg. Images img_splits.json does
   not list belong to no split.

Images are the originals in images/. resized/ holds the 256x256 copies the repository's
resize.py makes (aspect ratio lost): they are read only with --image-folder resized, and
then for every image, never mixed with images/. Image files missing from the folder are
counted and named on stderr; train, embed and evaluate then skip and count them.
The EntityCLIP authors' explanation files key a record by its image file name.
"""
from __future__ import annotations

import os

from eclip.data.benchmarks import image_folder_choice, no_layout, split_name, using
from eclip.data.readers import _checked, _has_caption, _inside, _json_list, _load_json, _root
from eclip.data.records import Record
from eclip.errors import EclipError

AUTHORS_KEY_PARTS = 1
CAPTION_FILES = ("captioning_dataset.json", "article+caption.json", "article_caption.json")
LAYOUTS = ("the EntityCLIP authors' new_goodnews_capim_{train,val,test}.json with broken_images.txt and images/",
           "the GoodNews release: captioning_dataset.json, article+caption.json or article_caption.json and "
           "img_splits.json (each in the data root or data/) with images/ (resized/ with --image-folder resized)")


def read(root, split: str = "train", image_folder: str | None = None, paper: bool = False) -> list[Record]:
    root = _root(root, "GoodNews", "; ".join(LAYOUTS))
    name = split_name("GoodNews", split)
    authors = root / f"new_goodnews_capim_{name}.json"
    captions = _first(root, CAPTION_FILES)
    splits = _first(root, ("img_splits.json",))
    if authors.is_file():
        folder = image_folder_choice(root, "GoodNews", image_folder, ("images", "resized"), ("images",))
        using("GoodNews", f"the EntityCLIP authors' {authors.name} with images in {folder}/")
        records = _authors_records(root, authors, folder, keep_broken=paper and name == "test", keep_empty=paper)
    elif captions is not None and splits is not None:
        folder = image_folder_choice(root, "GoodNews", image_folder, ("images", "resized"), ("images",))
        using("GoodNews", f"{captions.relative_to(root)} and {splits.relative_to(root)} with images in {folder}/")
        records = _release_records(root, captions, splits, name, folder, keep_empty=paper)
    else:
        raise no_layout(root, "GoodNews", split, LAYOUTS)
    _report_missing(root, folder, records, name)
    return records


def _first(root, names):
    return next((p for n in names for p in (root / n, root / "data" / n) if p.is_file()), None)


def _authors_records(root, path, folder: str, keep_broken: bool = False, keep_empty: bool = False) -> list[Record]:
    """`keep_broken`: the test split under --protocol paper; the reference's test reader (util.py
    read_dataset) keeps every record, and only its train/val reader skips broken_images.txt."""
    items = _json_list(path, ("image_id", "captioning"))
    broken_file = root / "broken_images.txt"
    broken = set()
    if keep_broken:
        from eclip.console import note
        note(f"GoodNews: --protocol paper keeps the test images listed in {broken_file.name}, as the reference's "
             f"test reader does")
    elif broken_file.is_file():
        broken = {line.strip() for line in broken_file.read_text(encoding="utf-8").splitlines() if line.strip()}
    else:
        from eclip.console import note
        note(f"GoodNews: no {broken_file.name} beside {path.name}; no image is left out as broken")
    records, kept, left_out = [], 0, 0
    for d in items:
        image = d["image_id"]
        if not isinstance(image, str) or not image.strip():
            raise EclipError(f"{path}: a record's image_id is not a file name")
        if image in broken:
            left_out += 1
            continue
        kept += 1
        caption = d["captioning"]
        if isinstance(caption, str):
            caption = caption.replace("\r\n", " ").replace("\r", "")
        if _has_caption({"caption": caption, "id": image}, path, keep_empty):
            records.append(Record(image.removesuffix(".jpg"), _inside(root, f"{folder}/{image}", path), caption))
    if left_out:
        from eclip.console import note
        note(f"GoodNews: left out {left_out} of {len(items)} images listed in {broken_file.name}")
    return _checked(records, path, kept, number_duplicates=True)


def _release_records(root, data_path, splits_path, name: str, folder: str, keep_empty: bool = False) -> list[Record]:
    splits = _load_json(splits_path)
    if not isinstance(splits, dict):
        raise EclipError(f"{splits_path}: expected a JSON object {{image name: split}}")
    wanted = {str(k).removesuffix(".jpg") for k, v in splits.items() if v == name}
    articles = _load_json(data_path)
    if not isinstance(articles, dict):
        raise EclipError(f"{data_path}: expected a JSON object keyed by article id")
    records, seen = [], 0
    for article_id, article in articles.items():
        images = article.get("images") if isinstance(article, dict) else None
        if not isinstance(images, dict):
            raise EclipError(f"{data_path}: article {article_id!r} lacks an 'images' object")
        for index, caption in images.items():
            image_id = f"{article_id}_{index}"
            if image_id not in wanted:
                continue
            seen += 1
            if isinstance(caption, str) and (keep_empty or caption.strip()):
                records.append(Record(image_id, _inside(root, f"{folder}/{image_id}.jpg", data_path), caption))
    return _checked(records, data_path, seen, number_duplicates=True)


def _report_missing(root, folder: str, records, split: str) -> None:
    """Count and name the records whose image file is not in the folder (one listing, not a stat per file)."""
    if not records:
        return
    present = set(os.listdir(root / folder))
    missing = [os.path.basename(r.image) for r in records if os.path.basename(r.image) not in present]
    if not missing:
        return
    hint = ""
    other = "resized" if folder == "images" else "images"
    if (root / other).is_dir():
        there = set(os.listdir(root / other))
        found = sum(1 for m in missing if m in there)
        if found:
            hint = (f"; {other}/ has {found} of them, but folders are never mixed"
                    + (": --image-folder resized reads the 256x256 copies for every image" if other == "resized"
                       else ""))
    from eclip.console import note
    note(f"GoodNews: {len(missing)} of {len(records)} {split} images are missing from {folder}/ "
         f"(first: {', '.join(missing[:5])}); they are skipped and counted{hint}")
