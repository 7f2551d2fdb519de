"""`eclip embed`: vectors equal open_clip's, Parquet metadata, bad images logged, resume, model refusal."""
import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from eclip.cli import app
from eclip.embedstore import open_store


@pytest.fixture(scope="module")
def photos(tmp_path_factory, real_images):
    """A folder of the four real photos, plus a caption file naming them."""
    folder = tmp_path_factory.mktemp("gallery")
    for name, src in real_images.items():
        (folder / f"{name}.jpg").write_bytes(src.read_bytes())
    return folder


def run(*args, code=0):
    result = CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


_OPEN_CLIP = {}


def open_clip_model(model):
    """A plain open_clip model and eval transform, built by open_clip itself, with `model`'s weights."""
    import open_clip
    if id(model) not in _OPEN_CLIP:
        clip, _, transform = open_clip.create_model_and_transforms(model.config.clip_name, pretrained=None)
        clip.load_state_dict(model.clip.state_dict())
        _OPEN_CLIP[id(model)] = (clip.eval(), transform, open_clip.get_tokenizer(model.config.clip_name))
    return _OPEN_CLIP[id(model)]


def open_clip_image_vector(model, path):
    clip, transform, _ = open_clip_model(model)
    with torch.no_grad():
        v = clip.encode_image(transform(Image.open(path).convert("RGB"))[None])
    return torch.nn.functional.normalize(v, dim=-1)[0].numpy()


def open_clip_text_vectors(model, texts):
    clip, _, tokenizer = open_clip_model(model)
    with torch.no_grad():
        return torch.nn.functional.normalize(clip.encode_text(tokenizer(texts)), dim=-1).numpy()


def test_vectors_equal_open_clip(tmp_path, checkpoint, photos):
    path, model = checkpoint
    captions = ["an astronaut in a suit", "a rocket on the launch pad", "a cat"]
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n")
    out = tmp_path / "out"
    run("embed", "--checkpoint", path, "--images", photos, "--texts", tmp_path / "caps.txt",
        "--output", out, "--dtype", "fp32", "--batch-size", "3", "--workers", "1")
    store = open_store(out)
    table = store.table("images").to_pydict()
    assert table["row"] == [0, 1, 2, 3]
    assert table["path"] == sorted(os.path.abspath(p) for p in photos.glob("*.jpg"))
    assert table["id"] == table["path"]
    vectors = store.vectors("images")
    for row, p in enumerate(table["path"]):
        np.testing.assert_allclose(vectors[row], open_clip_image_vector(model, p), atol=2e-5)
    np.testing.assert_allclose(store.vectors("texts"), open_clip_text_vectors(model, captions), atol=2e-5)
    assert store.table("texts").to_pydict()["id"] == ["1", "2", "3"]
    assert store.manifest["dim"] == 64 and store.manifest["images"]["count"] == 4
    assert store.identity["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_fp16_vectors_are_unit_length(tmp_path, checkpoint, photos):
    out = tmp_path / "out"
    run("embed", "--checkpoint", checkpoint[0], "--images", str(photos / "*.jpg"), "--output", out,
        "--workers", "0")
    store = open_store(out)
    assert store.dtype == "fp16"
    np.testing.assert_allclose(np.linalg.norm(store.vectors("images"), axis=1), 1.0, atol=2e-3)


def test_dataset_tables_rebuild_ground_truth(tmp_path, checkpoint, real_images):
    rows = [{"id": "r1", "image": str(real_images["astronaut"]), "text": "Eileen Collins, astronaut",
             "entities": [{"text": "Eileen Collins", "type": "PERSON"}]},
            {"id": "r2", "image": str(real_images["rocket"]), "text": "DSCOVR launch on a Falcon 9"},
            {"id": "r3", "image": str(real_images["astronaut"]), "text": "the same photo again"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run("embed", "--checkpoint", checkpoint[0], "--dataset", data, "--output", out, "--workers", "0")
    images = pq.read_table(out / "images.parquet")
    texts = pq.read_table(out / "texts.parquet")
    assert images.column_names == ["row", "id", "path", "sha256"]
    assert texts.column_names == ["row", "id", "text", "entities", "image"]
    # each image file once (its id is its path, as with --images); each record's caption names its image
    astronaut, rocket = str(real_images["astronaut"]), str(real_images["rocket"])
    assert images.column("path").to_pylist() == images.column("id").to_pylist() == [astronaut, rocket]
    assert texts.column("id").to_pylist() == ["r1", "r2", "r3"]
    assert texts.column("image").to_pylist() == [astronaut, rocket, astronaut]
    digest = hashlib.sha256(real_images["astronaut"].read_bytes()).hexdigest()
    assert images.column("sha256").to_pylist()[0] == digest
    assert json.loads(texts.column("entities")[0].as_py()) == [{"text": "Eileen Collins", "type": "PERSON"}]
    assert json.loads((out / "manifest.json").read_text())["source"]["dataset"] == str(data)

    from eclip.embedstore import evaluate_embeddings
    report = evaluate_embeddings(out, recall_k=(1,))
    assert report["n_images"] == 2 and report["n_texts"] == 3
    found = json.loads(run("match", "--gallery", out, "an astronaut", "--json").stdout)["results"][0]["matches"]
    assert sorted(m["path"] for m in found) == sorted([astronaut, rocket])     # no file twice


def write_bad_and_odd_images(folder, real_images):
    """Broken files (errors) and odd-but-valid ones (CMYK, 16-bit, alpha, EXIF rotation)."""
    photo = np.asarray(Image.open(real_images["astronaut"]).convert("RGB").resize((96, 64)))
    Image.fromarray(photo).save(folder / "plain.png")
    # EXIF orientation 6: stored rotated a quarter turn anticlockwise, shown upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(photo, 1).copy()).save(folder / "rotated.png", exif=exif)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    Image.fromarray(gray).save(folder / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    good = real_images["coffee"].read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    Image.new("1", (2000, 1000)).save(folder / "bomb.png")    # 2 Mpx, over the limit the test sets


def test_bad_images_are_logged_and_odd_ones_embedded_correctly(tmp_path, checkpoint, real_images, monkeypatch):
    monkeypatch.setenv("ECLIP_MAX_IMAGE_PIXELS", "1000000")
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_bad_and_odd_images(folder, real_images)
    listing = tmp_path / "list.txt"      # every file, plus one that is not there
    listing.write_text("".join(f"imgs/{p.name}\n" for p in sorted(folder.iterdir())) + "imgs/gone.jpg\n")
    out = tmp_path / "out"
    run("embed", "--checkpoint", checkpoint[0], "--images", listing, "--output", out, "--dtype", "fp32",
        "--shard-size", "3", "--workers", "2")
    errors = {json.loads(line)["image"].rsplit("/", 1)[1]: json.loads(line)["reason"]
              for line in (out / "errors.jsonl").read_text().splitlines()}
    assert errors.keys() == {"truncated.jpg", "text.jpg", "empty.png", "bomb.png", "gone.jpg"}
    assert errors["truncated.jpg"] == "truncated" and errors["text.jpg"] == "not an image"
    assert errors["empty.png"] == "empty file" and errors["gone.jpg"] == "missing"
    assert errors["bomb.png"].startswith("decompression bomb")
    store = open_store(out)
    names = [p.rsplit("/", 1)[1] for p in store.table("images").column("path").to_pylist()]
    assert sorted(names) == ["alpha.png", "cmyk.jpg", "gray16.png", "gray8.png", "plain.png", "rotated.png"]
    v = dict(zip(names, store.vectors("images")))
    np.testing.assert_allclose(v["rotated.png"], v["plain.png"], atol=1e-5)   # EXIF applied
    np.testing.assert_allclose(v["alpha.png"], v["plain.png"], atol=1e-5)     # opaque alpha dropped
    np.testing.assert_allclose(v["gray16.png"], v["gray8.png"], atol=1e-5)    # 16-bit scaled, not clipped
    assert float(v["cmyk.jpg"] @ v["plain.png"]) > 0.95                      # CMYK colours kept
    assert store.manifest["images"]["errors"] == 5 and store.manifest["images"]["inputs"] == 11


def shard_files(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("images-*-r*.*")}


def test_resume_skips_finished_shards_and_a_killed_run_leaves_no_corrupt_shard(tmp_path, checkpoint, photos,
                                                                               monkeypatch):
    import eclip.embed
    out = tmp_path / "out"
    args = ["embed", "--checkpoint", checkpoint[0], "--images", photos, "--output", out, "--shard-size", "1",
            "--workers", "0", "--dtype", "fp32"]
    writes = []
    real_write = eclip.embed.write_shard

    def dies_on_third_shard(folder, shard, *a, **kw):
        if len(writes) == 2:
            raise KeyboardInterrupt   # the run is killed while embedding shard 2
        writes.append(shard.index)
        return real_write(folder, shard, *a, **kw)

    monkeypatch.setattr(eclip.embed, "write_shard", dies_on_third_shard)
    run(*args, code=130)
    assert not (out / "manifest.json").exists()
    assert sorted(shard_files(out)) == ["images-00000-r0.parquet", "images-00000-r0.safetensors",
                                        "images-00001-r0.parquet", "images-00001-r0.safetensors"]
    assert not list(out.glob(".*tmp"))       # no half-written file left behind
    with pytest.raises(Exception, match="manifest.json"):
        open_store(out)
    before = shard_files(out)
    leftover = out / ".images-00002-r0.safetensors.x1y2.tmp"   # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"half a shard")

    writes.clear()
    monkeypatch.setattr(eclip.embed, "write_shard", lambda *a, **kw: writes.append(a[1].index) or real_write(*a, **kw))
    run(*args)
    assert writes == [2, 3]                  # only the unfinished shards are embedded
    after = shard_files(out)
    assert all(after[name] == mtime for name, mtime in before.items())
    assert not leftover.exists()
    assert open_store(out).count("images") == 4

    # a shard whose metadata part is missing is not finished: it is embedded again
    (out / "images-00001-r0.parquet").unlink()
    writes.clear()
    run(*args)
    assert writes == [1]
    writes.clear()
    run(*args)                               # everything finished: nothing to do
    assert writes == []
    np.testing.assert_allclose(open_store(out).vectors("images")[0],
                               open_clip_image_vector(checkpoint[1], sorted(photos.glob("*.jpg"))[0]), atol=2e-5)


def test_other_model_refused_in_embed_and_match(tmp_path, checkpoint, photos):
    from eclip.checkpoint import save_checkpoint
    out = tmp_path / "out"
    run("embed", "--checkpoint", checkpoint[0], "--images", photos, "--output", out, "--workers", "0")
    model = checkpoint[1]
    with torch.no_grad():
        model.clip.visual.proj.mul_(-1)          # another model: same architecture, other weights
    other = tmp_path / "other.safetensors"
    try:
        save_checkpoint(model, other)
    finally:
        with torch.no_grad():
            model.clip.visual.proj.mul_(-1)
    result = run("embed", "--checkpoint", other, "--images", photos, "--output", out, code=2)
    assert "made with checkpoint sha256" in result.stderr and result.stderr.count("\n") == 1
    result = run("match", "--gallery", out, "--checkpoint", other, "an astronaut", code=2)
    assert "embeddings were made with" in result.stderr and result.stderr.count("\n") == 1
    run("embed", "--checkpoint", other, "--images", photos, "--output", out, "--overwrite", "--workers", "0")
    assert open_store(out).identity["checkpoint_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


@pytest.mark.parametrize("args, message", [
    (["--images", "/no/such/folder"], "no such folder"),
    (["--texts", "/no/such.txt"], "no such file"),
    ([], "nothing to embed"),
    (["--images", "{photos}", "--checkpoint", "{truncated}"], "not a readable .safetensors file"),
    (["--images", "{photos}", "--shard-size", "0"], "must be at least 1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, checkpoint, photos, args, message):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(checkpoint[0].read_bytes()[:5000])
    args = [a.format(photos=photos, truncated=truncated) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(checkpoint[0])]
    result = run("embed", *args, "--output", tmp_path / "out", code=2)
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_image_and_text_inputs(tmp_path, photos):
    from eclip.embed import image_inputs, text_inputs
    from eclip.errors import EclipError
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen photos\n{photos / 'rocket.jpg'}\n\nrel/../{photos.name}/coffee.jpg\n")
    (tmp_path / photos.name).symlink_to(photos)
    got = [item["id"] for item in image_inputs(str(listing))]
    assert got == [str(photos / "rocket.jpg"), os.path.abspath(tmp_path / photos.name / "coffee.jpg")]
    assert [os.path.basename(i["path"]) for i in image_inputs(str(photos / "c*.jpg"))] == ["chelsea.jpg", "coffee.jpg"]
    with pytest.raises(EclipError, match="no files match"):
        image_inputs(str(photos / "*.gif"))
    (tmp_path / "caps.txt").write_text("first\n\nthird\n")
    assert [(t["id"], t["text"]) for t in text_inputs(tmp_path / "caps.txt")] == [("1", "first"), ("3", "third")]
    (tmp_path / "caps.jsonl").write_text('{"id": "x", "text": "a"}\n{"caption": "b", "entities": [{"text": "b"}]}\n')
    rows = text_inputs(tmp_path / "caps.jsonl")
    assert [(t["id"], t["text"], json.loads(t["entities"])) for t in rows] == [("x", "a", []), ("2", "b", [{"text": "b"}])]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(EclipError, match="bad.jsonl line 2: invalid JSON"):
        text_inputs(tmp_path / "bad.jsonl")


def test_stored_embeddings_evaluate_like_the_model_itself(tmp_path, checkpoint, real_images):
    """evaluate --embeddings (eclip.embedstore.evaluate_embeddings) gives the numbers evaluate computes."""
    from eclip.config import ModelSpec
    from eclip.data.readers import read_dataset
    from eclip.embedstore import evaluate_embeddings
    from eclip.errors import EclipError
    from eclip.evaluate import evaluate
    rows = [{"id": f"r{i}", "image": str(real_images[name]), "text": text}
            for i, (name, text) in enumerate([("astronaut", "an astronaut"), ("rocket", "a rocket on the pad"),
                                              ("coffee", "a cup of coffee"), ("chelsea", "a tabby cat"),
                                              ("rocket", "the same launch again")])]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run("embed", "--checkpoint", checkpoint[0], "--dataset", data, "--output", out, "--dtype", "fp32",
        "--workers", "0")
    stored = evaluate_embeddings(out, recall_k=(1, 5))
    direct = evaluate(model=checkpoint[1], records=read_dataset(str(data)), recall_k=(1, 5))
    for key in ("text_to_image", "image_to_text"):
        assert stored[key] == pytest.approx(direct[key])
    assert (stored["n_images"], stored["n_texts"]) == (direct["n_images"], direct["n_texts"]) == (4, 5)
    with pytest.raises(EclipError, match="embeddings were made with"):
        evaluate_embeddings(out, spec=ModelSpec(model="ViT-B-32", pretrained="none"))
    cli = json.loads(run("evaluate", "--embeddings", out, "--json", "--recall-k", "1,5").stdout)
    assert cli["text_to_image"] == pytest.approx(direct["text_to_image"])
    result = run("evaluate", "--embeddings", out, "--model", "ViT-B-32", "--pretrained", "none", code=2)
    assert "embeddings were made with" in result.stderr and result.stderr.count("\n") == 1


def test_random_weights_are_seeded_so_a_resumed_embed_uses_one_model(tmp_path, tiny_config_path, real_images):
    """`--pretrained none`: a killed and re-run embed, and match / evaluate against its vectors, use the
    same random model (the seed is part of the identity); another seed is another model and is refused."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):   # the same photograph twice, in two shards
        (photos / f"{name}.jpg").write_bytes(real_images["astronaut"].read_bytes())
    out = tmp_path / "out"
    args = ["embed", "--model", tiny_config_path, "--pretrained", "none", "--images", photos, "--output", out,
            "--shard-size", "1", "--workers", "0", "--dtype", "fp32"]
    run(*args)
    for path in [out / "manifest.json", *out.glob("images-00001-r0.*")]:
        path.unlink()                            # as if killed before the second shard
    torch.rand(1000)                             # this process's random stream has moved on
    run(*args)
    store = open_store(out)
    a, b = store.vectors("images")
    assert float(a @ b) == pytest.approx(1.0, abs=1e-5)
    assert store.identity["seed"] == 0

    model = ["--model", tiny_config_path, "--pretrained", "none"]
    run("match", "--gallery", out, "an astronaut", *model)
    refused = run("match", "--gallery", out, "an astronaut", *model, "--seed", "1", code=2)
    assert "embeddings were made with" in refused.stderr and "seed" in refused.stderr
    refused = run("embed", *args[1:], "--seed", "1", code=2)
    assert "seed" in refused.stderr and refused.stderr.count("\n") == 1
    from eclip.config import ModelSpec
    from eclip.embedstore import check_spec
    from eclip.errors import EclipError
    check_spec(store, ModelSpec(model=str(tiny_config_path), pretrained="none"))   # evaluate --embeddings
    with pytest.raises(EclipError, match="seed"):
        check_spec(store, ModelSpec(model=str(tiny_config_path), pretrained="none", seed=3))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, checkpoint, photos):
    out = tmp_path_factory.mktemp("store") / "out"
    run("embed", "--checkpoint", checkpoint[0], "--images", photos, "--output", out, "--workers", "0")
    return out


def set_path(d, dotted, value):
    *parents, last = dotted.split(".")
    for part in parents:
        d = d[int(part)] if isinstance(d, list) else d[part]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize("field, value", [
    ("dim", "abc"), ("dim", -3), ("identity", KeyError), ("identity", "model"), ("version", "x"),
    ("dtype", "int8"), ("images", "all"), ("images.count", "4"), ("images.shards", {}),
    ("images.shards.0.rows", None), ("images.shards.0.vectors", 7), ("images.table", KeyError),
])
def test_manifest_field_of_the_wrong_type_names_manifest_and_field(tmp_path, small_store, field, value):
    import shutil
    from eclip.errors import EclipError
    folder = tmp_path / "copy"
    shutil.copytree(small_store, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    set_path(manifest, field, value)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EclipError) as e:
        open_store(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{folder / 'manifest.json'}: ") and f"'{field}'" in msg, msg
    result = run("match", "--gallery", folder, "an astronaut", code=2)
    assert result.stderr.count("\n") == 1 and "manifest.json" in result.stderr


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.parquet"])
def test_manifest_entry_outside_the_gallery_is_refused(tmp_path, small_store, name):
    import shutil
    from eclip.errors import EclipError
    folder = tmp_path / "copy"
    shutil.copytree(small_store, folder)
    (tmp_path / "outside.safetensors").write_bytes((folder / "images-00000-r0.safetensors").read_bytes())
    (tmp_path / "outside.parquet").write_bytes((folder / "images.parquet").read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    key = "table" if name.endswith(".parquet") else "shards"
    if key == "table":
        manifest["images"]["table"] = name
    else:
        manifest["images"]["shards"][0]["vectors"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EclipError, match="outside the embeddings folder"):
        open_store(folder)


def test_a_huge_caption_is_cut_before_tokenizing_and_counted(tmp_path, checkpoint, monkeypatch):
    """A 2 MB caption: the tokenizer never sees more than MAX_TEXT_CHARS characters of it, its vector is
    that of its first few hundred characters (all the model reads), and embed says it was cut."""
    import open_clip.tokenizer

    from eclip.model.text_limit import MAX_TEXT_CHARS
    words = "Angela Merkel visits the Brandenburg Gate in Berlin. "
    huge = words * (2_000_000 // len(words))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                             for i, t in enumerate([huge, "a cat", huge[:1000], huge[:MAX_TEXT_CHARS + 1]])))
    seen = []
    real_call = open_clip.tokenizer.SimpleTokenizer.__call__
    monkeypatch.setattr(open_clip.tokenizer.SimpleTokenizer, "__call__",
                        lambda self, t, *a, **kw: seen.extend([t] if isinstance(t, str) else t)
                        or real_call(self, t, *a, **kw))
    out = tmp_path / "out"
    result = run("embed", "--checkpoint", checkpoint[0], "--texts", texts, "--output", out, "--dtype", "fp32",
                 "--json", "--engine", "torch")          # the spy sits in open_clip's tokenizer
    assert json.loads(result.stdout)["texts_truncated"] == 2
    assert seen and max(len(t) for t in seen) <= MAX_TEXT_CHARS
    vectors = open_store(out).vectors("texts")
    run("embed", "--checkpoint", checkpoint[0], "--texts", texts, "--output", tmp_path / "onnx", "--dtype", "fp32",
        "--engine", "onnx")                              # eclip's own tokenizer cuts the same way
    np.testing.assert_allclose(open_store(tmp_path / "onnx").vectors("texts"), vectors, atol=1e-4)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)   # the first 77 tokens are the same
    np.testing.assert_allclose(vectors[3], vectors[2], atol=1e-6)
