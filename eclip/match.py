"""Score images against captions with the CLIP towers (METHOD.md, "Inference"): cosine similarity
of the L2-normalised image and text features, and the softmax over captions at CLIP's logit scale.

Three ways in, one model load per process:
- `match_pairs`: images x captions given as arguments;
- `match_stream`: JSON lines in, one JSON line out per input line, in order, as they come;
- `match_gallery`: top-K over vectors written by `eclip embed`.
"""
from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from eclip.errors import EclipError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".avif", ".heic"}
TEXT_CACHE = 4096        # captions kept encoded (pipelines often repeat the same label set)
STREAM_BATCH = 32        # lines already waiting on stdin are encoded together, up to this many


def is_image_path(arg: str) -> bool:
    """An existing file with an image extension is an image; anything else is a caption."""
    return Path(arg).suffix.lower() in IMAGE_EXTENSIONS and Path(arg).is_file()


def looks_like_image_path(arg: str) -> bool:
    return Path(arg).suffix.lower() in IMAGE_EXTENSIONS and " " not in arg


def load_inference_model(spec):
    """The model for embedding and matching: CLIP towers only, fp32 weights (precision is autocast).

    Experts and the matching head exist only for training; they are not built unless the
    weights come from an eclip checkpoint (whose header describes them).
    """
    from eclip.config import ExpertConfig
    from eclip.model.factory import load_model
    model = load_model(replace(spec, precision="fp32"), experts=ExpertConfig(enabled=False))
    return model.eval()


def autocast(device, precision: str):
    import torch
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class Matcher:
    """A loaded model plus what matching needs: preprocessing, batching, a caption cache."""

    def __init__(self, model, precision: str = "fp32"):
        self.model = model
        self.precision = precision
        self.device = model.device
        self._texts: OrderedDict[str, object] = OrderedDict()

    @classmethod
    def from_spec(cls, spec) -> "Matcher":
        return cls(load_inference_model(spec), spec.precision)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach())

    def pixels(self, path):
        """Image file -> preprocessed tensor [3,H,W]; ImageError (one line, exit 2) when unusable."""
        from eclip.data.images import load_image
        return self.model.preprocess(load_image(path))

    def preprocess_stages(self):
        """(image stage, tensor stage) of the model's transform, split before ToTensor: the first
        (decode-side resizing and cropping on PIL images) is safe on a helper thread; the second
        runs torch ops, which belong on the main thread (torch ops on a second thread start a
        second OpenMP team, and the forward pass then ran ~30% slower, bench/bench_match.py)."""
        from torchvision.transforms import Compose, ToTensor
        transform = self.model.preprocess
        steps = list(getattr(transform, "transforms", []))
        cut = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
        if cut is None:
            return (lambda image: image), transform
        return Compose(steps[:cut]), Compose(steps[cut:])

    def encode_pixels(self, pixels: list):
        """[3,H,W] tensors -> float32 L2-normalised features [N, D] on the CPU."""
        import torch
        import torch.nn.functional as F
        if not pixels:
            return torch.zeros(0, self.model.config.clip_config["embed_dim"])
        with torch.inference_mode(), autocast(self.device, self.precision):
            v = self.model.encode_images(torch.stack(pixels).to(self.device))
        return F.normalize(v.float(), dim=-1).cpu()

    def encode_texts(self, texts: list[str], batch_size: int = 256):
        """Captions -> float32 L2-normalised features [N, D] on the CPU (cached by text)."""
        import torch
        import torch.nn.functional as F
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            with torch.inference_mode(), autocast(self.device, self.precision):
                v = self.model.encode_texts(self.model.tokenize(chunk).to(self.device))
            for text, row in zip(chunk, F.normalize(v.float(), dim=-1).cpu()):
                self._texts[text] = row
        for text in texts:
            self._texts.move_to_end(text)
        out = torch.stack([self._texts[t] for t in texts]) if texts else torch.zeros(0, 0)
        while len(self._texts) > max(TEXT_CACHE, len(texts)):
            self._texts.popitem(last=False)
        return out

    def scores(self, image_features, text_features):
        """-> (cosine [Ni, Nt], softmax over the captions at the logit scale [Ni, Nt])."""
        cos = image_features @ text_features.T
        return cos, (self.logit_scale * cos).softmax(dim=-1)


# ---- images x captions -------------------------------------------------------------------

def match_pairs(matcher: Matcher, images: list, texts: list[str]) -> dict:
    """Every image against every caption. Matches are listed best first."""
    if not images:
        raise EclipError("match: no image given (eclip match IMAGE CAPTION..., or --image IMAGE)")
    if not texts:
        raise EclipError("match: no caption given (eclip match IMAGE \"caption\" [\"caption\" ...])")
    pixels = [matcher.pixels(p) for p in images]
    cos, prob = matcher.scores(matcher.encode_pixels(pixels), matcher.encode_texts(texts))
    results, best = [], None
    for i, image in enumerate(images):
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
    except ValueError as e:
        raise EclipError(f"invalid JSON ({e})")
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


def match_gallery(matcher: Matcher, store, queries: list[str], top_k: int = 5, method: str = "auto") -> dict:
    """Top-K gallery images for each caption query, top-K gallery captions for each image query."""
    import hashlib

    from eclip.console import note
    from eclip.gallery import search
    if not queries:
        raise EclipError("match --gallery: give one or more captions or image files to search for")
    if top_k < 1:
        raise EclipError(f"--top-k {top_k}: must be at least 1")
    store.check_model(matcher.model.identity())
    kinds = []
    for q in queries:
        if is_image_path(q):
            kinds.append("image")
        else:
            if looks_like_image_path(q):
                note(f"{q}: no such image file, searching for it as a caption")
            kinds.append("text")
    results = [None] * len(queries)
    for kind, target in (("text", "images"), ("image", "texts")):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        store.require(target)
        if kind == "text":
            feats = matcher.encode_texts([queries[i] for i in idx])
        else:
            feats = matcher.encode_pixels([matcher.pixels(queries[i]) for i in idx])
        shards = json.dumps(store.manifest[target]["shards"], sort_keys=True).encode()
        cache = store.path / f"{target}-{hashlib.sha256(shards).hexdigest()[:12]}.ivf.faiss"
        scores, indices = search(feats.numpy(), store.vectors(target), top_k, method, index_path=cache)
        for row, i in enumerate(idx):
            found = [j for j in indices[row].tolist() if j >= 0]   # IVF pads with -1 when lists run short
            meta = store.rows(target, found)
            matches = [{"rank": r + 1, "score": float(scores[row][r]), **m} for r, m in enumerate(meta)]
            results[i] = {"query": queries[i], "kind": kind, "searched": target, "matches": matches}
    best = max((r for r in results if r["matches"]), key=lambda r: r["matches"][0]["score"], default=None)
    return {"gallery": str(store.path), "results": results,
            "best": None if best is None else {"query": best["query"], **best["matches"][0]},
            "counts": {k: store.count(k) for k in ("images", "texts")}}

