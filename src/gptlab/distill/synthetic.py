"""Sequence-level knowledge distillation: a teacher writes text from prompts, and that text becomes a student's
training data (AureliusGPT-Torch grew its 89k-token corpus this way with a fine-tuned Llama 3.2 1B).

The teacher is a gptlab run, or a Hugging Face causal LM (a local folder, or `hf:NAME` from the Hub) run
through transformers. The corpus is JSON lines, one record per sample -- {"text", "prompt", "tokens" (the
teacher's tokens in the continuation), "teacher"} -- which a [[data.sources]] entry reads as it is.
Writing goes to OUT.partial and is renamed to OUT when the token budget is reached; an interrupted run
continues where it stopped and produces the file it would have written in one go (batch k is drawn with
seed + k).
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
from gptlab.runs import CHECKPOINTS, INFO
from gptlab.text.sources import HF_PREFIX, check_hub_reachable


class GptlabTeacher:
    """A gptlab run (or one of its checkpoints) sampled with gptlab's own KV-cache generator."""

    def __init__(self, run: str | Path, device: torch.device):
        from gptlab.runs import load_run

        self.name, self.device = str(run), device
        self.model, self.tokenizer, cfg = load_run(run, device=device)
        self.data = cfg.data  # what its prompts start after, as its documents did

    def continue_prompts(self, prompts: list[str], s: DistillConfig, seed: int) -> list[tuple[str, int]]:
        """(continuation, its number of tokens) for each prompt."""
        from gptlab.generate import prompt_ids, sample_tokens

        if s.chat:
            raise GptlabError("--chat needs a teacher with a chat template (a Hugging Face model)", "drop --chat for a gptlab run")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        new, _ = sample_tokens(self.model, [prompt_ids(self.tokenizer, p, self.data) for p in prompts], s.max_new_tokens,
                               temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_id=self.tokenizer.eos_id,
                               generator=generator)
        return [(self.tokenizer.decode(ids), len(ids)) for ids in new]


class HFTeacher:
    """A transformers causal LM: batched, left-padded generate()."""

    def __init__(self, name: str, device: torch.device):
        try:
            import transformers
        except ImportError:
            raise GptlabError("a Hugging Face teacher needs transformers", "pip install 'gptlab[distill]'") from None
        local = not name.startswith(HF_PREFIX)
        where = name if local else name.removeprefix(HF_PREFIX)
        if not local:
            check_hub_reachable(where, "download the model elsewhere and give its folder")
        self.name = name
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=local)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(where, local_files_only=local).to(device).eval()
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GptlabError(f"could not load the teacher {name}: {first[:200]}",
                              "check the name and your connection, or download it and give its folder") from None
        self.transformers = transformers
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device

    def continue_prompts(self, prompts: list[str], s: DistillConfig, seed: int) -> list[tuple[str, int]]:
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
            out = self.model.generate(**batch, generation_config=config)
        results = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            new = []
            for t in row:  # up to (not including) the first end-of-text token
                if t == self.tokenizer.eos_token_id:
                    break
                new.append(t)
            results.append((self.tokenizer.decode(new, skip_special_tokens=True), len(new)))
        return results


def load_teacher(teacher: str | Path, device: str | torch.device = "cpu"):
    """A gptlab run directory or checkpoint folder, a Hugging Face model folder, or hf:NAME."""
    device = torch.device(device)
    name = str(teacher)
    if name.startswith(HF_PREFIX):
        return HFTeacher(name, device)
    path = Path(name)
    if not path.exists():
        raise GptlabError(f"teacher not found: {path}", "give a gptlab run directory, a Hugging Face model folder, or hf:NAME")
    if (path / "config.toml").is_file() or (path / INFO).is_file() or (path / CHECKPOINTS).is_dir():  # a run or a checkpoint
        return GptlabTeacher(path, device)
    if (path / "config.json").is_file():
        return HFTeacher(name, device)
    raise GptlabError(f"{path} is neither a gptlab run nor a Hugging Face model folder (no config.toml or config.json)",
                      "give the folder gptlab train or transformers' save_pretrained wrote")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"prompt file not found: {path}", "give a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise GptlabError(f"{path} is not UTF-8 text", "give a text file with one prompt per line") from None
    if not prompts:
        raise GptlabError(f"{path} has no prompts", "write one prompt per line")
    return prompts


def distill_corpus(teacher, prompts: list[str], out: str | Path, settings: DistillConfig | None = None, *,
                   verbose: bool = True, on_batch: Callable[[int], None] | None = None) -> dict:
    """Have `teacher` (see load_teacher) continue `prompts` until it has written settings.tokens tokens, into
    the JSON-lines file `out`; returns a summary. Resumes OUT.partial when one was left with the same settings."""
    s = settings or DistillConfig()
    if not prompts:
        raise GptlabError("no prompts", "give at least one prompt")
    out = Path(out)
    if out.exists():
        raise GptlabError(f"{out} already exists", "choose another --out, or delete it to write it again")
    partial, state_file = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    state = {"teacher": teacher.name, "prompts": prompts, "settings": s.model_dump()}
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
            for prompt, (text, n) in zip(chosen, teacher.continue_prompts(chosen, s, seed=s.seed + batch)):
                record = {"text": text if s.chat else prompt + text, "prompt": prompt, "tokens": n, "teacher": teacher.name}
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
