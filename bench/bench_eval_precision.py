"""Does evaluating in fp16 (the reference's eval.py on a GPU) instead of fp32 (eclip's default) move
recalls? The same checkpoints on the same split in fp32, fp16 and bf16, in the same run.

    python bench/bench_eval_precision.py --dataset DATA/test.jsonl CHECKPOINT [CHECKPOINT ...] [--device cpu]

Per checkpoint and precision: T->I and I->T R@1, rsum (eclip's evaluation, --same-image none as the
paper's protocol), the largest change of any text-image cosine against fp32, and how many queries
(both directions) change their top-1. fp16 on the CPU needs a torch with CPU half kernels; a
precision the device cannot run is reported as such.
"""
import argparse
import json
import sys

import torch

from eclip.config import ModelSpec
from eclip.data.readers import read_dataset
from eclip.evaluate import embed_images, embed_texts, evaluate_features
from eclip.model.factory import load_model

PRECISIONS = ("fp32", "fp16", "bf16")


def features(checkpoint, precision, device, records):
    model = load_model(ModelSpec(checkpoint=checkpoint, device=device, precision=precision))
    model.eval()
    images, failed = embed_images(model, [r.image for r in records], workers=0)
    if failed:
        raise SystemExit(f"{failed[0]}: unreadable image")
    texts = embed_texts(model, [r.caption for r in records])
    return torch.nn.functional.normalize(images.float(), dim=-1), torch.nn.functional.normalize(texts.float(), dim=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--dataset", required=True, help="a .jsonl / .csv split (e.g. the demo's test.jsonl)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    records = read_dataset(args.dataset)
    print(f"{args.dataset}: {len(records)} pairs, device {args.device}, torch {torch.__version__}")
    print(f"{'checkpoint':<60} {'precision':>9} {'T->I R@1':>9} {'I->T R@1':>9} {'rsum':>7} "
          f"{'max |d cos|':>11} {'top-1 changed':>13}")
    rows = []
    for checkpoint in args.checkpoints:
        base = None
        for precision in PRECISIONS:
            try:
                img, txt = features(checkpoint, precision, args.device, records)
            except (RuntimeError, NotImplementedError) as e:
                print(f"{checkpoint[-60:]:<60} {precision:>9} cannot run here: {str(e).splitlines()[0]}")
                continue
            sims = txt @ img.T
            r = evaluate_features(txt, img, list(range(len(records))))
            if base is None:
                base = sims
            delta = (sims - base).abs().max().item()
            changed = int((sims.argmax(1) != base.argmax(1)).sum() + (sims.argmax(0) != base.argmax(0)).sum())
            row = {"checkpoint": checkpoint, "precision": precision, "t2i_r1": r["text_to_image"]["R@1"],
                   "i2t_r1": r["image_to_text"]["R@1"], "rsum": r["rsum"], "max_delta_cos": delta,
                   "top1_changed": changed}
            rows.append(row)
            print(f"{checkpoint[-60:]:<60} {precision:>9} {row['t2i_r1']:>9.2f} {row['i2t_r1']:>9.2f} "
                  f"{row['rsum']:>7.2f} {delta:>11.2e} {changed:>13d}")
    json.dump(rows, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
