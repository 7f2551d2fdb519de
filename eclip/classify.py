"""`eclip evaluate --task classify` as a library: zero-shot classification and a linear probe on
a model's features, with the metrics CLIP_benchmark reports and more.

    from eclip.classify import ClassifyOptions, classify
    result = classify(ModelSpec(checkpoint="run/best.safetensors"), "n24news", None, "test",
                      options=ClassifyOptions(mode="zero-shot", inputs="image+text"))
    result["top1"], result["mean_per_class_recall"]

Labels are the records' `label` (N24News: its section; a table: its `label` field). The classes
are the distinct labels, sorted, unless `Classes` (a --classes file) lists them, optionally with
display names.

Inputs: the image, the caption (`text`) or both (`image+text`): the mean of the image's and the
caption's L2-normalised vectors, normalised again (so scores stay cosines; the ranking of classes
is that of the plain mean).

Zero-shot, as CLIP and CLIP_benchmark (clip_benchmark.metrics.zeroshot_classification) do: every
template filled with a class name is embedded and normalised, the class vector is their mean,
normalised; logits = 100 * features @ class vectors.

Linear probe, as CLIP_benchmark's (clip_benchmark.metrics.linear_probe): on normalised frozen
features, a logistic regression (scikit-learn, L-BFGS, seeded) is fitted on the train split for
each regularisation strength C in `PROBE_C`; the C with the best val top-1 (the smaller on a tie)
is refitted on train + val, as CLIP_benchmark does, and reported on the evaluated split.

Metrics (percentages, 0-100): top-1, top-5 (null with fewer than 5 classes, as CLIP_benchmark),
mean per-class recall (scikit-learn's balanced accuracy over the classes present), per-class
precision / recall / F1 / support, the confusion matrix (rows: true class, columns: predicted)
and the most confused pairs with a few example records each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from eclip.errors import EclipError

MODES = ("zero-shot", "linear-probe")
INPUTS = ("image", "text", "image+text")
DEFAULT_TEMPLATES = ("a news photo about {c}.", "a photo from the {c} section of a newspaper.",
                     "a news story about {c}.", "{c} news.")
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)    # the regularisation strengths tried on val
CONFUSED_PAIRS = 10         # the most confused (true, predicted) pairs reported
EXAMPLES_PER_PAIR = 4       # example records kept for each


@dataclass
class Classes:
    names: list                                   # labels as the records carry them
    display: list = field(default_factory=list)   # what tables and plots show (default: the names)

    def __post_init__(self):
        self.display = list(self.display) or list(self.names)


@dataclass
class ClassifyOptions:
    mode: str = "zero-shot"
    inputs: str = "image"
    templates: tuple = DEFAULT_TEMPLATES
    classes: Optional[Classes] = None
    train_split: str = "train"          # linear probe: fitted here,
    val_split: str = "val"              # C chosen here
    seed: int = 0                       # the probe's random_state (L-BFGS itself draws nothing)
    batch_size: int = 64

    def check(self) -> "ClassifyOptions":
        if self.mode not in MODES:
            raise EclipError(f"--mode {self.mode}: one of {', '.join(MODES)}")
        if self.inputs not in INPUTS:
            raise EclipError(f"--inputs {self.inputs}: one of {', '.join(INPUTS)}")
        check_templates(self.templates, "--templates")
        return self


def check_templates(templates, where: str) -> tuple:
    if not templates:
        raise EclipError(f"{where}: no templates")
    for t in templates:
        try:
            filled = t.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise EclipError(f"{where}: template {t!r} is not a format string with only {{c}} ({e!r})") from None
        if "{c}" not in t or filled == t:
            raise EclipError(f"{where}: template {t!r} has no {{c}} where the class name goes")
    return tuple(templates)


def read_templates(path) -> tuple:
    """One template per line, each with {c}; blank lines and lines starting with # are skipped."""
    from eclip.data.readers import read_lines
    path = Path(path).expanduser()
    if not path.is_file():
        raise EclipError(f"--templates {path}: file not found")
    lines = [t.strip() for _, t in read_lines(path) if t.strip() and not t.strip().startswith("#")]
    return check_templates(lines, f"--templates {path}")


def read_classes(path) -> Classes:
    """One class per line: its label, optionally a tab and the name to show (and to fill the
    templates with)."""
    from eclip.data.readers import read_lines
    path = Path(path).expanduser()
    if not path.is_file():
        raise EclipError(f"--classes {path}: file not found")
    names, display = [], []
    for number, text in read_lines(path):
        if not text.strip():
            continue
        label, _, shown = text.partition("\t")
        if label.strip() in names:
            raise EclipError(f"--classes {path} line {number}: class {label.strip()!r} listed twice")
        names.append(label.strip())
        display.append(shown.strip() or label.strip())
    if len(names) < 2:
        raise EclipError(f"--classes {path}: needs at least two classes")
    return Classes(names, display)


def label_targets(records, classes: Optional[Classes], where: str) -> tuple[Classes, list]:
    """(classes, class index of every record); EclipError when a record has no label, a label is
    not a class, or a class has no example in `records`."""
    _require_labels(records, where)
    if classes is None:
        labels = {r.label for r in records}
        classes = Classes(sorted(labels))
        if len(labels) == 1:
            raise EclipError(f"{where}: every record has the label {classes.names[0]!r}; classification "
                             "needs at least two classes")
    _, targets = label_targets_within(records, classes, where)
    present = set(targets)
    empty = [n for i, n in enumerate(classes.names) if i not in present]
    if empty:
        raise EclipError(f"{where}: class {empty[0]!r} has no examples ({len(empty)} class(es) without any)")
    return classes, targets


# --- features ----------------------------------------------------------------------------------

def record_features(model, records, inputs: str, batch_size: int = 64, workers: int | None = None):
    """-> (features [n_kept, D] float32 on the CPU, L2-normalised; kept record indices; skipped
    {image path: reason}). Records whose image cannot be read are dropped when images are used."""
    import torch
    import torch.nn.functional as F

    from eclip.console import progress
    from eclip.evaluate import embed_images, embed_texts, gallery_items
    kept, skipped = list(range(len(records))), {}
    image = text = None
    if inputs in ("image", "image+text"):
        first, file_of_record = gallery_items([r.image for r in records])
        with progress() as bar:
            features, failed = embed_images(model, [records[i].image for i in first], batch_size, workers, bar)
        bad = {i for i, _ in failed}
        for i, reason in failed:
            skipped[records[first[i]].image] = reason
        kept = [j for j in kept if file_of_record[j] not in bad]
        image = features.float().cpu()[torch.tensor([file_of_record[j] for j in kept], dtype=torch.long)]
    if inputs in ("text", "image+text"):
        text = embed_texts(model, [records[j].caption for j in kept], batch_size).float().cpu()
    if image is None:
        return text, kept, skipped
    if text is None:
        return image, kept, skipped
    return F.normalize((F.normalize(image, dim=-1) + F.normalize(text, dim=-1)) / 2, dim=-1), kept, skipped


def zero_shot_weights(model, names, templates, batch_size: int = 64):
    """Class vectors [D, C]: the mean of each class's normalised template embeddings, normalised."""
    import torch.nn.functional as F

    from eclip.evaluate import embed_texts
    texts = [t.format(c=name) for name in names for t in templates]
    f = F.normalize(embed_texts(model, texts, batch_size).float().cpu(), dim=-1)
    per_class = f.view(len(names), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def zero_shot_logits(features, weights):
    """[n, C] = 100 * features @ class vectors, as CLIP_benchmark scales them."""
    return 100.0 * features.float() @ weights.float()


def linear_probe(train_x, train_y, val_x, val_y, test_x, seed: int = 0, strengths=PROBE_C):
    """Logistic regression on features: C chosen on val, refitted on train + val; returns
    (log-probabilities of test_x [n, C] as a tensor, {"C", "val_top1", "val_top1_by_C"})."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from eclip.console import progress

    def fit(x, y, c):
        return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)

    tx, vx = _numpy_rows(train_x), _numpy_rows(val_x)
    ty, vy = np.asarray(train_y), np.asarray(val_y)
    scores = {}
    with progress() as bar:
        task = bar.add_task("linear probe: C on val", total=len(strengths) + 1)
        for c in strengths:
            scores[c] = 100.0 * float((fit(tx, ty, c).predict(vx) == vy).mean())
            bar.advance(task)
        best = max(strengths, key=lambda c: (scores[c], -c))
        final = fit(np.concatenate([tx, vx]), np.concatenate([ty, vy]), best)
        bar.advance(task)
    logits = torch.from_numpy(final.predict_log_proba(_numpy_rows(test_x))).float()
    return logits, {"C": best, "val_top1": scores[best], "val_top1_by_C": {str(c): s for c, s in scores.items()}}


def _numpy_rows(x):
    import torch.nn.functional as F
    return F.normalize(x.float(), dim=-1).numpy()       # CLIP_benchmark's probe normalises its features


# --- metrics -----------------------------------------------------------------------------------

def classification_metrics(logits, targets, display_names) -> dict:
    """Top-1 / top-5 accuracy, mean per-class recall, per-class precision / recall / F1 / support and
    the confusion matrix (rows: true, columns: predicted) of logits [n, C] against targets [n]."""
    import numpy as np
    import torch
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support
    logits = torch.as_tensor(logits).float()
    target = torch.as_tensor(targets, dtype=torch.long)
    n, n_classes = logits.shape
    ranked = logits.topk(min(5, n_classes), dim=1).indices
    hit = ranked.eq(target[:, None])
    pred = ranked[:, 0].numpy()
    y = target.numpy()
    labels = np.arange(n_classes)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "top1": 100.0 * hit[:, :1].any(1).double().mean().item(),
        "top5": 100.0 * hit[:, :5].any(1).double().mean().item() if n_classes >= 5 else None,
        "mean_per_class_recall": 100.0 * float(balanced_accuracy_score(y, pred)),
        "n": n,
        "n_classes": n_classes,
        "per_class": [{"class": name, "precision": 100.0 * float(p), "recall": 100.0 * float(r),
                       "f1": 100.0 * float(f), "support": int(s)}
                      for name, p, r, f, s in zip(display_names, precision, recall, f1, support)],
        "confusion_matrix": {"classes": list(display_names),
                             "counts": confusion_matrix(y, pred, labels=labels).tolist()},
        "predicted": pred.tolist(),
    }


def confused_pairs(counts, display_names, targets, predicted, records, top: int = CONFUSED_PAIRS,
                   examples: int = EXAMPLES_PER_PAIR) -> list:
    """The `top` off-diagonal cells of the confusion matrix, most frequent first, each with up to
    `examples` of its records: [{"true", "predicted", "count", "examples": [{id, image, caption}]}]."""
    cells = sorted(((c, i, j) for i, row in enumerate(counts) for j, c in enumerate(row) if i != j and c),
                   key=lambda t: (-t[0], t[1], t[2]))[:top]
    out = []
    for c, i, j in cells:
        found = [r for r, t, p in zip(records, targets, predicted) if t == i and p == j][:examples]
        out.append({"true": display_names[i], "predicted": display_names[j], "count": c,
                    "examples": [{"id": r.id, "image": r.image, "caption": r.caption} for r in found]})
    return out


# --- the whole evaluation ----------------------------------------------------------------------

def classify(spec=None, dataset: str | None = None, data_root=None, split: str = "test", *,
             options: ClassifyOptions | None = None, model=None, records=None, image_folder=None,
             workers: int | None = None, features_dir=None) -> dict:
    """Classify a split's records with a model and return the metrics report (module docstring).

    `records` may replace dataset / split (zero-shot only; a linear probe reads its train and val
    splits from `dataset`). With `features_dir`, each split's features are kept there and reused
    (eclip.features_cache)."""
    import torch
    options = (options or ClassifyOptions()).check()
    read = split_reader(dataset, data_root, image_folder)
    if records is None:
        records = read(split)
    if not records:
        raise EclipError(f"--dataset {dataset} --split {split}: no records to classify")
    where = _where(dataset, split)
    if options.mode == "zero-shot":
        classes, _ = label_targets(records, options.classes, where)
    else:
        check_labels(records, dataset, split, options, read)
        train = read(options.train_split)
        classes, _ = label_targets(train, options.classes, _where(dataset, options.train_split))
        val = read(options.val_split)
        label_targets_within(val, classes, _where(dataset, options.val_split))
    label_targets_within(records, classes, where)
    if model is None:
        from eclip.model.factory import load_model
        model = load_model(spec)
    model.eval()

    def features(split_records):
        if features_dir is None:
            return record_features(model, split_records, options.inputs, options.batch_size, workers)
        from eclip.features_cache import cached_features, records_digest
        stamp = {"model": model.identity() if hasattr(model, "identity") else None, "inputs": options.inputs,
                 "records": records_digest(split_records)}

        def compute():
            f, kept, skipped = record_features(model, split_records, options.inputs, options.batch_size, workers)
            return {"features": f, "kept": torch.tensor(kept, dtype=torch.long)}
        name = f"classify-{options.inputs.replace('+', '-')}-{stamp['records'][:16]}.safetensors"
        got = cached_features(Path(features_dir) / name, stamp, compute)
        kept = got["kept"].tolist()
        kept_set = set(kept)
        return got["features"], kept, {r.image: "unreadable" for i, r in enumerate(split_records) if i not in kept_set}

    x, kept, skipped = features(records)
    if not kept:
        raise EclipError(f"{where}: none of the {len(records)} records has a readable image")
    kept_records = [records[i] for i in kept]
    _, y = label_targets_within(kept_records, classes, where)
    extra = {}
    if options.mode == "zero-shot":
        weights = zero_shot_weights(model, classes.display, options.templates, options.batch_size)
        logits = zero_shot_logits(x, weights)
        extra["templates"] = list(options.templates)
    else:
        tx, tkept, _ = features(train)
        vx, vkept, _ = features(val)
        _, ty = label_targets_within([train[i] for i in tkept], classes, where)
        _, vy = label_targets_within([val[i] for i in vkept], classes, where)
        logits, extra = linear_probe(tx, ty, vx, vy, x, seed=options.seed)
        extra.update(train_split=options.train_split, val_split=options.val_split, n_train=len(ty), n_val=len(vy),
                     seed=options.seed)
    result = classification_metrics(logits, y, classes.display)
    predicted = result.pop("predicted")
    result["confused_pairs"] = confused_pairs(result["confusion_matrix"]["counts"], classes.display, y,
                                              predicted, kept_records)
    if skipped:
        from eclip.console import note
        first = next(iter(skipped.items()))
        note(f"skipped {len(skipped)} image file(s) that could not be read, with their "
             f"{len(records) - len(kept)} record(s); first: {first[0]}: {first[1]}")
    from eclip.data.readers import dataset_label
    identity = model.identity() if hasattr(model, "identity") else {}
    name, named_split = dataset_label(dataset, split)
    return {"task": "classify", "mode": options.mode, "inputs": options.inputs, **_headline(result), **extra,
            "classes": list(classes.names), **result, "model": identity.get("model"),
            "checkpoint": identity.get("checkpoint"), "checkpoint_sha256": identity.get("checkpoint_sha256"),
            "n_skipped": len(skipped), "dataset": name, "split": named_split}


def label_targets_within(records, classes: Classes, where: str) -> tuple[Classes, list]:
    """Class indices of records that must all carry one of `classes` (some classes may be absent)."""
    _require_labels(records, where)
    index = {name: i for i, name in enumerate(classes.names)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise EclipError(f"{where}: label {unknown[0]!r} is not a class of the classifier "
                         f"({', '.join(classes.names[:5])}{', ...' if len(classes.names) > 5 else ''})")
    return classes, [index[r.label] for r in records]


def _require_labels(records, where: str) -> None:
    unlabelled = [r for r in records if r.label is None]
    if unlabelled:
        raise EclipError(f"{where}: {len(unlabelled)} of {len(records)} records have no label (first: id "
                         f"{unlabelled[0].id!r}); classification needs a `label` field (N24News: its section)")


def _headline(result: dict) -> dict:
    return {k: result[k] for k in ("top1", "top5", "mean_per_class_recall")}


def split_reader(dataset, data_root, image_folder):
    """split -> records. A .jsonl / .csv dataset has no splits: a linear probe's --train-split and
    --val-split then name files of their own."""
    def read(split):
        if not dataset:
            raise EclipError("--dataset is required (n24news, visualnews or a .jsonl / .csv file with a label field)")
        from eclip.data.readers import read_dataset
        if _is_file(split):
            return read_dataset(split)
        return read_dataset(dataset, data_root, split, image_folder=image_folder)
    return read


def _is_file(name) -> bool:
    return Path(str(name)).suffix.lower() in (".jsonl", ".csv")


def check_labels(records, dataset, split, options: ClassifyOptions, read_split=None) -> None:
    """What `classify` would refuse about labels, found before a model loads (read_split(name) ->
    records reads a linear probe's train split)."""
    where = _where(dataset, split)
    if options.mode == "zero-shot":
        label_targets(records, options.classes, where)
        return
    if _is_file(dataset) and not _is_file(options.train_split):
        raise EclipError(f"--dataset {dataset}: a file has no train / val split; a linear probe needs "
                         "--train-split and --val-split as .jsonl / .csv files")
    train = (read_split or split_reader(dataset, None, None))(options.train_split)
    classes, _ = label_targets(train, options.classes, _where(dataset, options.train_split))
    label_targets_within(records, classes, where)


def _where(dataset, split) -> str:
    if _is_file(split):
        return f"--dataset {split}"
    from eclip.data.readers import dataset_label
    name, named_split = dataset_label(dataset, split)
    return f"--dataset {name}" + (f" --split {named_split}" if named_split else "")


def report_table(result: dict):
    """A rich Table of a classification report (what `eclip evaluate --task classify` prints)."""
    from rich.console import Group
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{v:.2f}"
    title = (f"{result.get('checkpoint') or result.get('model') or 'model'} on {result.get('dataset') or 'data'}"
             f"{' / ' + result['split'] if result.get('split') else ''}: {result['mode']} classification of "
             f"{result['n']} records ({result['inputs']}), {result['n_classes']} classes")
    head = Table(title=title, caption=(f"linear probe C = {result['C']:g} (val top-1 {result['val_top1']:.2f})"
                                       if result["mode"] == "linear-probe" else None))
    for col in ("top-1", "top-5", "mean per-class recall"):
        head.add_column(col, justify="right")
    head.add_row(pct(result["top1"]), pct(result["top5"]), pct(result["mean_per_class_recall"]))
    per = Table(title="Per class")
    for col, just in (("class", "left"), ("precision", "right"), ("recall", "right"), ("F1", "right"),
                      ("support", "right")):
        per.add_column(col, justify=just)
    for row in result["per_class"]:
        per.add_row(row["class"], pct(row["precision"]), pct(row["recall"]), pct(row["f1"]), str(row["support"]))
    return Group(head, per)
