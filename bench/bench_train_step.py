"""Cost of an EntityCLIP training step against a plain CLIP (--no-experts) step: same model, batch, machine.

Goal (issue: train): an EntityCLIP step takes at most 1.5x the time of a plain CLIP step.

Each variant runs in a fresh child process through eclip's own training step (Accelerator,
forward with the gathered losses, backward, AdamW step, logit-scale clamp), on random weights
and a synthetic batch (77-token captions and explanations cost the same whatever they say):

  plain        --no-experts: CLIP's contrastive loss on (image, caption)
  plain+expl   the same model, but the text tower also encodes the explanations
               (isolates the cost of the explanation pass that EntityCLIP needs)
  entityclip   the full objective: VTC + eta*GI-ITM + lambda*VTC(V*, T*), experts 4/4/4

so entityclip - plain+expl is the cost of the experts and the matching head. Wall time is
reported with process CPU time beside it (steadier when other work shares the cores; equal to
wall time x threads on an idle machine). Peak memory is
the CUDA peak on a GPU, else the peak resident set size of the child (ru_maxrss) and its rise
above the resting size before the first step.

With --lock-text (issue 29: a locked tower runs once per distinct input) it compares two EntityCLIP
steps with the text tower locked instead, on the same batch every step (as every caption recurs
every epoch): without the tower cache (the text tower runs every step) and with it, warm after the
warm-up step (eclip/model/tower_cache.py). Goal: the cached step at least 3x faster.

  python bench/bench_train_step.py --lock-text --model examples/minilm-vit.json --threads 1

Run: python bench/bench_train_step.py [--model ViT-B-32] [--batch 16] [--steps 3] [--device cpu]
     python bench/bench_train_step.py --profile        # also where an EntityCLIP step spends its time
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("plain", "plain+expl", "entityclip")
LOCKED = ("locked", "locked+cache")     # --lock-text: EntityCLIP steps, the text tower locked


def child(args) -> dict:
    import resource

    import torch

    from eclip.config import ExpertConfig, TrainConfig
    from eclip.model.factory import load_model
    from eclip.train.setup import make_accelerator, make_optimizer
    from eclip.train.step import clamp_logit_scale, forward_backward, negatives_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    acc = make_accelerator(TrainConfig(output="-", device=args.device, batch_size=args.batch,
                                       precision=args.precision))
    torch.manual_seed(0)
    experts = ExpertConfig(enabled=args.child in ("entityclip", *LOCKED))
    model = load_model(model=args.model, pretrained="none", device="cpu", experts=experts)
    if args.child in LOCKED:
        from eclip.model.tower_cache import training_towers
        model.clip.lock_text_tower()
        model.towers = training_towers(model.clip, 1024 if args.child == "locked+cache" else 0)
    model.train()
    size = model.config.preprocess["size"]
    size = size if isinstance(size, int) else size[0]
    captions = [f"Crowds greet the president of country {i} at the summit in its capital city" for i in
                range(args.batch)]
    explanations = [f"Country {i} is a republic whose president is elected; its capital hosts summits, "
                    f"state visits and national ceremonies with flags and guards." for i in range(args.batch)]
    batch = {"images": torch.randn(args.batch, 3, size, size), "caption_tokens": model.tokenize(captions),
             "explanation_tokens": model.tokenize(explanations)}
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    groups = torch.arange(args.batch)
    optimizer = make_optimizer(model, 1e-5, 0.0, acc.device.type)
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    use_expl = args.child != "plain"

    def step(i):
        if args.child == "plain+expl":
            # the baseline model skips explanations, so run their text pass (forward and backward) here
            out = model(batch["images"], batch["caption_tokens"], batch["caption_tokens"][:0], group_ids=groups,
                        generator=negatives_generator(42, i))
            with acc.autocast():   # as forward_backward's own pass runs under --precision
                extra = core.clip.encode_text(batch["explanation_tokens"]).float().sum()
            acc.backward(out["loss"] + 0.0 * extra)
        else:
            forward_backward(acc, model, batch, groups, negatives_generator(42, i), experts=use_expl)
        optimizer.step()
        optimizer.zero_grad()
        clamp_logit_scale(core)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()

    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resting = _rss_mb()
    for i in range(args.warmup):
        step(i)
    times, cpu = [], []
    for i in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(args.warmup + i)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    out = {"variant": args.child, "median_s": statistics.median(times), "min_s": min(times), "times": times,
           "cpu_s": statistics.median(cpu),
           "threads": torch.get_num_threads(), "device": str(acc.device),
           "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "resting_mb": torch.cuda.memory_allocated() / 2**20 if cuda else resting,
           "memory": "CUDA max_memory_allocated" if cuda else "peak RSS (ru_maxrss)",
           "parameters_m": sum(p.numel() for p in core.parameters()) / 1e6}
    if args.profile and args.child == "entityclip":
        from torch.profiler import profile
        with profile(record_shapes=False) as prof:
            step(10_000)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture or model-config JSON (random weights)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--lock-text", action="store_true",
                    help="compare a locked-text EntityCLIP step without and with the tower cache")
    ap.add_argument("--child", choices=VARIANTS + LOCKED, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "ECLIP_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    results = {}
    for variant in LOCKED if args.lock_text else VARIANTS:
        argv = [sys.executable, __file__, "--child", variant] + [
            x for k, v in vars(args).items() if k != "child" and v not in (None, False)
            for x in ([f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)])]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.lock_text:
        return print_locked(args, results)
    base = results["plain"]
    print(f"model {args.model} (random weights, {base['parameters_m']:.1f}M parameters with experts off), "
          f"batch {args.batch}, {args.precision}, {base['device']}, {base['threads']} threads; "
          f"median of {args.steps} steps after {args.warmup} warm-up; memory: {base['memory']}")
    print(f"{'variant':12s} {'step s':>8s} {'x plain':>8s} {'cpu s':>8s} {'x plain':>8s} {'peak MB':>9s} "
          f"{'x plain':>8s} {'rise MB':>9s} {'x plain':>8s}")
    base_rise = base["peak_mb"] - base["resting_mb"]
    for v in VARIANTS:
        r = results[v]
        rise = r["peak_mb"] - r["resting_mb"]
        print(f"{v:12s} {r['median_s']:8.3f} {r['median_s'] / base['median_s']:8.2f} {r['cpu_s']:8.3f} "
              f"{r['cpu_s'] / base['cpu_s']:8.2f} {r['peak_mb']:9.0f} {r['peak_mb'] / base['peak_mb']:8.2f} "
              f"{rise:9.0f} {rise / base_rise:8.2f}")
    full, expl = results["entityclip"]["median_s"], results["plain+expl"]["median_s"]
    ratio = full / base["median_s"]
    print(f"explanation pass: {expl - base['median_s']:+.3f} s; experts + GI-ITM + VTC*: {full - expl:+.3f} s")
    print(f"EntityCLIP / plain step time: {ratio:.2f}x wall, {results['entityclip']['cpu_s'] / base['cpu_s']:.2f}x "
          f"CPU time (goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    if "profile" in results["entityclip"]:
        print(results["entityclip"]["profile"])


def print_locked(args, results: dict) -> None:
    base, cached = results["locked"], results["locked+cache"]
    print(f"model {args.model} (random weights), EntityCLIP with --lock-text, batch {args.batch}, {args.precision}, "
          f"{base['device']}, {base['threads']} threads; median of {args.steps} steps after {args.warmup} warm-up "
          f"(the cache is warm after it)")
    for v in LOCKED:
        r = results[v]
        print(f"{v:13s} {r['median_s']:8.3f} s   cpu {r['cpu_s']:8.3f} s   peak {r['peak_mb']:7.0f} MB")
    ratio, cpu = base["median_s"] / cached["median_s"], base["cpu_s"] / cached["cpu_s"]
    print(f"tower cache speed-up: {ratio:.2f}x wall, {cpu:.2f}x CPU time "
          f"(goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
