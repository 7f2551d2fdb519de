"""Score images against captions with the CLIP towers (METHOD.md, "Inference"): cosine similarity
of the L2-normalised image and text features, and the softmax over captions at CLIP's logit scale.

Three ways in, one model load per process:
- `match_pairs`: images x captions given as arguments;
- `match_stream`: JSON lines in, one JSON line out per input line, in order, as they come;
- `match_gallery`: top-K over vectors written by `eclip embed`.
"""
from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from eclip.errors import EclipError, json_problem

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".avif", ".heic"}
TEXT_CACHE = 4096        # captions kept encoded (pipelines often repeat the same label set)
STREAM_BATCH = 32        # lines already waiting on stdin are encoded together, up to this many


def is_image_path(arg: str) -> bool:
    """An existing file with an image extension is an image; anything else is a caption."""
    return Path(arg).suffix.lower() in IMAGE_EXTENSIONS and Path(arg).is_file()


def looks_like_image_path(arg: str) -> bool:
    return Path(arg).suffix.lower() in IMAGE_EXTENSIONS and " " not in arg


class Matcher:
    """An encoder (eclip.runtime.engine: ONNX or torch) plus what matching needs: image
    preparation, batching, a caption cache. Features and scores are float32 numpy arrays."""

    def __init__(self, encoder, precision: str = "fp32"):
        if hasattr(encoder, "clip"):   # an EntityCLIP model (library use, tests): run it on torch
            from eclip.runtime.engine import TorchEncoder
            encoder = TorchEncoder(encoder.eval(), precision)
        self.encoder = encoder
        self.device = encoder.device
        self.precision = getattr(encoder, "precision", "fp32")
        self._texts: OrderedDict[str, object] = OrderedDict()

    @classmethod
    def from_spec(cls, spec, engine: str | None = None) -> "Matcher":
        from eclip.runtime.engine import load_encoder
        return cls(load_encoder(spec, engine))

    @property
    def logit_scale(self) -> float:
        return self.encoder.logit_scale

    @property
    def model(self):
        """The encoder (kept under its old name: it has identity(), name, engine, device)."""
        return self.encoder

    def identity(self) -> dict:
        return self.encoder.identity()

    def pixels(self, path):
        """Image file -> prepared pixels [3,H,W]; ImageError (one line, exit 2) when unusable."""
        from eclip.data.images import load_image
        return self.encoder.preprocess(load_image(path))

    def preprocess_stages(self):
        """(image stage, array stage): the first (decoding-side PIL work; for ONNX all of it) runs on
        the reader thread of `match_stream`, the second on the main thread."""
        return self.encoder.image_stages()

    def encode_pixels(self, pixels: list):
        """Prepared pixels [3,H,W] -> float32 L2-normalised features [N, D] (numpy)."""
        return self.encoder.encode_images(list(pixels))

    def encode_texts(self, texts: list[str], batch_size: int = 256):
        """Captions -> float32 L2-normalised features [N, D] (numpy; cached by text)."""
        import numpy as np
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            for text, row in zip(chunk, self.encoder.encode_texts(chunk)):
                self._texts[text] = row
        for text in texts:
            self._texts.move_to_end(text)
        out = np.stack([self._texts[t] for t in texts]) if texts else np.zeros((0, self.encoder.dim), np.float32)
        while len(self._texts) > max(TEXT_CACHE, len(texts)):
            self._texts.popitem(last=False)
        return out

    def scores(self, image_features, text_features):
        """-> (cosine [Ni, Nt], softmax over the captions at the logit scale [Ni, Nt]), numpy."""
        import numpy as np
        cos = np.asarray(image_features, np.float32) @ np.asarray(text_features, np.float32).T
        logits = self.logit_scale * cos
        e = np.exp(logits - logits.max(axis=-1, keepdims=True)) if cos.size else logits
        return cos, e / e.sum(axis=-1, keepdims=True) if cos.size else e


# ---- images x captions -------------------------------------------------------------------

def open_images(images: list) -> list:
    """Decode every image before a model loads: a missing file, a folder or a file that is not
    an image is reported at once (ImageError: one line, exit 2)."""
    from eclip.data.images import load_image
    for p in images:
        if Path(p).is_dir():
            raise EclipError(f"{p}: is a folder, not an image file")
        if not Path(p).exists():
            raise EclipError(f"{p}: no such image file")
    return [load_image(p) for p in images]


def match_pairs(matcher: Matcher, images: list, texts: list[str], decoded: list | None = None) -> dict:
    """Every image against every caption. Matches are listed best first. `decoded`: the images
    already opened by `open_images`."""
    if not images:
        raise EclipError("match: no image given (eclip match IMAGE CAPTION..., or --image IMAGE)")
    if not texts:
        raise EclipError("match: no caption given (eclip match IMAGE \"caption\" [\"caption\" ...])")
    if decoded is None:
        decoded = open_images(images)
    pixels = [matcher.encoder.preprocess(image) for image in decoded]
    return pairs_result(matcher, [str(p) for p in images], matcher.encode_pixels(pixels), texts,
                        matcher.encode_texts(texts))


def pairs_result(matcher: Matcher, names: list[str], image_features, texts: list[str], text_features) -> dict:
    """The `match --json` document for encoded images (named `names`) against encoded captions."""
    cos, prob = matcher.scores(image_features, text_features)
    results, best = [], None
    for i, image in enumerate(names):
        order = sorted(range(len(texts)), key=lambda j: -float(cos[i, j]))
        matches = [{"text": texts[j], "score": float(cos[i, j]), "prob": float(prob[i, j])} for j in order]
        results.append({"image": str(image), "matches": matches})
        if best is None or matches[0]["score"] > best["score"]:
            best = {"image": str(image), "text": matches[0]["text"], "score": matches[0]["score"]}
    return {"results": results, "best": best, "logit_scale": matcher.logit_scale}


# ---- JSON lines pipeline -----------------------------------------------------------------

def parse_line(line: str) -> dict:
    """One input line -> {"id", "image", "texts", "single"}; EclipError with the reason otherwise."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise EclipError(f"invalid JSON ({json_problem(e)})") from None
    if not isinstance(d, dict):
        raise EclipError("expected a JSON object with \"image\" and \"text\" or \"texts\"")
    image = d.get("image")
    if not isinstance(image, str) or not image:
        raise EclipError("missing \"image\" (a file path)")
    if "text" in d and "texts" in d:
        raise EclipError("give \"text\" or \"texts\", not both")
    if "text" in d:
        if not isinstance(d["text"], str):
            raise EclipError("\"text\" must be a string")
        return {"id": d.get("id"), "image": image, "texts": [d["text"]], "single": True}
    texts = d.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise EclipError("missing \"text\" (a string) or \"texts\" (a non-empty list of strings)")
    return {"id": d.get("id"), "image": image, "texts": texts, "single": False}


def _id_of(line: str):
    """Best effort: the id of a line that failed later than JSON parsing."""
    try:
        d = json.loads(line)
        return d.get("id") if isinstance(d, dict) else None
    except ValueError:
        return None


def _prepare(image_stage, number: int, line: str) -> dict:
    try:
        item = parse_line(line)
        from eclip.data.images import load_image
        item["decoded"] = image_stage(load_image(item["image"]))   # PIL work only: see preprocess_stages
        item["line"] = number
        return item
    except EclipError as e:
        return {"line": number, "id": _id_of(line), "error": str(e)}
    except Exception as e:   # one odd file must not end the stream
        return {"line": number, "id": _id_of(line), "error": f"{type(e).__name__}: {str(e)[:200]}"}


def match_stream(matcher: Matcher, lines, emit, threshold: float | None = None) -> dict:
    """Read JSON lines (str, or bytes decoded as UTF-8 line by line, so one bad line is one error
    record), call emit(record) once per non-blank line, in input order, as soon as it is done.

    A reader thread parses lines, decodes, resizes and crops images ahead of the model
    (overlapping the forward pass; tensors are made on the main thread); lines already waiting are encoded as one batch, so a burst costs one
    forward while an interactive line is answered at once. Returns counts.
    """
    pending: queue.Queue = queue.Queue(maxsize=2 * STREAM_BATCH)
    done = object()
    image_stage, tensor_stage = matcher.preprocess_stages()

    def reader():
        number = 0
        try:
            for number, line in enumerate(lines, 1):
                if isinstance(line, bytes):
                    try:
                        line = line.decode("utf-8")
                    except UnicodeDecodeError as e:   # this line only: the next ones are answered
                        pending.put({"line": number, "id": None, "error": f"line {number} is not UTF-8 text "
                                     f"(byte 0x{line[e.start]:02x} at column {e.start + 1})"})
                        continue
                if line.strip():
                    pending.put(_prepare(image_stage, number, line))
        except Exception as e:   # the input itself failed: say so on the next line instead of stopping silently
            pending.put({"line": number + 1, "id": None, "error": f"reading the input failed "
                         f"({type(e).__name__}: {str(e)[:160]})"})
        finally:
            pending.put(done)

    threading.Thread(target=reader, name="eclip-match-reader", daemon=True).start()
    counts = {"lines": 0, "errors": 0, "below_threshold": 0}
    finished = False
    while not finished:
        batch = [pending.get()]
        while len(batch) < STREAM_BATCH and batch[-1] is not done:
            try:
                batch.append(pending.get_nowait())
            except queue.Empty:
                break
        if batch[-1] is done:
            batch.pop()
            finished = True
        for record in _score_batch(matcher, tensor_stage, batch, threshold):
            counts["lines"] += 1
            counts["errors"] += "error" in record
            counts["below_threshold"] += record.get("passed") is False
            emit(record)
    return counts


def _score_batch(matcher: Matcher, tensor_stage, batch: list[dict], threshold) -> list[dict]:
    for item in batch:
        if "decoded" in item:
            try:
                item["pixels"] = tensor_stage(item.pop("decoded"))
            except Exception as e:   # a transform failing on one odd image fails that line only
                item["error"] = f"{item['image']}: preprocess failed ({type(e).__name__}: {str(e)[:160]})"
    good = [item for item in batch if "error" not in item]
    if good:
        try:
            images = matcher.encode_pixels([item["pixels"] for item in good])
            texts = matcher.encode_texts([t for item in good for t in item["texts"]])
        except Exception as e:   # e.g. out of memory on a huge batch: fail these lines, keep going
            for item in good:
                item["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            good = []
    out, offset = [], 0
    scored = {id(item): k for k, item in enumerate(good)}
    for item in batch:
        if "error" in item:
            out.append({"id": item.get("id"), "line": item["line"], "error": item["error"]})
            continue
        k, n = scored[id(item)], len(item["texts"])
        cos, prob = matcher.scores(images[k:k + 1], texts[offset:offset + n])
        offset += n
        cos, prob = cos[0].tolist(), prob[0].tolist()
        if item["single"]:
            record = {"id": item["id"], "image": item["image"], "text": item["texts"][0], "score": cos[0]}
            best = cos[0]
        else:
            j = max(range(n), key=lambda i: cos[i])
            best = cos[j]
            record = {"id": item["id"], "image": item["image"], "texts": item["texts"], "scores": cos,
                      "probs": prob, "best": {"index": j, "text": item["texts"][j], "score": best}}
        if threshold is not None:
            record["passed"] = best >= threshold
        out.append(record)
    return out


# ---- galleries -----------------------------------------------------------------------------

def gallery_spec(store, spec):
    """With no model options, the model recorded in the gallery's manifest."""
    if spec.model or spec.pretrained or spec.checkpoint:
        return spec
    recorded = store.manifest.get("model_spec") or {}
    if not (recorded.get("model") or recorded.get("checkpoint")):
        raise EclipError(f"{store.path}: its manifest names no model; pass --model/--pretrained or --checkpoint")
    return replace(spec, model=recorded.get("model"), pretrained=recorded.get("pretrained"),
                   checkpoint=recorded.get("checkpoint"), seed=store.identity.get("seed"))


def gallery_query_kinds(store, queries: list[str], top_k: int) -> list[str]:
    """"image" or "text" per query, after checking what needs no model: queries given, top_k,
    and that the gallery holds the vectors each kind searches (texts for an image query)."""
    from eclip.console import note
    if not queries:
        raise EclipError("match --gallery: give one or more captions or image files to search for")
    if top_k < 1:
        raise EclipError(f"--top-k {top_k}: must be at least 1")
    kinds = []
    for q in queries:
        if is_image_path(q):
            kinds.append("image")
        else:
            if looks_like_image_path(q):
                note(f"{q}: no such image file, searching for it as a caption")
            kinds.append("text")
    for kind, target in (("text", "images"), ("image", "texts")):
        if kind in kinds:
            store.require(target)
    return kinds


def match_gallery(matcher: Matcher, store, queries: list[str], top_k: int = 5, method: str = "auto",
                  kinds: list[str] | None = None) -> dict:
    """Top-K gallery images for each caption query, top-K gallery captions for each image query.
    `kinds`: gallery_query_kinds(store, queries, top_k), when the caller checked them already."""
    kinds = kinds or gallery_query_kinds(store, queries, top_k)
    store.check_model(matcher.identity())
    results = [None] * len(queries)
    for kind, target in (("text", "images"), ("image", "texts")):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        if kind == "text":
            feats = matcher.encode_texts([queries[i] for i in idx])
        else:
            feats = matcher.encode_pixels([matcher.pixels(queries[i]) for i in idx])
        for matches, i in zip(search_store(store, target, feats, top_k, method), idx):
            results[i] = {"query": queries[i], "kind": kind, "searched": target, "matches": matches}
    return gallery_result(store, results)


def search_store(store, target: str, features, top_k: int, method: str = "auto") -> list[list[dict]]:
    """Query features [Q, D] -> for each query its top-K rows of `target` ("images" | "texts"),
    best first: [{"rank", "score", "row", and the row's metadata}]."""
    import hashlib

    import numpy as np

    from eclip.gallery import search
    shards = json.dumps(store.manifest[target]["shards"], sort_keys=True).encode()
    cache = store.path / f"{target}-{hashlib.sha256(shards).hexdigest()[:12]}.ivf.faiss"
    scores, indices = search(np.asarray(features, dtype=np.float32), store.vectors(target), top_k, method,
                             index_path=cache)
    out = []
    for row in range(len(indices)):
        found = [j for j in indices[row].tolist() if j >= 0]   # IVF pads with -1 when lists run short
        meta = store.rows(target, found)
        out.append([{"rank": r + 1, "score": float(scores[row][r]), **m} for r, m in enumerate(meta)])
    return out


def gallery_result(store, results: list[dict]) -> dict:
    """The `match --gallery --json` document around per-query results."""
    best = max((r for r in results if r["matches"]), key=lambda r: r["matches"][0]["score"], default=None)
    return {"gallery": str(store.path), "results": results,
            "best": None if best is None else {"query": best["query"], **best["matches"][0]},
            "counts": {k: store.count(k) for k in ("images", "texts")}}

