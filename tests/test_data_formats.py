"""webdataset shards, img2dataset's files and parquet outputs, Hugging Face parquet and remote shards
read like a JSONL file beside a folder: the same pairs give the same metrics, vectors and weights."""
import http.server
import io
import json
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from data_formats import write_all
from eclip.cli import app
from train_helpers import build_flags


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from eclip.data.readers import read_dataset
    flags = build_flags(tmp_path_factory.mktemp("flags"))
    jsonl = flags / "set" / "train.jsonl"
    formats = write_all(read_dataset(jsonl), flags / "formats")
    return {"jsonl": str(jsonl), "model": str(flags / "tiny32.json"), **formats}


def cli(*argv, code=0):
    result = CliRunner(mix_stderr=False).invoke(app, [str(a) for a in argv])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


MODEL = ("--pretrained", "none", "--device", "cpu")


def test_every_format_gives_the_metrics_of_the_jsonl_set(sets):
    reports = {}
    for name in ("jsonl", "shards", "parquet", "bytes_parquet", "files"):
        out = cli("evaluate", "--dataset", sets[name], "--model", sets["model"], *MODEL, "--json")
        reports[name] = json.loads(out.stdout)
    for name, report in reports.items():
        assert report["n_queries"] if "n_queries" in report else True
        for key in ("text_to_image", "image_to_text", "rsum"):
            assert report[key] == reports["jsonl"][key], name
        assert report["n_skipped"] == 0


def test_embed_writes_the_vectors_of_the_jsonl_set_one_partition_per_shard(sets, tmp_path):
    def vectors(folder, kind):
        files = sorted(Path(folder).glob(f"{kind}-*.safetensors"))
        return files, np.concatenate([load_file(f)["embeddings"] for f in files])

    cli("embed", "--dataset", sets["jsonl"], "--model", sets["model"], *MODEL, "--dtype", "fp32",
        "--workers", "0", "-o", tmp_path / "a")
    for name in ("shards", "parquet"):
        cli("embed", "--dataset", sets[name], "--model", sets["model"], *MODEL, "--dtype", "fp32",
            "--workers", "0", "-o", tmp_path / name)
        for kind in ("images", "texts"):
            np.testing.assert_array_equal(vectors(tmp_path / name, kind)[1], vectors(tmp_path / "a", kind)[1])
    files, _ = vectors(tmp_path / "shards", "images")
    assert len(files) == sets["n_shards"]            # one partition per input shard


def test_embed_split_by_shard_range_joins_into_one_folder(sets, tmp_path):
    last = sets["n_shards"] - 1
    common = ("--model", sets["model"], *MODEL, "--dtype", "fp32", "--workers", "0")
    cli("embed", "--dataset", sets["shards"], *common, "--shards", "0-0", "-o", tmp_path / "m1")
    cli("embed", "--dataset", sets["shards"], *common, "--shards", f"1-{last}", "-o", tmp_path / "m2")
    whole = tmp_path / "whole"
    whole.mkdir()
    for part in ("m1", "m2"):
        for f in (tmp_path / part).glob("*-r*.*"):
            (whole / f.name).write_bytes(f.read_bytes())
    out = cli("embed", "--dataset", sets["shards"], *common, "-o", whole, "--json")
    summary = json.loads(out.stdout)
    assert summary["written"] == 0 and summary["reused"] == 2 * sets["n_shards"]   # nothing embedded again
    cli("embed", "--dataset", sets["shards"], *common, "-o", tmp_path / "one")
    a = cli("evaluate", "--embeddings", whole, "--json").stdout
    b = cli("evaluate", "--embeddings", tmp_path / "one", "--json").stdout
    assert json.loads(a)["rsum"] == json.loads(b)["rsum"]
    assert cli("embed", "--dataset", sets["shards"], *common, "--shards", "0-99", "-o", tmp_path / "x",
               code=2).stderr.count("\n") == 1


def _train(sets, name, out, *extra):
    return json.loads(cli("train", "--dataset", sets[name], "--model", sets["model"], *MODEL, "--epochs", "1",
                          "--batch-size", "12", "--lr", "1e-3", "--vision-experts", "2", "--text-experts", "2",
                          "--shared-experts", "2", "--workers", "0", "--no-val", "--no-tensorboard",
                          "--output", out, *extra, "--json").stdout)


@pytest.mark.slow
def test_one_epoch_from_shards_and_parquet_gives_the_weights_of_jsonl(sets, tmp_path):
    from safetensors.torch import load_file as load
    base = load(Path(_train(sets, "jsonl", tmp_path / "a")["last_checkpoint"]))
    for name in ("shards", "parquet"):
        other = load(Path(_train(sets, name, tmp_path / name)["last_checkpoint"]))
        assert set(other) == set(base)
        for key in base:
            assert bool((other[key] == base[key]).all()), f"{name}: {key} differs"


def test_explain_reads_shards(sets, tmp_path):
    out = cli("explain", "--dataset", sets["shards"], "--dry-run", "--json").stdout
    summary = json.loads(out)
    assert summary["records"] == 48 and len(summary["prompts"]) == summary["captions"]


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, message", [
    ("{folder}/none-{{000..009}}.tar", "no shard matches"),
    ("{folder}/empty", "neither a benchmark"),
    ("http://127.0.0.1:9/shards-{{0..3}}.tar", "cannot open"),
])
def test_pattern_or_url_that_names_nothing_is_one_line_exit_2(tmp_path, dataset, message):
    (tmp_path / "empty").mkdir()
    result = cli("evaluate", "--dataset", dataset.format(folder=tmp_path), "--model", "ViT-B-32", *MODEL, code=2)
    assert message in result.stderr and result.stderr.count("\n") == 1


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_counted_and_logged(sets, tmp_path, real_images):
    from eclip.data.readers import read_dataset
    photo = real_images["coffee"].read_bytes()
    folder = tmp_path / "bad"
    folder.mkdir()
    _shard(folder / "00000.tar", [("a.jpg", photo), ("a.txt", b"a cup of coffee"),
                                  ("b.jpg", photo),                                   # no text
                                  ("c.txt", b"no image here"),                        # no image
                                  ("d.jpg", b"not a jpeg"), ("d.txt", b"broken image"),
                                  ("e.jpg", photo), ("e.txt", b"coffee again")])
    whole = (folder / "00000.tar").read_bytes()
    _shard(folder / "00001.tar", [("f.jpg", photo), ("f.txt", b"one more"), ("g.jpg", photo), ("g.txt", b"lost")])
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[:len(data) - 1024 - len(photo) // 2])   # truncated inside g.jpg
    records = read_dataset(str(folder))
    assert [r.id for r in records] == ["a", "d", "e", "f"]
    reasons = {s.key: s.reason for s in records.skipped}
    assert reasons["b"].startswith("no text") and reasons["c"].startswith("no image")
    assert "truncated shard" in reasons["g"]
    assert len(whole) > 0

    out = json.loads(cli("embed", "--dataset", folder, "--model", sets["model"], *MODEL, "--workers", "0",
                         "-o", tmp_path / "emb", "--json").stdout)
    assert out["images"] == 3 and out["errors"] == 4     # b, c, the truncated sample g, and d (not a JPEG)
    logged = [json.loads(line) for line in (tmp_path / "emb" / "errors.jsonl").read_text().splitlines()]
    keys = sorted(e["image"].split("#")[1].split("@")[0].split(".")[0] for e in logged)
    assert keys == ["b", "c", "d", "g"]                              # each names its shard and key
    assert all(e["image"].startswith(str(folder / "0000")) for e in logged)


def test_parquet_row_with_empty_bytes_is_skipped_and_logged(sets, tmp_path, real_images):
    import pyarrow as pa
    import pyarrow.parquet as pq
    photo = real_images["chelsea"].read_bytes()
    pq.write_table(pa.table({"id": ["1", "2", "3"], "jpg": pa.array([photo, b"", photo], type=pa.binary()),
                             "title": ["a cat", "nothing", "the same cat"]}), tmp_path / "t.parquet")
    out = json.loads(cli("embed", "--dataset", tmp_path / "t.parquet", "--text-key", "title", "--model", sets["model"],
                         *MODEL, "--workers", "0", "-o", tmp_path / "emb", "--json").stdout)
    assert out["images"] == 2 and out["texts"] == 3 and out["errors"] == 1
    logged = json.loads((tmp_path / "emb" / "errors.jsonl").read_text())
    assert logged["reason"] == "empty image bytes" and logged["image"].endswith("#jpg@row1")


def test_column_mapping_for_tables(tmp_path, real_images):
    from eclip.cli.options import columns
    from eclip.data.readers import read_dataset
    (tmp_path / "a.tsv").write_text(f"url\tcaption\tuid\n{real_images['rocket']}\ta rocket\tr1\n")
    records = read_dataset(str(tmp_path / "a.tsv"), columns=columns("url", "caption", "uid"))
    assert [(r.id, r.caption, r.image) for r in records] == [("r1", "a rocket", str(real_images["rocket"]))]


# ---- remote ----------------------------------------------------------------------------------------

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file server plus byte ranges, as object stores and CDNs serve them."""

    def log_message(self, *args):
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start, _, stop = spec.removeprefix("bytes=").partition("-")
        start, stop = int(start), min(int(stop) if stop else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop}/{len(data)}")
        self.send_header("Content-Length", str(stop - start + 1))
        self.end_headers()
        return io.BytesIO(data[start:stop + 1])


@pytest.fixture
def http_folder(sets):
    root = Path(sets["shards"]).parent.parent
    handler = partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_shards_over_http_and_pipe(sets, http_folder):
    pattern = Path(sets["shards"]).name
    ours = json.loads(cli("evaluate", "--dataset", sets["jsonl"], "--model", sets["model"], *MODEL, "--json").stdout)
    remote = json.loads(cli("evaluate", "--dataset", f"{http_folder}/shards/{pattern}", "--model", sets["model"],
                            *MODEL, "--json").stdout)
    assert remote["rsum"] == ours["rsum"] and remote["text_to_image"] == ours["text_to_image"]
    from eclip.data.shards import Columns, shard_samples
    skipped = []
    piped = list(shard_samples(f"pipe:cat {Path(sets['shards']).parent / '00000.tar'}", Columns().image_exts(),
                               skipped))
    assert len(piped) == 20 and not skipped and isinstance(piped[0].parts["jpg"], bytes)


def test_img2dataset_outputs_read_as_its_pairs(sets, tmp_path):
    """img2dataset itself over file:// URLs (offline) when it is installed: its webdataset, files and parquet
    outputs give the same records. Elsewhere write_all writes the same layouts with the same writers."""
    pytest.importorskip("img2dataset")
    from img2dataset import download

    from eclip.data.readers import read_dataset
    records = read_dataset(sets["jsonl"])[:8]
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f'file://{r.image},"{r.caption}"\n' for r in records))
    seen = {}
    for fmt in ("webdataset", "files", "parquet"):
        download(url_list=str(urls), input_format="csv", url_col="url", caption_col="caption", output_format=fmt,
                 output_folder=str(tmp_path / fmt), processes_count=1, thread_count=2, image_size=64,
                 enable_wandb=False)
        seen[fmt] = sorted(r.caption for r in read_dataset(str(tmp_path / fmt)))
    assert seen["webdataset"] == seen["files"] == seen["parquet"] == sorted(r.caption for r in records)


# ---- streaming order ---------------------------------------------------------------------------------

def test_stream_order_reads_whole_shards_through_a_bounded_buffer(sets):
    from eclip.data.members import container_of
    from eclip.data.readers import read_dataset
    from eclip.data.stream import ShardStreamOrder
    records = read_dataset(sets["shards"])
    order = ShardStreamOrder(records, seed=1, buffer=4)
    first = list(order)
    assert sorted(first) == list(range(len(records)))          # every pair once
    assert list(order) == first                                 # drawn from (seed, epoch) alone
    order.set_epoch(1)
    assert list(order) != first
    plain = ShardStreamOrder(records, seed=1, buffer=0)
    shards = [container_of(records[i].image) for i in plain]
    assert sum(a != b for a, b in zip(shards, shards[1:])) == sets["n_shards"] - 1   # one shard after another
    # a buffer of 4 holds back at most 4 pairs: none comes out more than 4 places before it was read
    stream = [i for i in ShardStreamOrder(records, seed=1, buffer=0)]
    assert all(position >= stream.index(i) - 4 for position, i in enumerate(first))
    assert any(position > stream.index(i) for position, i in enumerate(first))       # and it does mix


def test_train_reads_shards_through_a_shuffle_buffer(sets, tmp_path):
    summary = _train(sets, "shards", tmp_path / "s", "--shuffle-buffer", "8", "--epochs", "2")
    assert summary["steps"] == 8 and summary["pairs_seen"] == 96
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config.get("config", config)["shuffle_buffer"] == 8
