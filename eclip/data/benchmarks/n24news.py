"""N24News (New York Times, 24 sections; Wang et al., LREC 2022).

Layouts, in the order they are looked for:
1. the N24News archive: news/nytimes_{train,dev,test}.json, images imgs/{image_id}.jpg;
2. the same split files with images in images/{image_id}.jpg, the folder the dataset
   repository's build_fully_dataset.py downloads into;
3. the repository's build output alone: nytimes_dataset.json (every record) and images/.
   It carries no split: N24News's train/dev/test membership is only in the archive's
   news/nytimes_{train,dev,test}.json, so only `--split all` reads it.

Each record's `section` is its label (`eclip evaluate --task classify`).
The text of a pair is the caption, not the headline: captions are what name the pictured
entities. The EntityCLIP authors' explanation files key a record by its image file name.
"""
from __future__ import annotations

from eclip.data.benchmarks import image_folder_choice, no_layout, split_name, using
from eclip.data.readers import _checked, _has_caption, _inside, _json_list, _root
from eclip.data.records import Record, clean_label
from eclip.errors import EclipError

AUTHORS_KEY_PARTS = 1
LAYOUTS = ("the N24News archive: news/nytimes_{train,dev,test}.json with images in imgs/{image_id}.jpg",
           "the same split files with images in images/{image_id}.jpg (the dataset repository's build output)",
           "the repository's build output alone: nytimes_dataset.json and images/ (no split: --split all)")


def read(root, split: str = "train", image_folder: str | None = None, paper: bool = False) -> list[Record]:
    root = _root(root, "N24News", "; ".join(LAYOUTS))
    name = split_name("N24News", split, val="dev", whole=True)
    split_file, whole_file = root / "news" / f"nytimes_{name}.json", root / "nytimes_dataset.json"
    if name != "all" and split_file.is_file():
        folder = image_folder_choice(root, "N24News", image_folder, ("imgs", "images"), ("imgs", "images"))
        using("N24News", f"news/nytimes_{name}.json with images in {folder}/")
        return _records(root, split_file, folder, paper)
    if whole_file.is_file():
        if name != "all":
            raise EclipError(f"{root}: N24News build output (nytimes_dataset.json and images/) has no "
                             f"train/dev/test split, and news/nytimes_{name}.json is not there; the split is "
                             "only in the N24News archive's news/nytimes_{train,dev,test}.json (linked from the "
                             "dataset's README): put those files under news/, or pass --split all")
        folder = image_folder_choice(root, "N24News", image_folder, ("images", "imgs"), ("images", "imgs"))
        using("N24News", f"the build output nytimes_dataset.json (every record) with images in {folder}/")
        return _records(root, whole_file, folder, paper)
    raise no_layout(root, "N24News", split, LAYOUTS)


def _records(root, path, folder: str, paper: bool = False) -> list[Record]:
    items = _json_list(path, ("image_id", "caption"))
    records = [Record(str(d["image_id"]), _inside(root, f"{folder}/{d['image_id']}.jpg", path), d["caption"],
                      label=clean_label(d.get("section")))   # its section: one of the 24 classes
               for d in items if _has_caption(d, path, keep_empty=paper)]
    return _checked(records, path, len(items), number_duplicates=True)
