"""The onnx format: a folder that runs with onnxruntime, without eclip and without torch.

image.onnx / text.onnx (+ their .data weight files) are the towers eclip's ONNX cache traces
(eclip.runtime.onnx_cache.export_towers: pixels or token ids -> L2-normalised vectors, checked
against torch to 1e-4 at export). tokenizer.json is CLIP's byte-pair tokenizer for the Hugging Face
`tokenizers` library (padding and truncation included), built from the vocabulary in the open_clip
wheel; tests/test_export.py checks its ids against open_clip's tokenizer. preprocess.json says how
to turn an image into pixels (open_clip's preprocess config) and what the text needs before the
tokenizer (open_clip's cleaning: ftfy.fix_text, HTML unescaping twice, whitespace).
A Hugging Face text tower (e.g. examples/minilm-vit.json) brings its own tokenizer.json, set to pad
and cut as open_clip's HFTokenizer does; the same cleaning and example apply.
The README's "Using your model elsewhere" has the ten-line onnxruntime example.
"""
from __future__ import annotations

import json
from pathlib import Path

from eclip.errors import EclipError

SETTINGS = "preprocess.json"


def check(model) -> None:
    from eclip.runtime.onnx_cache import clip_bpe_settings
    from eclip.runtime.transform import supports
    tok = clip_bpe_settings(model)
    if tok is None and hf_tokenizer(model) is None:
        raise EclipError("--format onnx: this model's tokenizer is neither CLIP's byte-pair tokenizer nor a Hugging "
                         "Face tokenizer.json with open_clip's default cleaning; use --format open-clip")
    if tok is not None and (tok["clean"] != "lower" or tok["additional_special_tokens"]):
        raise EclipError(f"--format onnx: tokenizer settings {tok} are not supported (only CLIP's lower-case "
                         f"cleaning); use --format open-clip")
    if not supports(model.config.preprocess) or (model.config.preprocess.get("resize_mode") or "shortest") != "shortest":
        raise EclipError(f"--format onnx: preprocessing {model.config.preprocess} is not supported (square "
                         f"'shortest' resize and centre crop only); use --format open-clip")


def hf_tokenizer(model):
    """A Hugging Face text tower's tokenizer as a `tokenizers.Tokenizer` that pads and cuts as
    open_clip's HFTokenizer does, or None when open_clip tokenizes it some other way."""
    from open_clip.tokenizer import HFTokenizer
    from tokenizers import Tokenizer

    from eclip.model.hf_text import tower_files
    wrapped = getattr(model.tokenizer, "_wrapped", model.tokenizer)
    kwargs = model.config.clip_config.get("text_cfg", {}).get("tokenizer_kwargs") or {}
    if not isinstance(wrapped, HFTokenizer) or wrapped.tokenizer_mode or wrapped.strip_sep_token \
            or kwargs.get("clean", "whitespace") != "whitespace":
        return None
    files = tower_files(model)
    if "tokenizer.json" not in files or wrapped.tokenizer.pad_token_id is None:
        return None
    tok = Tokenizer.from_str(files["tokenizer.json"])
    tok.enable_truncation(max_length=wrapped.context_length)
    tok.enable_padding(length=wrapped.context_length, pad_id=wrapped.tokenizer.pad_token_id,
                       pad_token=wrapped.tokenizer.pad_token)
    return tok


def clean(text: str) -> str:
    """open_clip's cleaning before the tokenizer, as the README's example does it."""
    import html

    import ftfy
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def clip_tokenizer(context_length: int = 77):
    """CLIP's BPE as a `tokenizers.Tokenizer`: the same ids as open_clip's SimpleTokenizer on
    cleaned text (clean = ftfy + HTML unescape twice; whitespace and lower case are done here)."""
    import gzip

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from eclip.model.source import open_clip_dir
    from eclip.runtime.tokenizer import N_MERGES, SPECIALS, VOCAB_FILE, byte_symbols
    lines = gzip.open(open_clip_dir() / VOCAB_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + SPECIALS
    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(models.BPE(ids, merges, end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""   # open_clip's, as in CLIP
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    sot, eot = SPECIALS
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{sot} $A {eot}", special_tokens=[(sot, ids[sot]),
                                                                                              (eot, ids[eot])])
    tok.enable_truncation(max_length=context_length)     # [sot, first ids, eot], as open_clip cuts
    tok.enable_padding(length=context_length, pad_id=0, pad_token=vocab[0])   # zeros, as open_clip pads
    return tok


def write(model, work: Path, final: Path) -> dict:
    from eclip.runtime.onnx_cache import clip_bpe_settings, export_towers
    bpe = clip_bpe_settings(model)
    if bpe is not None:       # the cache's export and check, tokenizer included
        meta = export_towers(model, work)
        if "unsupported" in meta:
            raise EclipError(f"--format onnx: this model cannot be exported to ONNX: {meta['unsupported']}")
        tokenizer, context = clip_tokenizer(bpe["context_length"]), bpe["context_length"]
    else:
        tokenizer, context = hf_tokenizer(model), model.config.context_length
        meta = _hf_towers(model, work, tokenizer)
    tokenizer.save(str(work / "tokenizer.json"))
    pre = model.config.preprocess
    size = pre.get("size", 224)
    settings = {"image": {"size": size if isinstance(size, int) else size[0],
                          "resize": "shortest side to size, then centre crop size x size",
                          "interpolation": pre.get("interpolation", "bicubic"), "mean": pre["mean"], "std": pre["std"],
                          "input": "pixels [N, 3, size, size] float32, RGB, (x / 255 - mean) / std"},
                "text": {"clean": "ftfy.fix_text, html.unescape twice, whitespace runs to one space; then "
                                  "tokenizer.json", "context_length": context,
                         "input": "tokens [N, context_length] int64"},
                "output": "features [N, embed_dim] float32, L2-normalised",
                "embed_dim": model.config.clip_config["embed_dim"], "logit_scale": float(model.logit_scale.detach()),
                "max_difference_from_torch": meta["max_difference"]}
    (work / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return {"onnx_max_difference": meta["max_difference"],
            "usage": ["# see the README of eclip, 'Using your model elsewhere': onnxruntime, tokenizers, ftfy, Pillow",
                      'image = onnxruntime.InferenceSession("image.onnx"); text = onnxruntime.InferenceSession("text.onnx")',
                      'tokenizer = tokenizers.Tokenizer.from_file("tokenizer.json")']}


def _hf_towers(model, work: Path, tokenizer) -> dict:
    """A Hugging Face text tower: the cache's tracer, then the graphs and tokenizer.json checked here
    against torch and open_clip's tokenizer (the cache's check knows CLIP's tokenizer only)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from eclip.runtime.onnx_cache import SAMPLE_CAPTIONS, TOLERANCE, trace_towers
    ids = np.array([e.ids for e in tokenizer.encode_batch([clean(t) for t in SAMPLE_CAPTIONS])], dtype=np.int64)
    tokens = model.tokenize(SAMPLE_CAPTIONS)
    if ids.shape != tuple(tokens.shape) or not (ids == tokens.numpy()).all():
        raise EclipError("--format onnx: the text tower's tokenizer.json does not reproduce open_clip's token ids; "
                         "use --format open-clip")
    trace_towers(model, work)
    size = model.config.preprocess.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_ref, text_ref = model.encode_images(pixels).numpy(), model.encode_texts(tokens).numpy()
    image = ort.InferenceSession(str(work / "image.onnx")).run(None, {"pixels": pixels.numpy()})[0]
    text = ort.InferenceSession(str(work / "text.onnx")).run(None, {"tokens": ids})[0]
    worst = float(max(np.abs(image - image_ref).max(), np.abs(text - text_ref).max()))
    if worst > TOLERANCE:
        raise EclipError(f"--format onnx: the ONNX graphs differ from torch by {worst:.2e}; use --format open-clip")
    return {"max_difference": worst}
