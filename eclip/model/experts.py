"""Multimodal Attentive Experts (METHOD.md, "MMAE").

An expert is one pre-norm transformer block (attention + QuickGELU MLP, residuals).
Experts of a group run in parallel on the same tokens and each is read at one
position (token 0 for images, EOT for text). A single block's output at a
position depends only on that position's query, so each expert computes
attention for that one query against all keys: the same numbers as running the
full block and reading one token, at a fraction of the cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU
from torch import nn

from eclip.config import ExpertConfig


class ExpertBlock(nn.Module):
    """Pre-norm block. Self-attention when `context` is None, else cross-attention to `context`."""

    def __init__(self, width: int, heads: int = 1, mlp_ratio: float = 4.0, cross: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.ln_context = LayerNorm(width) if cross else None
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), QuickGELU(), nn.Linear(hidden, width))

    def keys_values(self, keys: torch.Tensor):
        """keys [B, L, D] -> (k, v) projections, computed once and reused by every query that
        attends to the same tokens (the shared experts read one explanation from four places)."""
        d = keys.shape[-1]
        kv = self.ln_context(keys) if self.ln_context is not None else self.ln_1(keys)
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        return F.linear(kv, w[d:2 * d], b[d:2 * d]), F.linear(kv, w[2 * d:], b[2 * d:])

    def attend(self, query, k, v, key_padding=None):
        """query [B, D] (the raw token read out) against projected k, v [B, L, D] -> [B, D]."""
        (n, length, d), h = k.shape, self.attn.num_heads
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(self.ln_1(query), w[:d], b[:d]).view(n, h, 1, d // h)
        k, v = (t.view(n, length, h, d // h).transpose(1, 2) for t in (k, v))
        mask = None if key_padding is None else ~key_padding[:, None, None, :]   # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(n, d)
        x = query + self.attn.out_proj(out)
        return x + self.mlp(self.ln_2(x))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, key_padding: torch.Tensor | None = None):
        """query [B, D], keys [B, L, D], key_padding [B, L] True = ignore -> [B, D]."""
        return self.attend(query, *self.keys_values(keys), key_padding)


def _group(n: int, width: int, cfg: ExpertConfig, cross: bool = False) -> nn.ModuleList:
    return nn.ModuleList(ExpertBlock(width, cfg.heads, cfg.mlp_ratio, cross) for _ in range(n))


class MultimodalExperts(nn.Module):
    """Vision, text and shared (explanation) experts, and the gates giving V* and T*."""

    def __init__(self, width: int, cfg: ExpertConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = _group(cfg.n_vision, width, cfg)
        self.text = _group(cfg.n_text, width, cfg)
        self.shared = _group(cfg.n_shared, width, cfg, cross=True)
        self.image_gate = nn.Linear(width, cfg.n_vision + cfg.n_shared)   # W_v
        self.text_gate = nn.Linear(width, cfg.n_text + cfg.n_shared)      # W_t

    def vision_outputs(self, v_cls, v_tokens):
        """-> [B, n_vision, D]: self-attention over the image tokens, read at token 0."""
        return torch.stack([e(v_cls, v_tokens) for e in self.vision], dim=1)

    def text_outputs(self, t_eot, t_tokens, t_padding):
        """-> [B, n_text, D]: self-attention over the caption tokens, read at EOT."""
        return torch.stack([e(t_eot, t_tokens, t_padding) for e in self.text], dim=1)

    def shared_keys_values(self, e_tokens) -> list:
        """Per shared expert, (k, v) of the explanation tokens E [B, L, D]."""
        return [e.keys_values(e_tokens) for e in self.shared]

    def shared_outputs(self, query, e_kv: list, e_padding, rows=None):
        """-> [B, n_shared, D]: `query` (V_cls or T_eot) attends to explanation tokens E,
        given as `shared_keys_values(E)`; `rows` picks which explanation each query reads."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        pad = pick(e_padding)
        return torch.stack([e.attend(query, pick(k), pick(v), pad) for e, (k, v) in zip(self.shared, e_kv)], dim=1)

    @staticmethod
    def gated(outputs: torch.Tensor, cls: torch.Tensor, gate: nn.Linear) -> torch.Tensor:
        """sum_i softmax(gate(cls))_i * outputs_i, L2-normalised -> [B, D]."""
        weights = F.softmax(gate(cls), dim=-1)
        return F.normalize((weights[..., None] * outputs).sum(dim=1), dim=-1)
