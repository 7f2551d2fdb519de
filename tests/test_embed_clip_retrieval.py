"""`eclip embed --format clip-retrieval`, read back by the real downstream packages:
embedding-reader (npy + parquet, row-aligned by sorted file name) and autofaiss (an index
whose top-1 equals brute force), and compared with eclip's own store of the same inputs."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from eclip.cli import app
from eclip.embedstore import open_store


def run(*args, code=0):
    result = CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, real_images):
    """9 records over 4 real photos (some shared), one unreadable file and one missing file;
    with --shard-size 2 partition 3 (records 7, 8) holds only the two bad ones."""
    folder = tmp_path_factory.mktemp("pairs")
    for name, path in real_images.items():
        shutil.copy(path, folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows = [("a1", "astronaut", "Eileen Collins in her NASA portrait", [{"text": "Eileen Collins", "type": "PERSON"}]),
            ("r1", "rocket", "DSCOVR on a Falcon 9", [{"text": "SpaceX", "type": "ORG"}]),
            ("c1", "coffee", "a cup of coffee", []),
            ("r2", "rocket", "the same launch again", []),
            ("k1", "chelsea", "Chelsea the cat", []),
            ("a2", "astronaut", "the first woman to pilot a shuttle", []),
            ("b1", "broken", "this picture cannot be read", []),
            ("m1", "missing", "this picture was never downloaded", []),
            ("c2", "coffee", "coffee on a saucer", [])]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": f"{n}.jpg", "text": t, "entities": e}) + "\n"
                            for i, n, t, e in rows))
    return path, folder


@pytest.fixture(scope="module")
def both(tmp_path_factory, pairs, checkpoint):
    """The same dataset embedded in both layouts: (clip-retrieval folder, eclip folder)."""
    data, _ = pairs
    base = tmp_path_factory.mktemp("both")
    common = ["--checkpoint", checkpoint[0], "--dataset", data, "--shard-size", "2", "--workers", "0"]
    run("embed", *common, "--format", "clip-retrieval", "--output", base / "cr")
    run("embed", *common, "--output", base / "eclip")
    return base / "cr", base / "eclip"


def read_all(folder, meta_columns):
    from embedding_reader import EmbeddingReader
    reader = EmbeddingReader(str(folder), file_format="parquet_npy", meta_columns=meta_columns,
                             metadata_folder=str(folder.parent / "metadata"))
    vectors, meta = [], []
    for batch, batch_meta in reader(batch_size=3, show_progress=False):
        vectors.append(batch)
        meta.append(batch_meta)
    import pandas as pd
    return reader, np.concatenate(vectors), pd.concat(meta, ignore_index=True)


def test_layout_and_rows_as_clip_retrieval_writes_them(both):
    cr, _ = both
    names = sorted(p.relative_to(cr).as_posix() for p in cr.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(cr).parts))
    parts = (0, 1, 2, 4)   # 9 records, 2 per partition; partition 3 has no readable row, hence no files
    assert names == sorted(["errors.jsonl", "manifest.json"] + [f"img_emb/img_emb_{n}.npy" for n in parts]
                           + [f"text_emb/text_emb_{n}.npy" for n in parts]
                           + [f"metadata/metadata_{n}.parquet" for n in parts])
    first = np.load(cr / "img_emb" / "img_emb_0.npy")
    assert first.dtype == np.float16 and first.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(first.astype(np.float32), axis=1), 1, atol=2e-3)
    table = pq.read_table(cr / "metadata" / "metadata_0.parquet")
    assert table.column_names == ["image_path", "caption", "id", "entities"]
    assert table.column("id").to_pylist() == ["a1", "r1"]
    assert json.loads(table.column("entities")[0].as_py()) == [{"text": "Eileen Collins", "type": "PERSON"}]
    assert json.loads((cr / ".empty-partitions" / "3.json").read_text())["signature"]
    errors = [json.loads(line) for line in (cr / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["b1", "m1"]


def test_embedding_reader_and_autofaiss_read_it_like_eclip_store(both):
    pytest.importorskip("autofaiss")   # scripts/install.sh installs it (--no-deps: it pins numpy<2)
    from autofaiss import build_index
    cr, own = both
    reader, images, meta = read_all(cr / "img_emb", ["image_path", "caption", "id"])
    _, texts, text_meta = read_all(cr / "text_emb", ["id", "caption"])
    assert reader.count == 7 and images.shape == texts.shape == (7, 64)
    assert meta["id"].tolist() == text_meta["id"].tolist() == ["a1", "r1", "c1", "r2", "k1", "a2", "c2"]
    # the vectors are eclip's own store's: each record's image row, each record's caption row
    store = open_store(own)
    image_row = {p: i for i, p in enumerate(store.table("images").column("path").to_pylist())}
    text_row = {i: r for r, i in enumerate(store.table("texts").column("id").to_pylist())}
    np.testing.assert_allclose(images, store.vectors("images")[[image_row[p] for p in meta["image_path"]]], atol=1e-3)
    np.testing.assert_allclose(texts, store.vectors("texts")[[text_row[i] for i in meta["id"]]], atol=1e-3)

    index, _ = build_index(embeddings=str(cr / "img_emb"), save_on_disk=False, metric_type="ip",
                           max_index_memory_usage="100MB", current_memory_available="1GB", verbose=40)
    scores, found = index.search(texts.astype(np.float32), 1)
    brute = texts.astype(np.float32) @ images.astype(np.float32).T
    paths = meta["image_path"].tolist()
    assert [paths[j] for j in found[:, 0]] == [paths[j] for j in brute.argmax(axis=1)]
    np.testing.assert_allclose(scores[:, 0], brute.max(axis=1), atol=1e-4)


def test_rerun_resumes_partitions_and_drops_stale_files(tmp_path, pairs, checkpoint, both):
    data, _ = pairs
    cr = tmp_path / "cr"
    shutil.copytree(both[0], cr)
    (cr / "metadata" / "metadata_2.parquet").unlink()              # a run killed before partition 2 finished
    (cr / "img_emb" / ".img_emb_4.npy.x1.tmp").write_bytes(b"half")  # a write cut short
    (cr / "img_emb" / "img_emb_9.npy").write_bytes(b"stale")        # a partition of an older, longer run
    before = {p.name: p.read_bytes() for p in (cr / "text_emb").iterdir()}
    args = ["embed", "--checkpoint", checkpoint[0], "--dataset", data, "--shard-size", "2", "--workers", "0",
            "--format", "clip-retrieval", "--output", cr, "--json"]
    summary = json.loads(run(*args).stdout)
    assert (summary["written"], summary["reused"]) == (1, 4)           # the empty partition 3 is finished too
    assert not (cr / "img_emb" / ".img_emb_4.npy.x1.tmp").exists() and not (cr / "img_emb" / "img_emb_9.npy").exists()
    assert {p.name: p.read_bytes() for p in (cr / "text_emb").iterdir()} == before
    assert pq.read_table(cr / "metadata" / "metadata_2.parquet").column("id").to_pylist() == ["k1", "a2"]


def test_one_kind_alone_and_inputs_that_do_not_fit(tmp_path, checkpoint, pairs, both):
    _, folder = pairs
    only = tmp_path / "images-only"
    run("embed", "--checkpoint", checkpoint[0], "--images", folder, "--format", "clip-retrieval", "--output", only,
        "--workers", "0")
    assert not (only / "text_emb").exists()
    table = pq.read_table(only / "metadata" / "metadata_0.parquet")
    assert table.column_names == ["image_path", "id"] and table.num_rows == 4      # broken.jpg left out
    mixed = run("embed", "--checkpoint", checkpoint[0], "--images", folder, "--texts", folder / "pairs.jsonl",
                "--format", "clip-retrieval", "--output", tmp_path / "x", code=2)
    assert "--dataset" in mixed.stderr and mixed.stderr.count("\n") == 1
    other = run("embed", "--checkpoint", checkpoint[0], "--images", folder, "--output", both[1], "--format",
                "clip-retrieval", code=2)
    assert "eclip layout" in other.stderr and "--overwrite" in other.stderr
    gallery = run("match", "--gallery", both[0], "a cat", code=2)
    assert "--format clip-retrieval" in gallery.stderr and gallery.stderr.count("\n") == 1
