"""benchmarks/distill_tinystories.py's bookkeeping: a tuned way's setting is picked on the runs' own validation
split (never on the held-out text the table reports), and the RESULT line carries each way's picked score."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("distill_benchmark", REPO / "benchmarks" / "distill_tinystories.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def row(way, name, best_val, held_out, last_val=None):
    return {"way": way, "name": name, "knobs": {}, "best_val_bpb": best_val, "val_bpb": last_val or best_val, "best_step": 100,
            "held_out_bpb": held_out, "steps": 100, "tokens": 1000, "seconds": 10.0, "tokens_per_s": 100.0}


def test_the_setting_is_picked_on_validation_not_on_the_held_out_text():
    bench = load_benchmark()
    rows = [row("real", "real", 1.50, 1.60),
            row("logits", "logits-w0.5-T1", 1.40, 1.55),  # better on validation
            row("logits", "logits-w0.9-T2", 1.45, 1.45)]  # better on the held-out text: must not be picked
    picked = bench.best_per_way(rows)
    assert picked["logits"]["name"] == "logits-w0.5-T1"
    fields = bench.result_fields({"tinystories": rows})
    assert "tinystories_logits_bpb=1.5500" in fields and "tinystories_real_bpb=1.6000" in fields
    # a case without a held-out file reports its score on the real data's validation split, picked the same way
    fields = bench.result_fields({"meditations": [row("real", "real", 2.0, 2.3, last_val=2.3)]})
    assert fields == ["meditations_real_bpb=2.3000"]


def test_the_report_marks_the_picked_setting_and_compares_with_real():
    bench = load_benchmark()
    rows = [row("real", "real", 1.50, 1.60), row("logits", "logits-a", 1.40, 1.55), row("logits", "logits-b", 1.45, 1.45)]
    teacher = {"steps": 1000, "val_bpb": 1.1, "best_val_bpb": 1.1, "best_step": 1000, "held_out_bpb": 1.2}
    text = bench.report("cpu X", {"tinystories": rows}, {"tinystories": teacher})
    picked = next(line for line in text.splitlines() if "logits-a" in line)
    assert "(picked)" in picked and picked.rstrip().endswith("-0.0500 |")
    assert "(picked)" not in next(line for line in text.splitlines() if "logits-b" in line)
