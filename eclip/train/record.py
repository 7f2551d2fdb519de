"""Where a run's numbers go (main process only): log.jsonl, TensorBoard when installed, the
progress bar, and the curves plot at the end."""
from __future__ import annotations

import json
from pathlib import Path

from rich.progress import TextColumn

from eclip.console import note, progress

CURVES = (("loss", "loss"), ("vtc", "VTC"), ("gfm", "GI-ITM"), ("vtc_star", "VTC*"))


class Recorder:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, step: int, total_steps: int):
        self.enabled = enabled
        self.log_path = run_dir / "log.jsonl"
        self.log = open(self.log_path, "a", encoding="utf-8") if enabled else None
        self.writer = _tensorboard(run_dir / "tensorboard", step) if enabled and tensorboard else None
        self.bar = progress(TextColumn("loss {task.fields[loss]:.3f} lr {task.fields[lr]:.1e} "
                                       "{task.fields[sps]:.0f} pairs/s skipped {task.fields[skipped]}"))
        self.bar.disable = self.bar.disable or not enabled
        self.task = self.bar.add_task("train", total=total_steps, completed=step, loss=float("nan"),
                                      lr=0.0, sps=0.0, skipped=0)
        self.bar.start()

    def update(self, step: int, epoch: int, epochs: int, **fields) -> None:
        self.bar.update(self.task, completed=step, description=f"epoch {epoch + 1}/{epochs}", **fields)

    def write(self, kind: str, values: dict) -> None:
        """One line in log.jsonl (flushed: a killed run keeps every line it wrote) and TensorBoard scalars."""
        if not self.enabled:
            return
        self.log.write(json.dumps({"kind": kind, **values}) + "\n")
        self.log.flush()
        if self.writer is not None:
            for key, value in values.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, values["step"])

    def validation(self, values: dict, best: bool) -> None:
        self.write("val", values)
        announce(f"epoch {values['epoch']} step {values['step']}: val rsum {values['rsum']:.1f} "
                 f"(R@1 text->image {values['t2i_r1']:.1f}, image->text {values['i2t_r1']:.1f}), "
                 f"val loss {values['val_loss']:.4f}"
                 + ("  best so far" if best else ""), self.enabled)

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size if self.enabled and self.log_path.exists() else 0

    def close(self) -> None:
        self.bar.stop()
        if self.log is not None:
            self.log.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(folder: Path, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard is optional
        return None
    # purge_step drops events a killed run wrote after its last saved state
    return SummaryWriter(str(folder), purge_step=step or None)


def plot_curves(log_path: Path, out_path: Path) -> Path | None:
    """curves.png: training losses by step (left) and validation recall by step (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from eclip.atomic import atomic_path
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train and not val:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    losses, recall = fig.subplots(1, 2)
    for key, label in CURVES:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            losses.plot(*zip(*points), label=label)
    losses.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    for key, label in (("t2i_r1", "text->image R@1"), ("i2t_r1", "image->text R@1"),
                       ("t2i_r10", "text->image R@10"), ("i2t_r10", "image->text R@10")):
        points = [(r["step"], r[key]) for r in val if key in r]
        if points:
            recall.plot(*zip(*points), marker="o", label=label)
    recall.set(xlabel="optimizer step", ylabel="recall (%)", title="validation")
    for ax in (losses, recall):
        if ax.lines:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out_path


def announce(message: str, enabled: bool) -> None:
    if enabled:
        note(message)
