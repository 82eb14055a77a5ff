"""Sampling text from a GPT: temperature, top-k, top-p, EOS, a KV cache, batched prompts, best-of-N.

Prompts of different lengths share one batch by left padding: every row ends
at the same column, so each step appends one column for all rows. The KV cache
knows which columns are padding (never attended to) and gives each row
positions that count only its real tokens, so a batched row produces the same
tokens as the same prompt alone -- while the batch fits the context. Past it, the
whole batch starts again from its last 3/4 context at once, which for a row
shorter than the widest one is earlier than it would alone; rows then differ
from their lone runs (a per-row restart would need a cache per row).
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F

from gptlab.config import DataConfig, SampleConfig
from gptlab.errors import GptlabError
from gptlab.generate.decode import Decoder, greedy_pick
from gptlab.model import GPT, KVCache

# When a sequence outgrows the context, generation continues from its last 3/4 context (a fresh prefill).
KEEP_FRACTION = 0.75


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k, and outside the smallest set whose probability reaches top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # the top token always stays (before = 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float, generator=None):
    """[B, V] logits -> [B] token ids: argmax at temperature 0, else a draw from the filtered distribution."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_id: int | Collection[int] | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[list[int | None]], None] | None = None,
    compile: bool | str = "auto",
    stats: dict | None = None,
) -> tuple[list[list[int]], list[float]]:
    """Continue every prompt (token ids, each non-empty) in one batch.

    Returns the new tokens of each row (stopping before eos_id, if given: one id or several, e.g. a chat
    model's <|end|> and EOS) and their mean log-probability under the model (temperature 1, EOS included).
    on_step gets each step's token per row (None once a row has stopped). compile: torch.compile the
    decode step (True / False / "auto": where the generation is long enough to pay for it; see
    gptlab.generate.decode). stats, if given, receives "compile_seconds" (time spent compiling).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: the cache path compiles on its own
    device = next(model.parameters()).device
    rows, width = len(prompts), max(len(p) for p in prompts)
    context = model.cfg.context_length
    if width > context:
        raise GptlabError(
            f"a prompt of {width} tokens does not fit model.context_length={context}",
            "shorten the prompt",
        )
    tokens = torch.zeros(rows, width, dtype=torch.long, device=device)  # left padded: real tokens at the end
    valid = torch.zeros(rows, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        valid[i, width - len(p) :] = True

    stop_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device) if stop_ids else None
    greedy = temperature == 0

    def pick(logits):  # [B, V] fp32 -> (token [B], its log-probability [B])
        if greedy:
            return greedy_pick(logits)
        token = next_token(logits, temperature, top_k, top_p, generator)
        return token, F.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)

    # Every step's token and log-probability go into preallocated tensors, read once at the end: the loop
    # makes no Python lists, reads no values back (unless on_step or EOS asks) and grows no tensor.
    out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that drew a stop token
    stopped_rows: set[int] = set()  # the same, in Python, when on_step needs it each step
    decoder = Decoder(model, greedy=greedy, compile=compile, steps=max_new_tokens - 1)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(rows, context, device)
        logits, _ = model(tokens, cache=cache, valid=valid)
        token, logprob = pick(logits[:, -1].float())
        steps = max_new_tokens
        for step in range(max_new_tokens):
            out[:, step], logprobs[:, step] = token, logprob
            if on_step is not None:
                step_tokens = [None if row in stopped_rows else t for row, t in enumerate(token.tolist())]
                stopped_rows.update(row for row, t in enumerate(step_tokens) if t in stop_ids)
                on_step([None if t in stop_ids else t for t in step_tokens])
                if len(stopped_rows) == rows:
                    steps = step + 1
                    break
            elif stop is not None:
                finished |= torch.isin(token, stop)
                if step % 8 == 7 and bool(finished.all()):  # read back every few steps, not every one
                    steps = step + 1
                    break
            if step == max_new_tokens - 1:
                break
            if cache.length == cache.max_len:  # context full: start again from its last part
                keep = max(1, int(context * KEEP_FRACTION))
                seq = torch.cat([tokens, out[:, : step + 1]], dim=1)[:, -keep:]
                seq_valid = torch.cat([valid, torch.ones_like(out[:, : step + 1], dtype=torch.bool)], dim=1)[:, -keep:]
                cache = KVCache(rows, context, device)
                logits, _ = model(seq, cache=cache, valid=seq_valid)
                token, logprob = pick(logits[:, -1].float())
            elif greedy:
                token, logprob = decoder(cache, token)
            else:
                token, logprob = pick(decoder(cache, token))
    finally:
        model.train(was_training)
    if stats is not None:
        stats["compile_seconds"] = decoder.compile_seconds
    return _cut_at_stop(out[:, :steps].tolist(), logprobs[:, :steps].tolist(), stop_ids)


def _cut_at_stop(out: list[list[int]], logprobs: list[list[float]], stop_ids: set[int]):
    """Each row's tokens before its first stop token, and their mean log-probability (the stop token's included)."""
    new, means = [], []
    for tokens, lps in zip(out, logprobs):
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
        new.append(tokens if end is None else tokens[:end])
        scored = lps if end is None else lps[: end + 1]
        means.append(sum(scored) / max(1, len(scored)))
    return new, means


def start_id(tokenizer, data: DataConfig | None = None) -> int | None:
    """The token a text starts after: the one every training document followed, as `data prepare` wrote them.

    BOS where the data put one before each document (data.add_bos), else the EOS that ended the document
    before (data.add_eos), else none. Sampling, scoring, HellaSwag and the exported tokenizers (Hugging
    Face, GGUF) all start a text this way; `data` is the run's [data] section (None: the defaults).
    """
    data = data or DataConfig()
    if data.add_bos and tokenizer.bos_id is not None:
        return tokenizer.bos_id
    if data.add_eos and tokenizer.eos_id is not None:
        return tokenizer.eos_id
    return None


def prompt_ids(tokenizer, prompt: str, data: DataConfig | None = None) -> list[int]:
    """The prompt's tokens after the start token (`start_id`). An empty prompt where the documents start after
    nothing begins from the tokenizer's BOS, else its EOS (config.json's bos_token_id, else something)."""
    start = start_id(tokenizer, data)
    ids = ([] if start is None else [start]) + tokenizer.encode(prompt)
    if not ids:
        first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if first is None:
            raise GptlabError("the prompt is empty and the tokenizer has no BOS or EOS token to start from", "give a prompt")
        ids = [first]
    return ids


class _Stream:
    """Decodes each row's tokens as they come and hands on_token only the new text (whole characters)."""

    def __init__(self, tokenizer, rows: int, on_token: Callable[[int, str], None]):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows

    def __call__(self, step_tokens: list[int | None]) -> None:
        for row, token in enumerate(step_tokens):
            if token is not None:
                self.ids[row].append(token)
                self._send(row, hold_partial=True)

    def finish(self) -> None:
        """Hand on what was held back (a multi-byte character cut off by the end): the streamed text is the returned one."""
        for row in range(len(self.ids)):
            self._send(row, hold_partial=False)

    def _send(self, row: int, hold_partial: bool) -> None:
        text = self.tokenizer.decode(self.ids[row])
        if hold_partial and text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            return
        if len(text) > self.sent[row]:
            self.on_token(row, text[self.sent[row] :])
            self.sent[row] = len(text)


def generate(
    model: GPT,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    cfg: SampleConfig,
    on_token: Callable[[int, str], None] | None = None,
    *,
    data: DataConfig | None = None,
    stop_ids: Collection[int] | None = None,
) -> list[str]:
    """Continue each prompt cfg.num_samples times; returns the continuations (without the prompt), the
    samples of prompt i at [i * num_samples, (i + 1) * num_samples).

    A prompt is a text, which starts after the start token (`prompt_ids`; `data` is the run's [data]
    section, which says what that is), or a list of token ids taken as they are (a chat prompt:
    gptlab.generate.chat builds them). A sample ends at any of `stop_ids` (default: the tokenizer's EOS
    where cfg.stop_at_eos). All rows run in one batch. With best_of = N > 1, max(N, num_samples)
    candidates are drawn per prompt and the num_samples with the highest mean log-probability are
    returned, best first. on_token(i, text) streams the new text of output i as it is generated (with
    best_of, each result once ranked).
    """
    if not prompts:
        return []
    candidates = max(cfg.best_of, cfg.num_samples)
    stream = None
    if on_token is not None and candidates == cfg.num_samples:
        stream = _Stream(tokenizer, len(prompts) * candidates, on_token)
    new, scores = _draw(model, tokenizer, prompts, cfg, candidates, data, stop_ids, on_step=stream)
    if stream is not None:
        stream.finish()
    texts = []
    for i in range(len(prompts)):
        group = range(i * candidates, (i + 1) * candidates)
        if candidates > cfg.num_samples:  # best-of-N: rank the candidates by mean log-probability
            group = sorted(group, key=lambda j: scores[j], reverse=True)
        for j in list(group)[: cfg.num_samples]:
            texts.append(tokenizer.decode(new[j]))
            if on_token is not None and stream is None:
                on_token(len(texts) - 1, texts[-1])
    return texts


def sample_candidates(
    model: GPT,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    cfg: SampleConfig,
    n: int,
    *,
    data: DataConfig | None = None,
    stop_ids: Collection[int] | None = None,
) -> list[list[tuple[str, float]]]:
    """n continuations of each prompt, all drawn in one batch, as (text, mean log-probability) in the order
    drawn: the raw material of best-of-N (gptlab.generate.ranking orders them). Prompts, `data` and
    `stop_ids` as in `generate`; cfg.num_samples and cfg.best_of are not used."""
    if not prompts:
        return []
    new, scores = _draw(model, tokenizer, prompts, cfg, n, data, stop_ids)
    rows = [(tokenizer.decode(ids), score) for ids, score in zip(new, scores)]
    return [rows[i * n : (i + 1) * n] for i in range(len(prompts))]


def _draw(model, tokenizer, prompts, cfg: SampleConfig, n: int, data, stop_ids, on_step=None):
    """Each prompt n times in one batch (prompt i at rows [i * n, (i + 1) * n)): sample_tokens' (tokens, scores)."""
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise GptlabError(
            f"the model has {model.cfg.vocab_size} tokens but the tokenizer has {tokenizer.vocab_size}",
            "sample with the tokenizer the model was trained with",
        )
    ids = [prompt_ids(tokenizer, p, data) if isinstance(p, str) else list(p) for p in prompts for _ in range(n)]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return sample_tokens(
        model,
        ids,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_id=stop_ids if stop_ids is not None else tokenizer.eos_id if cfg.stop_at_eos else None,
        generator=generator,
        on_step=on_step,
        compile=cfg.compile,
    )
