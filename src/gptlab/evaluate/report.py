"""`gptlab eval RUN`: every measurement of one checkpoint, as RUN/eval.json and RUN/eval.md.

    datasets    loss, perplexity, bits per byte, teacher-forced top-k accuracy (overall and by how
                many tokens of context the prediction had) on each --data path, or on the run's own
                validation split when none is given
                a prepared folder of conversations (a chat run's own) is scored on the assistant's tokens
    conversations  --eval.conversations FILE: loss and bits per byte of the assistant's tokens (evaluate/chat.py),
                listed with the datasets
    hellaswag   acc, acc_norm, acc_per_token (see hellaswag.py)
    instructions  --eval.instructions FILE: how often a generated reply follows its instruction
                (evaluate/instructions.py), sampled with the command's [sample] settings (not the run's), so
                two runs evaluated with the same flags are asked alike
    samples     a continuation of each of a fixed set of prompts, with a fixed seed
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from gptlab.config import EvalConfig, SampleConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json, atomic_write_text

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, *, progress: bool = True, write: bool = True,
                 sample: SampleConfig | None = None) -> dict:
    """Evaluate a run's best (or last) checkpoint; writes RUN/eval.json and RUN/eval.md; returns the report.
    `sample`: how replies to cfg.instructions are drawn (default SampleConfig())."""
    from gptlab.device import pick_device, pick_precision, set_threads
    from gptlab.evaluate.chat import chat_renderer, evaluate_conversation_file, normalize_conversations
    from gptlab.evaluate.hellaswag import load_hellaswag
    from gptlab.evaluate.instructions import instruction_following, read_instructions
    from gptlab.runs import find_checkpoint, load_run, read_info, run_dir_of

    cfg = cfg or EvalConfig()
    device = pick_device(cfg.device)
    threads = set_threads(cfg.threads) if device.type == "cpu" else None
    precision = pick_precision(cfg.precision, device)
    checkpoint = find_checkpoint(run_dir, cfg.checkpoint)
    run = run_dir_of(checkpoint)
    model, tokenizer, run_cfg = load_run(checkpoint, device=device)
    info = read_info(checkpoint)
    common = dict(batch_size=cfg.batch_size, topk=cfg.topk, precision=precision, progress=progress)
    started = time.perf_counter()
    report: dict = {
        "run": str(run),
        "checkpoint": checkpoint.name,
        "which": cfg.checkpoint,
        "step": info.get("step"),
        "tokens_seen": info.get("tokens"),
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "settings": {"device": device.type, "threads": threads, "precision": precision, "batch_size": cfg.batch_size,
                     "context_length": run_cfg.model.context_length, "max_tokens": cfg.max_tokens},
        "datasets": [],
    }
    # bad files and a run that cannot take them stop us before any scoring
    hellaswag = load_hellaswag(cfg.hellaswag, cfg.limit) if cfg.hellaswag else None
    instructions = read_instructions(cfg.instructions, cfg.instruction_limit) if cfg.instructions else None
    as_chat = {"auto": None, "chat": True, "text": False}[cfg.chat_format]
    if cfg.conversations or (cfg.instructions and as_chat):  # the chat format asked of a run without chat tokens
        chat_renderer(tokenizer, as_chat if cfg.conversations else True, f"the run {run}")
    for path in cfg.data or _own_validation_split(run_cfg, cfg, report, progress):
        report["datasets"].append(_evaluate_dataset(model, tokenizer, run_cfg, cfg, str(path), common))
    if cfg.conversations:
        report["datasets"].append(evaluate_conversation_file(
            model, tokenizer, cfg.conversations, normalize=run_cfg.text if cfg.normalize else None, as_chat=as_chat,
            data=run_cfg.data, what=f"the run {run}", **common))
    if hellaswag is not None:
        report["hellaswag"] = _hellaswag(model, tokenizer, run_cfg, hellaswag, cfg, precision, progress)
    if instructions is not None:
        instructions = normalize_conversations(instructions, run_cfg.text if cfg.normalize else None)
        report["instructions"] = instruction_following(model, tokenizer, instructions, sample or SampleConfig(),
                                                       as_chat, data=run_cfg.data, batch_size=cfg.batch_size,
                                                       name=cfg.instructions)
    if cfg.sample_tokens and cfg.prompts:
        report["samples"] = _samples(model, tokenizer, run_cfg, cfg)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if write:
        atomic_write_json(run / EVAL_JSON, report)
        atomic_write_text(run / EVAL_MD, format_report(report))
    return report


def _own_validation_split(run_cfg, cfg: EvalConfig, report: dict, progress: bool) -> list[str]:
    """[the run's data folder]; [] with a note when it is not here and HellaSwag is what was asked for."""
    data_dir = Path(run_cfg.train.data_dir)
    if (data_dir / "meta.json").is_file():
        return [str(data_dir)]
    if cfg.hellaswag or cfg.conversations or cfg.instructions:
        report["notes"] = [f"the run's data folder {data_dir} is not here: its validation split was not scored"]
        if progress:
            print(f"note: {report['notes'][0]}", file=sys.stderr)
        return []
    raise GptlabError(f"no --data given, and the run's data folder {data_dir} is not here to take its validation split from",
                      "give --data FILE_OR_DIR (a text file or a prepared data folder)")


def _evaluate_dataset(model, tokenizer, run_cfg, cfg: EvalConfig, path: str, common: dict) -> dict:
    from gptlab.data import load_meta
    from gptlab.data.conversations import is_chat_data
    from gptlab.evaluate.chat import evaluate_conversation_split
    from gptlab.evaluate.texts import evaluate_data

    if not path.startswith("hf:") and not Path(path).exists() and not any(c in path for c in "*?["):
        raise GptlabError(f"evaluation data not found: {path}", "give a text file, a folder, a glob or a prepared data folder")
    if (Path(path) / "meta.json").is_file() and is_chat_data(load_meta(path)):  # conversations: the assistant's tokens
        return evaluate_conversation_split(model, tokenizer, path, cfg.split, **common)
    return evaluate_data(model, tokenizer, _as_prepared(path, run_cfg), split=cfg.split,
                         text=run_cfg.text if cfg.normalize else None, add_bos=run_cfg.data.add_bos,
                         add_eos=run_cfg.data.add_eos, max_tokens=cfg.max_tokens, **common)


def _as_prepared(path: str, run_cfg):
    """One of the run's own [[data.sources]] (or val_sources) is read with its settings (documents, separator,
    text_field...), as `data prepare` read it; any other path as a source with the default settings."""
    if (Path(path) / "meta.json").is_file() or path.startswith("hf:"):
        return path
    for source in run_cfg.data.sources + run_cfg.data.val_sources:
        if not source.path.startswith("hf:") and os.path.abspath(source.path) == os.path.abspath(path):
            return source.model_copy(update={"label": None, "path": path})
    return path


def _hellaswag(model, tokenizer, run_cfg, items: list, cfg: EvalConfig, precision: str, progress: bool) -> dict:
    from gptlab.evaluate.hellaswag import score_hellaswag

    result = score_hellaswag(model, tokenizer, items, batch_size=cfg.batch_size, precision=precision, progress=progress,
                             data=run_cfg.data)
    result.pop("logprobs")
    return {"source": cfg.hellaswag, **result}


def _samples(model, tokenizer, run_cfg, cfg: EvalConfig) -> list[dict]:
    from gptlab.generate import generate

    sample_cfg = run_cfg.sample.model_copy(update={"prompts": cfg.prompts, "max_new_tokens": cfg.sample_tokens,
                                                   "num_samples": 1, "best_of": 1})
    texts = generate(model, tokenizer, list(cfg.prompts), sample_cfg, data=run_cfg.data)
    return [{"prompt": p, "text": t} for p, t in zip(cfg.prompts, texts)]


# --------------------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def format_report(report: dict) -> str:
    """eval.md: bits per byte first, then HellaSwag, top-k by context size, and the samples."""
    lines = [f"# Evaluation of {report['run']}", "",
             f"Checkpoint {report['checkpoint']} ({report['which']}), step {report['step']:,}, "
             f"{report['tokens_seen']:,} tokens seen, {report['parameters']:,} parameters. "
             f"{report['settings']['device']}, {report['settings']['precision']}.", ""]
    lines += [f"Note: {note}." for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    ks = [k for k in report["datasets"][0]["topk"]] if report["datasets"] else []
    if report["datasets"]:
        lines += ["| data | bits per byte | loss | perplexity | tokens | bytes | " + " | ".join(f"top-{k}" for k in ks) + " |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(ks)]
    for d in report["datasets"]:
        bytes_ = f"{d['bytes']:,}" + (" (est.)" if d.get("bytes_estimated") else "") if d["bytes"] else ""
        lines.append(f"| {_data_name(d)} | **{_num(d['bpb'])}** | {_num(d['loss'])} | {_num(d['perplexity'], 2)} | "
                     f"{d['tokens']:,} | {bytes_} | " + " | ".join(_pct(d["topk"][k]) for k in ks) + " |")
    if "hellaswag" in report:
        h = report["hellaswag"]
        lines += ["", f"## HellaSwag ({h['items']:,} items, {h['source']})", "",
                  "| acc | acc_norm (per character) | acc per token | items/s |", "|---:|---:|---:|---:|",
                  f"| {_pct(h['acc'])} | {_pct(h['acc_norm'])} | {_pct(h['acc_per_token'])} | {h['items_per_s']} |",
                  "", "Chance is 25%."]
    if "instructions" in report:
        lines += _instruction_lines(report["instructions"])
    for d in report["datasets"]:
        if d["topk_by_context"]:
            lines += ["", f"## Top-k accuracy by tokens of context ({d['name']})", "",
                      "| context | tokens | " + " | ".join(f"top-{k}" for k in ks) + " |", "|---|---:|" + "---:|" * len(ks)]
            for row in d["topk_by_context"]:
                lines.append(f"| {row['context']} | {row['tokens']:,} | " + " | ".join(_pct(row[f"top{k}"]) for k in ks) + " |")
    if report.get("samples"):
        lines += ["", "## Samples", ""]
        for s in report["samples"]:
            lines += [f"**{json.dumps(s['prompt'], ensure_ascii=False)}**", "", "```text", s["prompt"] + s["text"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _data_name(d: dict) -> str:
    if d.get("kind") != "conversations":
        return d["name"]
    return f"{d['name']} (assistant tokens of {d['conversations']:,} conversations, {d['format']} format)"


def _instruction_lines(r: dict) -> list[str]:
    s = r["sampling"]
    lines = ["", f"## Instruction following ({r['instructions']:,} instructions, {r['source']})", "",
             "| follows all | name present | all words used | each word used | references | reply words |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| **{_pct(r['rate'])}** | {_pct(r['rates']['name'])} | {_pct(r['rates']['words'])} | "
             f"{_pct(r['rates']['word'])} | {_pct(r['reference_rate'])} | {r['reply_words']:.0f} |", "",
             f"Prompted in the {r['format']} format; sampled at temperature {s['temperature']}, top-k {s['top_k']}, "
             f"top-p {s['top_p']}, up to {s['max_new_tokens']} tokens, seed {s['seed']}. A word counts when it is in "
             "the reply as a whole word, any case; \"references\" is the rate of the reference replies themselves."]
    for e in r["examples"]:
        verdict = "follows" if e["ok"] else "misses " + ", ".join(repr(m) for m in e["missing"])
        lines += ["", f"**{json.dumps(e['instruction'], ensure_ascii=False)}** ({verdict})", "", "```text", e["reply"], "```"]
    return lines


def format_summary(report: dict) -> str:
    """The lines `gptlab eval` prints: one per dataset, HellaSwag, where the report went."""
    lines = []
    for d in report["datasets"]:
        bpb = f"{d['bpb']:.4f} bits/byte, " if d["bpb"] is not None else ""
        lines.append(f"{_data_name(d)}: {bpb}loss {d['loss']:.4f}, perplexity {d['perplexity']:.2f}, "
                     + ", ".join(f"top-{k} {100 * v:.1f}%" for k, v in d["topk"].items()) + f" ({d['tokens']:,} tokens)")
    if "hellaswag" in report:
        h = report["hellaswag"]
        lines.append(f"HellaSwag ({h['items']:,} items): acc {100 * h['acc']:.1f}%, acc_norm {100 * h['acc_norm']:.1f}% "
                     f"({h['items_per_s']} items/s)")
    if "instructions" in report:
        r = report["instructions"]
        lines.append(f"instructions ({r['instructions']:,}, {r['format']} format): {100 * r['rate']:.1f}% follow all "
                     f"(name {_pct(r['rates']['name']) or '-'}, all words {_pct(r['rates']['words']) or '-'})")
    return "\n".join([*lines, f"report: {report['run']}/eval.md, {report['run']}/eval.json"])
