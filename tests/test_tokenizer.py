"""The torch-free CLIP tokenizer gives open_clip's token ids, caption for caption."""
import random
import unicodedata

import numpy as np
import pytest

from eclip.runtime.tokenizer import ClipTokenizer, fix_text

CAPTIONS = [
    "",
    "   ",
    "Queen Elizabeth II at Windsor",
    "the statue of Eric Morecambe in Morecambe",
    "Angela Merkel in Berlin, 2015 — Reuters",
    "Zoë Saldaña und François Hollande in Köln",
    unicodedata.normalize("NFD", "Zoë Saldaña und François Hollande in Köln"),   # decomposed accents
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;friends&quot; &#39;quoted&#39;",
    "mojibake: CafÃ© and donâ€™t",
    "東京タワー と 富士山",
    "Владимир Путин в Москве",
    "القاهرة مصر",
    "emoji 🇯🇵 flag of Japan 🗾 and 👩‍🚀",
    "tabs\tand\nnew lines\r\nand  runs   of spaces",
    "control\x07chars\x1b[31m and \x7f delete",
    "UPPER lower MiXeD don't we'll I'd they've you're",
    "numbers 1234567 and 3.14159, 1e-10, #hashtag @user http://example.com/a_b?c=d",
    "under_score canonical-dash <start_of_text> literal specials <end_of_text>",
    " ".join(["Barack Obama and Michelle Obama at the White House"] * 12),     # far longer than 77 tokens
    "a" * 500,
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


def test_token_ids_equal_open_clip(open_clip_tokenizer):
    ours = ClipTokenizer(context_length=77)(CAPTIONS)
    theirs = open_clip_tokenizer(CAPTIONS).numpy()
    assert ours.dtype == np.int64 and ours.shape == theirs.shape == (len(CAPTIONS), 77)
    for caption, a, b in zip(CAPTIONS, ours, theirs):
        assert a.tolist() == b.tolist(), caption
    assert theirs[18, -1] == 49407 and theirs[18, 0] == 49406   # the long caption really was cut


@pytest.mark.parametrize("how", ["whitespace", "canonicalize"])
def test_other_cleanings_and_lengths_equal_open_clip(how):
    from open_clip.tokenizer import SimpleTokenizer
    theirs = SimpleTokenizer(context_length=32, clean=how)(CAPTIONS).numpy()
    assert ClipTokenizer(context_length=32, clean=how)(CAPTIONS).tolist() == theirs.tolist()


def test_plain_ascii_shortcut_matches_ftfy():
    """fix_text skips ftfy for printable ASCII without '&'; ftfy must indeed leave those alone."""
    import ftfy
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert fix_text(text) == ftfy.fix_text(text) or " ".join(fix_text(text).split()) == " ".join(
            ftfy.fix_text(text).split()), repr(text)
