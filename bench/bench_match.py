"""`eclip match` wall time against a bare open_clip script, input errors against `eclip --help`,
and `eclip match -` per-line cost, in one run.

Goals (issue 13, cold start):
- `eclip match photo.jpg "caption"` end to end at most 0.3x the floor: a bare script that
  imports open_clip, builds the same model, loads the same weights and encodes one image and
  one caption. Measured twice: weights given as a plain weights file (--model --pretrained FILE),
  and as an eclip checkpoint (--checkpoint; the floor loads the checkpoint's CLIP tensors).
  Both sides run from the same virtual environment, so both have its bytecode (or both lack it:
  the first line says which). eclip's first run for a model writes its ONNX copy; that run is
  timed and printed separately, the ratio uses the runs after it.
- Input errors that need no model, and the offline "no weights" error: at most 2x `eclip --help`.
- `eclip match -` over 100 JSON lines: per-line cost after start-up close to the model's
  forward time for one image and one caption (encode-only, measured here in-process).
  Two feeds: interactive (each line written after the previous answer arrived: the latency
  a user sees) and burst (all 100 lines at once: lines waiting are encoded as one batch).

Run: python bench/bench_match.py [--model ViT-B-32] [--repeat 3] [--lines 100] [--only pair|errors|stream]
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


def bytecode_state() -> str:
    """Whether this environment's open_clip and torch have compiled bytecode (.pyc) beside them."""
    import importlib.util
    found = []
    for name in ("open_clip", "torch"):
        folder = Path(list(importlib.util.find_spec(name).submodule_search_locations)[0]) / "__pycache__"
        found.append(f"{name} {'yes' if any(folder.glob('*.pyc')) else 'NO'}")
    return "bytecode compiled: " + ", ".join(found)


def error_times(eclip, work, images, ckpt, repeat, env):
    """Median seconds of `eclip --help` and of input errors (each must exit 2)."""
    folder = work / "run"
    folder.mkdir(exist_ok=True)
    (work / "notes.txt").write_text("not a photo")
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "empty-hub"), "HOME": str(work)}
    cases = [("eclip --help", ["--help"], env, 0),
             ("match -i missing.jpg", ["match", "--checkpoint", str(ckpt), "-i", str(work / "missing.jpg"), "a"],
              env, 2),
             ("match notes.txt (not an image)", ["match", "--checkpoint", str(ckpt), str(work / "notes.txt"), "a"],
              env, 2),
             ("match --checkpoint FOLDER", ["match", "--checkpoint", str(folder), str(images[0]), "a"], env, 2),
             ("match, offline, weights not cached", ["match", str(images[0]), "a caption"], offline, 2),
             ("mistyped subcommand (mach)", ["mach"], env, 2)]
    out = []
    for label, args, case_env, code in cases:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            done = subprocess.run(eclip + args, capture_output=True, text=True, env=case_env)
            times.append(time.perf_counter() - start)
            assert done.returncode == code, (label, done.returncode, done.stderr[-500:])
        out.append((label, statistics.median(times)))
    return out


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
    ap.add_argument("--only", choices=("all", "pair", "errors", "stream"), default="all")
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
    from eclip.model.factory import load_inference_model
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_embed import write_images
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="eclip-bench-match-"))
    atexit.register(shutil.rmtree, work, True)   # weights, ONNX copies and outputs: hundreds of MB
    env["ECLIP_CACHE"] = str(work / "cache")     # a fresh cache: the first run really writes the ONNX copy
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
          f"load average before: {os.getloadavg()[0]:.2f}; {bytecode_state()}")
    if args.only in ("all", "errors"):
        errors = error_times(eclip, work, images, ckpt, args.repeat, env)
        help_s = errors[0][1]
        print(f"{'input errors (exit 2), median of ' + str(args.repeat):44s} {'s':>7s} {'/ help':>7s}")
        for label, seconds in errors:
            print(f"{label:44s} {seconds:7.2f} {seconds / help_s:7.2f}" + ("" if label.startswith("eclip --help")
                                                                         else "   (goal <= 2.0)"))
        if args.only == "errors":
            return
    print(f"{'single pair, end to end':44s} {'best s':>7s} {'median':>7s}  runs")
    rows = []
    for kind, eclip_opts, weights_path in [] if args.only == "stream" else (("file", ["--model", args.model, "--pretrained", str(weights)], weights),
                                           ("checkpoint", ["--checkpoint", str(ckpt)], ckpt)):
        floor_cmd = [sys.executable, str(floor_py), args.model, str(weights_path), str(images[0]), caption, kind]
        eclip_cmd = eclip + ["match", *eclip_opts, str(images[0]), caption]
        first, _ = run_once(eclip_cmd, env)      # writes the ONNX copy of this model (once per model)
        print(f"{'eclip match, ' + kind + ', FIRST run (export)':44s} {first:7.2f}")
        times, outs = compare(floor_cmd, eclip_cmd, args.repeat, env)
        assert abs(float(outs["floor"]) - float(outs["eclip"])) < 2e-4, outs   # same number, same model
        for name in ("floor", "eclip"):
            label = ("floor (open_clip script), " if name == "floor" else "eclip match, ") + kind
            t = times[name]
            print(f"{label:44s} {min(t):7.2f} {statistics.median(t):7.2f}  {', '.join(f'{x:.2f}' for x in t)}")
        rows.append((kind, min(times["eclip"]) / min(times["floor"]),
                     statistics.median(times["eclip"]) / statistics.median(times["floor"])))
    for kind, best, median in rows:
        print(f"ratio eclip / floor ({kind}): best {best:.3f}, median {median:.3f} (goal <= 0.3)")

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
