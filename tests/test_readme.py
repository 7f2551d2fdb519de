"""README.md is read top to bottom by newcomers: no section may appear twice (an edit once pasted a
stale copy of eleven sections into the middle of it)."""
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def headings(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append(line.lstrip("#").strip())
    return out


def test_no_section_of_the_readme_appears_twice():
    for name in ("README.md", "CHANGELOG.md", "docs/METHOD.md", "examples/DATA.md"):
        found = headings((ROOT / name).read_text(encoding="utf-8"))
        twice = sorted(h for h, n in Counter(found).items() if n > 1)
        assert not twice, f"{name}: headings repeated: {twice}"


def test_headings_ignore_code_blocks():
    assert headings("# A\n```bash\n# a comment\n```\n## B\n") == ["A", "B"]
