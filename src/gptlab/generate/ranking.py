"""Best-of-N ranking: score N candidate continuations of a prompt and order them best first.

A scorer is named by a `--rank-by` target:
- `logprob`: the sampling model's own mean log-probability per token of each continuation (the scores
  `sample_tokens` returns with the tokens -- nothing is recomputed);
- `teacher:RUN_OR_HF`: the mean log-likelihood per token of the continuation under another model, given the
  prompt: a gptlab run (or checkpoint), a Hugging Face model folder, or `teacher:hf:NAME`. The teacher reads
  the prompt and the continuation with its own tokenizer (the prompt after its start token, as its training
  documents began) and only the continuation's tokens are scored, teacher-forced, all candidates in one batch;
- `python:MODULE:FUNCTION` or `python:path/to/file.py:FUNCTION`: a user function called as
  `FUNCTION(prompt: str, candidates: list[str]) -> list[float]`, one score per continuation, higher is better.

    scorer = parse_rank_by("teacher:runs/big")
    for text, score in rank(scorer, prompt, continuations, logprobs): ...
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError

KINDS_FIX = "give logprob, teacher:RUN_OR_HF (a gptlab run, a Hugging Face model folder or hf:NAME) or python:MODULE:FUNCTION"
ROWS_PER_FORWARD = 16  # candidates scored in one teacher-forced pass


class LogprobScorer:
    """The sampling model's own mean log-probability per token: the scores the sampler returned."""

    name = "logprob"
    needs_logprobs = True

    def score(self, prompt: str, candidates: Sequence[str], logprobs: Sequence[float] | None = None) -> list[float]:
        if logprobs is None or len(logprobs) != len(candidates):
            raise ValueError("ranking by logprob needs the sampler's mean log-probability of each candidate")
        return [float(x) for x in logprobs]


class TeacherScorer:
    """The mean log-likelihood per token of each continuation under a teacher (a gptlab run or a transformers
    causal LM), given the prompt. A continuation longer than the teacher's context is scored on its last part;
    an empty one scores -inf (nothing to judge), so it ranks last."""

    needs_logprobs = False

    def __init__(self, target: str, device: str | torch.device = "cpu"):
        from gptlab.generate.hf import load_hf_causal_lm, model_kind

        self.name, self.device = f"teacher:{target}", torch.device(device)
        if model_kind(target, what="teacher") == "gptlab":
            from gptlab.generate.sampling import prompt_ids
            from gptlab.runs import load_run

            model, tokenizer, cfg = load_run(target, device=self.device)
            model.eval()
            self.context = model.cfg.context_length
            self.forward = lambda x, mask: model(x)[0]  # causal: the right padding changes no real position
            self.encode_prompt = lambda text: prompt_ids(tokenizer, text, cfg.data)
            self.encode = tokenizer.encode
        else:
            model, tokenizer = load_hf_causal_lm(target, self.device, what="teacher")
            config = model.config
            self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30
            self.forward = lambda x, mask: model(input_ids=x, attention_mask=mask).logits
            first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            # the prompt as transformers users encode it (its start token added); an empty one starts from BOS/EOS
            self.encode_prompt = lambda text: tokenizer(text)["input_ids"] or ([] if first is None else [first])
            self.encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def score(self, prompt: str, candidates: Sequence[str], logprobs: Sequence[float] | None = None) -> list[float]:
        context = self.encode_prompt(prompt)
        rows = [(context, self.encode(text)) for text in candidates]
        scores = []
        for start in range(0, len(rows), ROWS_PER_FORWARD):
            scores += self._mean_loglik(rows[start : start + ROWS_PER_FORWARD])
        return scores

    def _mean_loglik(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Mean log p(continuation token | everything before it) of each (context, continuation) row."""
        seqs, scored = [], []
        for context, continuation in rows:
            seq = (context + continuation)[-(self.context + 1) :]  # the input (seq[:-1]) fits the context
            seqs.append(seq)
            scored.append(min(len(continuation), len(seq) - 1))
        width = max(1, max(len(s) - 1 for s in seqs))
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        y = torch.full((len(seqs), width), -1, dtype=torch.long)  # -1: not a continuation token
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (seq, n) in enumerate(zip(seqs, scored)):
            x[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            mask[i, : len(seq) - 1] = 1
            if n:
                y[i, len(seq) - 1 - n : len(seq) - 1] = torch.tensor(seq[-n:])
        x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
        logp = F.log_softmax(self.forward(x, mask).float(), dim=-1)
        token_logp = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y >= 0)
        return [float(total) / n if n else -math.inf for total, n in zip(token_logp.sum(dim=1).tolist(), scored)]


class PythonScorer:
    """A user function `FUNCTION(prompt: str, candidates: list[str]) -> list[float]` (higher is better)."""

    needs_logprobs = False

    def __init__(self, target: str):
        self.name = f"python:{target}"
        module_name, _, function = target.rpartition(":")
        if not module_name or not function:
            raise GptlabError(f"--rank-by {self.name} names no function",
                              "write python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION")
        module = _import(module_name, self.name)
        self.function: Callable = getattr(module, function, None)
        if not callable(self.function):
            raise GptlabError(f"--rank-by {self.name}: {module_name} has no function {function}",
                              f"define {function}(prompt, candidates) -> list of scores in it, or name another")

    def score(self, prompt: str, candidates: Sequence[str], logprobs: Sequence[float] | None = None) -> list[float]:
        got = self.function(prompt, list(candidates))
        fix = "return one number per candidate (higher is better)"
        try:
            scores = [float(s) for s in got]
        except (TypeError, ValueError):
            raise GptlabError(f"--rank-by {self.name} returned {type(got).__name__} {str(got)[:60]!r}, not a list of numbers",
                              fix) from None
        if len(scores) != len(candidates):
            raise GptlabError(f"--rank-by {self.name} returned {len(scores)} scores for {len(candidates)} candidates", fix)
        return scores


def _import(module_name: str, what: str):
    """A module by its dotted name (found on sys.path or in the current folder), or a .py file by its path."""
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise GptlabError(f"--rank-by {what}: no file {path}", "give the path of a .py file, or a module name")
            spec = importlib.util.spec_from_file_location(f"gptlab_rank_by_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:  # `python -m` finds the current folder's modules: so do we
            sys.path.append(os.getcwd())
        return importlib.import_module(module_name)
    except GptlabError:
        raise
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise GptlabError(f"--rank-by {what}: importing {module_name} failed: {e}", "install what it imports, or fix it") from None
        raise GptlabError(f"--rank-by {what}: no module named {e.name!r}",
                          "put the module in the current folder or on PYTHONPATH, or give a .py file's path") from None
    except Exception as e:  # its own code failed while importing: the user's bug, named on one line
        raise GptlabError(f"--rank-by {what}: importing {module_name} failed: {type(e).__name__}: {e}",
                          "fix the module") from None


def parse_rank_by(text: str, device: str | torch.device = "cpu"):
    """The scorer a `--rank-by` target names (see the module docstring); a target that does not load is one line."""
    kind, _, target = text.partition(":")
    if kind == "logprob" and not target:
        return LogprobScorer()
    if kind == "teacher":
        if not target:
            raise GptlabError("--rank-by teacher: names no model", "write teacher:RUN_DIR, teacher:HF_FOLDER or teacher:hf:NAME")
        try:
            return TeacherScorer(target, device)
        except GptlabError as e:
            raise GptlabError(f"--rank-by {text}: {e}") from None
    if kind == "python":
        if not target:
            raise GptlabError("--rank-by python: names no function", "write python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION")
        return PythonScorer(target)
    raise GptlabError(f"unknown --rank-by {text!r}", KINDS_FIX)


def rank(scorer, prompt: str, candidates: Sequence[str], logprobs: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """(candidate, score) best first (ties keep the order drawn). logprobs: the sampler's mean log-probability
    of each candidate, which the logprob scorer ranks by."""
    scores = scorer.score(prompt, candidates, logprobs)
    return [(candidates[i], scores[i]) for i in best_first(scores)]


def best_first(scores: Sequence[float]) -> list[int]:
    """The indices of `scores`, highest first; ties keep their order, a NaN ranks last."""
    key = [-math.inf if math.isnan(s) else s for s in scores]
    return sorted(range(len(scores)), key=lambda i: key[i], reverse=True)  # sorted() is stable
