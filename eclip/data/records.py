"""The one record type that flows through eclip: an image-text pair.

Readers make records, `explain` adds explanations, and train / embed / match /
evaluate consume them. Records are plain data and serialise to one JSON object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Record:
    id: str                       # unique within a dataset split
    image: str                    # absolute path of the image file
    caption: str                  # the text that names the entities
    explanation: Optional[str] = None   # LLM bridge text, used only in training
    entities: list = field(default_factory=list)  # [{"text": "Windsor", "type": "GPE"}, ...]
    label: Optional[str] = None   # a class (N24News's section, a table's `label`), for classification

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(
            id=str(d["id"]),
            image=str(d["image"]),
            caption=str(d["caption"]),
            explanation=d.get("explanation"),
            entities=list(d.get("entities") or []),
            label=None if d.get("label") in (None, "") else str(d["label"]),
        )

    def training_explanation(self) -> str:
        """The explanation, or the caption itself when none was written (METHOD.md fallback)."""
        return self.explanation if self.explanation else self.caption


def clean_label(value) -> Optional[str]:
    """A record's class as the readers keep it: the text, stripped; None when absent or blank."""
    return None if value is None or str(value).strip() == "" else str(value).strip()
