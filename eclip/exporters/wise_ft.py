"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the weights
(1 - alpha) * base + alpha * fine-tuned, base = the model the fine-tuning started from.

Only the CLIP towers are interpolated (the experts and matching head are not used at inference).
The base is what the run recorded: the `base_model` field of the checkpoint header (written by
`eclip train`), else the model options in the run folder's config.json beside the checkpoint; or
the model options the user gives. A base whose tensors differ in name or shape is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from eclip.errors import EclipError

SPEC_FIELDS = ("model", "pretrained", "checkpoint", "seed")


def check_alpha(alpha: float, what: str = "--wise-ft") -> float:
    if not 0.0 <= alpha <= 1.0:
        raise EclipError(f"{what} {alpha}: alpha must be between 0 (the base model) and 1 (the fine-tuned one)")
    return alpha


def parse_alphas(text: str) -> list[float]:
    """"0,0.25,0.5" -> [0.0, 0.25, 0.5]; EclipError naming the bad item."""
    alphas = []
    for item in (x.strip() for x in str(text).split(",")):
        try:
            alphas.append(check_alpha(float(item), f"--wise-ft {text}:"))
        except ValueError:
            raise EclipError(f"--wise-ft {text}: {item!r} is not a number (give alphas like 0,0.5,1)") from None
    if not alphas:
        raise EclipError(f"--wise-ft {text}: no alpha given")
    return alphas


def recorded_base(checkpoint) -> dict | None:
    """The model options the run that wrote `checkpoint` started from, or None if nothing says."""
    from eclip.checkpoint import read_header
    meta = read_header(checkpoint)
    if meta.get("base_model"):
        try:
            base = json.loads(meta["base_model"])
            if isinstance(base, dict):
                return {k: base.get(k) for k in SPEC_FIELDS}
        except ValueError:
            pass
    config = Path(checkpoint).parent / "config.json"      # runs from before the header recorded it
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or "output" not in saved:
        return None
    return {k: saved.get(k) for k in SPEC_FIELDS}


def base_for(spec, given=None):
    """The ModelSpec of the base for fine-tuned `spec`: `given` (model options) or the recorded one."""
    from eclip.config import ModelSpec
    from eclip.model.source import resolve_source
    if not spec.checkpoint:
        raise EclipError("--wise-ft: needs the fine-tuned model as an eclip checkpoint (CHECKPOINT or --checkpoint); "
                         "--model/--pretrained then name the base")
    if given is not None:
        base = given
    else:
        record = recorded_base(spec.checkpoint)
        if record is None:
            raise EclipError(f"--wise-ft: {spec.checkpoint} does not record the model its run started from; "
                             f"give the base with --model/--pretrained")
        base = ModelSpec(**record)
    resolve_source(base)                                  # a missing base file is bad input, said at once
    return base


def interpolate(model, base, alpha: float):
    """model.clip's weights become (1 - alpha) * base.clip + alpha * model.clip, in place."""
    import torch
    tuned, start = model.clip.state_dict(), base.clip.state_dict()
    if set(tuned) != set(start):
        odd = sorted(set(tuned) ^ set(start))
        raise EclipError(f"--wise-ft: the base model does not match the fine-tuned one ({len(odd)} tensors only in "
                         f"one of them, e.g. {odd[0]})")
    mixed = {}
    for key, value in tuned.items():
        other = start[key]
        if value.shape != other.shape:
            raise EclipError(f"--wise-ft: the base model does not match the fine-tuned one in shape ({key}: "
                             f"{list(other.shape)} vs {list(value.shape)})")
        if torch.is_floating_point(value):
            mixed[key] = torch.lerp(other.to(value.dtype), value, alpha) if 0 < alpha < 1 else \
                (value if alpha == 1 else other.to(value.dtype)).clone()
        else:
            mixed[key] = value
    model.clip.load_state_dict(mixed)
    return model


def curve(spec, base, alphas, **evaluate_options) -> dict:
    """`eclip evaluate --wise-ft A,B,...`: one evaluation per alpha (each model embedded once)."""
    from dataclasses import replace

    from eclip.evaluate import evaluate
    from eclip.model.factory import load_inference_model
    base = base_for(spec, base)
    tuned = load_inference_model(spec)
    start = load_inference_model(replace(base, device=spec.device, precision=spec.precision))
    weights = {k: v.clone() for k, v in tuned.clip.state_dict().items()}
    points = []
    for alpha in alphas:
        tuned.clip.load_state_dict(weights)
        interpolate(tuned, start, alpha)
        result = evaluate(spec, model=tuned, **evaluate_options)
        points.append({"alpha": alpha, **result})
    return {"wise_ft": points, "base": {k: getattr(base, k) for k in SPEC_FIELDS if getattr(base, k) is not None}}


def evaluate_curve(alphas: str, spec, *, dataset=None, **evaluate_options) -> dict:
    """`eclip evaluate --wise-ft A,B,...`: `spec` holds the fine-tuned --checkpoint; --model /
    --pretrained in it, if given, name the base (else the recorded base is used)."""
    from dataclasses import replace

    from eclip.config import ModelSpec
    points = parse_alphas(alphas)
    if not spec.checkpoint:
        raise EclipError("--wise-ft: needs the fine-tuned model as --checkpoint; --model/--pretrained then name the base")
    if not dataset:
        raise EclipError("--wise-ft: --dataset is required")
    base = ModelSpec(model=spec.model, pretrained=spec.pretrained, seed=spec.seed) \
        if (spec.model or spec.pretrained) else None
    return curve(replace(spec, model=None, pretrained=None), base, points, dataset=dataset, **evaluate_options)


def curve_table(result: dict):
    """One row per alpha: Recall@K both ways and rsum."""
    from rich.table import Table
    points = result["wise_ft"]
    first = points[0]
    keys = [k for k in ("text_to_image", "image_to_text") if isinstance(first.get(k), dict)]
    short = {"text_to_image": "t->i", "image_to_text": "i->t"}
    table = Table(title="WiSE-FT: (1 - alpha) * base + alpha * fine-tuned")
    table.add_column("alpha", justify="right")
    columns = [(d, k) for d in keys for k in first[d] if k.startswith("R@")]
    for d, k in columns:
        table.add_column(f"{short[d]} {k}", justify="right")
    table.add_column("rsum", justify="right")
    for p in points:
        table.add_row(f"{p['alpha']:g}", *(f"{p[d][k]:.2f}" for d, k in columns), f"{p.get('rsum', float('nan')):.2f}")
    return table
