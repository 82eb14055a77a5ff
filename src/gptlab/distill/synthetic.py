"""Sequence-level knowledge distillation: a teacher writes text from prompts, and that text becomes a student's
training data (AureliusGPT-Torch grew its 89k-token corpus this way with a fine-tuned Llama 3.2 1B).

The teacher is a gptlab run, or a Hugging Face causal LM (a local folder, or `hf:NAME` from the Hub) run
through transformers. The corpus is JSON lines, one record per sample -- {"text", "prompt", "tokens" (the
teacher's tokens in the continuation), "teacher"} -- which a [[data.sources]] entry reads as it is.
Writing goes to OUT.partial and is renamed to OUT when the token budget is reached; an interrupted run
continues where it stopped and produces the file it would have written in one go (batch k is drawn with
seed + k).

With best_of = N > 1 the teacher writes N candidates per prompt (in one batch) and only the best one by a
scorer (gptlab.generate.ranking: the teacher's own log-probability, another model's log-likelihood, or a
user function) is kept; its record gains "score" and "rank_by".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptlab.config import DistillConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json
from gptlab.generate.hf import load_hf_causal_lm, model_kind
from gptlab.generate.ranking import LogprobScorer, best_first


class GptlabTeacher:
    """A gptlab run (or one of its checkpoints) sampled with gptlab's own KV-cache generator."""

    def __init__(self, run: str | Path, device: torch.device):
        from gptlab.runs import load_run

        self.name, self.device = str(run), device
        self.model, self.tokenizer, cfg = load_run(run, device=device)
        self.data = cfg.data  # what its prompts start after, as its documents did

    def continue_prompts(self, prompts: list[str], s: DistillConfig, seed: int, logprobs: bool = False) -> list[tuple]:
        """(continuation, its number of tokens) for each prompt; with logprobs, (continuation, tokens, its mean
        log-probability per token under the teacher, the EOS included)."""
        from gptlab.generate import prompt_ids, sample_tokens

        if s.chat:
            raise GptlabError("--chat needs a teacher with a chat template (a Hugging Face model)", "drop --chat for a gptlab run")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        new, means = sample_tokens(self.model, [prompt_ids(self.tokenizer, p, self.data) for p in prompts], s.max_new_tokens,
                                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_id=self.tokenizer.eos_id,
                                   generator=generator)
        return [(self.tokenizer.decode(ids), len(ids), *([mean] if logprobs else [])) for ids, mean in zip(new, means)]


class HFTeacher:
    """A transformers causal LM: batched, left-padded generate()."""

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.model, self.tokenizer = load_hf_causal_lm(name, device, what="teacher")  # transformers is there, then
        import transformers

        self.transformers = transformers
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device

    def continue_prompts(self, prompts: list[str], s: DistillConfig, seed: int, logprobs: bool = False) -> list[tuple]:
        """As GptlabTeacher.continue_prompts."""
        if s.chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise GptlabError(f"the teacher {self.name} has no chat template", "drop --chat to continue the prompts as text")
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                       for p in prompts]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not s.chat).to(self.device)
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or 0} if s.temperature > 0 else {
            "do_sample": False}
        # A config of our own: the model's may set max_length or sampling defaults that would override these.
        config = self.transformers.GenerationConfig(max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                                    eos_token_id=self.tokenizer.eos_token_id, **sampling)
        torch.manual_seed(seed)  # transformers samples from the global generator
        with torch.no_grad():
            # output_logits: the raw logits of each step (before temperature and top-p), for the log-probabilities
            out = self.model.generate(**batch, generation_config=config, return_dict_in_generate=True, output_logits=logprobs)
        generated = out.sequences[:, batch["input_ids"].shape[1]:]
        if logprobs:
            step_logp = torch.stack(out.logits, dim=1).float().log_softmax(dim=-1)  # [B, steps, V]
            step_logp = step_logp.gather(-1, generated[..., None]).squeeze(-1).tolist()
        results = []
        for i, row in enumerate(generated.tolist()):
            new = []
            for t in row:  # up to (not including) the first end-of-text token
                if t == self.tokenizer.eos_token_id:
                    break
                new.append(t)
            result = (self.tokenizer.decode(new, skip_special_tokens=True), len(new))
            if logprobs:  # the mean over the tokens and the EOS that ended them, as gptlab's sampler counts
                scored = step_logp[i][: min(len(new) + 1, len(row))]
                result += (sum(scored) / max(1, len(scored)),)
            results.append(result)
        return results


def load_teacher(teacher: str | Path, device: str | torch.device = "cpu"):
    """A gptlab run directory or checkpoint folder, a Hugging Face model folder, or hf:NAME."""
    device = torch.device(device)
    if model_kind(teacher, what="teacher") == "gptlab":
        return GptlabTeacher(teacher, device)
    return HFTeacher(str(teacher), device)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: one per non-empty line of a text file; in a .jsonl file, one JSON value a line
    (blank lines skipped): an object with a "prompt" (or "text") string, or a string -- kept as written, so a
    prompt may hold newlines or begin with a space."""
    path = Path(path)
    fix = 'write one {"prompt": "..."} (or a JSON string) per line' if path.suffix in (".jsonl", ".ndjson") else "write one prompt per line"
    if not path.is_file():
        raise GptlabError(f"prompt file not found: {path}", "give a text file with one prompt per line, or a .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GptlabError(f"{path} is not UTF-8 text", "give a text file with one prompt per line") from None
    if path.suffix in (".jsonl", ".ndjson"):
        prompts = [_json_prompt(line, path, n, fix) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise GptlabError(f"{path} has no prompts", fix)
    return prompts


def _json_prompt(line: str, path: Path, n: int, fix: str) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} line {n} is not valid JSON: {e.msg} (column {e.colno})", fix) from None
    if isinstance(value, dict):
        value = value.get("prompt", value.get("text"))
    if not isinstance(value, str):
        raise GptlabError(f'{path} line {n} has no "prompt" string', fix)
    return value


def distill_corpus(teacher, prompts: list[str], out: str | Path, settings: DistillConfig | None = None, *,
                   scorer=None, verbose: bool = True, on_batch: Callable[[int], None] | None = None) -> dict:
    """Have `teacher` (see load_teacher) continue `prompts` until it has written settings.tokens tokens, into
    the JSON-lines file `out`; returns a summary. Resumes OUT.partial when one was left with the same settings.

    With settings.best_of = N > 1, or a `scorer` (gptlab.generate.ranking.parse_rank_by; default logprob), the
    teacher writes N candidates per prompt and the best one is kept, its record with "score" and "rank_by";
    the tokens counted are the kept samples'."""
    s = settings or DistillConfig()
    if scorer is None and s.best_of > 1:
        scorer = LogprobScorer()
    if not prompts:
        raise GptlabError("no prompts", "give at least one prompt")
    out = Path(out)
    if out.exists():
        raise GptlabError(f"{out} already exists", "choose another --out, or delete it to write it again")
    partial, state_file = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    state = {"teacher": teacher.name, "prompts": prompts, "settings": s.model_dump()}
    if scorer is not None:
        state["rank_by"] = scorer.name
    resumed_records, resumed_tokens = _resume(partial, state_file, state)
    records, tokens = resumed_records, resumed_tokens
    out.parent.mkdir(parents=True, exist_ok=True)
    if not partial.exists():
        atomic_write_json(state_file, state)
    started = time.perf_counter()
    bar = tqdm(total=s.tokens, initial=min(tokens, s.tokens), unit="tok", unit_scale=True, disable=not verbose, desc="distill")
    with open(partial, "a", encoding="utf-8") as f:
        batch = records // s.batch_size  # the file holds whole batches
        while tokens < s.tokens:
            first = batch * s.batch_size
            chosen = [prompts[(first + i) % len(prompts)] for i in range(s.batch_size)]
            lines = []
            for prompt, (text, n, *score) in zip(chosen, _write_batch(teacher, chosen, s, s.seed + batch, scorer)):
                record = {"text": text if s.chat else prompt + text, "prompt": prompt, "tokens": n, "teacher": teacher.name}
                if scorer is not None:
                    record |= {"score": score[0], "rank_by": scorer.name}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                tokens += n
            f.write("".join(lines))  # whole batches only, so a resumed run knows where it stopped
            f.flush()
            os.fsync(f.fileno())
            records += len(lines)
            batch += 1
            bar.update(min(tokens, s.tokens) - bar.n)
            if on_batch:
                on_batch(batch)
    bar.close()
    os.replace(partial, out)
    state_file.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return {"out": str(out), "records": records, "tokens": tokens, "teacher": teacher.name, "seconds": round(seconds, 2),
            "tokens_per_s": round((tokens - resumed_tokens) / seconds, 1) if seconds else None, "resumed_at_record": resumed_records}


def _write_batch(teacher, prompts: list[str], s: DistillConfig, seed: int, scorer) -> list[tuple]:
    """(text, tokens) for each prompt; with a scorer, (text, tokens, score) of the best of s.best_of candidates,
    all drawn in one batch (prompt i's at rows [i * N, (i + 1) * N))."""
    if scorer is None:
        return teacher.continue_prompts(prompts, s, seed=seed)
    n = s.best_of
    drawn = teacher.continue_prompts([p for p in prompts for _ in range(n)], s, seed=seed, logprobs=scorer.needs_logprobs)
    kept = []
    for i, prompt in enumerate(prompts):
        group = drawn[i * n : (i + 1) * n]
        scores = scorer.score(prompt, [c[0] for c in group], [c[2] for c in group] if scorer.needs_logprobs else None)
        best = best_first(scores)[0]
        kept.append((group[best][0], group[best][1], scores[best]))
    return kept


def _resume(partial: Path, state_file: Path, state: dict) -> tuple[int, int]:
    """(records, tokens) already in an interrupted run's file, cut back to its last whole batch."""
    if not partial.exists():
        return 0, 0
    try:
        saved = json.loads(state_file.read_text())
    except (OSError, ValueError):
        saved = None
    if saved != state:
        raise GptlabError(f"{partial} was left by a run with another teacher, prompts or settings",
                          f"run again with the same ones to continue it, or delete {partial} to start over")
    lines = partial.read_text(encoding="utf-8").splitlines(keepends=True)
    whole = [line for line in lines if line.endswith("\n")]
    keep = len(whole) - len(whole) % state["settings"]["batch_size"]
    partial.write_text("".join(whole[:keep]), encoding="utf-8")
    return keep, sum(json.loads(line)["tokens"] for line in whole[:keep])
