"""The training loader from webdataset shards against the same pairs as a JSONL file beside a folder
of JPEGs, in one run; and peak memory of reading a large shard set against a small one.

Goals (issue 24): pairs/s from shards at least 1.0x pairs/s from the folder; peak resident memory
of one pass over 50,000 small pairs from shards within 10% of 5,000.

Both sides go through eclip.train.setup.pair_loader (decode, the model's transform, tokenize, collate)
with a tiny open_clip model (no forward pass: this measures the data path): the folder side reads the
JSONL's records in a permutation (train's default), the shard side streams the shards with a shuffle
buffer of 1,000 (train --shuffle-buffer 1000), with no record list. Each is the loader train
iterates: an Accelerate DataLoaderShard (the folder's DataLoader through accelerator.prepare, as
eclip.train.loop does; the stream is built as one). DataLoader workers as given. Images are
random 64x64 crops of scikit-image photographs, JPEG.

Run: python bench/bench_data.py [--pairs 2000] [--small 5000] [--large 50000] [--workers 0] [--rounds 3]
"""
import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def write_pairs(folder: Path, n: int, per_shard: int = 1000) -> tuple[str, str]:
    """n pairs as folder/pairs.jsonl + images/ and as folder/shards/NNNNN.tar; -> (jsonl, shard pattern)."""
    import numpy as np
    import skimage.data
    import webdataset as wds
    from PIL import Image
    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "rocket", "coffee", "chelsea")]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "shards").mkdir(exist_ok=True)
    with open(folder / "pairs.jsonl", "w") as table, \
            wds.ShardWriter(str(folder / "shards" / "%05d.tar"), maxcount=per_shard, verbose=0) as shards:
        for i in range(n):
            photo = photos[i % len(photos)]
            y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
            out = io.BytesIO()
            Image.fromarray(photo[y:y + 64, x:x + 64]).convert("RGB").save(out, "JPEG", quality=85)
            data, key, caption = out.getvalue(), f"{i:09d}", f"photo crop number {i}"
            (folder / "images" / f"{key}.jpg").write_bytes(data)
            table.write(json.dumps({"id": key, "image": f"images/{key}.jpg", "text": caption}) + "\n")
            shards.write({"__key__": key, "jpg": data, "txt": caption})
    last = (n - 1) // per_shard
    return str(folder / "pairs.jsonl"), str(folder / "shards" / f"{{00000..{last:05d}}}.tar")


def one_pass(dataset: str, workers: int, batch: int, buffer) -> tuple[int, float, float]:
    """(pairs loaded, wall seconds, process CPU seconds) for one epoch of the training loader."""
    from eclip.config import ExpertConfig
    from eclip.data.readers import read_dataset
    from eclip.model.factory import load_model
    from eclip.train.setup import pair_loader
    config = Path(tempfile.mkdtemp()) / "tiny.json"
    config.write_text(json.dumps(TINY))
    model = load_model(model=str(config), pretrained="none", device="cpu", experts=ExpertConfig(enabled=False))
    t0, c0 = time.perf_counter(), time.process_time()
    if buffer is None:
        records = read_dataset(dataset)
    else:                        # streamed: no record list, shards read forward (eclip.data.stream)
        from eclip.data.shardset import open_shard_set
        records = open_shard_set(dataset)
    loader = pair_loader(records, model, batch, workers, seed=0, shuffle_buffer=buffer)
    if buffer is None:           # as eclip train hands it to accelerator.prepare (the stream is one already)
        from accelerate import Accelerator
        loader = Accelerator(cpu=True).prepare(loader)
    n = sum(len(b["indices"]) for b in loader)
    return n, time.perf_counter() - t0, time.process_time() - c0


def child(args) -> None:
    n, seconds, cpu = one_pass(args.child, args.workers, args.batch_size, args.buffer)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"pairs": n, "seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak_kib / 1024}))


def run_child(dataset: str, args, buffer) -> dict:
    cmd = [sys.executable, __file__, "--child", dataset, "--workers", str(args.workers),
           "--batch-size", str(args.batch_size)] + (["--buffer", str(buffer)] if buffer is not None else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ECLIP_QUIET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--small", type=int, default=5000)
    p.add_argument("--large", type=int, default=50000)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--buffer", type=int, default=None)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        jsonl, shards = write_pairs(work / "speed", args.pairs)
        folder_rates, shard_rates, folder_cpu, shard_cpu = [], [], [], []
        for _ in range(args.rounds):        # interleaved: the machine's load hits both sides alike
            f = run_child(jsonl, args, None)
            s = run_child(shards, args, 1000)
            folder_rates.append(f["pairs"] / f["seconds"])
            shard_rates.append(s["pairs"] / s["seconds"])
            folder_cpu.append(f["pairs"] / f["cpu_seconds"])
            shard_cpu.append(s["pairs"] / s["cpu_seconds"])
        fr, sr = statistics.median(folder_rates), statistics.median(shard_rates)
        print(f"loader pairs/s over {args.pairs} pairs, median of {args.rounds}: folder {fr:.0f}, shards {sr:.0f} "
              f"-> {sr / fr:.2f}x (goal >= 1.0x)")
        fc, sc = statistics.median(folder_cpu), statistics.median(shard_cpu)
        print(f"  per second of process CPU time (steadier when other work shares the cores): folder {fc:.0f}, "
              f"shards {sc:.0f} -> {sc / fc:.2f}x")
        _, small = write_pairs(work / "small", args.small)
        _, large = write_pairs(work / "large", args.large)
        a, b = run_child(small, args, 1000), run_child(large, args, 1000)
        print(f"peak memory of one pass from shards: {args.small} pairs {a['peak_mib']:.0f} MiB, {args.large} pairs "
              f"{b['peak_mib']:.0f} MiB -> {b['peak_mib'] / a['peak_mib']:.3f}x (goal <= 1.10x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
