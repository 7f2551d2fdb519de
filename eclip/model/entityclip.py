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
        if not self.token_note_given:
            self.token_note_given = True
            if message := self.token_note():
                note(message)
        b = images.shape[0]
        scale = self.logit_scale
        if self.experts is None:       # plain CLIP fine-tuning: explanations are not needed
            vtc = vtc_loss(F.normalize(self.towers.encode_image(self.clip, images), dim=-1),
                           F.normalize(self.towers.encode_text(self.clip, captions), dim=-1), scale)
            return {"loss": vtc, "vtc": vtc.detach()}
        v_tok, v_cls = self.towers.image_tokens(self.clip, images)           # [b,1+P,D], [b,D]
        t_all, t_pool, _, pad_all = self.towers.text_tokens(self.clip, torch.cat([captions, explanations]))
        t_tok, e_tok, t_cls = t_all[:b], t_all[b:], t_pool[:b]                # [b,L,D] x2, [b,D]
        t_pad, e_pad = pad_all[:b], pad_all[b:]
        vtc = vtc_loss(F.normalize(v_cls, dim=-1), F.normalize(t_cls, dim=-1), scale)

        ex = self.experts
        e_kv = ex.shared_keys_values(e_tok)                                   # once per step
        vision = ex.vision_outputs(v_cls, v_tok)                              # [b,nv,D]
        image_side = torch.cat([vision, ex.shared_outputs(v_cls, e_kv, e_pad)], dim=1)
        text_side = torch.cat([ex.text_outputs(t_cls, t_tok, t_pad),
                               ex.shared_outputs(t_cls, e_kv, e_pad)], dim=1)  # [b,nt+ns,D]
        v_star = ex.gated(image_side, v_cls, ex.image_gate)
        t_star = ex.gated(text_side, t_cls, ex.text_gate)
        vtc_star = vtc_loss(v_star, t_star, scale)

        gfm, pos_prob = self._matching_loss(v_cls, t_cls, vision, image_side, text_side, e_kv, e_pad,
                                            group_ids, generator, scale)
        loss = vtc + self.config.loss.eta * gfm + self.config.loss.lam * vtc_star
        return {"loss": loss, "vtc": vtc.detach(), "gfm": gfm.detach(), "vtc_star": vtc_star.detach(),
                "pos_prob": pos_prob}

    def _matching_loss(self, v_cls, t_cls, vision, image_side, text_side, e_kv, e_pad, group_ids, generator,
                       scale):
        """L_GFM over positives, (image, hard negative caption) and (hard negative image, caption), and the
        mean softmax mass on the positives of the rows the negatives are drawn from (logged as pos_prob).

        Negatives are drawn from softmax of the contrastive *logits*, exp(logit_scale) * cosine, as in
        the reference and ALBEF: softmax of raw cosines (range -1..1) is almost uniform, so the
        "hard" negatives would be random ones.

        Negatives come from the global batch: what a pair needs from another process (its
        explanation's keys/values, expert outputs) is gathered with gradient. Each negative caption brings its
        own explanation and its own EOT read-out (its text-side expert outputs).
        """
        ex, b = self.experts, v_cls.shape[0]
        rank, _ = world()
        v_all, t_all = gather(v_cls), gather(t_cls)
        vision_all, text_side_all = gather(vision), gather(text_side)
        e_kv_all, e_pad_all = [(gather(k), gather(v)) for k, v in e_kv], gather(e_pad)
        n = v_all.shape[0]
        local = torch.arange(b, device=v_cls.device) + rank * b
        ids = group_ids if group_ids is not None else local
        ids_all = gather(ids.to(v_cls.device))
        positive = ids.to(v_cls.device)[:, None] == ids_all[None, :]          # [b, n]
        positive[torch.arange(b), local] = True
        with torch.no_grad():
            vn, tn = F.normalize(v_cls, dim=-1), F.normalize(t_cls, dim=-1)
            u = shared_uniforms(n, v_cls.device, generator)[:, local]
            draw = reference_negative_indices if self.config.loss.negatives == "reference" else hard_negative_indices
            i2t, t2i = scale * (vn @ F.normalize(t_all, dim=-1).T), scale * (tn @ F.normalize(v_all, dim=-1).T)
            neg_text, neg_image = draw(i2t, positive, u[0]), draw(t2i, positive, u[1])
            pos_prob = (positive_probability(i2t, positive) + positive_probability(t2i, positive)) / 2

        pairs = [(v_cls, t_cls, torch.cat([image_side, text_side], dim=1), 1)]
        r = (neg_text >= 0).nonzero().squeeze(1)
        if r.numel():          # image r with a hard negative caption j (and j's explanation)
            j = neg_text[r]
            img = torch.cat([vision[r], ex.shared_outputs(v_cls[r], e_kv_all, e_pad_all, rows=j)], dim=1)
            pairs.append((v_cls[r], t_all[j], torch.cat([img, text_side_all[j]], dim=1), 0))
        r = (neg_image >= 0).nonzero().squeeze(1)
        if r.numel():          # hard negative image k with caption r (and r's explanation)
            k = neg_image[r]
            img = torch.cat([vision_all[k], ex.shared_outputs(v_all[k], e_kv, e_pad, rows=r)], dim=1)
            pairs.append((v_all[k], t_cls[r], torch.cat([img, text_side[r]], dim=1), 0))

        logits = self.itm(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]),
                          torch.cat([p[2] for p in pairs]))
        labels = torch.cat([torch.full((p[0].shape[0],), p[3], dtype=torch.long) for p in pairs]).to(logits.device)
        return F.cross_entropy(logits, labels), pos_prob
