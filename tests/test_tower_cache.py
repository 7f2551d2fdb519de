"""A locked tower computed once per distinct input trains exactly as one computed every step
(eclip/model/tower_cache.py): the same losses and weights to 1e-5, CPU, fp32."""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_hf_text import hf_config, minilm_folder
from train_helpers import build_flags, invoke, log_lines, train_args

LOSSES = ("loss", "vtc", "gfm", "vtc_star")


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    folder = build_flags(tmp_path_factory.mktemp("flags"), n_flags=12, views=6)
    (folder / "minilm.json").write_text(json.dumps(hf_config(minilm_folder(), proj="linear")))
    return folder


def run(flags, out, *extra) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        invoke(train_args(flags, out, *extra))
    finally:
        torch.set_num_threads(threads)
    return {"log": [{k: line[k] for k in (*LOSSES, "val_loss", "rsum") if k in line} for line in log_lines(out)
                    if line.get("kind") in ("train", "val")],
            "weights": load_file(str(out / "last.safetensors"))}


def assert_same(a: dict, b: dict) -> None:
    assert len(a["log"]) == len(b["log"]) > 0
    for x, y in zip(a["log"], b["log"]):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-5 for k in x), (x, y)
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.allclose(a["weights"][k], b["weights"][k], atol=1e-5, rtol=0), k


@pytest.mark.slow
@pytest.mark.parametrize("no_experts", [False, True])
def test_locked_minilm_text_tower_trains_the_same_cached_or_not(flags, tmp_path, no_experts):
    extra = ["--model", str(flags / "minilm.json"), "--lock-text", *(["--no-experts"] if no_experts else [])]
    plain = run(flags, tmp_path / "plain", *extra, "--tower-cache-mb", "0")
    cached = run(flags, tmp_path / "cached", *extra)
    assert_same(plain, cached)


@pytest.mark.slow
def test_both_towers_locked_open_clip_text_and_unaugmented_images_through_the_disk_cache(flags, tmp_path):
    extra = ["--lock-text", "--lock-image", "--no-val"]
    plain = run(flags, tmp_path / "plain", *extra, "--tower-cache-mb", "0")
    cached = run(flags, tmp_path / "cached", *extra, "--tower-cache-disk")
    assert_same(plain, cached)
    kept = {t: list((tmp_path / "cached" / "tower-cache" / t).glob("*.safetensors")) for t in ("text", "image")}
    assert kept["text"] and kept["image"]
    # a second run with a memory too small to keep anything reads every row back from the disk
    again = run(flags, tmp_path / "again", *extra, "--tower-cache-disk", "--tower-cache-mb", "0.001")
    assert_same(plain, again)


def test_a_locked_tower_runs_in_eval_mode_and_only_whole_towers_count_as_locked(tmp_path):
    from eclip.model.tower_cache import CachedTowers, RowCache, fully_locked
    from test_hf_text import make_hf
    model = make_hf(tmp_path)
    assert not fully_locked(model.clip, "text") and not fully_locked(model.clip, "image")
    model.clip.lock_text_tower()
    assert fully_locked(model.clip, "text")
    model.train()
    assert not model.clip.text.transformer.training and model.clip.text.proj.training and model.clip.visual.training
    next(model.clip.text.transformer.parameters()).requires_grad_(True)        # one layer unfrozen: not locked
    assert not fully_locked(model.clip, "text") and not CachedTowers(model.clip, 100).active

    cache = RowCache(max_mb=3 / 2 ** 20 * 4 * 4)       # room for 3 rows of 4 floats
    rows = cache.get_rows([b"a", b"b", b"a"], lambda idx: (torch.arange(4.0)[None].repeat(len(idx), 1),))
    assert len(rows) == 3 and cache.misses == 2 and cache.hits == 1 and torch.equal(rows[0][0], rows[2][0])
    for key in (b"c", b"d"):
        cache.get_rows([key], lambda idx: (torch.zeros(1, 4),))
    assert list(cache.rows) == [b"b", b"c", b"d"] and cache.bytes == 48     # the least recently used went
