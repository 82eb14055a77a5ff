"""The decode step: one new token a row through a KVCache, run eagerly or torch.compile'd.

At the sizes gptlab trains, a decode step is bound by per-op overhead, not arithmetic: a 1M-parameter
model's step is ~200 PyTorch ops of a few microseconds each around matmuls of a few microseconds. The step
here runs on the cache's step view (KVCache.step(): state in tensors, the keys' width a dynamic size), so
torch.compile traces it once for all positions and fuses it into ~35 kernels (17 of them matmuls).
Greedy decoding also picks the token and its log-probability inside the step.

Compiling costs seconds to a minute (cached on disk afterwards), so `compile="auto"` compiles only where
the decoding left is long enough to pay for it, as measured on its first eager steps (`worth_compiling`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from gptlab.device import can_compile
from gptlab.errors import GptlabError
from gptlab.model import GPT, KVCache

# Eager decoding time still ahead that justifies compiling, by device: about what a compile costs there
# with a warm inductor cache, so that a cold compile pays off in runs a few times longer.
COMPILE_MIN_SECONDS = {"cpu": 20.0, "cuda": 20.0}
PROBE_STEPS = 8  # eager steps timed before deciding (after one untimed step)
# Inductor writes a one-row matmul (batch 1: every linear map of the step is a matrix-vector product) as
# multiplies and a sum it fuses with its neighbours, instead of calling the BLAS library 17 times a step,
# where setting up each call costs more than the arithmetic: 1M quickstart model, batch 1, 2 threads,
# 2,250 -> 3,390 tokens/s (benchmarks/generate.py). Rows > 1 keep the library's matmul.
STEP_OPTIONS = {"decompose_mem_bound_mm": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V] logits -> (the most likely token [B], its log-probability [B])."""
    token = logits.argmax(dim=-1)
    return token, F.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)


def _model_step(model: GPT, rows, token: torch.Tensor) -> torch.Tensor:
    logits, _ = model(token[:, None], cache=rows)
    return logits[:, -1].float()


def _greedy_step(model: GPT, rows, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return greedy_pick(_model_step(model, rows, token))


_compiled: dict[str, object] = {}  # one torch.compile'd function each, shared by every Decoder (its guards tell models apart)
_warm: set[tuple] = set()  # (model, batch, cache length, greedy) already compiled in this process


def _compiled_step(greedy: bool):
    name = "greedy" if greedy else "logits"
    if name not in _compiled:
        # dynamic=None: shapes start static; the keys' width is marked dynamic (KVCache.step), and a batch size
        # seen second makes the batch dimension dynamic too, so a process compiles the step about twice at most
        _compiled[name] = torch.compile(_greedy_step if greedy else _model_step, dynamic=None, options=STEP_OPTIONS)
    return _compiled[name]


class Decoder:
    """The decode step of one generation: `decoder(cache, token)` -> the next token's logits [B, V] (fp32),
    or with greedy=True -> (the next token [B], its log-probability [B]).

    compile: True, False, or "auto" (compile once the first eager steps show the decoding left would take
    longer than COMPILE_MIN_SECONDS; at once where this shape was compiled earlier in the process).
    steps: how many steps this generation will take at most (what "auto" weighs).
    """

    def __init__(self, model: GPT, *, greedy: bool, compile: bool | str = "auto", steps: int = 0):
        self.model, self.greedy, self.steps_left = model, greedy, steps
        self.device = device = next(model.parameters()).device
        if compile == "auto":
            self.mode = "probe" if can_compile(device) else "eager"
        elif compile and not can_compile(device):
            raise GptlabError(f"compiling the decode step cannot work here (no C++ compiler or {device.type})",
                              "sample with compile=false")
        else:
            self.mode = "compiled" if compile else "eager"
        self.eager = _greedy_step if greedy else _model_step
        self.probe_start: float | None = None
        self.probed = 0
        self.compile_seconds = 0.0  # time spent compiling in this generation (its first compiled step)

    def __call__(self, cache: KVCache, token: torch.Tensor):
        self.steps_left -= 1
        key = (id(self.model), cache.batch_size, cache.max_len, self.greedy)
        if self.mode == "probe" and key in _warm:
            self.mode = "compiled"
        if self.mode == "probe":
            return self._probe(cache, token)
        if self.mode == "eager":
            return self.eager(self.model, cache.step(), token)
        if token.stride() != (1,):  # e.g. a column of a [B, T] tensor: compiled code is specialised on strides
            token = token.clone(memory_format=torch.contiguous_format)
        if key not in _warm:  # the first call compiles: time it, so benchmarks can leave it out
            start = time.perf_counter()
            out = _compiled_step(self.greedy)(self.model, cache.step(), token)
            self.compile_seconds += time.perf_counter() - start
            _warm.add(key)
            return out
        return _compiled_step(self.greedy)(self.model, cache.step(), token)

    def _probe(self, cache: KVCache, token: torch.Tensor):
        """An eager step, timed; after PROBE_STEPS of them, compile if the steps left would take long enough."""
        if self.probe_start is None:  # the first step is not timed (first-call allocations)
            self.probe_start = -1.0
        elif self.probe_start < 0:
            self.probe_start = time.perf_counter()
        else:
            self.probed += 1
        if self.probed == PROBE_STEPS:
            per_step = (time.perf_counter() - self.probe_start) / PROBE_STEPS
            self.mode = "compiled" if worth_compiling(per_step, self.steps_left, self.device.type) else "eager"
        return self.eager(self.model, cache.step(), token)


def worth_compiling(seconds_per_step: float, steps_left: int, device_type: str) -> bool:
    """compile="auto": whether the eager decoding still ahead would take COMPILE_MIN_SECONDS or more."""
    return seconds_per_step * steps_left >= COMPILE_MIN_SECONDS.get(device_type, float("inf"))
