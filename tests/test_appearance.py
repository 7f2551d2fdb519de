"""examples/appearance.py: the ablation's informative explanations say what a flag looks like."""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import appearance  # noqa: E402

BLUE, WHITE, RED, BLACK, YELLOW = (0, 85, 164), (255, 255, 255), (239, 65, 53), (0, 0, 0), (255, 206, 0)


def flag(rows=None, cols=None, h=90, w=180):
    a = np.zeros((h, w, 3), np.uint8)
    bands = rows or cols
    for i, colour in enumerate(bands):
        if rows:
            a[i * h // len(bands):(i + 1) * h // len(bands)] = colour
        else:
            a[:, i * w // len(bands):(i + 1) * w // len(bands)] = colour
    return a


def test_bands_stripes_and_a_disc_are_described_from_the_pixels():
    assert appearance.describe_flag(flag(cols=[BLUE, WHITE, RED]), "France") == (
        "The flag of France: three vertical bands, blue, white and red (hoist to fly).")
    assert appearance.describe_flag(flag(rows=[BLACK, RED, YELLOW]), "Germany") == (
        "The flag of Germany: three horizontal stripes, black, red and yellow (top to bottom).")
    japan = flag(rows=[WHITE])
    yy, xx = np.mgrid[:90, :180]
    japan[(yy - 45) ** 2 + (xx - 90) ** 2 < 27 ** 2] = (188, 0, 45)
    assert appearance.describe_flag(japan, "Japan") == "The flag of Japan: a white field with red in the centre."


def test_a_canton_is_placed_in_the_upper_hoist_corner():
    us = flag(rows=[RED, WHITE] * 6 + [RED])
    us[:49, :72] = (60, 59, 110)
    text = appearance.describe_flag(us, "the United States")
    assert text.startswith("The flag of the United States: thirteen horizontal stripes, alternating red and white")
    assert text.endswith("blue in the upper hoist corner.")


def test_the_cache_covers_every_caption_of_a_demo_set(tmp_path):
    from eclip.data.demo_set import build_demo_set
    from eclip.explain.cache import read_cache
    build_demo_set(tmp_path / "set", n_flags=3, views_per_entity=3, image_size=32)
    summary = appearance.write_cache(tmp_path / "set" / "train.jsonl", tmp_path / "appearance.jsonl")
    captions = {json.loads(line)["text"] for line in (tmp_path / "set" / "train.jsonl").read_text().splitlines()}
    found = read_cache(tmp_path / "appearance.jsonl")
    assert summary["missing"] == [] and set(found) == captions
    assert found["The national flag of Afghanistan"].startswith("The flag of Afghanistan:")
    assert "cat" in found["Chelsea the cat looking into the camera"]
