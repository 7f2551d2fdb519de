"""`eclip match`: scores, softmax over captions, --json, --threshold exit codes, bad input,
the JSON-lines pipeline on stdin, and top-K search in a gallery made by `eclip embed`."""
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eclip.cli import app


def run(*args, code=0, input=None):
    result = CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def features(model, image_paths=(), texts=()):
    """Reference numbers straight from open_clip's towers on the same weights."""
    from eclip.data.images import load_image
    with torch.no_grad():
        img = model.clip.encode_image(torch.stack([model.preprocess(load_image(p)) for p in image_paths])) \
            if image_paths else None
        txt = model.clip.encode_text(model.tokenizer(list(texts))) if texts else None
    norm = torch.nn.functional.normalize
    return (norm(img, dim=-1) if img is not None else None), (norm(txt, dim=-1) if txt is not None else None)


def test_one_caption_prints_the_cosine(checkpoint, real_images):
    path, model = checkpoint
    result = run("match", "--checkpoint", path, real_images["astronaut"], "an astronaut")
    img, txt = features(model, [real_images["astronaut"]], ["an astronaut"])
    assert result.stdout.strip() == f"{float(img @ txt.T):.4f}"


def test_several_captions_best_first_with_softmax(checkpoint, real_images):
    path, model = checkpoint
    captions = ["an astronaut", "a rocket", "a cup of coffee", "a cat"]
    result = run("match", "--checkpoint", path, real_images["coffee"], *captions, "--json")
    data = json.loads(result.stdout)
    matches = data["results"][0]["matches"]
    img, txt = features(model, [real_images["coffee"]], captions)
    cos = (img @ txt.T)[0]
    prob = (model.clip.logit_scale.exp().detach() * cos).softmax(-1)
    want = sorted(range(4), key=lambda j: -float(cos[j]))
    assert [m["text"] for m in matches] == [captions[j] for j in want]
    np.testing.assert_allclose([m["score"] for m in matches], [float(cos[j]) for j in want], atol=1e-5)
    np.testing.assert_allclose([m["prob"] for m in matches], [float(prob[j]) for j in want], atol=1e-5)
    assert data["best"]["text"] == matches[0]["text"]
    text = run("match", "--checkpoint", path, real_images["coffee"], *captions).stdout.splitlines()
    assert [line.split("%  ", 1)[1] for line in text] == [captions[j] for j in want]


def test_several_images(checkpoint, real_images):
    path, _ = checkpoint
    result = run("match", "--checkpoint", path, "--image", real_images["chelsea"],
                 "-i", real_images["rocket"], "a cat", "a rocket", "--json")
    data = json.loads(result.stdout)
    assert [r["image"] for r in data["results"]] == [str(real_images["chelsea"]), str(real_images["rocket"])]
    assert all(len(r["matches"]) == 2 for r in data["results"])
    assert data["best"]["score"] == max(r["matches"][0]["score"] for r in data["results"])


def test_threshold_sets_the_exit_code(checkpoint, real_images):
    path, model = checkpoint
    img, txt = features(model, [real_images["rocket"]], ["a rocket"])
    score = float(img @ txt.T)
    run("match", "--checkpoint", path, real_images["rocket"], "a rocket", "--threshold", score - 0.01, code=0)
    run("match", "--checkpoint", path, real_images["rocket"], "a rocket", "--threshold", score + 0.01, code=1)


@pytest.mark.parametrize("args, message", [
    (["{missing}", "a caption"], "no such image file"),
    (["{photo}"], "give one or more captions"),
    (["{notimage}", "a caption"], "not an image"),
    (["{photo}", "a caption", "--checkpoint", "{truncated}"], "not a readable .safetensors file"),
    (["--gallery", "{tmp}", "a caption"], "no manifest.json"),
    (["-", "--image", "{photo}"], "drop --image"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, checkpoint, real_images, args, message):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(checkpoint[0].read_bytes()[:4096])
    (tmp_path / "notes.jpg").write_text("not an image at all")
    values = {"missing": tmp_path / "nope.jpg", "photo": real_images["astronaut"], "truncated": truncated,
              "tmp": tmp_path, "notimage": tmp_path / "notes.jpg"}
    args = [a.format(**values) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(checkpoint[0])]
    result = run("match", *args, code=2)
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("eclip: error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_stdin_pipeline_keeps_order_and_reports_bad_lines(tmp_path, checkpoint, real_images, monkeypatch):
    import eclip.runtime.engine
    path, model = checkpoint
    loads = []
    real_load = eclip.runtime.engine.load_encoder
    monkeypatch.setattr(eclip.runtime.engine, "load_encoder", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))
    truncated = tmp_path / "half.jpg"
    data = real_images["coffee"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    lines = [
        {"id": "a", "image": str(real_images["astronaut"]), "text": "an astronaut"},
        {"id": "b", "image": str(tmp_path / "missing.jpg"), "text": "gone"},
        "{this is not json",
        {"id": 4, "image": str(real_images["rocket"]), "texts": ["a rocket", "a cat", "coffee"]},
        {"id": "e", "image": str(truncated), "text": "half a coffee"},
        {"id": "f", "image": str(real_images["chelsea"])},
        {"image": str(real_images["chelsea"]), "text": "a cat"},
    ]
    stdin = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines) + "\n"
    result = run("match", "--checkpoint", path, "-", input=stdin)
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == 7 and len(loads) == 1                  # one line out per line in; one model load
    assert [o.get("id") for o in out] == ["a", "b", None, 4, "e", "f", None]
    assert ["error" in o for o in out] == [False, True, True, False, True, True, False]
    assert "missing" in out[1]["error"] and "invalid JSON" in out[2]["error"] and out[2]["line"] == 3
    assert "truncated" in out[4]["error"] and "text" in out[5]["error"]
    img, txt = features(model, [real_images["astronaut"]], ["an astronaut"])
    assert out[0]["score"] == pytest.approx(float(img @ txt.T), abs=1e-5)
    img, txt = features(model, [real_images["rocket"]], ["a rocket", "a cat", "coffee"])
    np.testing.assert_allclose(out[3]["scores"], (img @ txt.T)[0].numpy(), atol=1e-5)
    assert sum(out[3]["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert out[3]["best"]["index"] == int((img @ txt.T)[0].argmax())


def test_stdin_pipeline_threshold(checkpoint, real_images):
    path, _ = checkpoint
    line = json.dumps({"image": str(real_images["rocket"]), "text": "a rocket"}) + "\n"
    result = run("match", "--checkpoint", path, "-", "--threshold", "-1", input=line * 3)
    assert [json.loads(x)["passed"] for x in result.stdout.splitlines()] == [True] * 3
    run("match", "--checkpoint", path, "-", "--threshold", "1.01", input=line, code=1)


def test_stream_writes_each_line_before_reading_the_next(checkpoint, real_images):
    """A line is answered before the next one arrives (interactive use, `tail -f | eclip match -`)."""
    import time

    from eclip.match import Matcher, match_stream
    emitted, answered_in_time = [], []

    def lines():
        yield json.dumps({"image": str(real_images["rocket"]), "text": "a rocket"}) + "\n"
        deadline = time.monotonic() + 30     # the next line only comes once the first is answered
        while not emitted and time.monotonic() < deadline:
            time.sleep(0.05)
        answered_in_time.append(bool(emitted))
        yield json.dumps({"image": str(real_images["coffee"]), "text": "coffee"}) + "\n"

    match_stream(Matcher(checkpoint[1]), lines(), emitted.append)
    assert answered_in_time == [True]
    assert [e["text"] for e in emitted] == ["a rocket", "coffee"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, checkpoint, real_images):
    out = tmp_path_factory.mktemp("embedded") / "gallery"
    captions = tmp_path_factory.mktemp("caps") / "caps.txt"
    captions.write_text("an astronaut\na rocket launch\na cup of coffee\na cat on a sofa\n")
    folder = real_images["astronaut"].parent
    run("embed", "--checkpoint", checkpoint[0], "--images", folder, "--texts", captions, "--output", out,
        "--dtype", "fp32", "--workers", "0")
    return out, captions.read_text().splitlines(), sorted(os.path.abspath(p) for p in folder.glob("*.jpg"))


@pytest.mark.parametrize("search", ["exact", "flat", "ivf"])
def test_gallery_text_query_top_k_equals_brute_force(checkpoint, gallery, search):
    path, model = checkpoint
    out, _, images = gallery
    result = run("match", "--gallery", out, "a cat", "--top-k", "3", "--json", "--search", search)
    data = json.loads(result.stdout)
    img, txt = features(model, images, ["a cat"])
    cos = (txt @ img.T)[0]
    want = [images[j] for j in cos.argsort(descending=True)[:3].tolist()]
    got = data["results"][0]["matches"]
    assert got[0]["path"] == want[0]
    if search != "ivf":
        assert [m["path"] for m in got] == want
        np.testing.assert_allclose([m["score"] for m in got], sorted(cos.tolist(), reverse=True)[:3], atol=1e-5)
    assert data["results"][0]["kind"] == "text"


def test_gallery_image_query_finds_captions_without_model_options(gallery, checkpoint, real_images):
    """An existing image file is an image query; the model comes from the gallery's manifest."""
    out, captions, _ = gallery
    _, model = checkpoint
    result = run("match", "--gallery", out, real_images["coffee"], "--json")
    data = json.loads(result.stdout)["results"][0]
    img, txt = features(model, [real_images["coffee"]], captions)
    want = [captions[j] for j in (img @ txt.T)[0].argsort(descending=True).tolist()]
    assert data["kind"] == "image" and [m["text"] for m in data["matches"]] == want   # 4 captions < top-k 5
    text = run("match", "--gallery", out, real_images["coffee"], "a rocket launch", "-k", "1").stdout
    assert "top 1 of 4 texts" in text and "top 1 of 4 images" in text


def test_gallery_threshold_and_missing_kind(tmp_path, checkpoint, gallery, real_images):
    out, _, _ = gallery
    run("match", "--gallery", out, "a cat", "--threshold", "-1", code=0)
    run("match", "--gallery", out, "a cat", "--threshold", "1.01", code=1)
    only_images = tmp_path / "only-images"
    run("embed", "--checkpoint", checkpoint[0], "--images", real_images["astronaut"], "--output", only_images,
        "--workers", "0")
    result = run("match", "--gallery", only_images, real_images["astronaut"], code=2)
    assert "holds no text embeddings" in result.stderr


def test_stream_preprocess_split_equals_the_model_transform(checkpoint, real_images):
    """The pipeline resizes on its reader thread and makes tensors on the main thread: same pixels."""
    from eclip.data.images import load_image
    from eclip.match import Matcher
    model = checkpoint[1]
    image_stage, tensor_stage = Matcher(model).preprocess_stages()     # the torch engine's split
    image = load_image(real_images["rocket"])
    assert torch.equal(tensor_stage(image_stage(image)), model.preprocess(image))
    assert image_stage(image).size == (64, 64)      # the reader thread hands over small images


def test_gallery_made_with_a_relative_model_path_is_found_again(tmp_path, tiny_config_path, real_images,
                                                                 monkeypatch):
    """`--model tiny.json` typed in the folder that holds it: match --gallery works from there
    and from elsewhere; a copy of the same config elsewhere is the same model, another config is not."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.json").write_bytes(tiny_config_path.read_bytes())
    monkeypatch.chdir(work)
    run("embed", "--model", "tiny.json", "--pretrained", "none", "--images", real_images["coffee"],
        "--output", "g", "--workers", "0")
    assert json.loads(run("match", "--gallery", "g", "a cup of coffee", "--json").stdout)["results"][0]["matches"]
    run("match", "--gallery", "g", "a cup of coffee", "--model", "tiny.json", "--pretrained", "none")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "copy.json").write_bytes(tiny_config_path.read_bytes())
    monkeypatch.chdir(elsewhere)
    run("match", "--gallery", work / "g", "a cup of coffee")
    run("match", "--gallery", work / "g", "a cup of coffee", "--model", "copy.json", "--pretrained", "none")
    config = json.loads(tiny_config_path.read_text())
    config["vision_cfg"]["layers"] = 1
    (elsewhere / "other.json").write_text(json.dumps(config))
    refused = run("match", "--gallery", work / "g", "a cup of coffee", "--model", "other.json", "--pretrained",
                  "none", code=2)
    assert "embeddings were made with" in refused.stderr


def test_stdin_line_that_is_not_utf8_gets_an_error_record_and_the_rest_are_answered(checkpoint, real_images):
    """A real `eclip match -` under a UTF-8 locale: one line with a Latin-1 byte, one whose JSON holds
    a lone surrogate escape (echoed back, it must not make the output invalid UTF-8)."""
    import subprocess
    import sys
    path, _ = checkpoint
    good = [json.dumps({"id": i, "image": str(real_images["rocket"]), "text": "a rocket"}).encode()
            for i in range(20)]
    good[4] = b'{"id": 4, "image": "' + str(real_images["rocket"]).encode() + b'", "text": "K\xf6ln"}'
    good[9] = json.dumps({"id": "\ud800", "image": str(real_images["coffee"]), "text": "coffee"}).encode()
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "ECLIP_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-m", "eclip", "match", "--checkpoint", str(path), "-"],
                          input=b"\n".join(good) + b"\n", capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    out = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]   # strict: valid UTF-8
    assert len(out) == 20 and [o.get("line") for o in out if "error" in o] == [5]
    assert "UTF-8" in out[4]["error"] and out[4]["line"] == 5
    assert all("score" in o for k, o in enumerate(out) if k != 4)
    assert out[9]["id"] == "\ud800" and out[9]["text"] == "coffee"
