"""The evaluate stage: how good a checkpoint is, and which run is better.

    evaluate_run(run_dir, EvalConfig) -> report        RUN/eval.json + RUN/eval.md (`gptlab eval`)
    evaluate_text(model, tokenizer, text) -> dict       loss, perplexity, bits per byte, top-k accuracy
    evaluate_source(model, tokenizer, path, ...)        ...of a text source, document by document
    evaluate_split(model, tokenizer, data_dir, split)   ...of a prepared split
    score_stream(model, tokens, start_id) -> StreamScore   the windowed scorer under all three
    load_hellaswag(path | "hf:Rowan/hellaswag", limit) / score_hellaswag(model, tokenizer, items)
    evaluate_conversations(model, tokenizer, conversations)   loss and bits per byte of the assistant's tokens
    follows(text, constraints) / instruction_following(model, tokenizer, instructions, sample_cfg)
                                                       does a reply do what its instruction asked
    compare_runs(run_dirs, out_dir, x="tokens"|"time")  compare.md + compare.png (`gptlab compare`)
    plot_run(run_dir)                                  RUN/plot.png (`gptlab plot`)
"""

from gptlab.evaluate.chat import evaluate_conversations
from gptlab.evaluate.compare import compare_runs, plot_run, read_metrics, run_summary
from gptlab.evaluate.hellaswag import HellaSwagItem, load_hellaswag, score_hellaswag
from gptlab.evaluate.instructions import follows, instruction_following, read_instructions
from gptlab.evaluate.report import evaluate_run, format_report, format_summary
from gptlab.evaluate.scoring import StreamScore, score_stream
from gptlab.evaluate.texts import (
    evaluate_data,
    evaluate_source,
    evaluate_split,
    evaluate_text,
)

__all__ = [
    "HellaSwagItem",
    "StreamScore",
    "compare_runs",
    "evaluate_conversations",
    "evaluate_data",
    "evaluate_run",
    "evaluate_source",
    "evaluate_split",
    "evaluate_text",
    "format_report",
    "follows",
    "format_summary",
    "instruction_following",
    "load_hellaswag",
    "plot_run",
    "read_instructions",
    "read_metrics",
    "run_summary",
    "score_hellaswag",
    "score_stream",
]
