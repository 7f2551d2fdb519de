"""`eclip embed` images/s against a bare open_clip loop over pre-decoded tensors, in one run.

Goal (issue 13): eclip embed reaches at least 1.0x the bare loop's images/s with the same model,
weights, threads and batch size. Both sides time only the embedding (model loading, and eclip's
one-off ONNX export, excluded); eclip's side includes decoding, the DataLoader workers,
normalisation and writing the shards. eclip runs its default engine (ONNX Runtime for fp32 on
the CPU; --engine torch to compare the torch engine).

The images are a few hundred varied crops of real photographs (scikit-image) and national
flags (flagpy), written as JPEG files of 120 to 640 pixels a side.

Run: python bench/bench_embed.py [--images 300] [--model ViT-B-32] [--batch-size 32] [--threads 2]
"""
import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEG files: random crops of skimage photos and flagpy flags, resized to varied sizes."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from eclip.data.demo_set import _package_dir, read_flag
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
               for name in ("astronaut", "rocket", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry",
                            "retina", "colorwheel", "cat")]
    flags = sorted((_package_dir("flagpy") / "flags").glob("*"))[:40]
    sources += [Image.fromarray(read_flag(p)) for p in flags]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(120, 641))
        scale = side / max(cw, ch)
        view = img.crop((x, y, x + cw, y + ch)).resize((max(1, int(cw * scale)), max(1, int(ch * scale))))
        path = folder / f"img-{i:04d}.jpg"
        view.save(path, quality=int(rng.integers(75, 96)))
        paths.append(path)
    return paths


def bare_loop(model, pixels, batch_size: int) -> float:
    """Seconds for open_clip's encode_image over pre-decoded tensors (normalised, like eclip)."""
    import torch
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(pixels), batch_size):
            v = model.encode_image(torch.stack(pixels[b:b + batch_size]))
            torch.nn.functional.normalize(v, dim=-1)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="eclip embed --workers (default: its own)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "eclip-bench-images"))
    ap.add_argument("--engine", default="auto", choices=("auto", "onnx", "torch"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ECLIP_QUIET", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # ONNX Runtime reads it as torch does

    import logging

    import open_clip
    import torch
    from safetensors.torch import save_model

    from eclip.config import ModelSpec
    from eclip.data.images import load_image
    from eclip.embed import default_workers, embed
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    paths = write_images(Path(args.folder) / "jpeg", args.images)
    work = Path(tempfile.mkdtemp(prefix="eclip-bench-embed-"))
    atexit.register(shutil.rmtree, work, True)   # weights, ONNX copy and outputs: hundreds of MB
    os.environ["ECLIP_CACHE"] = str(work / "cache")
    weights = work / "weights.safetensors"
    logging.getLogger().setLevel(logging.ERROR)   # "randomly initialised" warnings
    torch.manual_seed(0)
    save_model(open_clip.create_model(args.model, pretrained=None), str(weights))

    bare, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=str(weights))
    bare.eval()
    t0 = time.perf_counter()
    pixels = [preprocess(load_image(p)) for p in paths]
    decode_s = time.perf_counter() - t0
    listing = work / "images.txt"    # exactly these files, whatever else the folder holds
    listing.write_text("".join(f"{p}\n" for p in paths))
    spec = ModelSpec(model=args.model, pretrained=str(weights), device="cpu")
    workers = default_workers() if args.workers is None else args.workers

    bare_rates, eclip_rates = [], []

    def run_bare():
        bare_rates.append(len(pixels) / bare_loop(bare, pixels, args.batch_size))

    def run_eclip():
        summary = embed(spec, work / f"out-{len(eclip_rates)}", images=str(listing),
                        batch_size=args.batch_size, workers=workers, shard_size=4096, engine=args.engine)
        assert summary["images"] == len(paths), summary
        eclip_rates.append(summary["images_per_s"])

    # warm-up, untimed: first-use costs of the process (imports of pyarrow and safetensors, the
    # DataLoader machinery, the first forward pass) are not per-image costs on either side
    warm = work / "warm.txt"
    warm.write_text("".join(f"{p}\n" for p in paths[:args.batch_size]))
    t0 = time.perf_counter()
    embed(spec, work / "warm", images=str(warm), batch_size=args.batch_size, workers=workers, engine=args.engine)
    warm_s = time.perf_counter() - t0
    bare_loop(bare, pixels[:args.batch_size], args.batch_size)

    for r in range(args.repeat):   # alternate the order: a busy spell on the machine hits both sides
        for step in ((run_bare, run_eclip) if r % 2 == 0 else (run_eclip, run_bare)):
            step()
        print(f"round {r + 1}: bare {bare_rates[-1]:.2f} img/s, eclip embed {eclip_rates[-1]:.2f} img/s",
              file=sys.stderr)

    print(f"model {args.model} (random weights), {len(paths)} JPEG images, batch {args.batch_size}, "
          f"torch threads {args.threads}, eclip workers {workers}, cpus {os.cpu_count()}, "
          f"load average before: {load_before:.2f}")
    print(f"eclip engine: {args.engine}; first eclip embed call (ONNX export when onnx, untimed below): {warm_s:.1f} s")
    print(f"decode + preprocess alone (one thread, outside both timings): {len(paths) / decode_s:.1f} img/s")
    print(f"{'':28s} {'best img/s':>10s} {'median':>8s}  rounds")
    for name, rates in (("bare open_clip (tensors)", bare_rates), ("eclip embed (JPEG files)", eclip_rates)):
        print(f"{name:28s} {max(rates):10.2f} {statistics.median(rates):8.2f}  {', '.join(f'{x:.2f}' for x in rates)}")
    print(f"ratio eclip / bare: best {max(eclip_rates) / max(bare_rates):.3f}, "
          f"median {statistics.median(eclip_rates) / statistics.median(bare_rates):.3f} (goal >= 1.0)")

if __name__ == "__main__":
    main()
