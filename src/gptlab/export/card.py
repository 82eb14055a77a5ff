"""The model card (README.md) of an exported folder: what the model is, what it saw, how it scores.

Everything comes from the run directory: config.toml (architecture), the checkpoint's
checkpoint.json (step, tokens seen, validation loss), the data folder's meta.json when it
is still reachable (sources and token counts), summary.json and eval.json when present.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptlab.config import Config
from gptlab.model.blocks import block_label
from gptlab.tokenizer.chat import has_chat_tokens

# train.optimizer as a reader knows it
OPTIMIZERS = {"adamw": "AdamW", "muon": "Muon on the blocks' matrices and AdamW on the rest,"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def model_card(*, name: str, family, cfg: Config, tokenizer, info: dict, run_dir: Path, parameters: int,
               start: int | None, repo_id: str | None = None) -> str:
    m = cfg.model
    where = repo_id or "PATH_OR_REPO"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [gptlab, {family.model_type}, text-generation]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {parameters:,}-parameter language model trained from scratch with gptlab, "
        f"exported as a Hugging Face `{family.architecture}` (no custom code).",
        "",
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        'inputs = tokenizer("Once upon a time", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=50, do_sample=True, temperature=0.8)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
    ]
    if start is not None:
        lines += [f"The tokenizer puts `{tokenizer.decode([start])}` before every text (as every training document started); "
                  "`add_special_tokens=False` gives the bare ids.", ""]
    if has_chat_tokens(tokenizer):
        lines += _chat_section(where)
    lines += [
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {parameters:,} |",
        f"| layers x width | {m.n_layer} x {m.d_model} |",
        f"| attention heads | {m.n_head} query, {m.kv_heads} key/value, size {m.head_dim} |",
        f"| MLP | {m.mlp}, hidden {m.ff_dim} |",
        f"| block | {block_label(m.block).replace('|', '&#124;')} |",
        f"| norm | {m.norm}, eps {m.norm_eps:g} |",
        f"| positions | {m.position}" + (f" (theta {m.rope_theta:g})" if m.position == "rope" else "") + " |",
        f"| context | {m.context_length} tokens |",
        f"| vocabulary | {m.vocab_size:,} ({tokenizer.kind} tokenizer) |",
        f"| biases | {'yes' if m.bias else 'no'} |",
        f"| tied embeddings | {'yes' if m.tie_embeddings else 'no'} |",
        "",
    ]
    lines += _data_section(cfg) + _training_section(cfg, info, run_dir) + _eval_section(run_dir)
    return "\n".join(lines).rstrip() + "\n"


def _chat_section(where: str) -> list[str]:
    return [
        "## Chat",
        "",
        "A chat model: its tokenizer carries the chat template it was fine-tuned with "
        "(`<|role|>content<|end|>` per message, a reply asked for with `<|assistant|>`).",
        "",
        "```python",
        'messages = [{"role": "user", "content": "Write a story about a cat."}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        "out = model.generate(**inputs, max_new_tokens=200)",
        'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "A reply ends at `<|end|>` (among generation_config.json's `eos_token_id`). With llama.cpp, give the GGUF "
        "`--jinja` so that its own template is used rather than a guessed one.",
        "",
    ]


def _public_name(path: str) -> str:
    """A source as a published card names it: a Hub dataset as is, a local file by its name only (its folders
    are the author's machine, not the model's description)."""
    return path if path.startswith("hf:") else Path(path).name


def _data_section(cfg: Config) -> list[str]:
    meta = _read_json(Path(cfg.train.data_dir) / "meta.json")
    lines = ["## Data", ""]
    if meta is None:
        sources = [_public_name(s.label or s.path) for s in cfg.data.sources]
        lines.append(f"Trained on: {', '.join(sources)}." if sources else "The training data's description was not available at export.")
        return lines + [""]
    lines += ["| source | role | documents | tokens |", "|---|---|---|---|"]
    for s in meta.get("sources", []):
        docs = sum(v.get("documents", 0) for v in s.values() if isinstance(v, dict))
        tokens = sum(v.get("tokens", 0) for v in s.values() if isinstance(v, dict))
        lines.append(f"| {_public_name(s.get('label') or s.get('path', '?'))} | {s.get('role', '')} | {docs:,} | {tokens:,} |")
    splits = meta.get("splits", {})
    parts = [f"{name} {split.get('tokens', 0):,} tokens" for name, split in splits.items()]
    lines += ["", f"Prepared data: {', '.join(parts)}; documents end with EOS"
              + (" and start with BOS" if meta.get("add_bos") else "") + ".", ""]
    return lines


def _training_section(cfg: Config, info: dict, run_dir: Path) -> list[str]:
    t = cfg.train
    lines = ["## Training", ""]
    tokens = info.get("tokens")
    if info.get("imported_from"):
        lines.append(f"Imported from `{info['imported_from']}`" + (f", then trained for {tokens:,} tokens." if tokens else "."))
    else:
        lines.append(f"{info.get('step', 0):,} steps, {tokens or 0:,} tokens seen "
                     f"(batch {t.batch_size} x {t.grad_accum} x {cfg.model.context_length} tokens), "
                     f"{OPTIMIZERS[t.optimizer]} lr {t.lr:g} ({t.schedule}), weight decay {t.weight_decay:g}.")
    if info.get("val_loss") is not None:
        lines.append(f"Validation loss at this checkpoint: {info['val_loss']:.4f}.")
    summary = _read_json(run_dir / "summary.json")
    if summary and summary.get("elapsed"):
        lines.append(f"Training took {summary['elapsed'] / 60:.1f} minutes on {summary.get('device', '?')} ({summary.get('precision', '?')}).")
    return lines + [""]


def _eval_section(run_dir: Path) -> list[str]:
    report = _read_json(run_dir / "eval.json")
    if not report:
        return []
    lines = ["## Evaluation", "", f"From `gptlab eval` (checkpoint {report.get('checkpoint', '?')}).", ""]
    datasets = report.get("datasets") or []
    if datasets:
        lines += ["| data | loss | perplexity | bits per byte |", "|---|---|---|---|"]
        for d in datasets:
            lines.append(f"| {d.get('name') or d.get('path', '?')} | {_num(d.get('loss'))} | {_num(d.get('perplexity'), 2)} | {_num(d.get('bpb'))} |")
        lines.append("")
    hs = report.get("hellaswag")
    if hs:
        lines += [f"HellaSwag ({hs.get('items', '?')} items): acc {_num(hs.get('acc'))}, acc_norm {_num(hs.get('acc_norm'))}.", ""]
    return lines


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"
