"""Fit a training run to a memory budget before it starts (`gptlab model fit`): like llama.cpp's --fit,
but for training.

Every answer comes from the memory estimator (gptlab.model.info.memory_parts: the peak one training process
holds), which grows monotonically with the micro-batch and with the model, so the boundary is found by
doubling until a candidate no longer fits and bisecting between the last two:

    fit_batch  the largest micro-batch per process that fits, and the grad_accum that keeps the tokens a
               step (a smaller micro-batch makes up for it with more micro-steps)
    fit_model  the largest model of the config's family that fits at its batch: more layers (depth), a wider
               residual stream in steps of the head size (width), or both at the config's aspect ratio

Both return plain data (the CLI formats it); a budget that not even the smallest candidate fits is a
GptlabError that says what the smallest one needs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model.info import TrainingSetup, format_bytes, memory_parts

SCALES = ("batch", "depth", "width", "both")
TRY = "try --checkpointing, --precision bf16, --optimizer muon or a smaller model"


def fit_batch(model_cfg: ModelConfig, setup: TrainingSetup, memory: int, tokens_per_step: int | None = None) -> dict:
    """The largest micro-batch (sequences per process) whose predicted peak is within `memory` bytes, and the
    grad_accum that makes a step at least `tokens_per_step` tokens (default: the setup's own step,
    batch_size x processes x grad_accum sequences).

    A micro-batch b needs ceil(sequences / b) micro-steps, and from the second one on the gradients sit beside
    the activations: each b is priced with the grad_accum it would train with. The answer's micro-batch is the
    largest that fits, evened out over the micro-steps (36 sequences with room for 16: 3 x 12, not 16+16+4).
    """
    context = model_cfg.context_length
    tokens = tokens_per_step or setup.batch_size * setup.processes * setup.grad_accum * context
    sequences = math.ceil(tokens / (context * setup.processes))  # per process, a step

    def accum(b: int) -> int:
        return max(1, math.ceil(sequences / b))

    def peak(b: int) -> int:
        return memory_parts(model_cfg, replace(setup, batch_size=b, grad_accum=accum(b)))["total"]

    if peak(sequences) <= memory:  # the whole step at once: no accumulation, and maybe room for more
        largest = _largest(lambda b: peak(b) <= memory, sequences)
        batch = sequences
    elif peak(1) <= memory:  # below `sequences` every micro-batch accumulates: peak grows with b
        largest = _largest(lambda b: peak(b) <= memory, 1, sequences)
        batch = math.ceil(sequences / accum(largest))
        # the step's tokens exactly (256 sequences: 64 x 4 rather than 86 x 3) if it costs at most a third
        # of the largest micro-batch
        batch = next((b for b in range(batch, math.ceil(largest * 2 / 3) - 1, -1) if sequences % b == 0), batch)
    else:
        raise GptlabError(f"nothing fits in {format_bytes(memory)}: a micro-batch of 1 x {context:,} tokens needs "
                          f"{format_bytes(peak(1))} (predicted)", TRY)
    sizes = sorted({*_doublings(lambda b: peak(b) <= memory), batch, largest, largest + 1})
    rows = [{"batch": b, "grad_accum": accum(b), "peak": peak(b), "fits": peak(b) <= memory} for b in sizes]
    return {
        "batch_size": batch,  # per process
        "grad_accum": accum(batch),
        "largest": largest,
        "peak": peak(batch),
        "memory": memory,
        "tokens_per_step": batch * accum(batch) * setup.processes * context,
        "asked_tokens_per_step": tokens,
        "setup": replace(setup, batch_size=batch, grad_accum=accum(batch)),
        "overrides": [f"--train.batch_size={batch * setup.processes}", f"--train.grad_accum={accum(batch)}"],
        "rows": rows,
    }


def fit_model(model_cfg: ModelConfig, setup: TrainingSetup, memory: int, scale: str) -> dict:
    """The largest model of model_cfg's family whose predicted peak at `setup` is within `memory` bytes.

    scale: depth (n_layer), width (d_model in steps of the head size, heads added, head size kept; with grouped
    K/V heads, steps of a whole group) or both (n_layer and d_model together at the config's d_model / n_layer).
    Candidates are numbered by size (layers, or steps of width), 1 the smallest; the config is one of them.
    """
    if scale not in SCALES[1:]:
        raise GptlabError(f"--scale {scale!r} is not a way to scale a model", f"choose one of: {', '.join(SCALES)}")
    candidate = {"depth": _deeper, "width": _wider, "both": _bigger}[scale]
    own = model_cfg.d_model // _width_step(model_cfg)[0] if scale == "width" else model_cfg.n_layer
    cache: dict[int, dict] = {}

    def row(k: int) -> dict:
        if k not in cache:
            cfg = candidate(model_cfg, k)
            from gptlab.model.gpt import GPT

            with torch.device("meta"):  # shapes only: no memory, no time
                model = GPT(cfg)
            cache[k] = {"size": k, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
                        "n_kv_head": cfg.kv_heads, "d_ff": cfg.ff_dim, "parameters": model.num_params(),
                        "peak": memory_parts(cfg, setup, model)["total"], "config": k == own,
                        "overrides": _overrides(model_cfg, cfg)}
            cache[k]["fits"] = cache[k]["peak"] <= memory
        return cache[k]

    if not row(1)["fits"]:
        smallest = row(1)
        raise GptlabError(f"nothing fits in {format_bytes(memory)}: the smallest model ({smallest['n_layer']} layer"
                          f"{'s' if smallest['n_layer'] > 1 else ''} x "
                          f"{smallest['d_model']}) needs {format_bytes(smallest['peak'])} at micro-batch {setup.batch_size} "
                          "(predicted)", TRY.replace("a smaller model", "a smaller --batch-size"))
    largest = _largest(lambda k: row(k)["fits"], 1)
    rows = [row(k) for k in sorted({own, *range(max(1, largest - 2), largest + 3)})]
    best = row(largest)
    return {"scale": scale, "memory": memory, "setup": setup, **{k: v for k, v in best.items() if k != "config"},
            "rows": rows}


def _deeper(cfg: ModelConfig, layers: int) -> ModelConfig:
    return _shape(cfg, n_layer=layers)


def _width_step(cfg: ModelConfig) -> tuple[int, int]:
    """(d_model, heads) of one step of width: the fewest heads, as many queries per K/V head as the config
    has, in the config's heads-to-width proportion (DefaultGPT's 16-wide heads are twice as many as
    d_model / 16), whose width is a whole number of head sizes."""
    group = cfg.n_head // cfg.kv_heads
    for m in (m for m in range(1, cfg.kv_heads + 1) if cfg.kv_heads % m == 0):
        heads = m * group
        if heads * cfg.d_model % cfg.n_head == 0 and heads * cfg.d_model // cfg.n_head % cfg.head_dim == 0:
            return heads * cfg.d_model // cfg.n_head, heads
    return cfg.d_model, cfg.n_head  # no such step smaller than the config: steps of the config's own width


def _wider(cfg: ModelConfig, steps: int) -> ModelConfig:
    """`steps` steps of width (_width_step); the MLP's explicit width at its ratio to d_model (else
    mlp_ratio, as the config says)."""
    width, heads = _width_step(cfg)
    update = {"d_model": steps * width, "n_head": steps * heads}
    if cfg.n_kv_head:
        update["n_kv_head"] = steps * heads * cfg.kv_heads // cfg.n_head
    for key in ("d_ff", "moe_d_ff"):
        if getattr(cfg, key):
            update[key] = max(1, round(getattr(cfg, key) * steps * width / cfg.d_model))
    return _shape(cfg, **update)


def _bigger(cfg: ModelConfig, layers: int) -> ModelConfig:
    """`layers` layers, as wide as the config's aspect ratio says (to the nearest step of width)."""
    steps = max(1, round(cfg.d_model / cfg.n_layer * layers / _width_step(cfg)[0]))
    return _deeper(_wider(cfg, steps), layers)


def _shape(cfg: ModelConfig, **update) -> ModelConfig:
    """A validated copy (model_copy would not check that the heads divide the width); no longer the preset."""
    return ModelConfig(**{**cfg.model_dump(), "preset": None, **update})


def _overrides(old: ModelConfig, new: ModelConfig) -> list[str]:
    keys = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "moe_d_ff")
    return [f"--model.{key}={getattr(new, key)}" for key in keys if getattr(new, key) != getattr(old, key)]


def _largest(fits, low: int, high: int | None = None) -> int:
    """The largest n >= low with fits(n), where fits(low) holds and fits is true up to a point and false
    beyond it; below `high` if given (fits(high) false). Doubling finds a candidate that does not fit, then
    bisection the boundary: a few dozen predictions however large the answer."""
    if high is None:
        high = low * 2
        while fits(high):
            low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _doublings(fits) -> list[int]:
    """1, 2, 4, ... up to the first that does not fit."""
    sizes = [1]
    while fits(sizes[-1]):
        sizes.append(sizes[-1] * 2)
    return sizes
