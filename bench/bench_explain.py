"""Throughput of `eclip explain`, as ratios measured in one run.

    python bench/bench_explain.py                      # embedded SmolLM2, CPU
    python bench/bench_explain.py --device cuda --precision bf16 --captions 256 --batch-size 64

1. Batched local generation vs one caption at a time: the same model, the same captions
   and exactly the same number of new tokens per caption (min_new_tokens = max_new_tokens),
   so only batching differs. Target: batched >= 3x the items/s.
2. A re-run where everything is cached: lines handled per second, with a fresh backend
   that must never load its model. Target: >= 1000 items/s.

Both runs go through explain_records, so cache writes and bookkeeping are included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eclip.explain import explain_records  # noqa: E402
from eclip.explain.backends import embedded_backend  # noqa: E402
from eclip.explain.cache import make_entry  # noqa: E402
from eclip.explain.prompt import DEFAULT_TEMPLATE, prompt_sha256  # noqa: E402

ENTITIES = ["Queen Elizabeth II", "Barack Obama", "Angela Merkel", "the Eiffel Tower", "Windsor Castle",
            "the White House", "Emmanuel Macron", "the Golden Gate Bridge", "Serena Williams", "Mount Fuji",
            "the Kremlin", "Lionel Messi", "the Sydney Opera House", "Nelson Mandela", "the Taj Mahal",
            "Greta Thunberg"]
PLACES = ["in Paris", "at a press conference", "during a state visit", "in the rain", "at night",
          "before a crowd", "on Monday", "after the summit"]


def captions(n: int) -> list:
    return [f"{ENTITIES[i % len(ENTITIES)]} {PLACES[(i // len(ENTITIES)) % len(PLACES)]} (photo {i})."
            for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--cached-lines", type=int, default=20000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ECLIP_QUIET", "1")

    texts = captions(args.captions)
    common = dict(device=args.device, precision=args.precision, max_new_tokens=args.max_new_tokens,
                  min_new_tokens=args.max_new_tokens)
    backend = embedded_backend(batch_size=args.batch_size, **common)
    t = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - t
    list(backend.generate(texts[:2]))  # warm-up: first-call kernel setup is not throughput

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backend.batch_size = args.batch_size
        batched = explain_records(texts, backend, tmp / "batched.jsonl", show_progress=False)
        backend.batch_size = 1
        single = explain_records(texts, backend, tmp / "single.jsonl", show_progress=False)
        assert batched["generated"] == single["generated"] == args.captions, (batched, single)

        # a large cache: the real lines plus synthetic ones for the same model and prompt
        cache = tmp / "batched.jsonl"
        sha = prompt_sha256(DEFAULT_TEMPLATE)
        extra = captions(args.captions + args.cached_lines)[args.captions:]
        with open(cache, "a", encoding="utf-8") as f:
            for c in extra:
                f.write(json.dumps(make_entry(None, c, f"An explanation of {c}", backend.name, sha)) + "\n")
        fresh = embedded_backend(batch_size=args.batch_size, **common)
        t = time.perf_counter()
        rerun = explain_records(texts + extra, fresh, cache, show_progress=False)
        cached_s = time.perf_counter() - t
        assert rerun["generated"] == 0 and rerun["cached"] == len(texts) + len(extra)
        assert fresh._model is None, "the model was loaded although nothing needed generating"

    batched_rate = batched["generated"] / batched["seconds"]
    single_rate = single["generated"] / single["seconds"]
    cached_rate = rerun["cached"] / cached_s
    result = {
        "model": backend.name, "device": args.device, "threads": args.threads, "precision": args.precision, "captions": args.captions,
        "new_tokens_per_caption": args.max_new_tokens, "load_s": round(load_s, 2),
        "batched": {"batch_size": args.batch_size, "seconds": batched["seconds"],
                    "items_per_s": round(batched_rate, 3)},
        "one_at_a_time": {"seconds": single["seconds"], "items_per_s": round(single_rate, 3)},
        "batched_over_single": round(batched_rate / single_rate, 2),
        "cached_rerun": {"items": rerun["cached"], "seconds": round(cached_s, 4),
                         "items_per_s": round(cached_rate, 1), "model_loaded": False},
        "cached_over_target_1000": round(cached_rate / 1000, 2),
    }
    print(json.dumps(result, indent=2))
    ok = result["batched_over_single"] >= 3 and cached_rate >= 1000
    print(f"batched/single = {result['batched_over_single']}x (target >= 3x); "
          f"cached re-run = {cached_rate:.0f} items/s (target >= 1000): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
