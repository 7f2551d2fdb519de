"""The OpenAI-compatible endpoint backend against a stub server on 127.0.0.1: normal
answers, 429 with Retry-After, 5xx, malformed JSON, slow answers; the API key never
reaches a file; a run killed with SIGKILL resumes with every caption exactly once."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from eclip.cli import app
from eclip.errors import EclipError
from eclip.explain import explain_records
from eclip.explain.backends import EndpointBackend
from eclip.explain.cache import iter_entries, read_cache

PLAIN = "{caption}"  # the prompt is the caption itself, so the stub can tell captions apart
CAPTIONS = [f"Caption number {i} about Angela Merkel in Berlin." for i in range(6)]


def ok_body(prompt):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": f"About: {prompt}"}}]}).encode()


class Stub:
    """`behave(prompt, attempt) -> (status, headers, body, delay_s[, drip_s])`; attempt counts from 0 per
    prompt; with drip_s the body is sent one byte every drip_s seconds."""

    def __init__(self, behave=None):
        self.behave = behave or (lambda prompt, attempt: (200, {}, ok_body(prompt), 0))
        self.seen = Counter()
        self.requests = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):   # what a client sends after following a redirect of its POST
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                          "body": None})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                payload = ok_body("answered by the address redirected to")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with stub.lock:
                    attempt = stub.seen[prompt]
                    stub.seen[prompt] += 1
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                          "body": body})
                status, headers, payload, delay, *drip = stub.behave(prompt, attempt)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if drip:
                        for i in range(len(payload)):
                            self.wfile.write(payload[i:i + 1])
                            self.wfile.flush()
                            time.sleep(drip[0])
                    else:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(behave=None):
        s = Stub(behave)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def backend(url, **kw):
    kw = {"concurrency": 3, "timeout": 5.0, "retries": 2, "backoff": 0.001, "max_new_tokens": 16, **kw}
    return EndpointBackend(url, "stub-llm", **kw)


def run(captions, be, cache):
    return explain_records(captions, be, cache, PLAIN, show_progress=False)


def test_normal_answers_are_cached_with_an_openai_request(stub, tmp_path):
    s = stub()
    cache = tmp_path / "c.jsonl"
    summary = run(CAPTIONS, backend(s.url), cache)
    assert (summary["generated"], summary["failed"]) == (6, 0)
    assert read_cache(cache) == {c: f"About: {c}" for c in CAPTIONS}
    r = s.requests[0]
    assert r["path"] == "/v1/chat/completions"
    assert r["body"]["model"] == "stub-llm" and r["body"]["max_tokens"] == 16 and r["body"]["temperature"] == 0
    assert all(e["model"] == "stub-llm" for e in iter_entries(cache))


def test_429_and_503_are_retried_and_retry_after_is_honoured(stub, tmp_path):
    def behave(prompt, attempt):
        if prompt == CAPTIONS[0] and attempt == 0:
            return 429, {"Retry-After": "0.4"}, b'{"error": "slow down"}', 0
        if prompt == CAPTIONS[1] and attempt < 2:
            return 503, {}, b"overloaded", 0
        return 200, {}, ok_body(prompt), 0

    s = stub(behave)
    t0 = time.perf_counter()
    summary = run(CAPTIONS[:2], backend(s.url), tmp_path / "c.jsonl")
    assert time.perf_counter() - t0 >= 0.4  # waited as told, not the 1 ms backoff
    assert (summary["generated"], summary["failed"]) == (2, 0)
    assert s.seen[CAPTIONS[0]] == 2 and s.seen[CAPTIONS[1]] == 3


def test_500_malformed_and_timeout_fail_their_item_and_the_run_goes_on(stub, tmp_path):
    def behave(prompt, attempt):
        if prompt == CAPTIONS[0]:
            return 500, {}, b"internal error", 0
        if prompt == CAPTIONS[1]:
            return 200, {}, b"{not json", 0
        if prompt == CAPTIONS[2]:
            return 200, {}, ok_body(prompt), 2.0  # slower than the timeout
        return 200, {}, ok_body(prompt), 0

    s = stub(behave)
    cache = tmp_path / "c.jsonl"
    t0 = time.perf_counter()
    summary = run(CAPTIONS, backend(s.url, timeout=0.3, retries=1), cache)
    assert time.perf_counter() - t0 < 1.9  # gave up on the slow one without waiting for it
    assert (summary["generated"], summary["failed"]) == (3, 3)
    errors = {e["caption"]: e["error"] for e in iter_entries(cache) if e["error"]}
    assert "HTTP 500" in errors[CAPTIONS[0]] and "after 2 attempts" in errors[CAPTIONS[0]]
    assert "malformed response" in errors[CAPTIONS[1]]
    assert "timed out" in errors[CAPTIONS[2]]
    assert s.seen[CAPTIONS[0]] == 2 and s.seen[CAPTIONS[1]] == 1  # malformed answers are not retried
    assert set(read_cache(cache)) == set(CAPTIONS[3:])


def test_timeout_is_a_deadline_for_the_whole_answer(stub, tmp_path):
    """An answer dripping one byte every 50 ms takes ~5 s in all; each byte comes well within the
    0.5 s --timeout, which bounds the whole request, so the item fails as timed out and is not cached."""
    s = stub(lambda prompt, attempt: (200, {}, ok_body(prompt), 0, 0.05))
    cache = tmp_path / "c.jsonl"
    t0 = time.perf_counter()
    summary = run(CAPTIONS[:1], backend(s.url, timeout=0.5, retries=0), cache)
    assert time.perf_counter() - t0 < 3.0
    assert (summary["generated"], summary["failed"]) == (0, 1)
    [entry] = iter_entries(cache)
    assert "timed out after 0.5 s" in entry["error"] and entry["explanation"] is None


def test_huge_answers_are_not_read_whole_and_long_ones_are_cut(stub, tmp_path):
    """A server that ignores max_tokens: a 5 MB answer is refused after the first ~70 kB (its error is
    cached, not the answer); a 20,000-character one is kept up to --max-new-tokens x 12 characters and
    counted as cut."""
    def behave(prompt, attempt):
        if prompt == CAPTIONS[0]:
            return 200, {}, ok_body("x" * (5 << 20)), 0
        if prompt == CAPTIONS[1]:
            return 200, {}, ok_body("word " * 4000), 0
        return 200, {}, ok_body(prompt), 0

    s = stub(behave)
    cache = tmp_path / "c.jsonl"
    summary = run(CAPTIONS[:3], backend(s.url, max_new_tokens=16), cache)
    assert (summary["generated"], summary["failed"], summary["cut"]) == (2, 1, 1)
    entries = {e["caption"]: e for e in iter_entries(cache)}
    assert "larger than" in entries[CAPTIONS[0]]["error"] and entries[CAPTIONS[0]]["explanation"] is None
    kept = entries[CAPTIONS[1]]["explanation"]
    assert kept.startswith("About: word word") and len(kept) <= 16 * 12
    assert entries[CAPTIONS[2]]["explanation"] == f"About: {CAPTIONS[2]}"
    assert cache.stat().st_size < 10_000


def test_cli_exits_3_when_captions_failed(stub, tmp_path, monkeypatch):
    s = stub(lambda prompt, attempt: (503, {}, b"overloaded", 0) if prompt != CAPTIONS[0] else
             (200, {}, ok_body(prompt), 0))
    monkeypatch.setenv("MY_LLM_KEY", SENTINEL)
    r, _ = explain_cli(tmp_path, s.url, CAPTIONS[:3])
    assert r.exit_code == 3, r.output
    assert json.loads(r.stdout)["failed"] == 2 and json.loads(r.stdout)["generated"] == 1
    s2 = stub()
    r, _ = explain_cli(tmp_path, s2.url, CAPTIONS[:3])           # the re-run asks again and succeeds
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["generated"] == 2


def test_unauthorised_stops_the_run_with_a_clear_error(stub, tmp_path):
    s = stub(lambda prompt, attempt: (401, {}, b'{"error": "invalid api key"}', 0))
    with pytest.raises(EclipError, match="HTTP 401.*check the API key"):
        run(CAPTIONS, backend(s.url, concurrency=1), tmp_path / "c.jsonl")
    assert sum(s.seen.values()) <= 3  # stopped, did not try every caption


def test_named_api_key_variable_must_be_set(monkeypatch):
    monkeypatch.delenv("ECLIP_TEST_UNSET_KEY", raising=False)
    with pytest.raises(EclipError, match="--api-key-env ECLIP_TEST_UNSET_KEY: that environment variable is not set"):
        EndpointBackend("http://127.0.0.1:9/v1", "m", api_key_env="ECLIP_TEST_UNSET_KEY")


SENTINEL = "sk-eclip-test-SENTINEL-7f3a9c"
LEAK = SENTINEL[:12]   # a key cut anywhere after its 12th character still shows this much


def cli_runner():
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def explain_cli(tmp_path, url, captions, *extra):
    out_dir = tmp_path / "out"
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "prompt.txt").write_text(PLAIN)
    r = cli_runner().invoke(app, ["explain", "--texts", str(tmp_path / "captions.txt"), "-o", str(out_dir / "c.jsonl"),
                                  "--endpoint", url, "--llm", "stub-llm", "--api-key-env", "MY_LLM_KEY",
                                  "--prompt-template", str(tmp_path / "prompt.txt"), "--retries", "0", "--json",
                                  *extra])
    written = [p for p in out_dir.rglob("*") if p.is_file()]
    return r, written


def assert_never_leaked(r, written):
    for path in written:
        assert LEAK.encode() not in path.read_bytes(), f"{path.name} holds the key: {path.read_text()[:500]}"
    assert LEAK not in r.stdout and LEAK not in r.stderr


def test_api_key_is_sent_but_never_written_or_printed(stub, tmp_path, monkeypatch):
    def behave(prompt, attempt):  # a server that echoes the key back in its errors and answers
        if prompt == CAPTIONS[0]:
            return 500, {}, f"bad request from Bearer {SENTINEL}".encode(), 0
        if prompt == CAPTIONS[1]:
            return 200, {}, f"<html>{SENTINEL}</html>".encode(), 0
        if prompt == CAPTIONS[2]:   # the key straddles the 200-character cut of an error body
            return 503, {}, ("x" * 180 + f" Bearer {SENTINEL}").encode(), 0
        if prompt == CAPTIONS[3]:   # a "successful" answer that echoes the key
            return 200, {}, ok_body(f"Your key is {SENTINEL}, keep it safe."), 0
        return 200, {}, ok_body(prompt), 0

    s = stub(behave)
    monkeypatch.setenv("MY_LLM_KEY", SENTINEL)
    r, written = explain_cli(tmp_path, s.url, CAPTIONS[:5])
    assert r.exit_code == 3, r.output                       # some captions failed
    assert json.loads(r.stdout)["failed"] == 3
    assert all(req["auth"] == f"Bearer {SENTINEL}" for req in s.requests)
    assert written
    assert_never_leaked(r, written)
    entries = {e["caption"]: e for e in iter_entries(tmp_path / "out" / "c.jsonl")}
    assert "***" in entries[CAPTIONS[2]]["error"] and "***" in entries[CAPTIONS[3]]["explanation"]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "  "])
def test_api_key_read_from_a_file_loses_its_line_ending(stub, tmp_path, monkeypatch, ending):
    s = stub()
    monkeypatch.setenv("MY_LLM_KEY", SENTINEL + ending)   # as `export KEY=$(cat key.txt)` or an .env file leaves it
    r, written = explain_cli(tmp_path, s.url, CAPTIONS[:2])
    assert r.exit_code == 0, r.output
    assert [req["auth"] for req in s.requests] == [f"Bearer {SENTINEL}"] * 2
    assert_never_leaked(r, written)


def test_api_key_with_a_line_break_inside_is_refused_without_printing_it(stub, tmp_path, monkeypatch):
    s = stub()
    monkeypatch.setenv("MY_LLM_KEY", SENTINEL[:14] + "\n" + SENTINEL[14:])
    r, written = explain_cli(tmp_path, s.url, CAPTIONS[:2])
    assert r.exit_code == 2 and "MY_LLM_KEY" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not s.requests
    assert_never_leaked(r, written)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_address_never_gets_the_key(stub, tmp_path, monkeypatch, code):
    elsewhere = stub()   # another port: another origin
    s = stub(lambda prompt, attempt: (code, {"Location": elsewhere.url + "/chat/completions"}, b"moved", 0))
    monkeypatch.setenv("MY_LLM_KEY", SENTINEL)
    r, written = explain_cli(tmp_path, s.url, CAPTIONS[:3])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and s.url in line and elsewhere.url in line and "redirect" in line
    assert [req["auth"] for req in elsewhere.requests if req["auth"]] == []
    assert read_cache(tmp_path / "out" / "c.jsonl") == {} if (tmp_path / "out" / "c.jsonl").exists() else True
    assert_never_leaked(r, written)


def test_redirect_within_the_same_address_is_followed(stub, tmp_path, monkeypatch):
    where = {}
    s = stub(lambda prompt, attempt: (302, {"Location": where["url"] + "/moved"}, b"moved", 0))
    where["url"] = s.url
    monkeypatch.setenv("MY_LLM_KEY", SENTINEL)
    r, written = explain_cli(tmp_path, s.url, CAPTIONS[:1])
    assert r.exit_code == 0, r.output
    assert [req["path"] for req in s.requests] == ["/v1/chat/completions", "/v1/moved"]
    assert read_cache(tmp_path / "out" / "c.jsonl") == {CAPTIONS[0]: "About: answered by the address redirected to"}


def test_killed_run_resumes_with_every_caption_exactly_once(stub, tmp_path):
    captions = [f"Caption {i}: Barack Obama at the White House." for i in range(40)]
    slow = stub(lambda prompt, attempt: (200, {}, ok_body(prompt), 0.1))
    texts, prompt, cache = tmp_path / "captions.txt", tmp_path / "prompt.txt", tmp_path / "c.jsonl"
    texts.write_text("\n".join(captions) + "\n")
    prompt.write_text(PLAIN)
    env = {**os.environ, "ECLIP_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eclip", "explain", "--texts", str(texts), "-o", str(cache),
                             "--endpoint", slow.url, "--llm", "stub-llm", "--concurrency", "2",
                             "--prompt-template", str(prompt)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.exists() and cache.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_cache(cache))
    assert 4 <= done_before < len(captions)

    fast = stub()
    summary = run(captions, backend(fast.url), cache)
    assert summary["cached"] == done_before and summary["generated"] == len(captions) - done_before
    counts = Counter(e["caption"] for e in iter_entries(cache))
    assert set(counts) == set(captions) and set(counts.values()) == {1}
    assert all(c not in fast.seen for c in list(read_cache(cache))[:done_before])  # nothing asked twice


@pytest.mark.slow
def test_torchrun_two_processes_share_the_work_and_merge_into_one_cache(stub, tmp_path):
    captions = [f"Caption {i}: Serena Williams at Wimbledon." for i in range(11)]
    s = stub()
    texts, prompt, cache = tmp_path / "captions.txt", tmp_path / "prompt.txt", tmp_path / "c.jsonl"
    texts.write_text("\n".join(captions) + "\n")
    prompt.write_text(PLAIN)
    run(captions[:3], backend(s.url), cache)  # a previous run left three
    (tmp_path / "c.jsonl.part-1").write_text(json.dumps(  # and a killed 2-process run left a part file
        {"id": None, "caption": captions[3], "explanation": "from the killed run", "model": "stub-llm",
         "prompt_sha256": run([], backend(s.url), cache)["prompt_sha256"], "error": None}) + "\n{\"partial")
    env = {**os.environ, "ECLIP_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "eclip",
                        "explain", "--texts", str(texts), "-o", str(cache), "--endpoint", s.url, "--llm", "stub-llm",
                        "--prompt-template", str(prompt), "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)  # printed once, by process 0
    assert (summary["cached"], summary["generated"], summary["failed"]) == (4, 7, 0)
    counts = Counter(e["caption"] for e in iter_entries(cache))
    assert set(counts) == set(captions) and set(counts.values()) == {1}
    assert read_cache(cache)[captions[3]] == "from the killed run"
    assert sorted(s.seen) == sorted(captions[:3] + captions[4:])  # the part file's caption was not asked
    assert set(s.seen.values()) == {1}  # and none twice
    assert [p.name for p in tmp_path.iterdir() if ".part-" in p.name] == []
