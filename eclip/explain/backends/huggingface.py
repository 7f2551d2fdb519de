"""Any Hugging Face causal LM (a local folder or a hub id) through transformers: batched,
left-padded, greedy decoding."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from eclip.errors import EclipError

DEFAULT_MAX_NEW_TOKENS = 96


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
