"""Texts are cut to MAX_TEXT_CHARS characters before they reach a tokenizer.

A CLIP text tower reads its first 77 tokens (Hugging Face towers up to 512), about 300 to 2,000
characters of ordinary text, but the tokenizers clean and split the WHOLE text before they cut
the tokens: one 50 MB caption made `eclip embed` run for two minutes with 1.7 GB. 16,384
characters hold several times what any tower reads, so ordinary captions give the same tokens
with or without the cut. (A caption padded with thousands of spaces or HTML entities before its
words could lose them: tokenizers collapse such runs, the cut counts them.)
"""
from __future__ import annotations

MAX_TEXT_CHARS = 16_384


def cap_text(text: str) -> str:
    return text[:MAX_TEXT_CHARS] if len(text) > MAX_TEXT_CHARS else text


def count_long(texts) -> int:
    """How many of `texts` the cut shortens."""
    return sum(1 for t in texts if isinstance(t, str) and len(t) > MAX_TEXT_CHARS)


class CappedTokenizer:
    """An open_clip tokenizer (or any callable on a text or a list of texts) that first cuts every
    text to MAX_TEXT_CHARS; its other attributes are the wrapped tokenizer's."""

    def __init__(self, tokenizer):
        self._wrapped = tokenizer

    def __call__(self, texts, *args, **kwargs):
        texts = cap_text(texts) if isinstance(texts, str) else [cap_text(t) for t in texts]
        return self._wrapped(texts, *args, **kwargs)

    def __getattr__(self, name):   # e.g. .tokenizer of open_clip's HFTokenizer, .context_length
        if name == "_wrapped":      # not set yet (while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._wrapped, name)
