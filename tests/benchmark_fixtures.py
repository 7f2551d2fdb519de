"""Small copies of the three benchmarks in every layout eclip reads, with placeholder images
(crops of real skimage photographs) at the paths the records name.

VisualNews records are real: the four shown in the dataset repository's demo notebook
(FuxiaoLiu/VisualNews-Repository, VisualNews-Dataset.ipynb: data[0], data[250000],
data[500000], data[-1]). The N24News and GoodNews repositories show no records; theirs
follow the published field names.
"""
import json
from pathlib import Path

VISUALNEWS = [
    {"id": 39136, "caption": "Candace Pickens and her son Zachaeus", "topic": "law_crime",
     "source": "washington_post", "image_path": "./washington_post/images/0376/501.jpg",
     "article_path": "./washington_post/articles/39136.txt"},
    {"id": 305299, "caption": "The Senate handbook lists items available to senators", "topic": "arts_culture",
     "source": "usa_today", "image_path": "./usa_today/images/0465/047.jpg",
     "article_path": "./usa_today/articles/305299.txt"},
    {"id": 596887, "caption": "Sir Peter Hall outside the Town and Country Planning Association offices in "
                              "central London 2007", "topic": "cities", "source": "guardian",
     "image_path": "./guardian/images/0319/958.jpg", "article_path": "./guardian/articles/596887.txt"},
    {"id": 1686699, "caption": "Qader was wounded in a suicide car bomb attack on Kirkuk police HQ in 2013 30 "
                               "people died", "topic": "law_crime", "source": "bbc",
     "image_path": "./bbc/images/0537/663.jpg", "article_path": "./bbc/articles/1686699.txt"},
]

N24NEWS = [   # fields as in news/nytimes_*.json
    {"image_id": f"img{i}", "caption": caption, "headline": f"Headline {i}", "abstract": "...",
     "section": section, "image_url": f"https://example.org/{i}.jpg", "article_url": f"https://example.org/{i}",
     "article_id": f"a{i}"}
    for i, (caption, section) in enumerate([("Eileen Collins aboard the shuttle.", "Science"),
                                            ("A Falcon 9 lifts off with DSCOVR.", "Science"),
                                            ("Coffee at the Mansion House.", "Food"),
                                            ("Chelsea the cat at home.", "Style")], start=1)
]

GOODNEWS = {   # article id -> {image index: caption}
    "5a1b": {"0": "Barack Obama in Chicago.", "1": "Michelle Obama at the White House."},
    "6c2d": {"0": "Angela Merkel in Berlin.", "1": "The Reichstag at night."},
}


def placeholder(path: Path, n: int) -> Path:
    """A small JPEG, different for every n (a crop of a real photograph), at `path`."""
    import skimage.data
    from PIL import Image
    sources = ("astronaut", "rocket", "coffee", "chelsea", "camera", "cat")
    array = getattr(skimage.data, sources[n % len(sources)])()
    image = Image.fromarray(array).convert("RGB")
    offset = 8 * (n // len(sources))
    image = image.crop((offset, offset, offset + 256, offset + 256)).resize((64, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))       # one line, no final newline: as json.dump writes
    return path


# --- N24News -------------------------------------------------------------------------------

def n24news_archive(root: Path, folder: str = "imgs") -> Path:
    """news/nytimes_{train,dev,test}.json; images in imgs/ (the archive) or images/ (the build output)."""
    splits = {"train": N24NEWS[:2], "dev": N24NEWS[2:3], "test": N24NEWS}
    for name, items in splits.items():
        write_json(root / "news" / f"nytimes_{name}.json", items)
    for i, d in enumerate(N24NEWS):
        placeholder(root / folder / f"{d['image_id']}.jpg", i)
    return root


def n24news_build(root: Path) -> Path:
    """What the dataset repository's build_fully_dataset.py leaves: nytimes_dataset.json and images/."""
    write_json(root / "nytimes_dataset.json", N24NEWS)
    for i, d in enumerate(N24NEWS):
        placeholder(root / "images" / f"{d['image_id']}.jpg", i)
    return root


# --- VisualNews ----------------------------------------------------------------------------

def visualnews(root: Path, layout: str) -> Path:
    """layout: "authors" ({split}.json, images/<image_path>), "beside" ({split}.json next to origin/),
    "flat" ({split}.json, <image_path> under the root), "release" (origin/data.json only)."""
    base = {"authors": root / "images", "beside": root / "origin", "flat": root, "release": root / "origin"}[layout]
    if layout in ("beside", "release"):
        write_json(root / "origin" / "data.json", VISUALNEWS)
    if layout != "release":
        for name, items in {"train": VISUALNEWS[:2], "val": VISUALNEWS[2:3], "test": VISUALNEWS}.items():
            write_json(root / f"{name}.json", items)
    for i, d in enumerate(VISUALNEWS):
        placeholder(base / d["image_path"], i)
    return root


# --- GoodNews ------------------------------------------------------------------------------

def goodnews_release(root: Path, captions: str = "data/captioning_dataset.json", folders=("images",)) -> Path:
    """The release: captions file (under one of its names), img_splits.json, image folders."""
    write_json(root / captions, {aid: {"images": images, "headline": {"main": "h"}, "article": "text"}
                                 for aid, images in GOODNEWS.items()})
    write_json(root / "data" / "img_splits.json",
               {"5a1b_0.jpg": "train", "5a1b_1": "test", "6c2d_0.jpg": "test", "6c2d_1.jpg": "val"})
    for folder in folders:
        for i, (aid, ix) in enumerate((a, x) for a, images in GOODNEWS.items() for x in images):
            placeholder(root / folder / f"{aid}_{ix}.jpg", i + (10 if folder == "resized" else 0))
    return root


def goodnews_authors(root: Path) -> Path:
    """The EntityCLIP authors' split files with broken_images.txt, images in images/."""
    items = [{"image_id": f"{aid}_{ix}.jpg", "captioning": caption, "title": f"Title of {aid}"}
             for aid, images in GOODNEWS.items() for ix, caption in images.items()]
    items[0]["captioning"] = "Barack Obama\r\nin Chicago.\r"
    write_json(root / "new_goodnews_capim_test.json", items)
    write_json(root / "new_goodnews_capim_train.json", items[:2])
    write_json(root / "new_goodnews_capim_val.json", items[2:])
    (root / "broken_images.txt").write_text("6c2d_1.jpg\n")
    for i, d in enumerate(items):
        placeholder(root / "images" / d["image_id"], i)
    return root
