"""One EntityCLIP training step on fixed data, alone or split over processes (tests/test_train_distributed.py).

    python tests/dist_step.py OUT.safetensors MODEL.json                                    # the global batch
    torchrun --standalone --nproc_per_node 2 tests/dist_step.py OUT.safetensors MODEL.json  # half each
    torchrun ... tests/dist_step.py OUT.safetensors MODEL.json train --dataset ...          # then `eclip train`

Process 0 writes the loss terms (averaged over processes) and every parameter's gradient
after eclip's own step function (forward, gathered loss, accelerator.backward, DDP averaging), then
the same step in micro-batches of two pairs (--accum-freq) to OUT-accum.safetensors.
Further arguments then run the `eclip` command line in the same processes (one launch, not two).
"""
import sys

import torch

GLOBAL_BATCH = 8
CAPTIONS = ["Queen Elizabeth II greets crowds at Windsor", "The national flag of France",
            "Grace Hopper in naval uniform", "The statue of Eric Morecambe in Morecambe Bay",
            "Astronaut Eileen Collins in her NASA flight suit", "A SpaceX Falcon 9 carrying DSCOVR",
            "Chelsea the cat on a rug", "France's flag flying in the wind"]
EXPLANATIONS = ["Elizabeth II was the British monarch.", "France's flag is a blue, white and red tricolour.",
                "Grace Hopper was a US Navy rear admiral.", "Eric Morecambe was an English comedian.",
                "Eileen Collins was the first woman to pilot a space shuttle.", "DSCOVR observes the Sun.",
                "Chelsea is a tabby cat.", "The tricolour has three vertical bands."]
# records 1 and 7 show the same image file (one in each half): never each other's negatives
GROUPS = torch.tensor([10, 11, 12, 13, 14, 15, 16, 11])


def run(out_path: str, config_path: str) -> None:
    from safetensors.torch import save_file

    from eclip.config import ExpertConfig, LossConfig, TrainConfig
    from eclip.model.factory import load_model
    from eclip.train.setup import make_accelerator
    from eclip.train.step import forward_backward, negatives_generator

    acc = make_accelerator(TrainConfig(output="-", device="cpu", batch_size=GLOBAL_BATCH))
    torch.manual_seed(0)
    model = load_model(model=config_path, pretrained="none", device="cpu",
                       experts=ExpertConfig(n_vision=2, n_text=2, n_shared=2), loss=LossConfig(eta=0.5, lam=0.5))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g)
    captions, explanations = model.tokenize(CAPTIONS), model.tokenize(EXPLANATIONS)
    images[7] = images[1]
    share = GLOBAL_BATCH // acc.num_processes
    mine = slice(acc.process_index * share, (acc.process_index + 1) * share)
    model = acc.prepare(model)
    batch = {"images": images[mine], "caption_tokens": captions[mine], "explanation_tokens": explanations[mine]}
    # then the same step again in micro-batches of 2 per process (--accum-freq), to OUT-accum.safetensors
    for accum_freq, path in ((1, out_path), (share // 2, out_path.replace(".safetensors", "-accum.safetensors"))):
        acc.unwrap_model(model).zero_grad(set_to_none=True)
        out = forward_backward(acc, model, batch, GROUPS[mine], negatives_generator(42, 0), experts=True,
                               accum_freq=accum_freq)
        losses = acc.reduce(torch.stack([out[k].detach() for k in ("loss", "vtc", "gfm", "vtc_star")]), "mean")
        if acc.is_main_process:
            tensors = {"losses": losses.contiguous()}
            for name, p in acc.unwrap_model(model).named_parameters():
                if p.grad is not None:
                    tensors["grad." + name] = p.grad.contiguous()
            save_file(tensors, path)
        acc.wait_for_everyone()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
    if len(sys.argv) > 3:
        from eclip.cli import main
        sys.argv = ["eclip", *sys.argv[3:]]
        main()
