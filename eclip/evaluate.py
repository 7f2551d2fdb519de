"""`eclip evaluate` as a library: embed a dataset split, rank, and report retrieval metrics.

    from eclip.config import ModelSpec
    from eclip.evaluate import evaluate
    result = evaluate(ModelSpec(checkpoint="run/best.safetensors"), "n24news", None, "test")
    result["text_to_image"]["R@1"], result["rsum"]

Ground truth. Every record is one caption query; its positive is its record's image. Which
records share one gallery image is `same_image`:
- "bytes" (default): files with identical bytes (content sha256) are one gallery item,
  wherever they lie and however many records use them;
- "path": records naming the same image file are one item (CLIP_benchmark's convention,
  where a dataset item is one image with all its captions);
- "none": every record is its own gallery item, even when records share a file: the
  EntityCLIP reference's protocol (ETE eval.py / util.t2i_recall), the one the paper's
  numbers use.
An image query's positives are all the captions of the records its item stands for. A query
is a hit at K when any of its positives is in the top K (eclip.metrics has the definitions
and the tie rule: pessimistic, ties within 1e-6 ranked after the tied negatives).

Identical caption texts. Two records whose captions are the same text get identical text
vectors, so they score the same against every image. Unless their images are one gallery
item, each caption is a negative of the other's image that ties with its positive, and the
pessimistic tie rule ranks it first: neither image can reach image->text rank 1, and of
the two caption queries at most one can reach text->image rank 1 (they share one ranking).
The reference's argsort breaks such ties by sort order instead, so one of the pair may
count as a hit there.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from eclip.data.members import image_sha256, is_address
from eclip.errors import EclipError

DEFAULT_RECALL_K = (1, 5, 10)
SAME_IMAGE = ("bytes", "path", "none")


def parse_recall_k(text: str) -> tuple[int, ...]:
    """"1,5,10" -> (1, 5, 10); EclipError on anything else."""
    try:
        ks = tuple(int(p) for p in str(text).replace(" ", "").split(",") if p)
    except ValueError:
        ks = ()
    if not ks or any(k < 1 for k in ks):
        raise EclipError(f"--recall-k {text}: expected positive whole numbers separated by commas, e.g. 1,5,10")
    return tuple(sorted(set(ks)))


@dataclass
class Gallery:
    """The gallery items of a split (see `same_image`), and which of them each record uses."""
    paths: list = field(default_factory=list)          # one path per gallery item (its first record's)
    image_of_record: list = field(default_factory=list)  # gallery index per record, -1 when skipped
    skipped: dict = field(default_factory=dict)        # image path -> reason, for files that could not be read


def file_sha256(path: str) -> str:
    if is_address(path):   # a tar member or a parquet cell: hash the image's own bytes
        return image_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gallery_items(keys) -> tuple[list, list]:
    """(first row of every distinct key, item index of every row): rows with equal keys are one item."""
    first, item_of_row, index = [], [], {}
    for row, key in enumerate(keys):
        if key not in index:
            index[key] = len(first)
            first.append(row)
        item_of_row.append(index[key])
    return first, item_of_row


def check_same_image(same_image: str) -> str:
    if same_image not in SAME_IMAGE:
        raise EclipError(f"--same-image {same_image}: one of {', '.join(SAME_IMAGE)}")
    return same_image


def build_gallery(records, on_file=None, same_image: str = "bytes") -> Gallery:
    """Group the records' images into gallery items by `same_image`. With "bytes" every file is
    hashed (unreadable files are skipped with a reason); "path" and "none" read no file here."""
    if check_same_image(same_image) != "bytes":
        keys = [r.image for r in records] if same_image == "path" else range(len(records))
        first, item_of_record = gallery_items(keys)
        return Gallery(paths=[records[i].image for i in first], image_of_record=item_of_record)
    gallery = Gallery()
    by_path: dict[str, int] = {}
    by_digest: dict[str, int] = {}
    for r in records:
        if r.image not in by_path:
            try:
                digest = file_sha256(r.image)
            except FileNotFoundError:
                gallery.skipped[r.image], by_path[r.image] = "missing", -1
            except IsADirectoryError:
                gallery.skipped[r.image], by_path[r.image] = "not a file", -1
            except OSError as e:
                gallery.skipped[r.image], by_path[r.image] = f"unreadable ({e.strerror or type(e).__name__})", -1
            else:
                if digest not in by_digest:
                    by_digest[digest] = len(gallery.paths)
                    gallery.paths.append(r.image)
                by_path[r.image] = by_digest[digest]
            if on_file:
                on_file()
        gallery.image_of_record.append(by_path[r.image])
    return gallery


def evaluate(spec=None, dataset: str | None = None, data_root=None, split: str = "test", *,
             recall_k: Sequence[int] = DEFAULT_RECALL_K, batch_size: int = 64, chunk_size: int | None = None,
             dump_ranks=None, workers: int | None = None, model=None, records=None,
             image_folder: str | None = None, same_image: str = "bytes", features_dir=None,
             protocol: str | None = None) -> dict:
    """Embed a split with a model and return the metrics report (see `evaluate_features`).

    `spec` (eclip.config.ModelSpec) is loaded with eclip.model.factory.load_model unless an
    already built `model` is given; `records` may replace `dataset` / `data_root` / `split`.
    Images that cannot be read are left out (with their records), named in a note and
    counted in "n_skipped". With `features_dir`, the split's features are kept there and reused
    by the next evaluation of the same model and records (eclip.features_cache). `protocol` "paper"
    reads the split as the reference does (eclip.protocol).
    """
    recall_k = _check_k(recall_k)
    check_same_image(same_image)
    if records is None:
        if not dataset:
            raise EclipError("--dataset is required (n24news, visualnews, goodnews or a .jsonl / .csv file)")
        from eclip.data.readers import read_dataset
        records = read_dataset(dataset, data_root, split, image_folder=image_folder, protocol=protocol)
    if not records:
        raise EclipError(f"--dataset {dataset} --split {split}: no records to evaluate")
    if model is None:
        from eclip.model.factory import load_model
        model = load_model(spec)
    model.eval()

    if features_dir is None:
        embedded = embed_split(model, records, same_image, batch_size, workers, dataset)
    else:
        embedded = cached_split(features_dir, model, records, same_image, batch_size, workers, dataset)
    text_features, image_features, kept_records, paths = (embedded.text_features, embedded.image_features,
                                                          embedded.records, embedded.paths)
    kept = list(zip(kept_records, embedded.image_of_text))
    result = evaluate_features(text_features, image_features, [g for _, g in kept], recall_k=recall_k,
                               chunk_size=chunk_size, dump_ranks=dump_ranks,
                               text_ids=[r.id for r in kept_records], image_ids=paths,
                               text_entity_types=[_entity_types(r) for r in kept_records])
    from eclip.data.readers import dataset_label
    identity = model.identity() if hasattr(model, "identity") else {}
    name, named_split = dataset_label(dataset, split)
    result.update(model=identity.get("model"), checkpoint=identity.get("checkpoint"),
                  checkpoint_sha256=identity.get("checkpoint_sha256"), n_skipped=embedded.n_skipped,
                  dataset=name, split=named_split, same_image=same_image)
    return result


@dataclass
class SplitFeatures:
    """A split embedded for retrieval: caption i's gallery image is image_of_text[i]."""
    text_features: object            # [n_texts, D]
    image_features: object           # [n_images, D]
    image_of_text: list
    records: list                    # the records kept (readable image), one per caption
    paths: list                      # one image path per gallery item
    n_skipped: int = 0


def embed_split(model, records, same_image: str = "bytes", batch_size: int = 64, workers: int | None = None,
                dataset=None) -> SplitFeatures:
    """Group the records' images into gallery items (`same_image`), embed them and the captions."""
    import torch

    from eclip.console import note, progress
    with progress() as bar:
        hashing = bar.add_task("hashing images", total=len({r.image for r in records})) \
            if same_image == "bytes" else None
        gallery = build_gallery(records, on_file=(lambda: bar.advance(hashing)) if hashing is not None else None,
                                same_image=same_image)
        files, file_of_item = gallery_items(gallery.paths)      # "none" may name a file in several items
        file_features, failed = embed_images(model, [gallery.paths[i] for i in files], batch_size, workers, bar)
    for index, reason in failed:
        gallery.skipped[gallery.paths[files[index]]] = reason
    failed_files = {i for i, _ in failed}
    keep_image = torch.tensor([f not in failed_files for f in file_of_item], dtype=torch.bool)
    new_index = torch.cumsum(keep_image.long(), 0) - 1          # gallery index after dropping failures
    kept_files = torch.tensor([f for f, k in zip(file_of_item, keep_image.tolist()) if k], dtype=torch.long)
    image_features = file_features[kept_files.to(file_features.device)]
    paths = [p for p, k in zip(gallery.paths, keep_image.tolist()) if k]

    kept = [(r, int(new_index[g])) for r, g in zip(records, gallery.image_of_record)
            if g >= 0 and keep_image[g]]
    if gallery.skipped:
        dropped = len(records) - len(kept)
        first = next(iter(gallery.skipped.items()))
        note(f"skipped {len(gallery.skipped)} image file(s) that could not be read, with their {dropped} "
             f"record(s); first: {first[0]}: {first[1]}")
    if not kept:
        raise EclipError(f"--dataset {dataset}: none of the {len(records)} records has a readable image")
    kept_records = [r for r, _ in kept]

    text_features = embed_texts(model, [r.caption for r in kept_records], batch_size)
    return SplitFeatures(text_features, image_features, [g for _, g in kept], kept_records, paths,
                         len(gallery.skipped))


def cached_split(folder, model, records, same_image: str = "bytes", batch_size: int = 64,
                 workers: int | None = None, dataset=None) -> SplitFeatures:
    """embed_split, kept in `folder` (one file per records/model/same_image) and reused when unchanged."""
    import torch

    from eclip.features_cache import cached_features, records_digest
    index = {id(r): i for i, r in enumerate(records)}
    digest = records_digest(records)
    stamp = {"model": model.identity() if hasattr(model, "identity") else None, "same_image": same_image,
             "records": digest}

    def compute():
        split = embed_split(model, records, same_image, batch_size, workers, dataset)
        first = {}
        for r, g in zip(split.records, split.image_of_text):
            first.setdefault(g, index[id(r)])
        return {"text": split.text_features, "image": split.image_features,
                "image_of_text": torch.tensor(split.image_of_text, dtype=torch.long),
                "kept": torch.tensor([index[id(r)] for r in split.records], dtype=torch.long),
                "item_record": torch.tensor([first[g] for g in range(len(split.paths))], dtype=torch.long),
                "n_skipped": torch.tensor([split.n_skipped], dtype=torch.long)}
    got = cached_features(Path(folder) / f"retrieval-{same_image}-{digest[:16]}.safetensors", stamp, compute)
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    return SplitFeatures(got["text"].to(device), got["image"].to(device), got["image_of_text"].tolist(),
                         [records[i] for i in got["kept"].tolist()],
                         [records[i].image for i in got["item_record"].tolist()], int(got["n_skipped"][0]))


def embed_images(model, paths, batch_size: int = 64, workers: int | None = None, bar=None):
    """-> (features [n, D] on the model's device, failures [(index, reason)]).

    Rows of failed images are zero; the caller drops them.
    """
    import torch
    from torch.utils.data import DataLoader

    from eclip.data.dataset import ImageDataset, collate_images
    if workers is None:
        workers = 0 if len(paths) < 256 else min(4, max(1, (os.cpu_count() or 2) // 2))
    loader = DataLoader(ImageDataset(paths, model.preprocess), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_images, shuffle=False)
    param = next(model.parameters())
    features, failed = None, []
    task = bar.add_task("images", total=len(paths)) if bar is not None else None
    with torch.inference_mode():
        for batch in loader:
            failed += batch["skipped"]
            if batch["indices"].numel():
                f = model.encode_images(batch["images"].to(param.device, param.dtype)).float()
                if features is None:
                    features = torch.zeros(len(paths), f.shape[1], device=f.device)
                features[batch["indices"].to(f.device)] = f
            if task is not None:
                bar.advance(task, len(batch["indices"]) + len(batch["skipped"]))
    if features is None:
        features = torch.zeros(len(paths), 1, device=param.device)
    return features, failed


def embed_texts(model, captions, batch_size: int = 64):
    """Caption features [n, D] (L2-normalised, float32) on the model's device."""
    import torch

    from eclip.console import progress
    out = []
    with torch.inference_mode(), progress() as bar:
        task = bar.add_task("texts", total=len(captions))
        for s in range(0, len(captions), batch_size):
            tokens = model.tokenize(captions[s:s + batch_size]).to(model.device)
            out.append(model.encode_texts(tokens).float())
            bar.advance(task, len(tokens))
    return torch.cat(out)


def _entity_types(record) -> list:
    return sorted({e.get("type") for e in record.entities if e.get("type")})


def _check_k(recall_k) -> tuple:
    ks = tuple(sorted({int(k) for k in recall_k}))
    if not ks or ks[0] < 1:
        raise EclipError(f"--recall-k {','.join(map(str, recall_k))}: each K must be a positive whole number")
    return ks


def evaluate_features(text_features, image_features, image_of_text, *, recall_k=DEFAULT_RECALL_K,
                      chunk_size: int | None = None, dump_ranks=None, text_ids=None, image_ids=None,
                      text_entity_types=None) -> dict:
    """Metrics report from features: caption i's image is gallery item image_of_text[i].

    Returns {"text_to_image": {"R@k"..., "median_rank", "mean_rank"}, "image_to_text": {...},
    "rsum", "n_images", "n_texts"} and, when captions carry entity types,
    "by_entity_type": {TYPE: {"text_to_image_R@1", "image_to_text_R@1", "n", "n_images"}}
    (a caption counts toward every type its record names; an image toward every type of
    the records that use it). With `dump_ranks` (a path) it writes one JSON line per query.

    This is also where stored embeddings enter: eclip.embedstore.evaluate_embeddings reads
    features and ids from `eclip embed`'s store and calls this.
    """
    import torch

    from eclip.console import progress
    from eclip.metrics import recall_at, recall_summary, retrieval_ranks, rsum
    recall_k = _check_k(recall_k)
    n_t, n_i = text_features.shape[0], image_features.shape[0]
    image_of_text = torch.as_tensor(image_of_text, dtype=torch.long)
    top_k = max(recall_k) if dump_ranks else 0
    with progress() as bar:
        task = bar.add_task("ranking", total=n_t)
        try:
            ranks = retrieval_ranks(text_features, image_features, image_of_text, chunk_size=chunk_size,
                                    top_k=top_k, on_chunk=lambda rows: bar.advance(task, rows))
        except ValueError as e:
            raise EclipError(f"cannot rank: {e}") from None
    result = {
        "text_to_image": recall_summary(ranks.text_to_image, recall_k),
        "image_to_text": recall_summary(ranks.image_to_text, recall_k),
        "rsum": rsum(ranks),
        "n_images": n_i,
        "n_texts": n_t,
    }
    if text_entity_types and any(text_entity_types):
        image_types = [set() for _ in range(n_i)]
        for types, g in zip(text_entity_types, image_of_text.tolist()):
            image_types[g].update(types)
        counts = Counter(t for types in text_entity_types for t in types)
        by_type = {}
        for etype, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            texts = torch.tensor([etype in types for types in text_entity_types])
            images = torch.tensor([etype in types for types in image_types])
            by_type[etype] = {"text_to_image_R@1": recall_at(ranks.text_to_image[texts.to(ranks.text_to_image.device)], 1),
                              "image_to_text_R@1": recall_at(ranks.image_to_text[images.to(ranks.image_to_text.device)], 1),
                              "n": n, "n_images": int(images.sum())}
        result["by_entity_type"] = by_type
    if dump_ranks:
        text_ids = list(text_ids) if text_ids is not None else [str(i) for i in range(n_t)]
        image_ids = list(image_ids) if image_ids is not None else [str(i) for i in range(n_i)]
        write_rank_dump(dump_ranks, ranks, image_of_text, text_ids, image_ids)
    return result


def write_rank_dump(path, ranks, image_of_text, text_ids, image_ids) -> None:
    """One JSON line per query, captions first, atomically:
    {"direction", "query", "rank", "positives": [ids], "top": [{"id", "score"}, ...]}."""
    from eclip.atomic import atomic_path
    captions_of = [[] for _ in image_ids]
    for t, g in enumerate(image_of_text.tolist()):
        captions_of[g].append(text_ids[t])

    def lines(direction, query_ids, rank, top, gallery_ids, positives):
        idx, scores = top[0].tolist(), top[1].tolist()
        for q, (qid, r) in enumerate(zip(query_ids, rank.tolist())):
            yield json.dumps({"direction": direction, "query": qid, "rank": r, "positives": positives(q),
                              "top": [{"id": gallery_ids[j], "score": round(s, 6)}
                                      for j, s in zip(idx[q], scores[q])]}, ensure_ascii=False)

    gallery_of = image_of_text.tolist()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines("text_to_image", text_ids, ranks.text_to_image, ranks.text_top, image_ids,
                          lambda q: [image_ids[gallery_of[q]]]):
            f.write(line + "\n")
        for line in lines("image_to_text", image_ids, ranks.image_to_text, ranks.image_top, text_ids,
                          lambda q: captions_of[q]):
            f.write(line + "\n")


# HOOK for `eclip embed`: eclip.embedstore.evaluate_embeddings(dir, recall_k, chunk_size, dump_ranks, spec)
# (owned by eclip embed) rebuilds this module's ground truth from the store and calls
# evaluate_features; `eclip evaluate --embeddings DIR` calls it.


def report_table(result: dict):
    """A rich Table of the report (what `eclip evaluate` prints without --json)."""
    from rich.table import Table
    ks = [k for k in result["text_to_image"] if k.startswith("R@")]
    title = (f"{result.get('checkpoint') or result.get('model') or 'model'} on {result.get('dataset') or 'data'}"
             f"{' / ' + result['split'] if result.get('split') else ''}: "
             f"{result['n_texts']} captions, {result['n_images']} images")
    table = Table(title=title, caption=f"rsum {result['rsum']:.2f}"
                  + (f"; {result['n_skipped']} unreadable image(s) skipped" if result.get("n_skipped") else ""))
    table.add_column("direction")
    for k in ks:
        table.add_column(k, justify="right")
    table.add_column("median rank", justify="right")
    table.add_column("mean rank", justify="right")
    for name, key in (("text -> image", "text_to_image"), ("image -> text", "image_to_text")):
        row = result[key]
        table.add_row(name, *[f"{row[k]:.2f}" for k in ks], str(row["median_rank"]), f"{row['mean_rank']:.1f}")
    tables = [table]
    if result.get("by_entity_type"):
        by = Table(title="Recall@1 by entity type")
        for col, just in (("entity type", "left"), ("captions", "right"), ("text -> image R@1", "right"),
                          ("images", "right"), ("image -> text R@1", "right")):
            by.add_column(col, justify=just)
        for etype, row in result["by_entity_type"].items():
            by.add_row(etype, str(row["n"]), f"{row['text_to_image_R@1']:.2f}", str(row["n_images"]),
                       f"{row['image_to_text_R@1']:.2f}")
        tables.append(by)
    from rich.console import Group
    return Group(*tables)
