"""The run folder: the options, the resumable state, and the files a run leaves behind.

State is saved atomically. Each save goes into `state/step-N.tmp` and becomes
`state/step-N` by one rename once every file in it is written and synced; older states are
renamed away before they are deleted. So a run killed at any moment (SIGKILL, power loss)
always leaves its last complete state under a plain `state/step-N` name, and resuming
picks the highest such N.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

from eclip.atomic import disk_full, write_text
from eclip.config import TrainConfig
from eclip.errors import EclipError

STATE = "state"
TRAINER = "trainer.json"          # inside each state: step, epoch, best so far, log sizes
_NAME = re.compile(r"step-(\d+)")

# Options that may differ when a run is resumed; the rest define the run and must not change.
RESUMABLE = {"epochs", "workers", "val_frequency", "eval_every", "save_frequency", "save_every", "log_every",
             "device", "tensorboard",
             "grad_checkpointing", "accum_freq",      # memory and speed only: same results
             "tower_cache_mb", "tower_cache_disk",     # the tower cache changes no result (tests/test_tower_cache.py)
             "data_cache_mb"}                          # nor the data cache (tests/test_data_cache.py)
FLAG = {"lam": "--lambda", "output": "--output"}


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    def check_fresh(self) -> None:
        """A new run never mixes its files with an old one's."""
        if self.path.exists() and not self.path.is_dir():
            raise EclipError(f"--output {self.path}: exists and is not a folder")
        if self.config.exists() or (self.path / STATE).exists():
            raise EclipError(f"--output {self.path}: already holds a run; continue it with --resume {self.path}, "
                             f"or choose another --output")

    def write_config(self, cfg: TrainConfig, facts: dict | None = None) -> None:
        """config.json: the options, and `facts` about the data they read (not options: resume ignores them)."""
        from eclip import __version__
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config, json.dumps({**cfg.to_dict(), **(facts or {}), "eclip_version": __version__},
                                           indent=2) + "\n")

    # ---- state ----
    def latest_state(self) -> tuple[Path, dict] | None:
        """The newest complete state and its trainer record, or None if the run never saved one."""
        root = self.path / STATE
        found = []
        for p in root.iterdir() if root.is_dir() else ():
            m = _NAME.fullmatch(p.name)
            if m and (p / TRAINER).is_file():
                found.append((int(m.group(1)), p))
        if not found:
            return None
        path = max(found)[1]
        return path, json.loads((path / TRAINER).read_text())

    def clean_state(self) -> None:
        """Remove what a killed save left: half-written `.tmp` folders and old states half-deleted."""
        root = self.path / STATE
        latest = self.latest_state()
        for p in root.iterdir() if root.is_dir() else ():
            if latest is None or p != latest[0]:
                _discard(p)

    def save_state(self, accelerator, trainer: dict) -> Path:
        """accelerate's save_state (model, optimizer, scheduler, RNG of every process) plus `trainer`, atomically."""
        root = self.path / STATE
        final = root / f"step-{trainer['step']:09d}"
        tmp = root / f"{final.name}.tmp"
        if accelerator.is_main_process:
            _discard(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_text(tmp / TRAINER, json.dumps(trainer, indent=1))
                for f in tmp.iterdir():
                    _fsync(f)
        except Exception as e:
            full = disk_full(e, root)         # asked before the partial save is removed and frees its space
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if not full:
                raise
            previous = self.latest_state()
            kept = f"the previous state ({previous[0].name}) is kept" if previous else "no earlier state was saved"
            raise EclipError(f"{root}: no space left on device while saving the training state; {kept}. Free "
                             f"some space, then continue with: eclip train --resume {self.path}") from None
        if accelerator.is_main_process:
            _discard(final)
            os.replace(tmp, final)            # the commit point
            _fsync(root)
            for p in root.iterdir():
                if p != final:
                    _discard(p)
        accelerator.wait_for_everyone()
        return final

    def rewind(self, trainer: dict) -> None:
        """Cut log.jsonl and skipped.jsonl back to what they held when the state was saved:
        lines a killed run wrote after its last save are written again by the resumed run."""
        for name, key in (("log.jsonl", "log_bytes"), ("skipped.jsonl", "skipped_bytes")):
            path = self.path / name
            if path.is_file() and path.stat().st_size > trainer.get(key, 0):
                os.truncate(path, trainer.get(key, 0))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Rename away first, so no half-deleted folder ever carries a state's name."""
    if not path.exists():
        return
    trash = path.with_name(path.name + ".deleting")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


# Options that name files or folders: config.json keeps them absolute, so `--resume RUN` works from anywhere.
PATH_OPTIONS = ("output", "dataset", "val_dataset", "data_root", "explanations", "model", "pretrained", "checkpoint")
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def absolute_path_option(key: str, value):
    """`value` of option `key` with a file or folder made absolute; names (a benchmark, an architecture,
    a pretrained tag, hf-hub:...) are kept as they are."""
    if not isinstance(value, str) or not value:
        return value
    def absolute(path):
        return os.path.abspath(os.path.expanduser(path))
    if key in ("output", "data_root", "explanations", "checkpoint"):
        return absolute(value)
    if key in ("dataset", "val_dataset"):
        return absolute(value) if Path(value).suffix.lower() in (".jsonl", ".csv") else value
    if key == "model":
        if value.startswith("local-dir:"):
            return "local-dir:" + absolute(value[len("local-dir:"):])
        if value.startswith("hf-hub:"):
            return value
        return absolute(value) if value.endswith(".json") or os.path.sep in value else value
    if key == "pretrained":
        looks_like_file = Path(value).suffix.lower() in WEIGHTS_SUFFIXES or os.path.sep in value
        return absolute(value) if looks_like_file or os.path.isfile(value) else value
    return value


def base_model(cfg: TrainConfig) -> str:
    """The checkpoint header's `base_model`: the model options the run started from (JSON), which
    `eclip export --wise-ft` and `eclip evaluate --wise-ft` interpolate with."""
    return json.dumps({"model": cfg.model, "pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint,
                       "seed": cfg.seed})


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    return replace(cfg, **{k: absolute_path_option(k, getattr(cfg, k)) for k in PATH_OPTIONS})


def resume_config(run_dir, **given) -> TrainConfig:
    """The saved options of the run in `run_dir`, with the `given` (non-None) ones applied.

    Only options in RESUMABLE may change (e.g. more --epochs: the cosine schedule then
    stretches over the new total); changing what defines the run raises EclipError.
    """
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise EclipError(f"--resume {run_dir}: not a training run folder (no config.json)")
    try:
        saved = TrainConfig.from_dict(json.loads(run.config.read_text()))
    except (ValueError, TypeError) as e:
        raise EclipError(f"{run.config}: unreadable run options ({e})")
    for key, value in given.items():
        if key not in TrainConfig.__dataclass_fields__:
            raise TypeError(f"resume_config: unknown option {key}")
        value = absolute_path_option(key, value)
        saved_value = absolute_path_option(key, getattr(saved, key))   # runs saved before paths were absolute
        if value is None or key == "output" and value == absolute_path_option(key, str(run_dir)) \
                or key in PATH_OPTIONS and value == saved_value:
            continue
        if value != getattr(saved, key):
            if key not in RESUMABLE:
                flag = FLAG.get(key, "--" + key.replace("_", "-"))
                raise EclipError(f"--resume {run_dir}: {flag} cannot change when resuming (the run used "
                                 f"{getattr(saved, key)!r}); start a new run with --output to change it")
            setattr(saved, key, value)
    saved.output = str(run_dir)
    return with_absolute_paths(saved)
