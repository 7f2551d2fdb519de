"""CLIP's byte-pair tokenizer without torch: the same token ids as open_clip's SimpleTokenizer.

open_clip's tokenizer module imports torch (it returns tensors), so the ONNX inference path
(eclip.runtime.onnxclip) cannot use it; this one returns numpy arrays. It reads the vocabulary
file that ships inside the open_clip wheel, cleans text the same way (ftfy, HTML unescaping
twice, whitespace, lower case) and splits words with the same pattern.
tests/test_tokenizer.py checks the ids against open_clip on awkward captions.
"""
from __future__ import annotations

import gzip
import html
import string

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2          # merges CLIP uses: vocabulary 49408 = 2 * 256 bytes + merges + 2 specials
SPECIALS = ["<start_of_text>", "<end_of_text>"]
CLEANS = ("lower", "whitespace", "canonicalize")
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"&"} | {"\t", "\n"}


def byte_symbols() -> dict[int, str]:
    """Every byte as a printable character (CLIP's reversible byte-level alphabet), in CLIP's
    order (printable bytes first): the order gives the first 512 token ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) for b in printable}
    symbols.update({b: chr(256 + k) for k, b in enumerate(others)})
    return symbols


def fix_text(text: str) -> str:
    """ftfy.fix_text, skipped for plain printable ASCII without '&' (which it leaves as is):
    importing ftfy costs more than a whole caption's tokenization."""
    if _PLAIN.issuperset(text):
        return text
    import ftfy
    return ftfy.fix_text(text)


def clean(text: str, how: str = "lower") -> str:
    text = html.unescape(html.unescape(fix_text(text))).strip()
    if how == "canonicalize":
        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
        return " ".join(text.split()).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if how == "lower" else text


class ClipTokenizer:
    """texts -> int64 token ids [N, context_length]: start token, BPE ids, end token, zero padding;
    a caption too long is cut and its last kept id replaced by the end token (as open_clip does)."""

    def __init__(self, context_length: int = 77, clean: str = "lower", additional_special_tokens=None):
        import regex
        if clean not in CLEANS:
            raise ValueError(f"unknown text cleaning {clean!r}")
        from eclip.model.source import open_clip_dir
        lines = gzip.open(open_clip_dir() / VOCAB_FILE).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        symbols = list(byte_symbols().values())
        specials = SPECIALS + list(additional_special_tokens or [])
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + specials
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_symbol = byte_symbols()
        self.sot, self.eot = self.ids[SPECIALS[0]], self.ids[SPECIALS[1]]
        self.context_length, self.how = context_length, clean
        self.cache = {t: [self.ids[t]] for t in specials}
        self.pattern = regex.compile("|".join(specials)   # unescaped, as open_clip joins them
                                     + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)

    def word_ids(self, word: str) -> list[int]:
        """One pre-tokenized word -> its BPE ids (merges applied lowest rank first)."""
        if word in self.cache:
            return self.cache[word]
        parts = [self.byte_symbol[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, N_MERGES))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.ids[p] for p in parts]
        if len(self.cache) < 100_000:
            self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        from eclip.model.text_limit import cap_text   # the torch engine's cut, so both see the same text
        return [i for word in self.pattern.findall(clean(cap_text(text), self.how)) for i in self.word_ids(word)]

    def __call__(self, texts) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot
            out[row, :len(ids)] = ids
        return out
