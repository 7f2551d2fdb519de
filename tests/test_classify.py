"""`eclip evaluate --task classify`: zero-shot against CLIP_benchmark's own code on the same
features, the linear probe, the metrics on a case worked by hand, the CLI's JSON and PNG, and
labels flowing from N24News's `section` and a table's `label` into records."""
import json
import math

import numpy as np
import pytest
import torch

from eclip.classify import (ClassifyOptions, classification_metrics, classify, label_targets, linear_probe,
                            record_features)
from eclip.cli import app
from eclip.data.readers import read_dataset
from eclip.errors import EclipError

from test_evaluate import runner
from benchmark_fixtures import VISUALNEWS, n24news_archive, placeholder, visualnews

CLASSES = ["sport", "food", "art", "science", "travel", "politics"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """36 records of 6 classes: distinct real-photo crops, captions naming the class."""
    folder = tmp_path_factory.mktemp("labelled")
    rows = []
    for i in range(36):
        label = CLASSES[i % 6]
        placeholder(folder / f"img{i}.jpg", i)
        rows.append({"id": f"r{i}", "image": f"img{i}.jpg", "text": f"picture {i}: a story about {label}",
                     "label": label})
    path = folder / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class FeatureModel:
    """What CLIP_benchmark's zero-shot code calls, over eclip's model: encode_text is eclip's text
    tower; encode_image returns the features it is given (the images eclip embedded)."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, tokens):
        return self.model.encode_texts(tokens)

    def encode_image(self, features):
        return features


class Features(torch.utils.data.Dataset):
    def __init__(self, x, y, classes):
        self.x, self.y, self.classes = x, torch.as_tensor(y), classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("inputs", ["image", "image+text"])
def test_zero_shot_equals_clip_benchmark_on_the_same_features(labelled, tiny_model, inputs, monkeypatch):
    """CLIP_benchmark's evaluate() builds its own class vectors (through eclip's text tower and
    tokenizer), scores eclip's image features and computes its metrics; ours must agree."""
    import builtins

    from clip_benchmark.metrics import zeroshot_classification as cb
    # its accuracy() calls float() on a 1-element array, which NumPy 2 refuses: the module-level
    # float it looks up first takes the element (nothing else in its code changes)
    monkeypatch.setattr(cb, "float", lambda v: builtins.float(np.asarray(v).reshape(-1)[0]), raising=False)
    records = read_dataset(str(labelled))
    templates = ("a photo about {c}.", "news: {c}.", "the {c} section")
    ours = classify(records=records, model=tiny_model,
                    options=ClassifyOptions(inputs=inputs, templates=templates, batch_size=8))
    x, kept, _ = record_features(tiny_model, records, inputs, batch_size=8)
    assert len(kept) == len(records)
    classes, y = label_targets(records, None, "test")
    loader = torch.utils.data.DataLoader(Features(x, y, classes.names), batch_size=10)
    theirs = cb.evaluate(FeatureModel(tiny_model), loader, tiny_model.tokenize, classes.display, list(templates),
                         "cpu", amp=False)
    assert ours["top1"] == pytest.approx(100 * theirs["acc1"], abs=1e-9)
    assert ours["top5"] == pytest.approx(100 * theirs["acc5"], abs=1e-9)
    assert ours["mean_per_class_recall"] == pytest.approx(100 * theirs["mean_per_class_recall"], abs=1e-9)
    assert ours["n"] == 36 and ours["classes"] == sorted(CLASSES)


def test_metrics_on_a_case_worked_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0],     # true 0, predicted 0
                           [1.0, 3.0, 2.0],     # true 0, predicted 1 (0 third)
                           [1.0, 3.0, 0.0],     # true 1, predicted 1
                           [0.0, 1.0, 3.0],     # true 1, predicted 2
                           [0.0, 1.0, 3.0]])    # true 2, predicted 2
    m = classification_metrics(logits, [0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m["top1"] == pytest.approx(60.0)
    assert m["top5"] is None                              # fewer than 5 classes, as CLIP_benchmark
    assert m["mean_per_class_recall"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    assert m["confusion_matrix"] == {"classes": ["a", "b", "c"], "counts": [[1, 1, 0], [0, 1, 1], [0, 0, 1]]}
    by = {r["class"]: r for r in m["per_class"]}
    assert by["a"]["precision"] == 100.0 and by["a"]["recall"] == 50.0 and by["a"]["support"] == 2
    assert by["c"]["precision"] == 50.0 and by["c"]["recall"] == 100.0
    assert by["b"]["f1"] == pytest.approx(50.0)


def test_linear_probe_separates_separable_classes_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3

    def draw(n):
        y = torch.arange(n) % 4
        return centres[y] + 0.3 * torch.randn(n, 16, generator=g), y.tolist()
    (tx, ty), (vx, vy), (sx, sy) = draw(40), draw(12), draw(20)
    logits, info = linear_probe(tx, ty, vx, vy, sx, seed=0)
    assert classification_metrics(logits, sy, list("abcd"))["top1"] == 100.0
    assert info["val_top1"] == 100.0 and len(info["val_top1_by_C"]) == 7
    again, info2 = linear_probe(tx, ty, vx, vy, sx, seed=0)
    assert torch.equal(logits, again) and info == info2
    shuffled = [sy[(i + 1) % len(sy)] for i in range(len(sy))]       # labels that do not go with the features
    assert classification_metrics(logits, shuffled, list("abcd"))["top1"] == 0.0


def test_linear_probe_c_is_chosen_on_val():
    """Train 18:2, val 10:10. At C=1e-6 the weights shrink to ~0 and the (unpenalised) intercept
    predicts the common class: 50% on val; at C=100 the feature is learnt: 100%."""
    a, b = [1.0, 0.0], [0.0, 1.0]
    tx, ty = torch.tensor([a] * 18 + [b] * 2), [0] * 18 + [1] * 2
    vx, vy = torch.tensor([a] * 10 + [b] * 10), [0] * 10 + [1] * 10
    _, info = linear_probe(tx, ty, vx, vy, vx, seed=0, strengths=(1e-6, 100.0))
    assert info["val_top1_by_C"] == {"1e-06": 50.0, "100.0": 100.0} and info["C"] == 100.0


def test_cli_writes_json_and_a_confusion_png(labelled, tiny_config_path, tmp_path):
    png, out = tmp_path / "cm.png", tmp_path / "r.json"
    r = runner().invoke(app, ["evaluate", "--task", "classify", "--dataset", str(labelled), "--model",
                              str(tiny_config_path), "--pretrained", "none", "--device", "cpu", "--inputs", "text",
                              "--json", "--plot", str(png), "--output", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert json.loads(out.read_text()) == report
    assert report["task"] == "classify" and report["mode"] == "zero-shot" and report["inputs"] == "text"
    counts = np.array(report["confusion_matrix"]["counts"])
    assert counts.shape == (6, 6) and counts.sum() == 36 and list(counts.sum(1)) == [6] * 6
    assert report["top1"] == pytest.approx(100 * np.trace(counts) / 36)
    assert [p["support"] for p in report["per_class"]] == [6] * 6
    for pair in report["confused_pairs"]:
        assert pair["count"] == counts[report["classes"].index(pair["true"]), report["classes"].index(pair["predicted"])]
        assert 0 < len(pair["examples"]) <= 4
    from PIL import Image
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 400
    table = runner().invoke(app, ["evaluate", "--task", "classify", "--dataset", str(labelled), "--model",
                                  str(tiny_config_path), "--pretrained", "none", "--device", "cpu"])
    assert table.exit_code == 0 and "mean per-class recall" in table.stdout and "politics" in table.stdout


def test_classes_file_names_and_orders_the_classes(labelled, tiny_model, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{c}\t{c.title()} news\n" for c in reversed(CLASSES)))
    from eclip.classify import read_classes
    got = classify(records=read_dataset(str(labelled)), model=tiny_model,
                   options=ClassifyOptions(classes=read_classes(classes), batch_size=8))
    assert got["classes"] == list(reversed(CLASSES))
    assert [p["class"] for p in got["per_class"]] == [f"{c.title()} news" for c in reversed(CLASSES)]


def test_labels_come_from_n24news_sections_and_table_fields(tmp_path):
    root = n24news_archive(tmp_path / "n24")
    records = read_dataset("n24news", root, "test")
    assert [r.label for r in records] == ["Science", "Science", "Food", "Style"]
    topics = [r.label for r in read_dataset("visualnews", visualnews(tmp_path / "vn", "authors"), "test")]
    assert topics == [d["topic"] for d in VISUALNEWS]
    table = tmp_path / "t.csv"
    table.write_text("image,text,label\na.jpg,one,7\nb.jpg,two,\n")
    assert [r.label for r in read_dataset(str(table))] == ["7", None]
    with pytest.raises(EclipError, match="no label"):
        label_targets(read_dataset(str(table)), None, "--dataset t.csv")


def test_top5_is_nan_free_and_none_below_five_classes():
    m = classification_metrics(torch.eye(4), [0, 1, 2, 3], list("abcd"))
    assert m["top5"] is None and not any(isinstance(v, float) and math.isnan(v) for v in (m["top1"],))


def test_cli_linear_probe_reads_train_and_val_files(labelled, tiny_config_path):
    """A table has no splits: --train-split / --val-split name files. 36 captions in 64 dimensions
    are linearly separable, so a probe fitted on them (train = val = test here) classifies them all."""
    r = runner().invoke(app, ["evaluate", "--task", "classify", "--mode", "linear-probe", "--inputs", "text",
                              "--dataset", str(labelled), "--train-split", str(labelled), "--val-split",
                              str(labelled), "--model", str(tiny_config_path), "--pretrained", "none",
                              "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["mode"] == "linear-probe" and report["n_train"] == 36 and report["n_val"] == 36
    assert report["top1"] == 100.0 and report["val_top1"] == 100.0 and report["C"] in (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)


def test_kept_features_are_reused(labelled, tiny_model, tmp_path, monkeypatch):
    import eclip.evaluate
    records = read_dataset(str(labelled))
    options = ClassifyOptions(inputs="image+text", batch_size=8)
    first = classify(records=records, model=tiny_model, options=options, features_dir=tmp_path)
    assert len(list(tmp_path.glob("classify-image-text-*.safetensors"))) == 1

    def no_embedding(*a, **k):
        raise AssertionError("images embedded again although their features were kept")
    monkeypatch.setattr(eclip.evaluate, "embed_images", no_embedding)
    again = classify(records=records, model=tiny_model, options=options, features_dir=tmp_path)
    assert again == first
    with pytest.raises(AssertionError, match="embedded again"):     # other records: not the kept features
        classify(records=records[:-6], model=tiny_model, options=options, features_dir=tmp_path)
