"""Retrieval-metric pass (eclip.metrics.retrieval_ranks: both directions, all ranks) against one
similarity matrix multiply of the same size, measured in the same run.

Goal (issue: evaluate): the metric pass within 1.5x the time of one full text x image matmul,
in at most 2 GB beyond the embeddings, at 100,000 x 100,000.

Baseline: the full similarity matrix computed chunk by chunk into one reused output buffer
(torch.matmul(out=...)): pure matmul time, no allocation, nothing else. A 100k x 100k float32
matrix would be 40 GB, so no evaluator can hold it; at the small size the single unchunked
matmul is timed too. Each measurement runs in a fresh process so that its peak resident
memory (ru_maxrss) belongs to it alone; "extra" is that peak minus the resident memory just
before the pass, with the embeddings already in memory (generated in place, no temporaries).

Times are medians of interleaved runs; on a shared machine also compare the fastest runs and
the CPU seconds (all threads), which other processes disturb less than wall time.
Run: python bench/bench_metrics.py [--sizes 20000,100000] [--dim 512] [--repeat 2]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # KiB on Linux


def cpu_seconds() -> float:
    """CPU time of this process, all threads: less disturbed than wall time by other work on the machine."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def features(n, d, seed):
    """Unit vectors, texts near their image (cosine ~0.16, so recalls are neither 0 nor 100)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    img = torch.empty(n, d)
    txt = torch.empty(n, d)
    for s in range(0, n, 4096):
        e = min(n, s + 4096)
        img[s:e] = torch.nn.functional.normalize(torch.randn(e - s, d, generator=g), dim=1)
        txt[s:e] = torch.nn.functional.normalize(img[s:e] + 6.0 * torch.randn(e - s, d, generator=g) / d ** 0.5,
                                                 dim=1)
    return txt, img


def child(kind, n, d, top_k):
    import torch

    from eclip.metrics import CHUNK_BYTES, recall_summary, retrieval_ranks
    txt, img = features(n, d, seed=0)
    before_rss, before_peak = rss_mb(), peak_mb()
    info = {}
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    if kind == "matmul":                       # the baseline: the whole matrix, chunk by chunk
        rows = max(1, CHUNK_BYTES // (n * 6))  # the same rows per chunk the metric pass uses
        buf = torch.empty(rows, n)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            torch.matmul(txt[s:e], img.T, out=buf[:e - s])
    elif kind == "matmul-whole":
        sim = txt @ img.T
        del sim
    else:
        ranks = retrieval_ranks(txt, img, torch.arange(n), top_k=top_k)
        info = {"t2i": recall_summary(ranks.text_to_image), "i2t": recall_summary(ranks.image_to_text)}
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    print(json.dumps({"kind": kind, "n": n, "seconds": seconds, "cpu_seconds": cpu, "extra_peak_mb": max(0.0, peak_mb() - before_rss),
                      "embeddings_mb": 2 * n * d * 4 / 2**20, "peak_before_mb": before_peak,
                      "threads": torch.get_num_threads(), **info}))


def run(kind, n, d, top_k=0):
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), str(d), str(top_k)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,100000", help="n texts = n images, comma-separated")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved baseline / metric runs per size")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, n, d, k = args.child
        return child(kind, int(n), int(d), int(k))

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, dim {args.dim}")
    print(f"{'size':>15s} {'what':28s} {'seconds':>9s} {'ratio':>6s} {'extra peak MB':>14s}")
    for n in (int(s) for s in args.sizes.split(",")):
        base, metric, extra_b, extra_m, cpu_b, cpu_m = [], [], [], [], [], []
        for _ in range(args.repeat):          # interleaved, so a busy machine slows both alike
            b, m = run("matmul", n, args.dim), run("metric", n, args.dim)
            base.append(b["seconds"]), metric.append(m["seconds"])
            cpu_b.append(b["cpu_seconds"]), cpu_m.append(m["cpu_seconds"])
            extra_b.append(b["extra_peak_mb"]), extra_m.append(m["extra_peak_mb"])
        size = f"{n}x{n}"
        tb, tm = statistics.median(base), statistics.median(metric)
        print(f"{size:>15s} {'matmul (chunked, baseline)':28s} {tb:9.2f} {1:6.2f} {max(extra_b):14.0f}")
        print(f"{size:>15s} {'metric pass (both ways)':28s} {tm:9.2f} {tm / tb:6.2f} {max(extra_m):14.0f}")
        print(f"{'':>15s} runs: matmul {', '.join(f'{t:.2f}' for t in base)}; "
              f"metric {', '.join(f'{t:.2f}' for t in metric)}; ratio of the fastest runs "
              f"{min(metric) / min(base):.2f}; CPU seconds (median) matmul {statistics.median(cpu_b):.2f}, "
              f"metric {statistics.median(cpu_m):.2f}, ratio {statistics.median(cpu_m) / statistics.median(cpu_b):.2f}; "
              f"embeddings {m['embeddings_mb']:.0f} MB; "
              f"t2i R@1 {m['t2i']['R@1']:.2f}, i2t R@1 {m['i2t']['R@1']:.2f}")
        if n <= 30000:
            w = run("matmul-whole", n, args.dim)
            k = run("metric", n, args.dim, top_k=10)
            print(f"{size:>15s} {'matmul (one call, whole)':28s} {w['seconds']:9.2f} {w['seconds'] / tb:6.2f} "
                  f"{w['extra_peak_mb']:14.0f}")
            print(f"{size:>15s} {'metric pass + top-10 lists':28s} {k['seconds']:9.2f} {k['seconds'] / tb:6.2f} "
                  f"{k['extra_peak_mb']:14.0f}")


if __name__ == "__main__":
    main()
