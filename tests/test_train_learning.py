"""Training learns: a tiny random model matches real national flags to country names it never saw
phrased that way, on flag views it never saw, far above chance (EntityCLIP and the plain CLIP baseline).

Data: 30 flagpy flags, 8 views each (6 train, 1 val); val captions use phrasings that train does not.
"""
import json

import pytest
import torch

from eclip.config import TrainConfig
from eclip.train import train

TINY32 = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def flag_set(tmp_path_factory):
    from eclip.data.demo_set import build_demo_set
    folder = tmp_path_factory.mktemp("flags30")
    build_demo_set(folder / "set", n_flags=30, views_per_entity=8, include_photos=False, image_size=64)
    (folder / "tiny32.json").write_text(json.dumps(TINY32))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("no_experts", [False, True], ids=["entityclip", "plain-clip"])
def test_tiny_model_learns_to_match_flags_to_country_names(tmp_path, flag_set, no_experts):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny model: one thread is as fast, and immune to busy cores
    try:
        summary = train(TrainConfig(
            output=str(tmp_path / "run"), dataset=str(flag_set / "set" / "train.jsonl"),
            model=str(flag_set / "tiny32.json"), pretrained="none", device="cpu", epochs=25, batch_size=15,
            lr=1e-3, workers=0, no_experts=no_experts, vision_experts=2, text_experts=2, shared_experts=2,
            tensorboard=False, log_every=50))
    finally:
        torch.set_num_threads(threads)
    val = summary["last_val"]
    chance = 100.0 / val["n_images"]                 # R@1 of a random ranking: 1 / gallery size
    assert val["n_images"] == 30 and summary["steps"] == 25 * 12
    assert val["t2i_r1"] >= 5 * chance, val
    assert val["i2t_r1"] >= 3 * chance, val
    assert summary["best_val_rsum"] >= 2.5 * (2 * chance * (1 + 5 + 10)), summary  # chance rsum ~107
