"""--grad-checkpointing and partial freezing: the same results, less memory, frozen parts untouched."""
import pytest
import torch

from conftest import TINY, make_tiny
from eclip.config import TrainConfig
from eclip.errors import EclipError
from eclip.model.experts import ExpertBlock, group_attend, group_keys_values
from eclip.train.setup import make_optimizer
from eclip.train.towers import apply_tower_options, check_tower_options


def batch(model, n=8):
    torch.manual_seed(1)
    return (torch.randn(n, 3, 64, 64), model.tokenize([f"caption {i} " + "x " * i for i in range(n)]),
            model.tokenize([f"explanation {i} " + "y " * (2 * i) for i in range(n)]))


def losses_grads_and_saved_bytes(model):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch(model), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    return ({k: v.detach() for k, v in out.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved))


def test_grad_checkpointing_gives_the_same_losses_and_gradients_and_saves_less(tiny_config_path):
    model = make_tiny(tiny_config_path)
    losses, grads, saved = losses_grads_and_saved_bytes(model)
    apply_tower_options(model, TrainConfig(output="-", grad_checkpointing=True))
    assert model.experts.checkpointing and model.clip.transformer.grad_checkpointing
    losses_c, grads_c, saved_c = losses_grads_and_saved_bytes(model)
    torch.testing.assert_close(losses_c, losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_c, grads, rtol=1e-5, atol=1e-5)
    assert saved_c * 2 < saved, (saved_c, saved)     # what the forward keeps for the backward


def test_grouped_experts_equal_expert_by_expert_blocks():
    """One pass per group (folded norms, one projection matmul, fused attention) = each ExpertBlock alone."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(ExpertBlock(32, heads=2, cross=True) for _ in range(3))
    for p in blocks.parameters():      # non-trivial norms, so folding them into the projections is tested
        p.data += 0.1 * torch.randn_like(p)
    query, keys = torch.randn(5, 2, 32), torch.randn(5, 9, 32)
    pad = torch.zeros(5, 9, dtype=torch.bool)
    pad[1, 4:] = True
    got = group_attend(blocks, query, group_keys_values(blocks, keys), pad)          # [5, 2, 3, 32]
    want = torch.stack([torch.stack([blk(query[:, q], keys, pad) for blk in blocks], dim=1) for q in range(2)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_partial_freezing_trains_only_the_unlocked_groups_and_gives_frozen_ones_no_optimizer_state(
        tiny_config_path):
    model = make_tiny(tiny_config_path)
    apply_tower_options(model, TrainConfig(output="-", lock_image_unlocked_groups=2, lock_text_unlocked_layers=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    visual = {n for n in trainable if n.startswith("clip.visual.")}
    # the last of TINY's 2 blocks with ln_post, and the projection
    assert visual == {n for n, _ in model.named_parameters()
                      if n.startswith(("clip.visual.transformer.resblocks.1.", "clip.visual.ln_post."))
                      or n == "clip.visual.proj"}
    text = {n for n in trainable if n.startswith("clip.") and not n.startswith("clip.visual.")}
    assert text == {"clip.text_projection", "clip.logit_scale"}
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("experts.", "itm.")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, 1e-3, 0.0)
    model(*batch(model), generator=torch.Generator().manual_seed(0))["loss"].backward()
    optimizer.step()
    with_state = {n for n, p in model.named_parameters() if p in optimizer.state}
    assert with_state == trainable
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


@pytest.mark.parametrize("options, message", [
    ({"lock_image_unlocked_groups": 5}, "the image tower has 4 layer groups"),
    ({"lock_text_unlocked_layers": 5}, "the text tower has 4 layer groups"),
    ({"lock_image": True, "lock_image_freeze_bn_stats": True}, "(VisionTransformer) has no batch norm"),
    ({"lock_image_freeze_bn_stats": True}, "add --lock-image or --lock-image-unlocked-groups"),
])
def test_lock_options_a_tower_cannot_take_are_refused(options, message):
    with pytest.raises(EclipError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tower_options(TrainConfig(output="-", **options), TINY)


def test_resnet_towers_cannot_be_partly_locked_or_checkpointed():
    from eclip.model.source import builtin_config
    rn50 = builtin_config("RN50")
    with pytest.raises(EclipError, match="can only be locked whole"):
        check_tower_options(TrainConfig(output="-", lock_image_unlocked_groups=1), rn50)
    with pytest.raises(EclipError, match="cannot checkpoint"):
        check_tower_options(TrainConfig(output="-", grad_checkpointing=True), rn50)
    check_tower_options(TrainConfig(output="-", grad_checkpointing=True, lock_image=True,
                                    lock_image_freeze_bn_stats=True), rn50)    # a locked ResNet: fine


def expert_by_expert_losses(model, images, captions, explanations, generator):
    """The objective as it was computed before the experts ran by group: every ExpertBlock alone,
    each pair's expert outputs assembled one use at a time (one process)."""
    import torch.nn.functional as F

    from eclip.model.backbone import image_tokens, text_tokens
    from eclip.model.loss import vtc_loss
    ex, b, scale = model.experts, len(images), model.logit_scale
    v_tok, v_cls = image_tokens(model.clip, images)
    t_all, t_pool, _, pad_all = text_tokens(model.clip, torch.cat([captions, explanations]))
    t_tok, e_tok, t_cls, t_pad, e_pad = t_all[:b], t_all[b:], t_pool[:b], pad_all[:b], pad_all[b:]

    def run(blocks, query, keys, pad):
        return torch.stack([blk(query, keys, pad) for blk in blocks], dim=1)
    vision, text = run(ex.vision, v_cls, v_tok, None), run(ex.text, t_cls, t_tok, t_pad)
    image_side = torch.cat([vision, run(ex.shared, v_cls, e_tok, e_pad)], dim=1)
    text_side = torch.cat([text, run(ex.shared, t_cls, e_tok, e_pad)], dim=1)
    vtc = vtc_loss(F.normalize(v_cls, dim=-1), F.normalize(t_cls, dim=-1), scale)
    vtc_star = vtc_loss(ex.gated(image_side, v_cls, ex.image_gate), ex.gated(text_side, t_cls, ex.text_gate), scale)
    neg_text, neg_image, _ = model._hard_negatives(v_cls, t_cls, v_cls, t_cls, None, generator, scale)
    v, t, outputs, labels = [v_cls], [t_cls], [torch.cat([image_side, text_side], dim=1)], [1] * b
    for i in range(b):
        j, k = int(neg_text[i]), int(neg_image[i])       # every row of a batch of distinct pairs has both
        v.append(v_cls[i:i + 1]), t.append(t_cls[j:j + 1])
        outputs.append(torch.cat([vision[i:i + 1], run(ex.shared, v_cls[i:i + 1], e_tok[j:j + 1], e_pad[j:j + 1]),
                                  text_side[j:j + 1]], dim=1))
        v.append(v_cls[k:k + 1]), t.append(t_cls[i:i + 1])
        outputs.append(torch.cat([vision[k:k + 1], run(ex.shared, v_cls[k:k + 1], e_tok[i:i + 1], e_pad[i:i + 1]),
                                  text_side[i:i + 1]], dim=1))
        labels += [0, 0]
    logits = model.itm(torch.cat(v), torch.cat(t), torch.cat(outputs))
    gfm = F.cross_entropy(logits, torch.tensor(labels))          # a mean: the order of the pairs is free
    eta, lam = model.config.loss.eta, model.config.loss.lam
    return {"loss": vtc + eta * gfm + lam * vtc_star, "vtc": vtc, "gfm": gfm, "vtc_star": vtc_star}


def test_the_objective_equals_the_expert_by_expert_computation(tiny_config_path):
    """Losses and gradients of the grouped experts and the single shared pass = every expert alone."""
    model = make_tiny(tiny_config_path)
    images, captions, explanations = batch(model)
    out = model(images, captions, explanations, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = expert_by_expert_losses(model, images, captions, explanations, torch.Generator().manual_seed(0))
    want["loss"].backward()
    torch.testing.assert_close({k: v.detach() for k, v in out.items() if k != "pos_prob"}, {k: v.detach() for k, v in want.items()},
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, {n: p.grad for n, p in model.named_parameters()}, rtol=1e-5, atol=1e-6)
