"""The ablation's seed spread, and whether one demo run's EntityCLIP - --no-experts gap lies inside it.

bench/bench_ablation.py writes SPREAD_FILE (test text->image R@1 per seed of the two rows the demo
trains, and the settings they were trained with); examples/demo.py reads it to print, under its
table, where its own run falls. One place for the figures, so the README, the demo and the ablation
cannot disagree.

The rule: the demo trains both models with the same seed, so its gap is compared with the ablation's
per-seed gaps (EntityCLIP minus --no-experts, the same seed each). It is inside the seed spread when
it lies within their mean +- 2 sample standard deviations. With 3 seeds that band is wide; it says
whether a run is unusual, not whether EntityCLIP is better.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

SPREAD_FILE = Path(__file__).resolve().parent / "ablation-spread.json"
ROWS = {"EntityCLIP": "EntityCLIP (a) LLM explanations",           # demo name -> ablation row
        "CLIP fine-tuned (--no-experts)": "CLIP fine-tuned (--no-experts)"}
WHY = ("Training figures move with the seed and from machine to machine: CPU kernels round differently "
       "and thousands of steps amplify the difference; the same machine with the same threads repeats them.")


def write_spread(path: Path, rows: list, settings: dict, seeds: list, machine: str) -> dict | None:
    """From the ablation's result records, the per-seed T->I R@1 of the demo's two rows, written whole.
    None (nothing written) unless both rows have every seed."""
    from eclip.atomic import write_text
    per_row = {}
    for demo_name, row in ROWS.items():
        by_seed = {r["seed"]: r["t2i_r1"] for r in rows if r["row"] == row}
        if any(s not in by_seed for s in seeds):
            return None
        per_row[demo_name] = [by_seed[s] for s in seeds]
    spread = {"settings": settings, "seeds": seeds, "t2i_r1": per_row, "machine": machine,
              "written_by": "python bench/bench_ablation.py"}
    write_text(path, json.dumps(spread, indent=2) + "\n")
    return spread


def read_spread(settings: dict, path: Path = SPREAD_FILE) -> dict | None:
    """The recorded spread if it was measured with these demo settings, else None."""
    if not path.is_file():
        return None
    spread = json.loads(path.read_text(encoding="utf-8"))
    return spread if spread.get("settings") == settings else None


def mean_sd(values: list) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread_lines(run_t2i: dict, spread: dict | None) -> list[str]:
    """The lines under the demo's table: this run beside the seed spread, and whether the gap is inside it.
    run_t2i: demo model name -> this run's test T->I R@1."""
    a, b = ROWS
    gap = run_t2i[a] - run_t2i[b]
    if spread is None:
        return [f"{a} - --no-experts in this run: {gap:+.1f} points of T→I R@1 (one run, one machine); "
                "no ablation was recorded for these settings, so there is no seed spread to set it beside.",
                WHY]
    r = spread["t2i_r1"]
    seeds = ", ".join(map(str, spread["seeds"]))
    gaps, m, sd, low, high = gap_band(spread)
    inside = low <= gap <= high
    rows = "; ".join(f"{name} {mean_sd(v)[0]:.1f} ± {mean_sd(v)[1]:.1f}" for name, v in r.items())
    return [f"One run (seed 42) on one machine. The ablation (seeds {seeds}; bench/bench_ablation.py): "
            f"{rows} test T→I R@1.",
            f"{a} - --no-experts in this run: {gap:+.1f} points, "
            f"{'INSIDE' if inside else 'OUTSIDE'} the ablation's seed spread (its per-seed gaps "
            f"{', '.join(f'{g:+.1f}' for g in gaps)}: mean {m:+.1f} ± 2 × {sd:.1f} = {low:+.1f} to {high:+.1f}).",
            WHY]


def gap_band(spread: dict) -> tuple[list, float, float, float, float]:
    """The rule (see the module's docstring): the per-seed gaps, their mean and sd, and the band's ends."""
    a, b = ROWS
    gaps = [x - y for x, y in zip(spread["t2i_r1"][a], spread["t2i_r1"][b])]
    m, sd = mean_sd(gaps)
    return gaps, m, sd, m - 2 * sd, m + 2 * sd
