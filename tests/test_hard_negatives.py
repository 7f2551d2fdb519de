"""GI-ITM's hard negatives are hard: drawn from the contrastive logits (exp(logit_scale) * cosine),
as in the reference and ALBEF, not from raw cosines, whose softmax is almost uniform."""
import math

import pytest
import torch

import eclip.model.entityclip as entityclip
from eclip.model.loss import vtc_loss

PHOTOS = ("astronaut", "rocket", "coffee", "chelsea", "camera", "moon", "page", "horse", "text", "clock",
          "brick", "grass", "gravel", "cell", "retina", "logo")


@pytest.fixture(scope="module")
def aligned(tiny_config_path):
    """A tiny EntityCLIP whose towers have learned 16 real photographs and their captions (plain
    contrastive steps), so similarities mean something, plus the batch it learned."""
    import skimage.data
    from PIL import Image

    from conftest import make_tiny
    model = make_tiny(tiny_config_path)
    images = torch.stack([model.preprocess(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"))
                          for n in PHOTOS])
    captions = model.tokenize([f"a photograph of {n}, number {i}" for i, n in enumerate(PHOTOS)])
    optimizer = torch.optim.Adam(model.clip.parameters(), lr=1e-3)
    for _ in range(40):
        loss = vtc_loss(model.encode_images(images), model.encode_texts(captions), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, images, captions


def drawn_negatives(model, images, captions, logit_scale, monkeypatch, draws=30):
    """(negative caption per image, negative image per caption) of `draws` forward passes."""
    seen = []
    real = entityclip.hard_negative_indices
    monkeypatch.setattr(entityclip, "hard_negative_indices", lambda *a: seen.append(real(*a)) or seen[-1])
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(logit_scale))
        for s in range(draws):
            model(images, captions, captions, generator=torch.Generator().manual_seed(s))
    return torch.stack(seen[0::2]), torch.stack(seen[1::2])


def test_a_near_duplicate_is_drawn_most_of_the_time(aligned, monkeypatch):
    model, images, captions = aligned
    torch.manual_seed(0)
    # pair 16 nearly repeats pair 0: the same photograph with a little noise, the caption with a full stop
    images = torch.cat([images, images[:1] + 0.02 * torch.randn_like(images[:1])])
    captions = torch.cat([captions, model.tokenize(["a photograph of astronaut, number 0."])])
    neg_text, neg_image = drawn_negatives(model, images, captions, 100.0, monkeypatch)   # trained CLIP's scale
    assert (neg_text[:, 0] == 16).float().mean() >= 0.8      # image 0 meets the near-duplicate caption
    assert (neg_image[:, 0] == 16).float().mean() >= 0.8     # caption 0 meets the near-duplicate image
    assert (neg_text[:, 16] == 0).float().mean() >= 0.8
    # at scale 1 (softmax of raw cosines, the old behaviour) the draw is spread over the batch
    neg_text, neg_image = drawn_negatives(model, images, captions, 1.0, monkeypatch)
    assert (neg_text[:, 0] == 16).float().mean() < 0.5 and (neg_image[:, 0] == 16).float().mean() < 0.5


def reference_weights(logits):
    """The reference's lines (wangyxxjtu/ETE clip/model.py, CLIP.itm_loss), as written there:
    softmax(x + 1e-4), the diagonal subtracted, 1e-5 added; torch.multinomial then draws
    index j with probability weights[j] / weights.sum()."""
    import torch.nn.functional as F
    w = F.softmax(logits + 1e-4, dim=-1)
    w = w - torch.diag(torch.diag(w)) + 1e-5
    return w / w.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("positive_logit", [0.0, 8.0, 14.0])   # the positive's softmax mass from ~1/8 to ~0.9999
def test_the_reference_draw_has_the_reference_distribution(positive_logit):
    from eclip.model.itm import hard_negative_indices, reference_negative_indices
    g = torch.Generator().manual_seed(0)
    q, n = 6, 200_000
    logits = torch.randn(q, q, generator=g)
    logits.diagonal().add_(positive_logit)
    positive = torch.eye(q, dtype=torch.bool)
    expected = reference_weights(logits)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n        # evenly spread: counts are exact to +-1
    rows = torch.arange(q).repeat_interleave(n)
    drawn = reference_negative_indices(logits[rows], positive[rows], u.repeat(q))
    freq = torch.zeros(q, q).index_put_((rows, drawn), torch.ones(q * n), accumulate=True) / n
    torch.testing.assert_close(freq, expected, rtol=0, atol=3 / n)
    assert (drawn.view(q, n) == torch.arange(q)[:, None]).any()  # the pair itself can be drawn, as in the reference
    # eclip's default never draws the positive, and at a dominant positive the two draws differ
    ours = hard_negative_indices(logits[rows], positive[rows], u.repeat(q))
    assert not (ours.view(q, n) == torch.arange(q)[:, None]).any()


def test_the_model_draws_with_the_reference_rule_when_configured(aligned, monkeypatch):
    model, images, captions = aligned
    calls = []
    real = entityclip.reference_negative_indices
    monkeypatch.setattr(entityclip, "reference_negative_indices", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(model.config.loss, "negatives", "reference")
    with torch.no_grad():
        out = model(images, captions, captions, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 and torch.isfinite(out["gfm"])
    monkeypatch.setattr(model.config.loss, "negatives", "softmax")
    with torch.no_grad():
        model(images, captions, captions, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2
