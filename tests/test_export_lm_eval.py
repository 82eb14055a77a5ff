"""lm-evaluation-harness on an exported folder agrees with gptlab's HellaSwag on the same items.

Runs only where `lm_eval` is installed. The real task reads Rowan/hellaswag from the Hub; here the
same task (lm-eval's own hellaswag process_docs, prompt, choices and metrics) reads a local JSONL, so

    lm_eval --model hf --model_args pretrained=DIR --tasks hellaswag --limit 20

is exercised end to end through lm-eval's Python API, offline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval")
huggingface = pytest.importorskip("lm_eval.models.huggingface")  # needs accelerate too

ITEMS = [
    ("Cooking", "A man puts a pan on the stove.", "he", ["cracks an egg into it.", "sings to the cat.", "drives a red car.", "reads a [title] book."], 0),
    ("Playing ball", "Lily found a red ball in the park.", "she", ["ran to show her mom.", "ate the ball.", "was very happy.", "flew to the moon."], 2),
    ("Baking", "Sue wanted to bake a cake.", "her dad", ["helped her mix the flour.", "swam in the sea.", "drove it around the room.", "sang songs by the tree."], 0),
    ("Fishing", "A small fish swam in the blue sea.", "it", ["saw a shiny shell.", "laughed at the dog.", "baked a cake.", "played in the sun."], 1),
    ("Toys", "Ben had a toy car.", "he", ["drove it around the room and laughed.", "found a shell.", "mixed the eggs.", "sang a song."], 3),
    ("Friends", "The dog and the bird were friends.", "every morning they", ["sang songs by the big tree.", "baked a cake.", "drove a car.", "swam home."], 0),
]


def _write_task(folder, data):
    """lm-eval's hellaswag task, reading `data` instead of the Hub dataset."""
    folder.mkdir()
    (folder / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (folder / "hellaswag_local.yaml").write_text(f"""task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


def test_lm_eval_hellaswag_matches_gptlab(make_export_run, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gptlab.evaluate import load_hellaswag, score_hellaswag
    from gptlab.export import export_hf
    from gptlab.runs import load_run

    run = make_export_run("llama-gqa-untied", norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, tie_embeddings=False)
    export_hf(run, tmp_path / "hf")
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps({"activity_label": a, "ctx_a": ca, "ctx_b": cb, "endings": e, "label": y}) + "\n"
                            for a, ca, cb, e, y in ITEMS))
    _write_task(tmp_path / "tasks", data)

    lm = huggingface.HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag_local"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    theirs = out["results"]["hellaswag_local"]
    samples = sorted(out["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    their_logprobs = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])

    model, tokenizer, _ = load_run(run)
    ours = score_hellaswag(model, tokenizer, load_hellaswag(data))
    np.testing.assert_allclose(their_logprobs, ours["logprobs"], atol=1e-4, rtol=0)
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
