"""Validation during training: retrieval Recall@1/5/10 both ways on the val pairs, with the
CLIP towers alone (what `eclip evaluate` measures), spread over the processes, and the
contrastive loss the reference selects its checkpoint by."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from eclip.data.dataset import collate_pairs
from eclip.metrics import recall_summary, retrieval_ranks, rsum


@torch.no_grad()
def encode_pairs(accelerator, model, dataset, batch_size: int, workers: int):
    """(dataset indices [n], image features [n, D], caption features [n, D], skipped) of the readable
    pairs, gathered from every process and sorted by index."""
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = Subset(dataset, range(rank, len(dataset), world))
    # its own generator: a DataLoader draws its workers' base seed from torch's global one, which
    # training reads (--augment with --workers 0), so validating would change the training
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=collate_pairs, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    device, width = accelerator.device, model.config.clip_config["embed_dim"]
    idx = [torch.empty(0, dtype=torch.long, device=device)]
    img, txt = [torch.empty(0, width, device=device)], [torch.empty(0, width, device=device)]
    skipped = []
    for batch in loader:
        skipped += batch["skipped"]
        if not len(batch["indices"]):
            continue
        with accelerator.autocast():     # through model.towers: a locked tower's outputs are computed once
            img.append(F.normalize(model.towers.encode_image(model.clip, batch["images"].to(device)), dim=-1).float())
            txt.append(F.normalize(model.towers.encode_text(model.clip, batch["caption_tokens"].to(device)),
                                   dim=-1).float())
        idx.append(batch["indices"].to(device))
    idx, img, txt = torch.cat(idx), torch.cat(img), torch.cat(txt)
    if world > 1:
        from accelerate.utils import gather_object
        idx = accelerator.pad_across_processes(idx, pad_index=-1)
        img, txt = accelerator.pad_across_processes(img), accelerator.pad_across_processes(txt)
        idx, img, txt = accelerator.gather((idx, img, txt))
        keep = idx >= 0
        idx, img, txt = idx[keep], img[keep], txt[keep]
        skipped = gather_object(skipped)
    order = idx.argsort()
    return idx[order], img[order], txt[order], skipped


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, chunk: int) -> float:
    """The CLIP loss (symmetric cross-entropy, each pair its own class) over consecutive chunks of
    `chunk` pairs in dataset order, averaged over chunks: the reference's validation loss (its
    val loader's batches are twice the training batch, the last one smaller)."""
    from open_clip.loss import ClipLoss
    clip_loss = ClipLoss()      # one process: these are all the pairs
    losses = [clip_loss(img[s:s + chunk], txt[s:s + chunk], logit_scale) for s in range(0, img.shape[0], chunk)]
    return float(torch.stack(losses).mean())


def validate(accelerator, model, dataset, group_ids: torch.Tensor, batch_size: int, workers: int,
             loss_chunk: int | None = None):
    """-> (metrics, skipped [(index, reason)]). metrics: t2i_r1/5/10, i2t_r1/5/10 (percent),
    median ranks, rsum (sum of the six recalls), val_loss (`contrastive_loss` over chunks of
    `loss_chunk` pairs, default 2 * batch_size), n_pairs, n_images.

    Records showing the same image file (same group id) share one gallery entry, and a
    caption's positive is that entry.
    """
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    idx, img, txt, skipped = encode_pairs(accelerator, model, dataset, batch_size, workers)
    model.train(was_training)
    if idx.numel() == 0:
        return None, skipped
    groups = group_ids.to(idx.device)[idx]
    _, image_of = torch.unique(groups, return_inverse=True)            # caption -> gallery entry
    n = len(idx)
    first = torch.full((int(image_of.max()) + 1,), n, device=idx.device).scatter_reduce(
        0, image_of, torch.arange(n, device=idx.device), "amin")
    ranks = retrieval_ranks(txt, img[first], image_of)
    t2i, i2t = recall_summary(ranks.text_to_image), recall_summary(ranks.image_to_text)
    metrics = {f"{d}_r{k}": s[f"R@{k}"] for d, s in (("t2i", t2i), ("i2t", i2t)) for k in (1, 5, 10)}
    scale = float(model.logit_scale.detach())
    metrics.update(t2i_median_rank=t2i["median_rank"], i2t_median_rank=i2t["median_rank"],
                   rsum=rsum(ranks), val_loss=contrastive_loss(img, txt, scale, loss_chunk or 2 * batch_size),
                   n_pairs=n, n_images=len(first))
    return metrics, skipped
