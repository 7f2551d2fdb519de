"""`eclip export`: each format loaded by the tool it is for, vectors compared with eclip's.

- open-clip: open_clip's own `create_model_and_transforms("local-dir:DIR")`, for the tiny ViT and
  for a Hugging Face text tower (examples/minilm-vit.json), to 1e-5; and eclip's `--model local-dir:`;
- hf: transformers' CLIPModel (1e-4) and CLIPProcessor (pixels, token ids);
- onnx: the README's onnxruntime example, run in a process that cannot import eclip or torch (1e-4);
- CLIP_benchmark's retrieval evaluation on the exported folder = `eclip evaluate --same-image path`;
- bad input: one line, exit 2, nothing left behind.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import cli, ok

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["Queen Elizabeth II at Windsor", "Zoë Saldaña in Köln &amp; 東京", "", "a " * 100,
            "“Curly” quotes, ﬁne ligatures and ｆｕｌｌ width", "the flag of Japan 🇯🇵", "Hello,world!!  3.14"]


def eclip_vectors(model, images):
    """eclip's torch engine, fp32: (image vectors, text vectors) of the real photos and CAPTIONS."""
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in images])
        return model.encode_images(pixels).numpy(), model.encode_texts(model.tokenize(CAPTIONS)).numpy()


def open_clip_vectors(folder, images):
    import open_clip
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    clip.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
        image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_text(tokenizer(CAPTIONS)), dim=-1)
    return image.numpy(), text.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint):
    """{format: folder} of the session's tiny checkpoint."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for fmt in ("open-clip", "hf", "onnx"):
        result = ok("export", checkpoint[0], "--format", fmt, "--output", root / fmt)
        assert "upload" in result.stderr
        out[fmt] = root / fmt
    return out


def test_open_clip_loads_the_folder_with_eclips_vectors(exported, checkpoint, real_images):
    images = list(real_images.values())
    ours = eclip_vectors(checkpoint[1], images)
    theirs = open_clip_vectors(exported["open-clip"], images)
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() < 1e-5
    assert sorted(p.name for p in exported["open-clip"].iterdir()) == [
        "README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    from safetensors import safe_open
    with safe_open(exported["open-clip"] / "open_clip_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith(("clip.", "experts.", "itm.")) for k in keys)


def test_the_exported_folder_is_an_eclip_model_again(exported, checkpoint, real_images):
    from eclip.model.factory import load_model
    again = load_model(model=f"local-dir:{exported['open-clip']}", device="cpu").eval()
    images = list(real_images.values())
    for a, b in zip(eclip_vectors(checkpoint[1], images), eclip_vectors(again, images)):
        assert np.abs(a - b).max() < 1e-6


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(checkpoint, model): examples/minilm-vit.json, a ViT with the real all-MiniLM-L6-v2 text tower."""
    from eclip.checkpoint import save_checkpoint
    from eclip.config import ExpertConfig
    from eclip.model.factory import load_model
    torch.manual_seed(0)
    model = load_model(model=str(ROOT / "examples/minilm-vit.json"), pretrained="none", device="cpu",
                       experts=ExpertConfig(enabled=False)).eval()
    path = tmp_path_factory.mktemp("minilm") / "minilm.safetensors"
    save_checkpoint(model, path)
    return path, model


def test_a_hugging_face_text_tower_round_trips_through_open_clip(tmp_path, minilm, real_images):
    ok("export", minilm[0], "--output", tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "tokenizer.json", "open_clip_config.json", "open_clip_model.safetensors"} <= files
    images = list(real_images.values())
    for a, b in zip(eclip_vectors(minilm[1], images), open_clip_vectors(tmp_path / "out", images)):
        assert np.abs(a - b).max() < 1e-5
    # the hf format cannot hold this tower: one line, exit 2, nothing written
    result = cli("export", minilm[0], "--format", "hf", "--output", tmp_path / "hf")
    assert result.exit_code == 2 and "CLIPModel" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_transformers_clip_model_gives_eclips_vectors(exported, checkpoint, real_images):
    from transformers import CLIPModel, CLIPProcessor
    folder = str(exported["hf"])
    hf = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder, backend="pil")
    model = checkpoint[1]
    photos = [Image.open(p).convert("RGB") for p in real_images.values()]
    ours = torch.stack([model.preprocess(p) for p in photos])
    # transformers crops at floor((W - size) / 2), open_clip at round(): the rocket's resized margin is
    # odd (427 x 640 -> 64 x 95), so its crops are one pixel apart; the others' margins are even
    even = [i for i, name in enumerate(real_images) if name != "rocket"]
    pixels = processor(images=[photos[i] for i in even], return_tensors="pt")["pixel_values"]
    assert pixels.shape == ours[even].shape and (pixels - ours[even]).abs().max() < 1e-6
    plain = ["Queen Elizabeth II at Windsor", "Zoë Saldaña in Köln & 東京", "", "a " * 100, "the flag of Japan 🇯🇵"]
    ids = processor(text=plain, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, model.tokenize(plain))   # (no HTML entities or ftfy fixes: transformers does neither)
    with torch.no_grad():
        image = torch.nn.functional.normalize(_tensor(hf.get_image_features(pixel_values=ours)), dim=-1)
        text = torch.nn.functional.normalize(_tensor(hf.get_text_features(input_ids=model.tokenize(CAPTIONS))), dim=-1)
        ref_image, ref_text = model.encode_images(ours), model.encode_texts(model.tokenize(CAPTIONS))
    assert (image - ref_image).abs().max() < 1e-4 and (text - ref_text).abs().max() < 1e-4
    assert abs(hf.logit_scale.exp().item() - model.logit_scale.item()) < 1e-4


def test_a_plain_gelu_model_maps_to_hidden_act_gelu(tmp_path, real_images):
    """quick_gelu off: transformers must use the exact GELU (open_clip's nn.GELU), not quick_gelu."""
    from transformers import CLIPModel

    from conftest import TINY
    from eclip.config import ExpertConfig, ModelSpec
    from eclip.exporters import export
    from eclip.model.factory import load_model
    config = tmp_path / "gelu.json"
    config.write_text(json.dumps({**TINY, "quick_gelu": False}))
    export(ModelSpec(model=str(config), pretrained="none", seed=3), tmp_path / "hf", "hf")
    model = load_model(model=str(config), pretrained="none", seed=3, device="cpu",
                       experts=ExpertConfig(enabled=False)).eval()
    hf = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.text_config.hidden_act == hf.config.vision_config.hidden_act == "gelu"
    pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in real_images.values()])
    with torch.no_grad():
        image = torch.nn.functional.normalize(_tensor(hf.get_image_features(pixel_values=pixels)), dim=-1)
        text = torch.nn.functional.normalize(_tensor(hf.get_text_features(input_ids=model.tokenize(CAPTIONS))), dim=-1)
        assert (image - model.encode_images(pixels)).abs().max() < 1e-4
        assert (text - model.encode_texts(model.tokenize(CAPTIONS))).abs().max() < 1e-4


def test_eclip_embed_gives_the_same_vectors_from_the_exported_folder(exported, checkpoint, real_images, tmp_path):
    from eclip.embedstore import open_store
    folder = next(iter(real_images.values())).parent
    ok("embed", "--checkpoint", checkpoint[0], "--images", folder, "--dtype", "fp32", "--workers", "0",
       "-o", tmp_path / "a")
    ok("embed", "--model", f"local-dir:{exported['open-clip']}", "--images", folder, "--dtype", "fp32",
       "--workers", "0", "-o", tmp_path / "b")
    a, b = (open_store(tmp_path / x) for x in "ab")
    assert a.table("images").to_pydict()["path"] == b.table("images").to_pydict()["path"]
    assert np.abs(np.asarray(a.vectors("images")) - np.asarray(b.vectors("images"))).max() < 1e-5


def _tensor(out):
    """get_*_features returns a tensor, or in newer transformers an output object holding it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Using your model elsewhere"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("eclip", "torch", "open_clip", "torchvision"):
            raise ImportError(f"{name} may not be imported here")
sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_the_readme_onnxruntime_example_runs_without_eclip_or_torch(which, exported, checkpoint, minilm, real_images,
                                                                    tmp_path):
    """CLIP's tokenizer (the tiny ViT) and a Hugging Face one (MiniLM), the same ten lines."""
    if which == "tiny":
        folder, model = exported["onnx"], checkpoint[1]
    else:
        ok("export", minilm[0], "--format", "onnx", "--output", tmp_path / "minilm-onnx")
        folder, model = tmp_path / "minilm-onnx", minilm[1]
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 25
    folder_line = 'folder = "my-model-onnx"'
    assert folder_line in code
    images = [str(p) for p in real_images.values()]
    last = code.rstrip().splitlines()[-1]
    assert last.startswith("print(")
    script = tmp_path / "example.py"
    script.write_text(BLOCKER + code.replace(folder_line, f"folder = {str(folder)!r}").replace(
        last, f"np.save('images.npy', embed_images({images!r})); np.save('texts.npy', embed_texts({CAPTIONS!r}))"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    image_ref, text_ref = eclip_vectors(model, real_images.values())
    assert np.abs(np.load(tmp_path / "images.npy") - image_ref).max() < 1e-4
    assert np.abs(np.load(tmp_path / "texts.npy") - text_ref).max() < 1e-4
    # the same process really cannot import eclip or torch
    probe = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "may not be imported" in probe.stderr


def test_tokenizer_json_gives_open_clips_token_ids(exported):
    import html

    import ftfy
    import open_clip
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(exported["onnx"] / "tokenizer.json"))
    captions = CAPTIONS + ["don't STOP me now", "x" * 400, "<start_of_text> inside", "tab\tand\nnewline",
                           "Ünïcödé ÀÉÎ ß ﬀ", "Müller-Lüdenscheidt, 1999–2003: “the 2nd”", "日本語の説明文"]
    ours = np.array([e.ids for e in tokenizer.encode_batch(
        [html.unescape(html.unescape(ftfy.fix_text(t))) for t in captions])])
    theirs = open_clip.get_tokenizer("ViT-B-32")(captions).numpy()
    assert ours.shape == theirs.shape and (ours == theirs).all()


def test_clip_benchmark_retrieval_equals_eclip_evaluate_same_image_path(tmp_path, checkpoint):
    """clip_benchmark.metrics.zeroshot_retrieval.evaluate on the exported folder, loaded by
    clip_benchmark's own open_clip loader: the same recalls as eclip's CLIP_benchmark convention."""
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate as benchmark
    from clip_benchmark.models.open_clip import load_open_clip

    from train_helpers import build_flags
    folder = build_flags(tmp_path / "flags", n_flags=12, views=3)
    rows = [json.loads(x) for x in (folder / "set/train.jsonl").read_text().splitlines()][:24]
    first_view = {}
    for r in rows:
        r["image"] = first_view.setdefault(r["entities"][0]["text"], str(folder / "set" / r["image"]))
    data = tmp_path / "shared.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok("export", checkpoint[0], "--output", tmp_path / "model")
    report = json.loads(ok("evaluate", "--checkpoint", checkpoint[0], "--dataset", data, "--same-image", "path",
                           "--device", "cpu", "--json").stdout)
    model, transform, tokenizer = load_open_clip(f"local-dir:{tmp_path / 'model'}", pretrained=None)
    model.eval()
    images = list(dict.fromkeys(r["image"] for r in rows))
    captions = [[r["text"] for r in rows if r["image"] == image] for image in images]

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(Image.open(images[i]).convert("RGB")), captions[i]

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=4,
                                         collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]))
    theirs = benchmark(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert report["n_images"] == len(images) == 12 and report["n_texts"] == len(rows)
    for k in (1, 5, 10):
        assert theirs[f"image_retrieval_recall@{k}"] * 100 == pytest.approx(report["text_to_image"][f"R@{k}"], abs=1e-4)
        assert theirs[f"text_retrieval_recall@{k}"] * 100 == pytest.approx(report["image_to_text"][f"R@{k}"], abs=1e-4)


def test_the_open_clip_name_is_the_builtin_config_quick_gelu_included():
    from eclip.exporters.openclip import builtin_name
    from eclip.model.source import builtin_config_file
    b32 = builtin_config_file("ViT-B-32")
    assert builtin_name(b32) == "ViT-B-32"
    assert builtin_name({**b32, "quick_gelu": True}) == "ViT-B-32-quickgelu"
    assert builtin_name({**b32, "embed_dim": 7}) is None


def test_the_model_card_has_hugging_face_front_matter(exported):
    card = (exported["onnx"] / "README.md").read_text()
    front = card.split("---\n")[1]
    fields = dict(line.split(": ", 1) for line in front.strip().splitlines())
    assert json.loads(fields["library_name"]) == "onnx" and json.loads(fields["license"]) == "other"
    assert "clip" in json.loads(fields["tags"]) and json.loads(fields["pipeline_tag"])
    from eclip import __version__
    assert __version__ in card


# ---- bad input -------------------------------------------------------------------------------

def one_line_exit_2(result, *words):
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eclip: error:"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, checkpoint):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    one_line_exit_2(cli("export", checkpoint[0], "--output", full), "not empty")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    one_line_exit_2(cli("export", checkpoint[0], "--format", "tflite", "--output", tmp_path / "a"), "tflite")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(Path(checkpoint[0]).read_bytes()[:-1000])
    one_line_exit_2(cli("export", truncated, "--output", tmp_path / "b"), "truncated")
    one_line_exit_2(cli("export", checkpoint[0], "--output", tmp_path / "c", "--wise-ft", "1.5"), "between 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "full"]


def test_what_a_killed_export_left_is_removed_by_the_next(tmp_path, checkpoint):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".model.{dead.stdout.strip()}.abc.tmp"
    left.mkdir()
    (left / "open_clip_model.safetensors").write_bytes(b"half")
    ok("export", checkpoint[0], "--output", tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_empty_output_folder_is_filled(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    ok("export", checkpoint[0], "--output", tmp_path / "empty")
    assert (tmp_path / "empty" / "open_clip_model.safetensors").is_file()


def test_eclip_match_and_evaluate_give_the_checkpoints_scores_from_the_exported_folder(exported, checkpoint,
                                                                                       real_images, tmp_path):
    """The round trip for the commands that score: `match --model local-dir:DIR` ranks the captions with
    the checkpoint's scores, and `evaluate` gives the checkpoint's recalls."""
    import json
    photo, captions = real_images["coffee"], ["an astronaut", "a rocket", "a cup of coffee", "a cat"]
    scores = {}
    for name, options in {"checkpoint": ["--checkpoint", checkpoint[0]],
                          "folder": ["--model", f"local-dir:{exported['open-clip']}"]}.items():
        data = json.loads(ok("match", *options, photo, *captions, "--json").stdout)
        scores[name] = {m["text"]: m["score"] for m in data["results"][0]["matches"]}
    assert scores["folder"].keys() == scores["checkpoint"].keys()
    np.testing.assert_allclose([scores["folder"][c] for c in captions], [scores["checkpoint"][c] for c in captions],
                               atol=1e-5)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(p), "text": f"a photo called {n}"}) + "\n"
                             for n, p in real_images.items()))
    recalls = [json.loads(ok("evaluate", *options, "--dataset", pairs, "--json").stdout)
               for options in (["--checkpoint", checkpoint[0]], ["--model", f"local-dir:{exported['open-clip']}"])]
    assert recalls[0]["text_to_image"] == recalls[1]["text_to_image"]
    assert recalls[0]["image_to_text"] == recalls[1]["image_to_text"]
