"""The training loop: a plain loop over batches; Accelerate handles devices, precision and processes.

    eclip train --dataset n24news --pretrained openai --output runs/n24          # one device
    torchrun --nproc_per_node 8 -m eclip train --dataset n24news --output runs/n24   # eight
    eclip train --resume runs/n24                                                # after a stop
"""
from __future__ import annotations

import json
import math
import time

import torch

from eclip.atomic import disk_full
from eclip.config import SELECT_BY, TrainConfig
from eclip.errors import EclipError
from eclip.lock import lock_folder
from eclip.train.record import Recorder, announce, plot_curves
from eclip.train.rundir import RunDir, with_absolute_paths
from eclip.train.step import clamp_logit_scale, common_batch, forward_backward, negatives_generator

LOSSES = ("loss", "vtc", "gfm", "vtc_star", "pos_prob")   # pos_prob: GI-ITM's softmax mass on the positive


def train(cfg: TrainConfig, resume: bool = False, splits=None) -> dict:
    """Train; return the summary. `resume=True` continues the run in `cfg.output` from its last
    saved state (the same next batch, learning rate and random streams).

    best.safetensors is the model at the validation with the highest val rsum (R@1+5+10 of
    both directions), or with `select_by="val-loss"` the lowest validation contrastive loss
    (the reference's rule); a later validation that only ties it does not replace it.
    last.safetensors is the model at the latest saved state.
    `splits`: (train records, val records) already read by eclip.train.inputs.check_inputs.
    """
    trainer = None
    try:
        trainer = Trainer(cfg, resume, splits)
        return trainer.fit()
    except KeyboardInterrupt:
        raise EclipError(f"interrupted; continue with: eclip train --resume {cfg.output}", exit_code=130) from None
    except EclipError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        where = getattr(e, "filename", None) or cfg.output
        raise EclipError(f"{where}: no space left on device; free some space, then continue with: "
                         f"eclip train --resume {cfg.output}") from None
    finally:
        if trainer is not None:
            trainer.close()


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool, splits=None):
        from eclip.train.setup import make_accelerator
        if not cfg.dataset:
            raise EclipError("--dataset is required (or --resume RUN_DIR to continue a run)")
        if cfg.select_by not in SELECT_BY:
            raise EclipError(f"--select-by {cfg.select_by}: one of {', '.join(SELECT_BY)}")
        self.run = RunDir(cfg.output)
        self.acc = acc = make_accelerator(cfg)
        self.main = acc.is_main_process
        # one run per folder: the main process holds its lock until close() (or the process ends)
        self.lock = lock_folder(self.run.path) if self.main else None
        try:
            self._setup(cfg, resume, splits)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: TrainConfig, resume: bool, splits=None) -> None:
        from accelerate.utils import set_seed

        from eclip.data.dataset import PairDataset, SkipLog
        from eclip.model.tower_cache import training_towers
        from eclip.train.inputs import read_splits, resolve_validation, validation_line
        from eclip.train.setup import build_model, cosine_schedule, group_ids, make_optimizer, pair_loader
        acc = self.acc
        cfg = resolve_validation(with_absolute_paths(cfg))   # config.json then resumes from any directory
        if not resume:
            self.run.check_fresh()
        announce(validation_line(cfg), self.main)   # the run's first line
        set_seed(cfg.seed)
        model = build_model(cfg)
        model.towers = training_towers(model.clip, cfg.tower_cache_mb, augmented=bool(cfg.augment),
                                       folder=self.run / "tower-cache" if cfg.tower_cache_disk else None)
        self.train_records, self.val_records = splits or read_splits(cfg)
        self.cfg = cfg
        # EntityCLIP never trains on captions-as-explanations unannounced (plain CLIP reads no explanation)
        self.fallback = sum(1 for r in self.train_records if not r.explanation) \
            if model.experts is not None and not hasattr(self.train_records, "group_ids") else None   # streamed: unknown
        self.facts = {"train_pairs": len(self.train_records), "captions_as_explanations": self.fallback}
        if self.fallback:
            announce(f"EntityCLIP: {self.fallback} of {len(self.train_records)} training pairs have no explanation; "
                     "their caption stands in for it" + ("" if cfg.explanations else
                                                          " (no --explanations file was given)"), self.main)
        acc.wait_for_everyone()          # every process checked the folder before it is written
        if self.main:
            self.run.write_config(cfg, self.facts)   # on resume too: changed --epochs etc. hold for the next resume
            if resume:
                self.run.clean_state()
        acc.wait_for_everyone()

        self.experts = model.experts is not None
        self.ids = group_ids(self.train_records).to(acc.device)
        self.val_ids = group_ids(self.val_records)
        loader = pair_loader(self.train_records, model, cfg.batch_size, cfg.workers, seed=cfg.seed,
                             augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer, cache_mb=cfg.data_cache_mb)
        self.batches_per_epoch = len(loader)
        self.total_steps = cfg.epochs * math.ceil(self.batches_per_epoch / cfg.grad_accum)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, acc.device.type)
        scheduler = cosine_schedule(optimizer, self.total_steps, cfg.warmup_steps)
        self.val_set = PairDataset(self.val_records, model.preprocess, model.tokenizer)
        if getattr(loader, "per_process", False):   # streamed shards: each process reads its own share
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
            self.loader = loader
        else:
            self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        self.core = acc.unwrap_model(self.model)

        latest = self._restore(resume)
        self.rec = Recorder(self.run.path, self.main, cfg.tensorboard, self.t["step"], self.total_steps)
        self.skiplog = SkipLog(self.run / "skipped.jsonl") if self.main else None
        if self.skiplog is not None and not latest:   # samples without an image or text (shards, parquet)
            for s in getattr(self.train_records, "skipped", []):
                self.skiplog.write(**s.to_log())
        self.start = time.perf_counter() - self.t["elapsed_s"]
        self._reset_window(self.t.get("window"))   # a resume inside a logging window continues that window
        where = f"from step {self.t['step']}" if latest else "from the start"
        validating = f"validating on {len(self.val_records)} pairs" if self.val_records else "no validation"
        announce(f"training {len(self.train_records)} pairs ({self.batches_per_epoch} batches of {cfg.batch_size} "
                 f"per epoch, {self.total_steps} optimizer steps) on {acc.num_processes} process(es), "
                 f"{acc.device.type}, {cfg.precision}, {'EntityCLIP' if self.experts else 'plain CLIP'}; "
                 f"{where}; {validating}", self.main)
        if message := self.core.token_note():
            announce(message, self.main)
        self.core.token_note_given = True            # said here, on the main process only

    def _restore(self, resume: bool):
        """Trainer record (step, epoch, best so far, ...) and, when resuming, the last saved state."""
        self.t = {"step": 0, "epoch": 0, "batch": 0, "best_rsum": None, "best_loss": None, "best_epoch": None,
                  "best_step": None,
                  "val": None, "samples": 0, "elapsed_s": 0.0, "log_bytes": 0, "skipped_bytes": 0,
                  "skipped_train": [], "skipped_val": []}
        latest = self.run.latest_state() if resume else None
        if latest:
            self.acc.load_state(str(latest[0]))
            self.t.update(latest[1])
        if resume and self.main:
            self.run.rewind(self.t)
        return latest

    # ---- the loop ----
    def fit(self) -> dict:
        for epoch in range(self.t["epoch"], self.cfg.epochs):
            self._epoch(epoch)
            self.t["epoch"], self.t["batch"] = epoch + 1, 0
            last = epoch + 1 == self.cfg.epochs
            if (epoch + 1) % self.cfg.val_frequency == 0 or last:
                self._validate(epoch + 1)
            if (epoch + 1) % self.cfg.save_frequency == 0 or last:
                self._save()
        return self._summary()

    def _epoch(self, epoch: int) -> None:
        acc, cfg, t = self.acc, self.cfg, self.t
        self.loader.set_epoch(epoch)
        start = t["batch"]
        batches = acc.skip_first_batches(self.loader, start) if start else self.loader
        self.model.train()
        for i, batch in enumerate(batches, start=start):
            batch, skipped = common_batch(acc, batch)
            self._skipped(skipped, self.train_records, "skipped_train")
            if batch is None:
                continue
            lr = self.scheduler.get_last_lr()[0]
            generator = negatives_generator(cfg.seed, epoch * self.batches_per_epoch + i)
            with acc.accumulate(self.model):
                out = forward_backward(acc, self.model, batch, self.ids[batch["indices"]], generator, self.experts,
                                       cfg.accum_freq)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            self._track(out, len(batch["indices"]) * acc.num_processes)
            if not acc.sync_gradients:
                continue
            clamp_logit_scale(self.core)
            t["step"] += 1
            t["batch"] = i + 1
            last = i + 1 == self.batches_per_epoch
            self.rec.update(t["step"], epoch, cfg.epochs, loss=float(out["loss"].detach()), lr=lr,
                            sps=self._pairs_per_s(), skipped=len(t["skipped_train"]))
            if t["step"] % cfg.log_every == 0 or last:
                self._log(epoch, lr)
            if last:
                break     # the epoch's end validates and saves
            if cfg.eval_every and t["step"] % cfg.eval_every == 0:
                self._validate(epoch + 1)
            if cfg.save_every and t["step"] % cfg.save_every == 0:
                self._save()

    # ---- numbers ----
    def _reset_window(self, saved: dict | None = None) -> None:
        self.window = {k: 0.0 for k in LOSSES}
        self.window_batches, self.window_pairs, self.window_start = 0, 0, time.perf_counter()
        if saved:
            for k, v in saved["sums"].items():
                self.window[k] = torch.tensor(v, dtype=torch.float32, device=self.acc.device)
            self.window_batches, self.window_pairs = saved["batches"], saved["pairs"]
            self.window_start -= saved["seconds"]

    def _window_state(self) -> dict:
        """The logging window so far, for the saved state: the losses summed over its batches (the
        mean over processes, which is what _log reduces them to), its batch and pair counts, its time.
        Float32 sums go through JSON exactly, so a resumed run logs the same numbers."""
        keys = [k for k in LOSSES if torch.is_tensor(self.window[k])]
        sums = self.acc.reduce(torch.stack([self.window[k] for k in keys]), "mean").tolist() if keys else []
        return {"sums": dict(zip(keys, sums)), "batches": self.window_batches, "pairs": self.window_pairs,
                "seconds": time.perf_counter() - self.window_start}

    def _track(self, out: dict, pairs: int) -> None:
        for k in LOSSES:
            if k in out:
                self.window[k] = self.window[k] + out[k].detach().float()
        self.window_batches += 1
        self.window_pairs += pairs
        self.t["samples"] += pairs

    def _pairs_per_s(self) -> float:
        return self.window_pairs / max(1e-9, time.perf_counter() - self.window_start)

    def _log(self, epoch: int, lr: float) -> None:
        keys = [k for k in LOSSES if torch.is_tensor(self.window[k])]
        means = self.acc.reduce(torch.stack([self.window[k] for k in keys]), "mean") / self.window_batches
        line = {"step": self.t["step"], "epoch": epoch + 1, "lr": lr, **dict(zip(keys, means.tolist())),
                "logit_scale": float(self.core.logit_scale.detach()), "pairs_per_s": self._pairs_per_s(),
                "skipped": len(self.t["skipped_train"]), "elapsed_s": time.perf_counter() - self.start}
        self.rec.write("train", line)
        self._reset_window()

    def _skipped(self, items, records, key: str) -> None:
        """Unreadable images: listed once in skipped.jsonl (the first time they are met), counted."""
        seen = set(self.t[key])
        new = sorted({int(i): r for i, r in items if int(i) not in seen}.items())
        if new:
            self.t[key] = sorted(seen | {i for i, _ in new})
            if self.skiplog is not None:
                self.skiplog.write_skipped(new, records)

    # ---- validation and saving ----
    def _validate(self, epoch: int) -> None:
        from eclip.checkpoint import save_checkpoint
        from eclip.train.rundir import base_model
        from eclip.train.validate import validate
        cfg, t = self.cfg, self.t
        if cfg.no_val:
            return     # _save writes best.safetensors as the last model
        metrics, skipped = validate(self.acc, self.model, self.val_set, self.val_ids,
                                    max(1, cfg.batch_size // self.acc.num_processes), cfg.workers,
                                    loss_chunk=2 * cfg.batch_size)
        self._skipped(skipped, self.val_records, "skipped_val")
        if metrics is None:
            announce(f"step {t['step']}: no readable validation image; nothing to compare", self.main)
            return
        values = {"step": t["step"], "epoch": epoch, **metrics}
        if cfg.select_by == "val-loss":
            best = t["best_step"] is None or metrics["val_loss"] < t["best_loss"]
        else:
            best = t["best_step"] is None or metrics["rsum"] > t["best_rsum"]
        t["val"] = values
        if best:
            t["best_rsum"], t["best_loss"] = metrics["rsum"], metrics["val_loss"]
            t["best_epoch"], t["best_step"] = epoch, t["step"]
            if self.main:
                save_checkpoint(self.core, self.run / "best.safetensors",
                                extra={"step": t["step"], "epoch": epoch, "val_rsum": metrics["rsum"],
                                       "val_loss": metrics["val_loss"], "select_by": cfg.select_by,
                                       "base_model": base_model(cfg)})
        self.rec.validation(values, best)

    def _save(self) -> None:
        from eclip.atomic import same_file
        from eclip.checkpoint import save_checkpoint
        from eclip.train.rundir import base_model
        t = self.t
        if self.cfg.no_val:     # no validation: the best model is the last
            t["best_epoch"], t["best_step"] = t["epoch"], t["step"]
        if self.main:
            last = save_checkpoint(self.core, self.run / "last.safetensors",
                                   extra={"step": t["step"], "epoch": t["epoch"], "base_model": base_model(self.cfg)})
            if self.cfg.no_val:     # the same file, not written twice (a ViT-L is 1.7 GB)
                same_file(last, self.run / "best.safetensors")
            t["log_bytes"] = self.rec.log_bytes()
            t["skipped_bytes"] = (self.run / "skipped.jsonl").stat().st_size
        t["elapsed_s"] = time.perf_counter() - self.start
        t["window"] = self._window_state()
        self.run.save_state(self.acc, t)

    def _summary(self) -> dict:
        t, run = self.t, self.run
        summary = {
            "run_dir": str(run.path), "select_by": self.cfg.select_by, "best_val_rsum": t["best_rsum"],
            "best_val_loss": t.get("best_loss"), "best_epoch": t["best_epoch"],
            "best_step": t["best_step"], "last_val": t["val"], "epochs": self.cfg.epochs, "steps": t["step"],
            "pairs_seen": t["samples"], "skipped_images": len(t["skipped_train"]) + len(t["skipped_val"]),
            "elapsed_s": round(time.perf_counter() - self.start, 2),
            "best_checkpoint": str(run / "best.safetensors"), "last_checkpoint": str(run / "last.safetensors"),
            "log": str(run / "log.jsonl"), "skipped_log": str(run / "skipped.jsonl"), "curves": None,
            **self.facts,
        }
        if self.main:
            self.rec.close()
            curves = plot_curves(run / "log.jsonl", run / "curves.png")
            summary["curves"] = str(curves) if curves else None
            from eclip.atomic import write_text
            write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        if getattr(self, "rec", None) is not None:
            self.rec.close()
        if getattr(self, "skiplog", None) is not None:
            self.skiplog.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
