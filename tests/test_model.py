"""The model core: towers give tokens consistent with open_clip, experts and GI-ITM train."""
import pytest
import torch
import torch.nn.functional as F

from eclip.config import ExpertConfig
from eclip.model.backbone import image_tokens, text_tokens
from eclip.model.experts import ExpertBlock
from eclip.model.itm import hard_negative_indices

CAPTIONS = ["Queen Elizabeth II greets crowds at Windsor", "the flag of France",
            "Grace Hopper", "the statue of Eric Morecambe in Morecambe Bay, Lancashire"]
EXPLANATIONS = ["Queen Elizabeth II was the British monarch; Windsor Castle is a royal residence.",
                "France's flag is a vertical tricolour of blue, white and red.",
                "Grace Hopper was an American computer scientist and US Navy rear admiral.",
                "Eric Morecambe was an English comedian; the bronze statue shows him mid-dance."]


def batch(model, n=4):
    torch.manual_seed(1)
    return torch.randn(n, 3, 64, 64), model.tokenize(CAPTIONS[:n]), model.tokenize(EXPLANATIONS[:n])


def test_pooled_features_equal_open_clip(tiny_model):
    images, captions, _ = batch(tiny_model)
    clip = tiny_model.clip
    v_tok, v_cls = image_tokens(clip, images)
    t_tok, t_cls, eot, padding = text_tokens(clip, captions)
    assert v_tok.shape == (4, 1 + 16, 64)            # 64 px / patch 16 -> 16 patches + class token
    assert t_tok.shape == (4, 77, 64)
    torch.testing.assert_close(v_cls, clip.encode_image(images), rtol=0, atol=0)
    torch.testing.assert_close(t_cls, clip.encode_text(captions), rtol=0, atol=0)
    torch.testing.assert_close(v_tok[:, 0], v_cls)
    torch.testing.assert_close(t_tok[torch.arange(4), eot], t_cls)
    # inference API == open_clip's normalised features
    torch.testing.assert_close(tiny_model.encode_images(images), F.normalize(clip.encode_image(images), dim=-1))


def test_eot_index_and_padding_follow_caption_length(tiny_model):
    tokens = tiny_model.tokenize(["Windsor", "Queen Elizabeth II at Windsor Castle"])
    _, _, eot, padding = text_tokens(tiny_model.clip, tokens)
    n_words = [1, 6]                                    # BPE: one token per word here
    assert eot.tolist() == [1 + n_words[0], 1 + n_words[1]]   # after the start-of-text token
    assert padding[0, eot[0] + 1:].all() and not padding[0, : eot[0] + 1].any()
    assert int(padding[1].sum()) == 77 - (eot[1] + 1)


def test_expert_reads_one_position_like_a_full_block():
    """The query-only expert equals a full pre-norm block run over every token and read at one position."""
    torch.manual_seed(0)
    block = ExpertBlock(32, heads=2)
    x = torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    h = block.ln_1(x)
    full = x + block.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
    full = full + block.mlp(block.ln_2(full))
    read = torch.tensor([0, 4, 8])
    got = block(x[torch.arange(3), read], x, pad)
    torch.testing.assert_close(got, full[torch.arange(3), read], rtol=1e-5, atol=1e-5)


def test_padding_is_masked_in_expert_attention():
    torch.manual_seed(0)
    block = ExpertBlock(16, cross=True)
    q, ctx = torch.randn(2, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, True, True, True]] * 2)
    changed = ctx.clone()
    changed[:, 2:] = 100.0                             # garbage in padded positions
    torch.testing.assert_close(block(q, ctx, pad), block(q, changed, pad))


def test_full_loss_backward_reaches_every_parameter_group(tiny_model):
    images, captions, explanations = batch(tiny_model)
    out = tiny_model(images, captions, explanations, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "vtc", "gfm", "vtc_star", "pos_prob"}
    assert 0.0 < float(out["pos_prob"]) < 1.0
    eta, lam = tiny_model.config.loss.eta, tiny_model.config.loss.lam
    torch.testing.assert_close(out["loss"].detach(), out["vtc"] + eta * out["gfm"] + lam * out["vtc_star"])
    out["loss"].backward()
    groups = {"clip.visual": 0, "clip.transformer": 0, "clip.token_embedding": 0, "experts.vision": 0,
              "experts.text": 0, "experts.shared": 0, "experts.image_gate": 0, "experts.text_gate": 0,
              "itm.gate": 0, "itm.classify": 0, "clip.logit_scale": 0}
    for name, p in tiny_model.named_parameters():
        for g in groups:
            if name.startswith(g) and p.grad is not None and p.grad.abs().sum() > 0:
                groups[g] += 1
    assert all(groups.values()), {g: n for g, n in groups.items() if not n}


def test_no_experts_is_plain_clip_loss(tiny_config_path):
    from conftest import make_tiny
    m = make_tiny(tiny_config_path, experts=ExpertConfig(enabled=False))
    assert m.experts is None and m.itm is None
    images, captions, explanations = batch(m)
    out = m(images, captions, explanations)
    assert set(out) == {"loss", "vtc"}
    out["loss"].backward()


def test_hard_negatives_never_pick_a_positive():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    sim.fill_diagonal_(10.0)                          # the positive is by far the most similar
    positive = torch.eye(6, dtype=torch.bool)
    positive[0, 3] = True                             # e.g. the same image file in two records
    for _ in range(200):
        idx = hard_negative_indices(sim, positive, torch.rand(6))
        assert (idx >= 0).all()
        assert not positive[torch.arange(6), idx].any()


def test_hard_negatives_follow_the_logits():
    sim = torch.tensor([[0.0, 5.0, -5.0]])
    positive = torch.tensor([[True, False, False]])
    picks = [int(hard_negative_indices(sim, positive, torch.tensor([u]))) for u in torch.linspace(0, 0.999, 50)]
    assert picks.count(1) > 45                        # softmax weight of index 1 is ~0.99995


def test_batch_of_one_has_no_negatives_and_still_trains(tiny_model):
    """Documented: with one pair there is no negative, so L_GFM is the positive pair's loss and VTC is 0."""
    assert int(hard_negative_indices(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.rand(1))) == -1
    images, captions, explanations = batch(tiny_model, n=1)
    out = tiny_model(images, captions, explanations)
    assert torch.isfinite(out["loss"]) and float(out["vtc"]) == pytest.approx(0.0, abs=1e-6)
    out["loss"].backward()


def test_similarity_is_cosine(tiny_model):
    images, captions, _ = batch(tiny_model)
    with torch.no_grad():
        i, t = tiny_model.encode_images(images), tiny_model.encode_texts(captions)
    sim = tiny_model.similarity(i, t)
    assert sim.shape == (4, 4) and float(sim.abs().max()) <= 1.0 + 1e-5
    torch.testing.assert_close(sim[1, 2], F.cosine_similarity(i[1], t[2], dim=0))


def test_single_token_towers_are_named_once(tiny_config_path, tmp_path, monkeypatch, capsys):
    """A ViT and CLIP text tower give every token; a ModifiedResNet gives one, said once on the first forward."""
    import json

    from conftest import TINY, make_tiny
    vit = make_tiny(tiny_config_path)
    assert vit.token_note() is None
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps({**TINY, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}}))
    rn = make_tiny(path)
    v_tok, v_cls = image_tokens(rn.clip, torch.randn(2, 3, 64, 64))
    assert v_tok.shape == (2, 1, 64)
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    images, captions, explanations = batch(rn, n=2)
    rn(images, captions, explanations)
    rn(images, captions, explanations)
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "image tower (ModifiedResNet) gives the experts one token" in said, said
    assert make_tiny(path, experts=ExpertConfig(enabled=False)).token_note() is None   # no experts, nothing to say
