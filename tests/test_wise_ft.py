"""WiSE-FT (`eclip export --wise-ft`, `eclip evaluate --wise-ft`): alpha 0 is the model the run
started from, alpha 1 the fine-tuned one, 0.5 the mean of their weights; the base is what the run
recorded, or the model options given; a base of another shape is refused."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_runner import cli, ok

from train_helpers import build_flags, train_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny `eclip train` run on real flags (1 epoch, random initial weights drawn with seed 42)."""
    flags = build_flags(tmp_path_factory.mktemp("wise"))
    out = flags / "run"
    argv = train_args(flags, out)
    argv[argv.index("--epochs") + 1] = "1"
    ok(*argv)
    return flags, out


def vectors(folder):
    """open_clip's own loader on an exported folder: the model's weights and text vectors."""
    import open_clip
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        text = model.eval().encode_text(tokenizer(["the flag of Japan", "a red flag with a star"]))
        image = model.encode_image(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return torch.cat([text, image]).numpy()


def test_the_checkpoint_records_the_model_its_run_started_from(run):
    from eclip.checkpoint import read_header
    flags, out = run
    base = json.loads(read_header(out / "best.safetensors")["base_model"])
    assert base == {"model": str(flags / "tiny32.json"), "pretrained": "none", "checkpoint": None, "seed": 42}


def test_alpha_0_is_the_base_1_the_fine_tuned_and_half_the_mean(run, tmp_path):
    from eclip.checkpoint import save_checkpoint
    from eclip.config import ExpertConfig
    from eclip.model.factory import load_model
    flags, out = run
    for alpha in ("0", "0.5", "1"):
        ok("export", out / "best.safetensors", "--wise-ft", alpha, "--output", tmp_path / alpha)
    ok("export", out / "best.safetensors", "--output", tmp_path / "tuned")
    base = load_model(model=str(flags / "tiny32.json"), pretrained="none", seed=42, device="cpu",
                      experts=ExpertConfig(enabled=False))
    save_checkpoint(base, tmp_path / "base.safetensors")
    ok("export", tmp_path / "base.safetensors", "--output", tmp_path / "base")
    assert np.abs(vectors(tmp_path / "0") - vectors(tmp_path / "base")).max() < 1e-6
    assert np.abs(vectors(tmp_path / "1") - vectors(tmp_path / "tuned")).max() < 1e-6
    assert np.abs(vectors(tmp_path / "tuned") - vectors(tmp_path / "base")).max() > 1e-3   # training moved it
    half, a, b = (load_file(tmp_path / name / "open_clip_model.safetensors") for name in ("0.5", "base", "tuned"))
    assert set(half) == set(a) == set(b)
    for key in half:
        assert torch.allclose(half[key], (a[key] + b[key]) / 2, atol=1e-6), key
    card = (tmp_path / "0.5" / "README.md").read_text()
    assert "wise-ft" in card and "WiSE-FT" in card and "best_val_rsum" in card   # the run's summary.json


def test_the_run_folder_config_names_the_base_of_an_older_checkpoint(run, tmp_path):
    from eclip.checkpoint import save_checkpoint
    from eclip.exporters.wise_ft import recorded_base
    from eclip.model.factory import load_checkpoint
    flags, out = run
    save_checkpoint(load_checkpoint(out / "best.safetensors"), out / "older.safetensors")   # no base_model field
    try:
        assert recorded_base(out / "older.safetensors") == {"model": str(flags / "tiny32.json"), "pretrained": "none",
                                                            "checkpoint": None, "seed": 42}
    finally:
        (out / "older.safetensors").unlink()


def test_a_base_of_another_shape_or_none_at_all_is_refused(run, tmp_path, tiny_config_path):
    flags, out = run
    other = tmp_path / "wide.json"
    cfg = json.loads((flags / "tiny32.json").read_text())
    other.write_text(json.dumps({**cfg, "embed_dim": 32}))
    result = cli("export", out / "best.safetensors", "--wise-ft", "0.5", "--model", other, "--pretrained", "none",
                 "--output", tmp_path / "x")
    assert result.exit_code == 2 and "shape" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    from eclip.checkpoint import save_checkpoint
    from eclip.model.factory import load_checkpoint
    lone = tmp_path / "lone.safetensors"
    save_checkpoint(load_checkpoint(out / "best.safetensors"), lone)                    # outside any run folder
    result = cli("export", lone, "--wise-ft", "0.5", "--output", tmp_path / "y")
    assert result.exit_code == 2 and "--model/--pretrained" in result.stderr


def test_evaluate_wise_ft_reports_the_curve_in_one_table(run):
    flags, out = run
    data = flags / "set" / "val.jsonl"
    common = ["--dataset", data, "--device", "cpu", "--json"]
    curve = json.loads(ok("evaluate", "--checkpoint", out / "best.safetensors", "--wise-ft", "0,0.5,1", *common).stdout)
    assert [p["alpha"] for p in curve["wise_ft"]] == [0, 0.5, 1]
    tuned = json.loads(ok("evaluate", "--checkpoint", out / "best.safetensors", *common).stdout)
    base = json.loads(ok("evaluate", "--model", flags / "tiny32.json", "--pretrained", "none", "--seed", "42",
                         *common).stdout)
    for point, alone in ((curve["wise_ft"][0], base), (curve["wise_ft"][2], tuned)):
        assert point["rsum"] == pytest.approx(alone["rsum"], abs=1e-6)
        assert point["text_to_image"] == pytest.approx(alone["text_to_image"])
    table = ok("evaluate", "--checkpoint", out / "best.safetensors", "--wise-ft", "0,1", "--dataset", data,
               "--device", "cpu").stdout
    assert "WiSE-FT" in table and table.count("\n") < 20
    bad = cli("evaluate", "--checkpoint", out / "best.safetensors", "--wise-ft", "0,x", "--dataset", data)
    assert bad.exit_code == 2 and "'x'" in bad.stderr
