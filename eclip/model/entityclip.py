"""EntityCLIP: CLIP towers + Multimodal Attentive Experts + GI-ITM, trained jointly;
inference uses the CLIP towers alone (METHOD.md, "Inference")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eclip.config import EntityCLIPConfig
from eclip.console import note
from eclip.model.backbone import single_token_towers
from eclip.model.experts import MultimodalExperts
from eclip.model.itm import MatchingHead, hard_negative_indices, positive_probability, reference_negative_indices
from eclip.model.loss import gather, shared_uniforms, vtc_loss, world
from eclip.model.tower_cache import Towers, keep_locked_in_eval


class EntityCLIP(nn.Module):
    def __init__(self, clip: nn.Module, config: EntityCLIPConfig, preprocess=None, tokenizer=None):
        super().__init__()
        self.clip = clip
        self.config = config
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = {"model": config.clip_name, "pretrained": None, "checkpoint_sha256": None}
        width = config.clip_config["embed_dim"]
        cfg = config.experts
        self.experts = MultimodalExperts(width, cfg) if cfg.enabled else None
        n_pair = cfg.n_vision + cfg.n_text + 2 * cfg.n_shared
        self.itm = MatchingHead(width, n_pair) if cfg.enabled else None
        self.token_note_given = False    # the single-token note is said once (training start or first forward)
        self.towers = Towers()           # training's tower calls; CachedTowers when a tower is locked (tower_cache)

    # ---- inference: plain CLIP ----
    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def tokenize(self, texts) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    @staticmethod
    def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [Ni, Nt] of L2-normalised features."""
        return image_features @ text_features.T

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def identity(self) -> dict:
        """What produced this model's vectors: embeddings from another model are refused."""
        if self.source.get("checkpoint") and not self.source.get("checkpoint_sha256"):
            from eclip.checkpoint import sha256_file
            self.source["checkpoint_sha256"] = sha256_file(self.source["checkpoint"])
        return {**self.source, "preprocess": self.config.preprocess}

    # ---- training ----
    def train(self, mode: bool = True):
        """As nn.Module.train, but a fully locked tower stays in eval mode (no dropout), as in LiT."""
        super().train(mode)
        keep_locked_in_eval(self.clip)
        return self

    def token_note(self) -> str | None:
        """One line when a tower gives the experts a single token (ModifiedResNet, timm); else None."""
        towers = single_token_towers(self.clip) if self.experts is not None else []
        if not towers:
            return None
        return (f"note: the {' and the '.join(towers)} give{'s' if len(towers) == 1 else ''} the experts one token, "
                f"the pooled feature, not every token: those experts have nothing to attend over "
                f"(README: which towers give the experts tokens)")

    def forward(self, images, captions, explanations, group_ids=None, generator=None) -> dict:
        """images [b,3,H,W], captions / explanations [b,L] token ids -> dict of scalar losses.

        group_ids [b] (optional): pairs sharing an id (e.g. the same image file) are never
        drawn as each other's negatives. `generator` makes negative sampling reproducible.
        """
        return self.objective(self.tower_outputs(images, captions, explanations), group_ids, generator)

    def tower_outputs(self, images, captions, explanations) -> dict:
        """What the objective reads from the CLIP towers, per pair: every tensor's first dimension
        is the batch, and each row depends on its own pair only, so a batch's outputs are its
        micro-batches' outputs concatenated (eclip.train.accumulate relies on this)."""
        if not self.token_note_given:
            self.token_note_given = True
            if message := self.token_note():
                note(message)
        if self.experts is None:       # plain CLIP fine-tuning: explanations are not needed
            return {"v_cls": self.towers.encode_image(self.clip, images), "t_cls": self.towers.encode_text(self.clip, captions)}
        b = images.shape[0]
        v_tok, v_cls = self.towers.image_tokens(self.clip, images)                       # [b,1+P,D], [b,D]
        t_all, t_pool, _, pad_all = self.towers.text_tokens(self.clip, torch.cat([captions, explanations]))
        return {"v_tok": v_tok, "v_cls": v_cls, "t_tok": t_all[:b], "t_cls": t_pool[:b], "t_pad": pad_all[:b],
                "e_tok": t_all[b:], "e_pad": pad_all[b:]}                    # [b,L,D] x2, [b,D], [b,L] x2

    def objective(self, towers: dict, group_ids=None, generator=None) -> dict:
        """L = VTC(V_cls, T_cls) + eta * L_GFM + lambda * VTC(V*, T*) from `tower_outputs`."""
        scale = self.logit_scale
        v_cls, t_cls = towers["v_cls"], towers["t_cls"]
        vtc = vtc_loss(F.normalize(v_cls, dim=-1), F.normalize(t_cls, dim=-1), scale)
        if self.experts is None:
            return {"loss": vtc, "vtc": vtc.detach()}
        ex = self.experts
        v_all, t_all = gather(v_cls), gather(t_cls)
        neg_text, neg_image, pos_prob = self._hard_negatives(v_cls, t_cls, v_all, t_all, group_ids, generator, scale)
        r1 = (neg_text >= 0).nonzero().squeeze(1)     # image r1 with hard negative caption j (and j's explanation)
        r2 = (neg_image >= 0).nonzero().squeeze(1)    # hard negative image k with caption r2 (and r2's explanation)
        j, k = neg_text[r1], neg_image[r2]

        vision = ex.vision_outputs(v_cls, towers["v_tok"])                            # [b,nv,D]
        text = ex.text_outputs(t_cls, towers["t_tok"], towers["t_pad"])               # [b,nt,D]
        # the shared experts, once for all their uses: explanation i is read by V_i, T_i and the
        # negative image of caption i (any image where caption i has none: unused); image r1 reads j's
        queries = torch.stack([v_cls, t_cls, v_all[neg_image.clamp(min=0)]], dim=1)  # [b,3,D]
        e_tok, e_pad = towers["e_tok"], towers["e_pad"]
        extra = (None, None) if world()[1] == 1 else (gather(e_tok)[j], gather(e_pad)[j])
        shared, shared_neg = ex.shared_pass(queries, e_tok, e_pad, v_cls[r1], j, *extra)   # [b,3,ns,D], [R,ns,D]
        image_side = torch.cat([vision, shared[:, 0]], dim=1)                         # [b,nv+ns,D]
        text_side = torch.cat([text, shared[:, 1]], dim=1)                            # [b,nt+ns,D]
        v_star = ex.gated(image_side, v_cls, ex.image_gate)
        t_star = ex.gated(text_side, t_cls, ex.text_gate)
        vtc_star = vtc_loss(v_star, t_star, scale)

        # L_GFM over positives, (image, hard negative caption) and (hard negative image, caption)
        pairs = [(v_cls, t_cls, torch.cat([image_side, text_side], dim=1), 1)]
        if r1.numel():
            text_side_all = gather(text_side)
            pairs.append((v_cls[r1], t_all[j], torch.cat([vision[r1], shared_neg, text_side_all[j]], dim=1), 0))
        if r2.numel():
            img = torch.cat([gather(vision)[k], shared[r2, 2]], dim=1)
            pairs.append((v_all[k], t_cls[r2], torch.cat([img, text_side[r2]], dim=1), 0))
        logits = self.itm(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]),
                          torch.cat([p[2] for p in pairs]))
        labels = torch.cat([torch.full((p[0].shape[0],), p[3], dtype=torch.long) for p in pairs]).to(logits.device)
        gfm = F.cross_entropy(logits, labels)
        loss = vtc + self.config.loss.eta * gfm + self.config.loss.lam * vtc_star
        return {"loss": loss, "vtc": vtc.detach(), "gfm": gfm.detach(), "vtc_star": vtc_star.detach(),
                "pos_prob": pos_prob}

    def _hard_negatives(self, v_cls, t_cls, v_all, t_all, group_ids, generator, scale):
        """(negative caption per image, negative image per caption) [b] as global-batch indices, -1: none,
        and the mean softmax mass on the positives of the rows they are drawn from (logged as pos_prob).

        Drawn from softmax of the contrastive *logits*, exp(logit_scale) * cosine, as in the
        reference and ALBEF: softmax of raw cosines (range -1..1) is almost uniform, so the "hard"
        negatives would be random ones. Negatives come from the global batch: what a pair needs
        from another process (its explanation, expert outputs) is gathered with gradient; each
        negative caption brings its own explanation and its own EOT read-out.
        """
        b, device = v_cls.shape[0], v_cls.device
        rank, _ = world()
        n = v_all.shape[0]
        local = torch.arange(b, device=device) + rank * b
        ids = group_ids.to(device) if group_ids is not None else local
        ids_all = gather(ids)
        positive = ids[:, None] == ids_all[None, :]                          # [b, n]
        positive[torch.arange(b), local] = True
        with torch.no_grad():
            vn, tn = F.normalize(v_cls, dim=-1), F.normalize(t_cls, dim=-1)
            u = shared_uniforms(n, device, generator)[:, local]
            draw = reference_negative_indices if self.config.loss.negatives == "reference" else hard_negative_indices
            i2t, t2i = scale * (vn @ F.normalize(t_all, dim=-1).T), scale * (tn @ F.normalize(v_all, dim=-1).T)
            neg_text, neg_image = draw(i2t, positive, u[0]), draw(t2i, positive, u[1])
            pos_prob = (positive_probability(i2t, positive) + positive_probability(t2i, positive)) / 2
        return neg_text, neg_image, pos_prob
