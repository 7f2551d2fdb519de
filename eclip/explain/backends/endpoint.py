"""An OpenAI-compatible HTTP server (vLLM, llama.cpp, Ollama, hosted APIs) as an explanation backend."""
from __future__ import annotations

import email.utils
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Iterator, Optional

from eclip.errors import EclipError
from eclip.explain.backends.deadline import DeadlineHTTPHandler, DeadlineHTTPSHandler
from eclip.explain.backends.huggingface import DEFAULT_MAX_NEW_TOKENS

# An answer of N tokens is at most ENVELOPE_BYTES + N * BYTES_PER_TOKEN bytes (a token's text, JSON-escaped
# as \uXXXX pairs at worst; the envelope: id, usage, fingerprints): a longer body is not read further.
ENVELOPE_BYTES = 64 << 10
BYTES_PER_TOKEN = 128
# The explanation kept: N * CHARS_PER_TOKEN characters (English averages about 4 per token); a server that
# ignores max_tokens gets its answer cut there, and counted.
CHARS_PER_TOKEN = 12
ERROR_BYTES = 64 << 10     # of an error's body (only a snippet is shown)


class EndpointBackend:
    """POST {url}/chat/completions with `concurrency` threads (stdlib urllib: no extra
    dependency). 429, 5xx, timeouts and dropped connections are retried with exponential
    backoff, honouring Retry-After; an item still failing is reported as an error and the
    run goes on. 401/403/404 stop the run: every other request would fail the same way.

    The API key is read from the environment variable `api_key_env` (surrounding whitespace,
    such as the line ending of a key read from a file, is dropped) and only ever put in the
    Authorization header of requests to the --endpoint address: a redirect to another
    address (host, port or scheme) is refused, and the key is masked in every text the
    backend returns (answers and errors that echo it) and in its error messages.

    `timeout` is a deadline for each request as a whole (connecting, sending, the last byte of the
    answer), not for each read: a server dripping its answer cannot hold a request longer. An answer
    is read up to a size its `max_new_tokens` can fill (larger: the item fails, unread), and the text
    kept is cut at max_new_tokens * CHARS_PER_TOKEN characters (`answers_cut` counts those)."""

    def __init__(self, url: str, model: str, *, api_key_env: Optional[str] = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 4, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 seed: int = 0, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_consecutive_failures: int = 32):
        if not model:
            raise EclipError("--endpoint needs --llm NAME: the model name the server serves")
        if not url.startswith(("http://", "https://")):
            raise EclipError(f"--endpoint {url}: expected an http:// or https:// URL such as http://127.0.0.1:8000/v1")
        if concurrency < 1:
            raise EclipError(f"--concurrency must be at least 1, got {concurrency}")
        if retries < 0:
            raise EclipError(f"--retries must be 0 or more, got {retries}")
        if timeout <= 0:
            raise EclipError(f"--timeout must be positive, got {timeout}")
        self.url = url.rstrip("/") + "/chat/completions"
        self.name = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.max_new_tokens = max_new_tokens
        self.max_answer_bytes = ENVELOPE_BYTES + max_new_tokens * BYTES_PER_TOKEN
        self.max_chars = max(max_new_tokens, 1) * CHARS_PER_TOKEN
        self.answers_cut = 0
        self._cut_lock = threading.Lock()
        self.seed = seed
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_consecutive_failures = max_consecutive_failures
        key = _read_key(api_key_env)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._key = key
        self._opener = urllib.request.build_opener(_SameOriginRedirects(bool(key)), DeadlineHTTPHandler(),
                                                   DeadlineHTTPSHandler())
        self._stop = threading.Event()

    def __repr__(self):
        return f"EndpointBackend(url={self.url!r}, model={self.name!r})"

    def _scrub(self, text: Optional[str]) -> Optional[str]:
        return text.replace(self._key, "***") if self._key and text else text

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff)
            except ValueError:
                try:
                    when = email.utils.parsedate_to_datetime(retry_after).timestamp()
                    return min(max(when - time.time(), 0.0), self.max_backoff)
                except (TypeError, ValueError):
                    pass
        return min(self.backoff * (2 ** attempt), self.max_backoff)

    def _one(self, prompt: str) -> tuple:
        """(text, None) or (None, error). Raises EclipError for failures no retry can fix."""
        body = json.dumps({"model": self.name, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_new_tokens, "temperature": 0, "seed": self.seed}).encode()
        error = None
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                return None, "cancelled"
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
                request.deadline = time.monotonic() + self.timeout
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read(self.max_answer_bytes + 1)
            except urllib.error.HTTPError as e:
                detail = _snippet(self._scrub(self._error_body(e)))   # mask, then cut
                error = self._scrub(f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else ""))
                if e.code in (401, 403, 404):
                    raise EclipError(f"{self.url}: {error}" + (
                        " (check the API key variable)" if e.code in (401, 403) else " (check --endpoint and --llm)"))
                if not (e.code == 429 or 500 <= e.code < 600):
                    return None, error
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (TimeoutError, socket.timeout):
                error = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as e:
                reason = e.reason
                error = f"timed out after {self.timeout:g} s" if isinstance(reason, (TimeoutError, socket.timeout)) \
                    else self._scrub(f"cannot reach the endpoint: {reason}")
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                error = self._scrub(f"connection failed: {type(e).__name__}: {e}")
            else:
                if len(raw) > self.max_answer_bytes:   # not retried: the same question gets the same answer
                    return None, (f"the answer is larger than {self.max_answer_bytes} bytes, far more than "
                                  f"max_tokens {self.max_new_tokens} allows (the rest was not read)")
                return self._parse(raw)
            if attempt < self.retries and self._stop.wait(self._delay(attempt, retry_after)):
                return None, "cancelled"
        return None, f"{error} (after {self.retries + 1} attempts)"

    def _parse(self, raw: bytes) -> tuple:
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"malformed response (not an OpenAI chat completion): {_snippet(self._scrub(_text(raw)))}"
        if not isinstance(text, str) or not text.strip():
            return None, "the model generated no text"
        text = self._scrub(text.strip())
        if len(text) > self.max_chars:   # the server ignored max_tokens
            text = text[:self.max_chars].rstrip()
            with self._cut_lock:
                self.answers_cut += 1
        return text, None

    def _error_body(self, e) -> str:
        """The start of an error's body; never a cut-off piece of the key at its end."""
        try:
            raw = e.read(ERROR_BYTES + 1) if e.fp else b""
        except (OSError, http.client.HTTPException):
            return ""
        text = _text(raw[:ERROR_BYTES])
        if len(raw) > ERROR_BYTES and self._key:
            text = text[:-len(self._key)]
        return text

    def generate(self, prompts: list) -> Iterator[tuple]:
        if not prompts:
            return
        self._stop.clear()
        self.answers_cut = 0
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="eclip-explain")
        pending = {}
        next_index = 0
        failures_in_a_row = 0
        try:
            while pending or next_index < len(prompts):
                while next_index < len(prompts) and len(pending) < 2 * self.concurrency:
                    pending[pool.submit(self._one, prompts[next_index])] = next_index
                    next_index += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    try:
                        text, error = future.result()
                    except EclipError as e:   # fatal: stops the run, never with the key in it
                        raise EclipError(self._scrub(str(e)), e.exit_code) from None
                    text, error = self._scrub(text), self._scrub(error)   # whatever path made them
                    failures_in_a_row = failures_in_a_row + 1 if error else 0
                    yield i, text, error
                    if failures_in_a_row >= self.max_consecutive_failures:
                        raise EclipError(f"{self.url}: {failures_in_a_row} requests in a row failed, stopping "
                                         f"(last: {error}); finished items are cached, re-run to go on")
        finally:
            self._stop.set()  # sleeping retries give up at once; requests in flight end within --timeout
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self):
        self._stop.set()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _snippet(text: str, n: int = 200) -> str:
    text = text.strip().replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


def _read_key(api_key_env: Optional[str]) -> Optional[str]:
    """The API key from `api_key_env` (default OPENAI_API_KEY, optional), without surrounding
    whitespace; one that cannot go in an HTTP header is refused without being shown."""
    env = api_key_env or "OPENAI_API_KEY"
    key = (os.environ.get(env) or "").strip()
    if api_key_env and not key:  # named explicitly: it must be there
        raise EclipError(f"--api-key-env {api_key_env}: that environment variable is not set (or empty)")
    if any(not 0x21 <= ord(c) <= 0x7E for c in key):   # RFC 6750 tokens are visible ASCII
        raise EclipError(f"${env}: the API key holds a line break, space or other character that cannot go in "
                         f"an HTTP header (the key is not shown); check how the variable was set")
    return key or None


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib copies every header, Authorization included, into the request it sends after a
    redirect: with a key, a redirect to another origin (scheme, host, port) is refused."""

    def __init__(self, has_key: bool):
        self.has_key = has_key

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.has_key and _origin(newurl) != _origin(req.full_url):
            raise EclipError(f"{req.full_url}: the server redirects (HTTP {code}) to {newurl}, another address; "
                             f"eclip does not send the API key there (point --endpoint at that address if you "
                             f"trust it)")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.deadline = getattr(req, "deadline", None)   # the redirect is part of the same request
        return new
