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
from torch.utils.checkpoint import checkpoint

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


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without gain and bias, in fp32 like open_clip's LayerNorm, back in x's dtype."""
    return F.layer_norm(x.float(), x.shape[-1:]).to(x.dtype)


def _stack(blocks, get) -> torch.Tensor:
    """One parameter of every expert of a group, stacked: [n, ...]."""
    return torch.stack([get(b) for b in blocks])


def _folded(weight: torch.Tensor, bias: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor):
    """Per expert, Linear(LayerNorm(x)) as a Linear of the un-affine-normalised x:
    W (x_hat * g + s) + c = (W * g) x_hat + (W s + c). weight [n, O, D], bias [n, O], gain/shift [n, D]."""
    return weight * gain[:, None, :], bias + torch.einsum("nod,nd->no", weight, shift)


def group_keys_values(blocks: nn.ModuleList, keys: torch.Tensor) -> torch.Tensor:
    """keys [B, L, D] -> every expert's keys and values [B, L, 2, n, D] in one matmul.

    Each expert's norm is folded into its projection (`_folded`), so x_hat is computed once for
    the group. Keys before values, so each is a view with the experts' heads side by side."""
    d, n = keys.shape[-1], len(blocks)
    norm = [b.ln_context if b.ln_context is not None else b.ln_1 for b in blocks]
    w, c = _folded(_stack(blocks, lambda b: b.attn.in_proj_weight[d:]),
                   _stack(blocks, lambda b: b.attn.in_proj_bias[d:]),
                   torch.stack([ln.weight for ln in norm]), torch.stack([ln.bias for ln in norm]))   # [n, 2D, D]
    w = w.view(n, 2, d, d).transpose(0, 1).reshape(2 * n * d, d)                                 # keys, then values
    c = c.view(n, 2, d).transpose(0, 1).reshape(2 * n * d)
    return F.linear(_normalise(keys), w, c).view(*keys.shape[:2], 2, n, d)


def group_attend(blocks: nn.ModuleList, query: torch.Tensor, kv: torch.Tensor, key_padding=None) -> torch.Tensor:
    """query [M, Q, D] (Q queries read against the same keys), kv [M, L, 2, n, D] from
    `group_keys_values`, key_padding [M, L] True = ignore -> [M, Q, n, D]: each expert's block output."""
    (m, q_len, d), n, h = query.shape, len(blocks), blocks[0].attn.num_heads
    length = kv.shape[1]
    w_q, b_q = _folded(_stack(blocks, lambda b: b.attn.in_proj_weight[:d]),
                       _stack(blocks, lambda b: b.attn.in_proj_bias[:d]),
                       _stack(blocks, lambda b: b.ln_1.weight), _stack(blocks, lambda b: b.ln_1.bias))
    q = F.linear(_normalise(query), w_q.reshape(n * d, d), b_q.reshape(n * d))
    q = q.view(m, q_len, n * h, d // h).transpose(1, 2)                                          # [M, n*h, Q, d/h]
    k, v = (kv[:, :, i].reshape(m, length, n * h, d // h).transpose(1, 2) for i in (0, 1))       # views
    mask = None if key_padding is None else ~key_padding[:, None, None, :]                       # True = attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                                # [M, n*h, Q, d/h]
    out = out.transpose(1, 2).reshape(m, q_len, n, d)
    x = query[:, :, None] + _per_expert_linear(out, blocks, lambda b: b.attn.out_proj)
    y = _normalise(x) * _stack(blocks, lambda b: b.ln_2.weight) + _stack(blocks, lambda b: b.ln_2.bias)
    y = _per_expert_linear(y, blocks, lambda b: b.mlp[0])
    y = y * torch.sigmoid(1.702 * y)                                                             # QuickGELU
    return x + _per_expert_linear(y, blocks, lambda b: b.mlp[2])


def _per_expert_linear(x: torch.Tensor, blocks, get) -> torch.Tensor:
    """x [..., n, D_in] -> [..., n, D_out]: expert i's Linear `get(block i)` on slot i, one batched matmul."""
    w = _stack(blocks, lambda b: get(b).weight)                                                  # [n, out, in]
    return torch.einsum("...ni,noi->...no", x, w) + _stack(blocks, lambda b: get(b).bias)


class MultimodalExperts(nn.Module):
    """Vision, text and shared (explanation) experts, and the gates giving V* and T*.

    With `checkpointing` on (--grad-checkpointing), each group's pass keeps only its inputs and
    is recomputed in the backward pass: one group's activations are alive at a time."""

    def __init__(self, width: int, cfg: ExpertConfig):
        super().__init__()
        self.cfg = cfg
        self.width = width
        self.vision = _group(cfg.n_vision, width, cfg)
        self.text = _group(cfg.n_text, width, cfg)
        self.shared = _group(cfg.n_shared, width, cfg, cross=True)
        self.image_gate = nn.Linear(width, cfg.n_vision + cfg.n_shared)   # W_v
        self.text_gate = nn.Linear(width, cfg.n_text + cfg.n_shared)      # W_t
        self.checkpointing = False

    def _run(self, fn, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _self_attention(self, blocks, query, tokens, padding):
        """The group's outputs [B, n, D]: self-attention over `tokens`, read at `query` (one of them)."""
        if not len(blocks):
            return query.new_zeros(query.shape[0], 0, self.width)
        return self._run(lambda q, t, p: group_attend(blocks, q[:, None], group_keys_values(blocks, t), p)[:, 0],
                         query, tokens, padding)

    def vision_outputs(self, v_cls, v_tokens):
        """-> [B, n_vision, D]: self-attention over the image tokens, read at token 0."""
        return self._self_attention(self.vision, v_cls, v_tokens, None)

    def text_outputs(self, t_eot, t_tokens, t_padding):
        """-> [B, n_text, D]: self-attention over the caption tokens, read at EOT."""
        return self._self_attention(self.text, t_eot, t_tokens, t_padding)

    def shared_pass(self, queries, e_tokens, e_padding, extra_queries, rows, extra_tokens=None, extra_padding=None):
        """Every use of the shared experts in a step, with their keys and values computed once:

        queries [B, Q, D] read explanation i (row i of E [B, L, D], padding [B, L]) -> [B, Q, n, D];
        extra_queries [R, D] read the explanations `rows` [R] of E -> [R, n, D], or, when given,
        `extra_tokens` [R, L, D] with `extra_padding` (explanations of other processes, gathered)."""
        if not len(self.shared):
            return (queries.new_zeros(*queries.shape[:2], 0, self.width),
                    extra_queries.new_zeros(extra_queries.shape[0], 0, self.width))

        def run(queries, e_tokens, e_padding, extra_queries, rows, extra_tokens, extra_padding):
            kv = group_keys_values(self.shared, e_tokens)
            dense = group_attend(self.shared, queries, kv, e_padding)
            if extra_tokens is None:
                kv_rows, extra_padding = kv[rows], e_padding[rows]       # one gather for every expert
            else:
                kv_rows = group_keys_values(self.shared, extra_tokens)
            return dense, group_attend(self.shared, extra_queries[:, None], kv_rows, extra_padding)[:, 0]

        return self._run(run, queries, e_tokens, e_padding, extra_queries, rows, extra_tokens, extra_padding)

    @staticmethod
    def gated(outputs: torch.Tensor, cls: torch.Tensor, gate: nn.Linear) -> torch.Tensor:
        """sum_i softmax(gate(cls))_i * outputs_i, L2-normalised -> [B, D]."""
        weights = F.softmax(gate(cls), dim=-1)
        return F.normalize((weights[..., None] * outputs).sum(dim=1), dim=-1)
