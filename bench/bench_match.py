"""`eclip match` wall time against its floor, and `eclip match -` per-line cost, in one run.

Goals (issue: embed and match):
- `eclip match photo.jpg "caption"` end to end at most 1.3x the floor: a bare script that
  imports open_clip, builds the same model, loads the same weights and encodes one image and
  one caption. Measured twice: weights given as a plain weights file (--model --pretrained FILE),
  and as an eclip checkpoint (--checkpoint; the floor loads the checkpoint's CLIP tensors).
- `eclip match -` over 100 JSON lines: per-line cost after start-up close to the model's
  forward time for one image and one caption (encode-only, measured here in-process).
  Two feeds: interactive (each line written after the previous answer arrived: the latency
  a user sees) and burst (all 100 lines at once: lines waiting are encoded as one batch).

Run: python bench/bench_match.py [--model ViT-B-32] [--repeat 3] [--lines 100]
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = r'''
import sys
import open_clip, torch
from PIL import Image
from safetensors.torch import load_file
model_name, weights, image, caption, kind = sys.argv[1:6]
if kind == "file":
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
else:   # eclip checkpoint: its CLIP tensors carry the prefix "clip."
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    state = {k[5:]: v for k, v in load_file(weights).items() if k.startswith("clip.")}
    model.load_state_dict(state)
model.eval()
tokenizer = open_clip.get_tokenizer(model_name)
with torch.no_grad():
    i = model.encode_image(preprocess(Image.open(image).convert("RGB"))[None])
    t = model.encode_text(tokenizer([caption]))
    print(f"{float(torch.nn.functional.cosine_similarity(i, t)):.4f}")
'''


def run_once(cmd, env):
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return seconds, done.stdout.strip()


def compare(floor_cmd, eclip_cmd, repeat, env):
    """Alternating runs (a busy spell on the machine hits both) -> ({name: [seconds]}, outputs)."""
    times, outs = {"floor": [], "eclip": []}, {}
    for r in range(repeat):
        order = (("floor", floor_cmd), ("eclip", eclip_cmd))
        for name, cmd in (order if r % 2 == 0 else order[::-1]):
            seconds, outs[name] = run_once(cmd, env)
            times[name].append(seconds)
    return times, outs


def stream(cmd, lines, env, encode_once):
    """Interactive feed: each line is written once the previous answer is back. After each
    answer, `encode_once()` times the bare forward pass in this process (the server is idle
    then), so both figures of a pair see the same machine load.

    -> (seconds to the first answer, [(line round trip s, encode-only s)] after the first)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env)
    start = time.perf_counter()
    pairs, first = [], None
    for k, line in enumerate(lines):
        time.sleep(0.2)   # the server idles between lines, as a person or a slow producer makes it
        t0 = time.perf_counter()
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        t1 = time.perf_counter()
        assert answer and "error" not in json.loads(answer), answer
        if k == 0:
            first = t1 - start
        else:
            pairs.append((t1 - t0, encode_once(k)))
    proc.stdin.close()
    proc.wait()
    return first, pairs


def burst(cmd, lines, env):
    """All lines at once: -> (seconds to the first answer, per-line seconds after it)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env)
    start = time.perf_counter()
    proc.stdin.write("".join(line + "\n" for line in lines))
    proc.stdin.flush()
    stamps = []
    for _ in lines:
        answer = proc.stdout.readline()
        stamps.append(time.perf_counter())
        assert answer and "error" not in json.loads(answer), answer
    proc.stdin.close()
    proc.wait()
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lines", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("all", "pair", "stream"), default="all")
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "eclip-bench-images"))
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ECLIP_QUIET": "1", "OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env)

    import logging

    import open_clip
    import torch
    from safetensors.torch import save_model

    from eclip.checkpoint import save_checkpoint
    from eclip.config import ModelSpec
    from eclip.data.images import load_image
    from eclip.match import load_inference_model
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_embed import write_images
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="eclip-bench-match-"))
    atexit.register(shutil.rmtree, work, True)   # weights and outputs: hundreds of MB
    images = write_images(Path(args.folder) / "jpeg", args.lines)
    weights, ckpt = work / "weights.safetensors", work / "eclip.safetensors"
    torch.manual_seed(0)
    save_model(open_clip.create_model(args.model, pretrained=None), str(weights))
    spec = ModelSpec(model=args.model, pretrained=str(weights), device="cpu")
    from eclip.model.factory import load_model
    save_checkpoint(load_model(spec), ckpt)     # default experts, as `eclip train` writes them
    model = load_inference_model(spec)
    caption = "the statue of Eric Morecambe in Morecambe"
    eclip = [sys.executable, "-m", "eclip"]
    floor_py = work / "floor.py"
    floor_py.write_text(FLOOR)

    # encode-only cost of one line: one image and one caption, batch 1, already decoded
    pixels = [model.preprocess(load_image(p))[None] for p in images[:args.lines]]
    captions = [f"{caption}, photo {i}" for i in range(args.lines)]
    tokens = model.tokenize(captions)

    def encode_once(k):
        time.sleep(0.2)   # idle first, like the server between lines (the scheduler favours sleepers)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.encode_images(pixels[k]), model.encode_texts(tokens[k:k + 1])
            return time.perf_counter() - t0

    for k in range(3):
        encode_once(k)                          # warm-up
    t0 = time.perf_counter()
    for p in images[:20]:
        model.preprocess(load_image(p))
    decode_ms = (time.perf_counter() - t0) / 20 * 1000

    print(f"model {args.model} (random weights), torch threads {args.threads}, cpus {os.cpu_count()}, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'single pair, end to end':44s} {'best s':>7s} {'median':>7s}  runs")
    rows = []
    for kind, eclip_opts, weights_path in [] if args.only == "stream" else (("file", ["--model", args.model, "--pretrained", str(weights)], weights),
                                           ("checkpoint", ["--checkpoint", str(ckpt)], ckpt)):
        floor_cmd = [sys.executable, str(floor_py), args.model, str(weights_path), str(images[0]), caption, kind]
        times, outs = compare(floor_cmd, eclip + ["match", *eclip_opts, str(images[0]), caption], args.repeat, env)
        assert abs(float(outs["floor"]) - float(outs["eclip"])) < 2e-4, outs   # same number, same model
        for name in ("floor", "eclip"):
            label = ("floor (open_clip script), " if name == "floor" else "eclip match, ") + kind
            t = times[name]
            print(f"{label:44s} {min(t):7.2f} {statistics.median(t):7.2f}  {', '.join(f'{x:.2f}' for x in t)}")
        rows.append((kind, min(times["eclip"]) / min(times["floor"]),
                     statistics.median(times["eclip"]) / statistics.median(times["floor"])))
    for kind, best, median in rows:
        print(f"ratio eclip / floor ({kind}): best {best:.3f}, median {median:.3f} (goal <= 1.3)")

    if args.only == "pair":
        return
    # a different caption on every line: the caption cache must not flatter the per-line figure
    lines = [json.dumps({"id": k, "image": str(p), "text": captions[k]}) for k, p in enumerate(images[:args.lines])]
    cmd = eclip + ["match", "--model", args.model, "--pretrained", str(weights), "-"]
    first_i, pairs = stream(cmd, lines, env, encode_once)
    line_ms = statistics.median(p[0] for p in pairs) * 1000
    encode_ms = statistics.median(p[1] for p in pairs) * 1000
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    first_b, per_line_b = burst(cmd, lines, env)
    burst_encode_ms = statistics.median(encode_once(k) for k in range(10)) * 1000
    print(f"\neclip match - over {len(lines)} lines (one image + one caption each, all captions different)")
    print(f"decode + preprocess one JPEG: {decode_ms:.1f} ms")
    print(f"interactive (line written after the previous answer), medians over {len(pairs)} lines:")
    print(f"  per line, round trip through the pipe:  {line_ms:7.1f} ms")
    print(f"  encode only (image + caption, batch 1): {encode_ms:7.1f} ms   (timed right after each line)")
    print(f"  ratio per line / encode only:           {ratio:7.2f}   (first answer after {first_i:.1f} s)")
    print(f"burst (all lines at once; waiting lines are encoded as one batch):")
    print(f"  per line after the first:               {per_line_b * 1000:7.1f} ms   "
          f"({per_line_b * 1000 / burst_encode_ms:.2f}x encode only {burst_encode_ms:.1f} ms; "
          f"first answer after {first_b:.1f} s)")


if __name__ == "__main__":
    main()
