"""`--protocol paper`: the EntityCLIP reference code's choices in one switch (README, "Comparing with
the paper"; docs/METHOD.md, "Where eclip differs"), on `eclip train` and `eclip evaluate`.

What it sets on train: best.safetensors by the lowest validation loss, GI-ITM negatives drawn as
the reference draws them, and the reference's readers (see `readers_choices`). On evaluate:
every record its own gallery item (--same-image none), the readers' choices, and fp16 on a CUDA
device (the reference's eval.py runs the model in fp16 on a GPU and in fp32 on the CPU).
An option given beside the protocol that contradicts it is refused, never silently overridden.
"""
from __future__ import annotations

from eclip.errors import EclipError

PROTOCOLS = ("eclip", "paper")

# option (as TrainConfig / evaluate name it) -> (value under --protocol paper, its flag)
PAPER_TRAIN = {"select_by": ("val-loss", "--select-by"), "negatives": ("reference", "--negatives")}
PAPER_EVALUATE = {"same_image": ("none", "--same-image")}


def check_protocol(protocol: str | None) -> str:
    protocol = protocol or "eclip"
    if protocol not in PROTOCOLS:
        raise EclipError(f"--protocol {protocol}: one of {', '.join(PROTOCOLS)}")
    return protocol


def paper_options(protocol: str | None, given: dict, sets: dict) -> dict:
    """`given` (option -> value or None) with what the protocol `sets` filled in; EclipError when an
    option given explicitly contradicts it."""
    if check_protocol(protocol) != "paper":
        return dict(given)
    out = dict(given)
    for key, (value, flag) in sets.items():
        if given.get(key) not in (None, value):
            raise EclipError(f"{flag} {given[key]}: --protocol paper sets {flag} {value}; leave {flag} out "
                             f"or drop --protocol paper")
        out[key] = value
    return out


def evaluation_precision(protocol: str | None, precision: str | None, device: str | None) -> str:
    """The compute precision of `eclip evaluate`: the one given, else fp32; under --protocol paper fp16
    on a CUDA device and fp32 elsewhere, as the reference (clip.load makes the model fp16 on CUDA and
    calls model.float() on the CPU), said on stderr."""
    if check_protocol(protocol) != "paper" or precision is not None:
        return precision or "fp32"
    import torch
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    from eclip.console import note
    note("--protocol paper: evaluating in fp16 on the GPU, as the reference's eval.py" if cuda else
         "--protocol paper: evaluating in fp32: the reference's eval.py uses fp16 only on a GPU and fp32 on the CPU")
    return "fp16" if cuda else "fp32"
