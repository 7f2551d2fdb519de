"""The prompt that asks an LLM for a caption's explanation (METHOD.md's bridge text).

A template is plain text with one `{caption}` placeholder. It is filled with
`str.replace`, not `str.format`, so other braces (JSON examples, ...) stay as written.
Its SHA-256 is part of the cache key: editing the template regenerates everything.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from eclip.errors import EclipError

PLACEHOLDER = "{caption}"

DEFAULT_TEMPLATE = (
    "Here is a news image caption:\n"
    "{caption}\n\n"
    "Explain who or what the people, places, organisations and things named in the caption are, "
    "and what they look like, in two or three sentences. "
    "Only state facts you are sure of; do not invent details."
)


def validate_template(template: str, source: str = "prompt template") -> str:
    """Return the template, or raise EclipError if it cannot be used."""
    if not template.strip():
        raise EclipError(f"{source}: the template is empty")
    if PLACEHOLDER not in template:
        raise EclipError(f"{source}: the template has no {PLACEHOLDER} placeholder "
                         "(it marks where each caption goes)")
    return template


def load_template(path=None) -> str:
    """The template in `path` (UTF-8 text), or the default one when `path` is None."""
    if path is None:
        return DEFAULT_TEMPLATE
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EclipError(f"{path}: prompt template file not found") from None
    except IsADirectoryError:
        raise EclipError(f"{path}: prompt template is a folder, not a file") from None
    except UnicodeDecodeError:
        raise EclipError(f"{path}: prompt template is not UTF-8 text") from None
    return validate_template(text, source=str(path))


def render(template: str, caption: str) -> str:
    return template.replace(PLACEHOLDER, caption)


def prompt_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()
