"""Cost of an EntityCLIP training step against a plain CLIP (--no-experts) step: same model, batch, machine.

Goals (issue 26): an EntityCLIP step takes at most 1.3x the time of a plain CLIP step on this CPU at
the defaults, 1.4x on a GPU (bf16, ViT-B-32, batch 192), and at most 1.3x its peak memory;
--grad-checkpointing lowers a ViT-B-32 step's peak memory at least 2x on CPU and fits ViT-L-14
EntityCLIP at batch 192 in 24 GB on a GPU; --no-experts reaches 0.95x open_clip_train's samples/s.

Each variant runs in a fresh child process through eclip's own training step (Accelerator,
forward with the gathered losses, backward, AdamW step, logit-scale clamp), on random weights
and a synthetic batch (77-token captions and explanations cost the same whatever they say):

  plain        --no-experts: CLIP's contrastive loss on (image, caption)
  plain+expl   the same model, but the text tower also encodes the explanations
               (isolates the cost of the explanation pass that EntityCLIP needs)
  entityclip   the full objective: VTC + eta*GI-ITM + lambda*VTC(V*, T*), experts 4/4/4

so entityclip - plain+expl is the cost of the experts and the matching head. Wall time is
reported with process CPU time beside it (steadier when other work shares the cores; equal to
wall time x threads on an idle machine). Peak memory is the CUDA peak on a GPU; on CPU the peak
resident set size of the timed steps (VmHWM, reset after warm-up, when the optimizer state exists;
else the child's ru_maxrss), with its rise above the resting size before them.

A variant name may carry options: "+gc" --grad-checkpointing, "+acc4" --accum-freq 4
(e.g. --variants plain,entityclip,entityclip+gc). The variant "open_clip_train" runs open_clip's
own training script (python -m open_clip_train.main, synthetic data, same model, batch, precision and
device) and reads its per-step samples/s; its data loading is inside its step time, eclip's synthetic
batch is not, so compare it with a GPU and enough --oc-workers.
--memory-budget GB finds, per variant, the largest batch whose peak memory (CUDA max allocated, or
peak RSS on CPU) stays within GB: doubling from --batch, then bisecting, one child process a try.

With --lock-text (issue 29: a locked tower runs once per distinct input) it compares two EntityCLIP
steps with the text tower locked instead, on the same batch every step (as every caption recurs
every epoch): without the tower cache (the text tower runs every step) and with it, warm after the
warm-up step (eclip/model/tower_cache.py). Goal: the cached step at least 3x faster.

  python bench/bench_train_step.py --lock-text --model examples/minilm-vit.json --threads 1

Run: python bench/bench_train_step.py [--model ViT-B-32] [--batch 16] [--steps 3] [--device cpu]
     python bench/bench_train_step.py --profile        # also where an EntityCLIP step spends its time
     python bench/bench_train_step.py --variants entityclip,entityclip+gc --batch 64 --steps 1
     python bench/bench_train_step.py --model ViT-L-14 --device cuda --precision bf16 \
         --variants entityclip+gc --memory-budget 24
     bench/gpu_figures.sh                              # every GPU figure of issue 26, on a GPU
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


def variant_options(variant: str) -> tuple[str, dict]:
    """"entityclip+gc+acc4" -> ("entityclip", {"grad_checkpointing": True, "accum_freq": 4})."""
    if variant in LOCKED:
        return variant, {}
    base, *extras = variant.split("+")
    if base == "plain" and extras[:1] == ["expl"]:
        base, extras = "plain+expl", extras[1:]
    options = {}
    for extra in extras:
        if extra == "gc":
            options["grad_checkpointing"] = True
        elif extra.startswith("acc") and extra[3:].isdigit():
            options["accum_freq"] = int(extra[3:])
        else:
            raise SystemExit(f"variant {variant}: unknown option +{extra} (gc, accN)")
    if base not in VARIANTS:
        raise SystemExit(f"variant {variant}: one of {', '.join(VARIANTS)} (with +gc, +accN) "
                         f"or open_clip_train")
    return base, options


def child(args) -> dict:
    import torch

    from eclip.config import ExpertConfig, TrainConfig
    from eclip.model.factory import load_model
    from eclip.train.setup import make_accelerator, make_optimizer
    from eclip.train.towers import apply_tower_options
    from eclip.train.step import clamp_logit_scale, forward_backward, negatives_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    base, options = variant_options(args.child)
    cfg = TrainConfig(output="-", device=args.device, batch_size=args.batch, precision=args.precision,
                      lock_image_unlocked_groups=args.lock_image_unlocked_groups,
                      lock_text_unlocked_layers=args.lock_text_unlocked_layers, **options)
    acc = make_accelerator(cfg)
    torch.manual_seed(0)
    experts = ExpertConfig(enabled=base in ("entityclip", *LOCKED))
    model = load_model(model=args.model, pretrained="none", device="cpu", experts=experts)
    apply_tower_options(model, cfg)
    if base in LOCKED:
        from eclip.model.tower_cache import training_towers
        model.clip.lock_text_tower()
        model.towers = training_towers(model.clip, 1024 if base == "locked+cache" else 0)
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
    use_expl = base != "plain"

    def step(i):
        if base == "plain+expl":
            # the baseline model skips explanations, so run their text pass (forward and backward) here
            out = model(batch["images"], batch["caption_tokens"], batch["caption_tokens"][:0], group_ids=groups,
                        generator=negatives_generator(42, i))
            with acc.autocast():   # as forward_backward's own pass runs under --precision
                extra = core.clip.encode_text(batch["explanation_tokens"]).float().sum()
            acc.backward(out["loss"] + 0.0 * extra)
        else:
            forward_backward(acc, model, batch, groups, negatives_generator(42, i), experts=use_expl,
                             accum_freq=cfg.accum_freq)
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
    # the timed steps' own peak: after warm-up the optimizer state exists; on Linux the peak RSS
    # can be reset (clear_refs 5), else it is the process's peak since it started
    step_peak = _reset_peak_rss() if not cuda and args.warmup else False
    if step_peak:
        resting = _rss_mb()
    times, cpu = [], []
    for i in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(args.warmup + i)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    out = {"variant": args.child, "median_s": statistics.median(times), "min_s": min(times), "times": times,
           "cpu_s": statistics.median(cpu),
           "threads": torch.get_num_threads(), "device": str(acc.device),
           "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb(),
           "resting_mb": torch.cuda.memory_allocated() / 2**20 if cuda else resting,
           "memory": "CUDA max_memory_allocated" if cuda else
           "peak RSS of the timed steps (VmHWM)" if step_peak else "peak RSS of the process (ru_maxrss)",
           "parameters_m": sum(p.numel() for p in core.parameters()) / 1e6}
    if args.profile and base == "entityclip":
        from torch.profiler import profile
        with profile(record_shapes=False) as prof:
            step(10_000)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_clip_train(args) -> dict:
    """open_clip's own training script on synthetic data: median samples/s of its logged steps after warm-up."""
    import re
    import tempfile
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
    with tempfile.TemporaryDirectory() as logs:
        argv = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "synthetic",
                "--train-num-samples", str(args.batch * (args.warmup + args.steps)), "--batch-size", str(args.batch),
                "--epochs", "1", "--model", args.model, "--precision", precision, "--workers", str(args.oc_workers),
                "--lr", "1e-5", "--wd", "0", "--warmup", "0", "--log-every-n-steps", "1", "--logs", logs,
                "--name", "bench", "--save-frequency", "0", "--seed", "0", "--device", args.device]
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        log = proc.stdout + proc.stderr
    rates = [float(r) for r in re.findall(r"Batch \(t\): [\d.]+, ([\d.e+]+)/s,", log)]
    if proc.returncode or len(rates) <= args.warmup:
        raise RuntimeError(f"open_clip_train failed:\n{log[-3000:]}")
    per_step = [args.batch / r for r in rates[args.warmup:]]
    return {"variant": "open_clip_train", "median_s": statistics.median(per_step), "min_s": min(per_step),
            "cpu_s": float("nan"), "peak_mb": float("nan"), "resting_mb": float("nan"), "threads": None,
            "device": args.device, "memory": "-", "parameters_m": float("nan")}


def run_variant(args, variant: str, batch: int | None = None, steps: int | None = None) -> dict | None:
    """One variant in a fresh child process; None when it ran out of memory."""
    if variant == "open_clip_train":
        return open_clip_train(args)
    given = {**vars(args), "batch": batch or args.batch, "steps": steps or args.steps}
    argv = [sys.executable, __file__, "--child", variant] + [
        x for k, v in given.items() if k in CHILD_ARGS and v not in (None, False)
        for x in ([f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)])]
    env = {**os.environ, "ECLIP_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        if "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137):
            return None
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHILD_ARGS = ("model", "batch", "steps", "warmup", "device", "precision", "threads", "profile",
              "lock_image_unlocked_groups", "lock_text_unlocked_layers")


def largest_batch(args, variant: str, budget_gb: float) -> tuple[int, dict | None]:
    """The largest batch whose peak memory is within the budget: doubling from --batch, then bisecting."""
    def fits(b):
        r = run_variant(args, variant, batch=b, steps=1)
        ok = r is not None and r["peak_mb"] <= budget_gb * 1024
        print(f"  {variant} batch {b}: " + (f"{r['peak_mb']:.0f} MB" if r else "out of memory")
              + (" fits" if ok else " does not fit"), flush=True)
        return ok, r
    low, high, best = 0, args.batch, None
    while True:                          # doubling
        ok, r = fits(high)
        if not ok:
            break
        low, best, high = high, r, high * 2
        if high > args.max_batch:
            return low, best
    while high - low > max(1, low // 16):          # bisecting, to within 1/16
        mid = (low + high) // 2
        ok, r = fits(mid)
        low, high, best = (mid, high, r) if ok else (low, mid, best)
    return low, best


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
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated; the first is the baseline the ratios are against")
    ap.add_argument("--lock-image-unlocked-groups", type=int, default=0)
    ap.add_argument("--lock-text-unlocked-layers", type=int, default=0)
    ap.add_argument("--memory-budget", type=float, metavar="GB",
                    help="per variant, the largest batch whose peak memory fits GB")
    ap.add_argument("--max-batch", type=int, default=4096, help="--memory-budget stops doubling here")
    ap.add_argument("--oc-workers", type=int, default=4, help="data workers of the open_clip_train variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--lock-text", action="store_true",
                    help="compare a locked-text EntityCLIP step without and with the tower cache")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    variants = list(LOCKED) if args.lock_text else args.variants.split(",")
    for v in variants:
        if v != "open_clip_train":
            variant_options(v)
    if args.memory_budget:
        print(f"largest batch within {args.memory_budget:g} GB: model {args.model}, {args.precision}, {args.device}")
        found = {v: largest_batch(args, v, args.memory_budget) for v in variants}
        for v, (b, r) in found.items():
            print(f"{v:24s} batch {b:6d}" + (f"  peak {r['peak_mb']:.0f} MB ({r['memory']})" if r else ""))
        return
    results = {v: run_variant(args, v) for v in variants}
    if any(r is None for r in results.values()):
        sys.exit(f"out of memory: {', '.join(v for v, r in results.items() if r is None)}")
    if args.lock_text:
        return print_locked(args, results)
    base_name = variants[0]
    base = results[base_name]
    eclip = next((r for r in results.values() if r["threads"] is not None), base)   # not open_clip_train
    print(f"model {args.model} (random weights, {eclip['parameters_m']:.1f}M parameters in {eclip['variant']}), "
          f"batch {args.batch}, {args.precision}, {eclip['device']}, {eclip['threads']} threads; "
          f"median of {args.steps} steps after {args.warmup} warm-up; memory: {eclip['memory']}; "
          f"ratios against {base_name}")
    print(f"{'variant':20s} {'step s':>8s} {'ratio':>6s} {'cpu s':>8s} {'ratio':>6s} {'peak MB':>9s} "
          f"{'ratio':>6s} {'rise MB':>9s} {'ratio':>6s} {'pairs/s':>8s}")
    base_rise = base["peak_mb"] - base["resting_mb"]
    for v in variants:
        r = results[v]
        rise = r["peak_mb"] - r["resting_mb"]
        print(f"{v:20s} {r['median_s']:8.3f} {r['median_s'] / base['median_s']:6.2f} {r['cpu_s']:8.3f} "
              f"{r['cpu_s'] / base['cpu_s']:6.2f} {r['peak_mb']:9.0f} {r['peak_mb'] / base['peak_mb']:6.2f} "
              f"{rise:9.0f} {rise / base_rise:6.2f} {args.batch / r['median_s']:8.1f}")
    if "open_clip_train" in results and "plain" in results:
        speed = results["open_clip_train"]["median_s"] / results["plain"]["median_s"]
        print(f"--no-experts samples/s / open_clip_train samples/s: {speed:.2f}x (goal >= 0.95x: "
              f"{'met' if speed >= 0.95 else 'NOT met'})")
    if "entityclip" in results and "plain" in results:
        full, plain = results["entityclip"], results["plain"]
        ratio, memory = full["median_s"] / plain["median_s"], full["peak_mb"] / plain["peak_mb"]
        if "plain+expl" in results:
            expl = results["plain+expl"]["median_s"]
            print(f"explanation pass: {expl - plain['median_s']:+.3f} s; experts + GI-ITM + VTC*: "
                  f"{full['median_s'] - expl:+.3f} s")
        goal, cpu_ratio = (1.4 if args.device.startswith("cuda") else 1.3), full["cpu_s"] / plain["cpu_s"]
        on_gpu = args.device.startswith("cuda")
        judged = ratio if on_gpu else cpu_ratio          # CPU: wall time is noise on shared cores
        print(f"EntityCLIP / plain: step time {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time "
              f"(goal <= {goal}x {'wall' if on_gpu else 'CPU time'}: {'met' if judged <= goal else 'NOT met'}); "
              f"peak memory {memory:.2f}x "
              f"(goal <= 1.3x: {'met' if memory <= 1.3 else 'NOT met'})")
    for v in variants:
        if "profile" in results[v]:
            print(f"profile of {v}:\n{results[v]['profile']}")


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
