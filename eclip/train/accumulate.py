"""--accum-freq K: each batch computed in K micro-batches, with the loss and gradient of the whole batch.

As in open_clip's --accum-freq, the towers first run on every micro-batch without gradient and
their outputs are kept (`EntityCLIP.tower_outputs`: pooled features, every token state of the
image, caption and explanation, the padding masks). Then, where open_clip recomputes the loss once
per micro-batch with that micro-batch's features swapped in, eclip computes the loss once, on the
kept outputs made leaves of the graph (GradCache, Gao et al. 2021). Its backward gives the experts,
the matching head and the logit scale their gradient (once, not K times: open_clip's way gives the
logit scale K times its gradient and would run the experts K times), and gives the gradient of the
loss with respect to every pair's tower outputs. Each micro-batch then runs through the towers
again, with gradient, and is back-propagated with its slice of that gradient.

Each row of the tower outputs depends on its own pair only, so by the chain rule the towers'
gradient is the whole batch's; and everything the loss reads -- the contrastive negatives, the
GI-ITM hard negatives drawn from the whole batch, the token states of those negatives -- is the
whole batch's. Exact up to float rounding (tested against one batch, losses and gradients), given
no batch statistics: dropout is replayed with the same random state in the second pass, but a
batch-norm layer in training mode (ResNet towers that are not locked with
--lock-image-freeze-bn-stats) sees micro-batch statistics.
"""
from __future__ import annotations

import torch


def accumulated_forward_backward(accelerator, model, images, captions, explanations, group_ids, generator,
                                 accum_freq: int) -> dict:
    """The whole batch's losses (dict of scalars); its gradients accumulated into the parameters."""
    core = accelerator.unwrap_model(model)
    parts = [p for p in zip(images.tensor_split(accum_freq), captions.tensor_split(accum_freq),
                            explanations.tensor_split(accum_freq) if len(explanations) else
                            [explanations] * accum_freq) if len(p[0])]
    states, outputs = [], []
    with torch.no_grad(), accelerator.autocast():
        for part in parts:
            states.append(_rng_state(images.device))
            outputs.append(core.tower_outputs(*part))
    leaves = {k: torch.cat([o[k] for o in outputs]).requires_grad_(outputs[0][k].is_floating_point())
              for k in outputs[0]}
    del outputs
    with accelerator.autocast():
        out = core.objective(leaves, group_ids, generator)
    accelerator.backward(out["loss"])          # loss scaling and --grad-accum division apply to both passes
    grads = {k: v.grad.split([len(p[0]) for p in parts]) for k, v in leaves.items() if v.grad is not None}
    if _towers_train(core) and grads:
        end = _rng_state(images.device)
        for j, part in enumerate(parts):
            _set_rng_state(states[j])
            with accelerator.autocast():
                towers = core.tower_outputs(*part)
            pairs = [(towers[k], g[j]) for k, g in grads.items() if towers[k].requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        _set_rng_state(end)
    if accelerator.num_processes > 1 and accelerator.sync_gradients:
        _average_gradients(core, accelerator.num_processes)   # what DDP does, which this path goes around
    return out


def _towers_train(core) -> bool:
    return any(p.requires_grad for n, p in core.clip.named_parameters() if not n.startswith("logit_"))


def _rng_state(device: torch.device):
    """The random state dropout draws from (CPU, and the GPU's when on one)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device), device) if device.type == "cuda" else None


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(*cuda)


def _average_gradients(core, processes: int) -> None:
    import torch.distributed as dist
    for p in core.parameters():
        if p.requires_grad:           # every process reduces the same tensors, in the same order
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= processes
