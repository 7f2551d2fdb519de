"""The onnx format: a folder that runs with onnxruntime, without eclip and without torch.

image.onnx / text.onnx (+ their .data weight files) are the towers eclip's ONNX cache traces
(eclip.runtime.onnx_cache.export_towers: pixels or token ids -> L2-normalised vectors, checked
against torch to 1e-4 at export). tokenizer.json is CLIP's byte-pair tokenizer for the Hugging Face
`tokenizers` library (padding and truncation included), built from the vocabulary in the open_clip
wheel; tests/test_export.py checks its ids against open_clip's tokenizer. preprocess.json says how
to turn an image into pixels (open_clip's preprocess config) and what the text needs before the
tokenizer (open_clip's cleaning: ftfy.fix_text, then HTML unescaping twice).
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
    if tok is None:
        raise EclipError("--format onnx: this model's text tokenizer is not CLIP's byte-pair tokenizer (a Hugging "
                         "Face text tower?), which the torch-free folder supports; use --format open-clip")
    if tok["clean"] != "lower" or tok["additional_special_tokens"]:
        raise EclipError(f"--format onnx: tokenizer settings {tok} are not supported (only CLIP's lower-case "
                         f"cleaning); use --format open-clip")
    if not supports(model.config.preprocess) or (model.config.preprocess.get("resize_mode") or "shortest") != "shortest":
        raise EclipError(f"--format onnx: preprocessing {model.config.preprocess} is not supported (square "
                         f"'shortest' resize and centre crop only); use --format open-clip")


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
    meta = export_towers(model, work)
    if "unsupported" in meta:
        raise EclipError(f"--format onnx: this model cannot be exported to ONNX: {meta['unsupported']}")
    tok = clip_bpe_settings(model)
    clip_tokenizer(tok["context_length"]).save(str(work / "tokenizer.json"))
    pre = model.config.preprocess
    size = pre.get("size", 224)
    settings = {"image": {"size": size if isinstance(size, int) else size[0],
                          "resize": "shortest side to size, then centre crop size x size",
                          "interpolation": pre.get("interpolation", "bicubic"), "mean": pre["mean"], "std": pre["std"],
                          "input": "pixels [N, 3, size, size] float32, RGB, (x / 255 - mean) / std"},
                "text": {"clean": "ftfy.fix_text, then html.unescape twice, before tokenizer.json",
                         "context_length": tok["context_length"], "input": "tokens [N, context_length] int64"},
                "output": "features [N, embed_dim] float32, L2-normalised",
                "embed_dim": meta["embed_dim"], "logit_scale": meta["logit_scale"],
                "max_difference_from_torch": meta["max_difference"]}
    (work / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return {"onnx_max_difference": meta["max_difference"],
            "usage": ["# see the README of eclip, 'Using your model elsewhere': onnxruntime, tokenizers, ftfy, Pillow",
                      'image = onnxruntime.InferenceSession("image.onnx"); text = onnxruntime.InferenceSession("text.onnx")',
                      'tokenizer = tokenizers.Tokenizer.from_file("tokenizer.json")']}
