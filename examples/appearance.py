"""Explanations that say what each demo entity looks like: the "informative" row of the ablation.

    python examples/appearance.py --dataset demo-out/data/train.jsonl --output appearance.jsonl

Writes an explanation cache (the format `eclip explain` writes and `eclip train --explanations`
reads) with one line per distinct caption of the dataset:
- a flag's explanation is derived from its pixels (flagpy's 90 x 180 image): the colours that
  cover it, largest first, and its layout (vertical bands, horizontal stripes, a field with
  something at the hoist or in the centre), e.g. "The flag of France: three vertical bands,
  blue, white and red (hoist to fly).";
- a photograph's explanation is written below as data, from what its package's docstring or
  source says it shows (the `source` beside each), e.g. "Chelsea is a tabby cat ...".
Nothing here is an LLM: it is the upper bound of what an explanation could tell the model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from itertools import groupby
from pathlib import Path

# Named colours, anchored near the shades flags use. Nearest anchor by "redmean" RGB distance.
PALETTE = {
    "white": (255, 255, 255), "black": (0, 0, 0), "red": (206, 17, 38), "orange": (255, 136, 0),
    "yellow": (252, 209, 22), "green": (0, 135, 70), "dark green": (0, 75, 35), "light blue": (100, 180, 235), "blue": (0, 56, 168), "dark blue": (25, 35, 90),
}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
           10: "ten", 11: "eleven", 12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen"}
UNIFORM = 0.85      # a row/column is one colour when this share of its pixels is
MIN_AREA = 0.04     # colours covering less than this share of the flag are not named

# (what it looks like, where that comes from)
PHOTOS = {
    "eileen-collins": (
        "Eileen Collins, a NASA astronaut: a smiling woman with short hair in an orange spacesuit, "
        "a helmet beside her and an American flag behind.",
        "skimage.data.astronaut docstring (NASA Great Images) and the picture"),
    "dscovr-falcon-9": (
        "DSCOVR on a SpaceX Falcon 9: a tall white rocket on its launch pad between dark towers, at dusk, "
        "lights below.",
        "skimage.data.rocket docstring (SpaceX launch photo, Cape Canaveral) and the picture"),
    "grace-hopper": (
        "Grace Hopper, U.S. Navy officer: an older woman with glasses in a dark navy uniform and cap, "
        "ribbons on her chest, an American flag behind.",
        "matplotlib grace_hopper.jpg (Wikimedia Commons File:Grace_Hopper.jpg) and the picture"),
    "chelsea-the-cat": (
        "Chelsea, a cat: a striped brown and ginger tabby face with green eyes, a pink nose and white "
        "whiskers, up close.",
        "skimage.data.chelsea docstring (Chelsea the cat) and the picture"),
    "pikolo-espresso": (
        "Coffee at Pikolo Espresso Bar: a red cup and saucer of espresso with a spoon on a wooden table.",
        "skimage.data.coffee docstring (coffee cup, courtesy of Pikolo Espresso Bar) and the picture"),
    "hubble-deep-field": (
        "The Hubble Space Telescope's deep field: a black sky full of small faint galaxies, orange, "
        "white and blue dots.",
        "skimage.data.hubble_deep_field docstring (Hubble eXtreme Deep Field) and the picture"),
    "pompeii-coins": (
        "Greek coins from Pompeii: rows of small round grey coins outlined against a grey background.",
        "skimage.data.coins docstring (Greek coins from Pompeii, Brooklyn Museum) and the picture"),
    "scikit-image-logo": (
        "The scikit-image logo: a round emblem, green above and orange below, with a snake drawn in dark "
        "lines, on white.",
        "skimage.data.logo (the scikit-image logo) and the picture"),
    "china-temple": (
        "A temple in China: a tall octagonal tower of several storeys with red pillars and green and "
        "orange tiled roofs, trees in front, a lake and hazy sky behind.",
        "sklearn china.jpg (load_sample_image; Flickr, CC BY 2.0) and the picture"),
}
MODEL = "appearance (examples/appearance.py)"


def colour_labels(rgb):
    """(H, W, 3) uint8 -> (H, W) index into PALETTE's names."""
    import numpy as np
    names = list(PALETTE)
    anchors = np.array([PALETTE[n] for n in names], dtype=np.float32)            # [K, 3]
    px = rgb.reshape(-1, 1, 3).astype(np.float32)                                 # [N, 1, 3]
    mean_r = (px[..., 0] + anchors[None, :, 0]) / 2
    d = px - anchors[None]
    dist = (2 + mean_r / 256) * d[..., 0] ** 2 + 4 * d[..., 1] ** 2 + (2 + (255 - mean_r) / 256) * d[..., 2] ** 2
    return dist.argmin(axis=1).reshape(rgb.shape[:2])


def _runs(labels, min_len: int) -> list:
    """Run-length of a 1-D label sequence, runs shorter than `min_len` folded into a neighbour."""
    runs = [(x, len(list(group))) for x, group in groupby(labels)]
    runs = [r for r in runs if r[1] >= min_len] or runs
    return [x for x, _ in groupby(x for x, _ in runs)]


def _majority(a):
    """Per-row (axis 1) majority label and the share of the row it covers."""
    import numpy as np
    counts = np.stack([(a == k).sum(axis=1) for k in range(len(PALETTE))], axis=1)
    return counts.argmax(axis=1), counts.max(axis=1) / a.shape[1]


def _listing(names: list) -> str:
    if len(names) > 4 and len(set(names)) == 2 and all(a != b for a, b in zip(names, names[1:])):
        return f"alternating {names[0]} and {names[1]}"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _where(mask) -> str:
    """Where a boolean mask's mass lies on the flag."""
    import numpy as np
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    if abs(cy - 0.5) < 0.15 and abs(cx - 0.5) < 0.15:
        return "in the centre"
    if cx < 0.35 and cy < 0.4:
        return "in the upper hoist corner"
    if cx < 0.4:
        return "at the hoist"
    return "in the centre" if abs(cx - 0.5) < 0.2 else "on the fly side"


def describe_flag(rgb, name: str) -> str:
    """One sentence on a flag's colours and layout, from its (H, W, 3) uint8 pixels."""
    import numpy as np
    names = list(PALETTE)
    lab = colour_labels(rgb)
    h, w = lab.shape
    share = np.bincount(lab.ravel(), minlength=len(names)) / lab.size
    colours = [k for k in np.argsort(-share) if share[k] >= MIN_AREA]
    head = f"The flag of {name}:"

    def extra(text: str, expected) -> str:
        """`text` + what differs from the stripes (a canton, a hoist triangle, an emblem)."""
        odd = lab != expected
        if odd.mean() >= 0.03:
            found = np.bincount(lab[odd], minlength=len(names))
            more = [k for k in np.argsort(-found) if found[k] >= 0.02 * lab.size]
            if more:
                text += f", with {_listing([names[k] for k in more[:2]])} {_where(odd)}"
        return text + "."

    # vertical bands: the columns of the top and bottom quarters (clear of a central emblem)
    edge_rows = np.r_[0:h // 4, h - h // 4:h]
    col_major, col_share = _majority(lab[edge_rows].T)
    if (col_share >= UNIFORM).mean() >= 0.85:
        bands = _runs(col_major, max(2, int(0.04 * w)))
        if len(bands) > 1:
            return extra(f"{head} {NUMBERS.get(len(bands), len(bands))} vertical bands, "
                         f"{_listing([names[k] for k in bands])} (hoist to fly)", col_major[None, :].repeat(h, 0))
    # horizontal stripes: the rows of the fly side (clear of a canton or a hoist triangle)
    row_major, row_share = _majority(lab[:, int(0.55 * w):])
    if (row_share >= UNIFORM).mean() >= 0.85:
        stripes = _runs(row_major, max(2, int(0.04 * h)))
        text = (f"{head} {NUMBERS.get(len(stripes), len(stripes))} horizontal stripes, "
                f"{_listing([names[k] for k in stripes])} (top to bottom)" if len(stripes) > 1
                else f"{head} a {names[stripes[0]]} field")
        return extra(text, row_major[:, None].repeat(w, 1))
    field, others = colours[0], colours[1:]
    if share[field] < 0.5:
        return f"{head} {_listing([names[k] for k in colours[:4]])}, largest first, not in stripes."
    text = f"{head} a {names[field]} field"
    if others:
        text += f" with {_listing([names[k] for k in others[:3]])} {_where(lab != field)}"
    return text + "."


def appearance_by_slug() -> dict:
    """{entity slug: explanation} for every flag flagpy ships and every photograph above."""
    import numpy as np

    from eclip.data.demo_set import flag_entities
    out = {}
    for entity in flag_entities():
        name = entity.captions["train"][0].removeprefix("The national flag of ")   # "the Bahamas"
        out[entity.slug] = describe_flag(np.asarray(entity.image()), name)
    out.update({slug: text for slug, (text, _) in PHOTOS.items()})
    return out


def write_cache(dataset, output) -> dict:
    """The explanation cache for every distinct caption of `dataset` (a demo-set .jsonl)."""
    from eclip.atomic import write_text
    from eclip.explain.cache import make_entry
    described = appearance_by_slug()
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    lines, seen, missing = [], set(), []
    for line in Path(dataset).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        slug = rec["image"].split("/")[1]
        if rec["text"] in seen:
            continue
        seen.add(rec["text"])
        if slug not in described:
            missing.append(slug)
            continue
        lines.append(json.dumps(make_entry(rec["id"], rec["text"], described[slug], MODEL, digest),
                                ensure_ascii=False))
    write_text(output, "".join(x + "\n" for x in lines))
    return {"output": str(output), "captions": len(lines), "missing": sorted(set(missing))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="a demo-set .jsonl (train.jsonl)")
    ap.add_argument("--output", required=True, help="explanation cache to write")
    args = ap.parse_args(argv)
    print(json.dumps(write_cache(args.dataset, args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
