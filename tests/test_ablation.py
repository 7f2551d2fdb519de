"""bench/bench_ablation.py: the photographs column is added to earlier results and shown per seed."""
import json
import runpy
from pathlib import Path

ABLATION = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "bench_ablation.py"))


def test_backfill_adds_the_photographs_to_trained_rows_only_and_keeps_the_rest(tmp_path):
    results = tmp_path / "results.jsonl"
    old = [{"row": "untrained (random init)", "seed": 42, "t2i_r1": 0.5},
           {"row": "CLIP fine-tuned (--no-experts)", "seed": 42, "t2i_r1": 62.1},
           {"row": "EntityCLIP (a) LLM explanations", "seed": 42, "t2i_r1": 70.0,
            "photos_first_test": 7, "photos_first_val": 8, "n_photos": 8}]
    results.write_text("".join(json.dumps(r) + "\n" for r in old))
    asked = []

    def photos_first(record):
        asked.append((record["row"], record["seed"]))
        return {"photos_first_test": 8, "photos_first_val": 6, "n_photos": 8}

    assert ABLATION["backfill"](results, photos_first) == 1
    assert asked == [("CLIP fine-tuned (--no-experts)", 42)]
    now = [json.loads(line) for line in results.read_text().splitlines()]
    assert now[0] == old[0] and now[2] == old[2]
    assert now[1] == {**old[1], "photos_first_test": 8, "photos_first_val": 6, "n_photos": 8}
    assert ABLATION["backfill"](results, photos_first) == 0 and len(asked) == 1     # nothing left to add


def test_table_shows_the_photographs_per_seed_test_then_val():
    rows = [{"row": "EntityCLIP (a) LLM explanations", "seed": s, "t2i_r1": t, "i2t_r1": t, "rsum": 5 * t,
             "best_t2i_r1": t, "n_images": 203, "photos_first_test": p, "photos_first_val": 8, "n_photos": 8}
            for s, t, p in ((42, 70.0, 7), (43, 58.6, 8))]
    rows.append({"row": "untrained (random init)", "seed": 42, "t2i_r1": 0.5, "i2t_r1": 0.5, "rsum": 17.2,
                 "best_t2i_r1": 0.5, "n_images": 203})
    text = ABLATION["table"](rows, [42, 43], {"views": 8, "epochs": 60, "batch_size": 32, "lr": 2e-3,
                                              "warmup_steps": 100, "weight_decay": 0.1, "model": "tiny-vit.json"},
                             "test machine", 60, False)
    line = next(x for x in text.splitlines() if x.startswith("| EntityCLIP (a)"))
    assert "| 70.0, 58.6 | 7 (8), 8 (8) of 8 |" in line
    untrained = next(x for x in text.splitlines() if x.startswith("| untrained"))
    assert "| 0.5 |  |" in untrained          # no photographs column for the untrained row
