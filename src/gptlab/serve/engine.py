"""Continuous batching: many requests share the model's forward passes, each joining and leaving on its own.

    engine = Engine(model, slots=16)                    # starts a thread that runs the model
    request = engine.submit(GenerationRequest(prompt_ids, max_tokens=100, temperature=0.8), on_event)
    ...  on_event(TokenEvent) per new token, then one DoneEvent; request.cancel() ends it early
    engine.complete(GenerationRequest(...)) -> Completion   # the same, waiting for the end (notebooks, tests)
    engine.close()

The loop, one pass at a time: requests waiting for a slot are admitted while slots are free (their
prompts run through their slots together -- the prefill -- and give each request its first token), then
every running request advances one token in a single forward pass over all their slots (the decode
step), and those that are done (a stop token, max_tokens, the end of the context, cancelled) leave
and free their slots for the next pass. So a new request waits at most one pass for its first token
while slots are free, and a long request never holds up a short one.

Each slot keeps its own KV cache rows (model/cache.py SlotCache) and, after its request has left,
what it held: a new prompt that starts like a slot's last sequence (a chat resent with one more
turn) runs only the part that differs. Admission is bounded per pass (`prefill_budget` tokens) so a
burst of long prompts cannot stall the running requests' decode steps for long.

Sampling is per request: its temperature, top-k, top-p and, given a seed, its own generator, so a
seeded request gives the same tokens whatever else shares its batch (up to float rounding in the
batched matmuls). Log-probabilities are the model's own (temperature 1), as OpenAI's API reports them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from gptlab.generate import filter_logits
from gptlab.model import GPT
from gptlab.model.cache import SlotCache

# Prompt tokens run through the model per pass before the running requests get their next token.
PREFILL_BUDGET = 2048


@dataclass
class GenerationRequest:
    """One sequence to continue: prompt token ids and how to sample from them."""

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()  # tokens that end the sequence (not part of its text)
    seed: int | None = None  # None: the engine's shared generator
    top_logprobs: int = 0  # alternatives reported with each token (their ids and log-probabilities)


@dataclass
class TokenEvent:
    token: int
    logprob: float  # log-probability of the token under the model (temperature 1)
    top: list[tuple[int, float]]  # the `top_logprobs` most likely tokens at this step, most likely first


@dataclass
class DoneEvent:
    reason: str  # "stop" (a stop token), "length" (max_tokens or the context), "cancelled", "timeout", "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens that were already in the slot's cache (not run again)
    error: str | None = None


Event = TokenEvent | DoneEvent


@dataclass
class Completion:
    """What engine.complete returns: every token of one request and how it ended."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    done: DoneEvent


class EngineBusy(Exception):
    """The waiting queue is full: the caller should answer 'try again later'."""


@dataclass(eq=False)
class Handle:
    """A submitted request: its settings, where its events go, and its place in the engine."""

    request: GenerationRequest
    on_event: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    slot: int | None = None
    generator: torch.Generator | None = None
    last_token: int | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """End the request at the engine's next pass (its slot is freed; a DoneEvent "cancelled" follows)."""
        self.cancelled = True


@dataclass
class EngineStats:
    """Running totals the server's /metrics reads (plain numbers: the engine does not know Prometheus)."""

    requests: dict[str, int] = field(default_factory=dict)  # finished requests by reason
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0  # decode passes
    prefills: int = 0  # forward passes that ran prompts (several a pass where they arrive together)
    batched_tokens: int = 0  # tokens produced by decode passes (batched_tokens / steps = mean batch size)
    on_step: Callable[[int], None] | None = None  # called with each decode pass's batch size
    on_done: Callable[[Handle, DoneEvent], None] | None = None  # called as each request ends


class Engine:
    """Runs `model` for every submitted request on a thread of its own; see the module docstring."""

    def __init__(self, model: GPT, slots: int = 16, max_queue: int = 256, queue_timeout: float | None = 60.0,
                 prefill_budget: int = PREFILL_BUDGET, seed: int = 0, stats: EngineStats | None = None):
        self.model = getattr(model, "_orig_mod", model).eval()
        self.device = next(self.model.parameters()).device
        self.context = self.model.cfg.context_length
        self.vocab_size = self.model.cfg.vocab_size
        self.slots, self.max_queue, self.queue_timeout, self.prefill_budget = slots, max_queue, queue_timeout, prefill_budget
        self.cache = SlotCache(slots, self.context, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = stats or EngineStats()
        self.waiting: deque[Handle] = deque()
        self.running: dict[int, Handle] = {}  # slot -> request
        self.free = list(range(slots))  # least recently used first
        self.wake = threading.Condition()
        self.closing = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the API

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; on_event is called from the engine's thread. EngineBusy if the queue is full."""
        if not request.prompt:
            raise ValueError("a prompt needs at least one token")
        if len(request.prompt) >= self.context:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens leaves no room in a context of {self.context}")
        if max(request.prompt) >= self.vocab_size or min(request.prompt) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        handle = Handle(request, on_event)
        with self.wake:
            if self.closing:
                raise EngineBusy("the engine is shutting down")
            if self.failure is not None:
                raise EngineBusy(f"the engine stopped: {self.failure}")
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(handle)
            self.wake.notify()
        return handle

    def complete(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """Submit and wait for the end: every token, its log-probability and alternatives, how it ended."""
        result = Completion([], [], [], None)
        finished = threading.Event()

        def collect(event: Event):
            if isinstance(event, TokenEvent):
                result.tokens.append(event.token)
                result.logprobs.append(event.logprob)
                result.top.append(event.top)
            else:
                result.done = event
                finished.set()

        handle = self.submit(request, collect)
        if not finished.wait(timeout):
            handle.cancel()
            finished.wait()
        return result

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.running)

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end with DoneEvent "cancelled"."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.wake:
                        while not self.waiting and not self.running and not self.closing:
                            self.wake.wait()
                        if self.closing:
                            break
                    self._drop_stale()
                    self._admit()
                    if self.running:
                        self._decode()
        except BaseException as e:  # a bug or out of memory: every request hears of it, later submits are refused
            self.failure = e
            raise
        finally:
            with self.wake:
                self.closing = True
                left = list(self.running.values()) + list(self.waiting)
                self.running.clear()
                self.waiting.clear()
            for handle in left:
                self._finish(handle, "error" if self.failure else "cancelled",
                             error=f"{type(self.failure).__name__}: {self.failure}" if self.failure else None)

    def _drop_stale(self) -> None:
        """End the requests cancelled since the last pass, and those that waited longer than queue_timeout."""
        for handle in list(self.running.values()):
            if handle.cancelled:
                self._leave(handle, "cancelled")
        now = time.monotonic()
        with self.wake:
            stale = [h for h in self.waiting if h.cancelled or self._overdue(h, now)]
            for handle in stale:
                self.waiting.remove(handle)
        for handle in stale:
            if handle.cancelled:
                self._finish(handle, "cancelled")
            else:
                self._finish(handle, "timeout", error=f"waited {now - handle.submitted:.1f} s for a free slot")

    def _overdue(self, handle: Handle, now: float) -> bool:
        return self.queue_timeout is not None and now - handle.submitted > self.queue_timeout

    def _admit(self) -> None:
        """Start waiting requests while slots are free and this pass's prefill budget lasts: each takes a slot,
        then their prompts run together, a few forward passes for all of them (`_prefill`)."""
        budget, admitted = self.prefill_budget, []
        while self.free and budget > 0:
            with self.wake:
                if not self.waiting:
                    break
                handle = self.waiting.popleft()
            prompt = handle.request.prompt
            # the free slot that holds the longest start of this prompt; the last prompt token always runs (its logits)
            slot = max(self.free, key=lambda s: min(self.cache.shared_prefix(s, prompt), len(prompt) - 1))
            self.free.remove(slot)
            handle.slot = slot
            handle.cached_tokens = min(self.cache.shared_prefix(slot, prompt), len(prompt) - 1)
            seed = handle.request.seed
            handle.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
            self.running[slot] = handle
            self.stats.prompt_tokens += len(prompt)
            admitted.append(handle)
            budget -= len(prompt) - handle.cached_tokens
        while admitted:
            admitted = self._prefill(admitted)

    def _prefill(self, handles: list[Handle]) -> list[Handle]:
        """Run the prompts of newly admitted requests in one forward pass (left-padded to the longest) and sample
        their first tokens; return the requests left for another pass.

        Longest first, a prompt joins the pass while the padding stays under the real tokens plus 256, so a
        burst of short prompts takes one pass and a long one does not make many short ones pay its length.
        """
        def left(h: Handle) -> int:  # prompt tokens not in the slot's cache yet
            return len(h.request.prompt) - h.cached_tokens

        handles = sorted(handles, key=left, reverse=True)
        T, real, group = left(handles[0]), 0, []
        for h in handles:
            if group and (len(group) + 1) * T > 2 * (real + left(h)) + 256:
                break
            group.append(h)
            real += left(h)
        tokens = torch.zeros(len(group), T, dtype=torch.long)
        valid = torch.zeros(len(group), T, dtype=torch.bool)
        for i, h in enumerate(group):
            new = h.request.prompt[h.cached_tokens :]
            tokens[i, T - len(new) :] = torch.tensor(new)
            valid[i, T - len(new) :] = True
            self.cache.truncate(h.slot, h.cached_tokens)
            self.cache.tokens[h.slot].extend(new)
            self.stats.cached_tokens += h.cached_tokens
        logits, _ = self.model(tokens.to(self.device), cache=self.cache.rows([h.slot for h in group]),
                               valid=valid.to(self.device))
        self.stats.prefills += 1
        self._emit(group, logits[:, -1])
        return handles[len(group) :]

    def _decode(self) -> None:
        """One token for every running request, in one forward pass."""
        handles = list(self.running.values())
        tokens = torch.tensor([[h.last_token] for h in handles], device=self.device)
        slots = [h.slot for h in handles]
        logits, _ = self.model(tokens, cache=self.cache.rows(slots))
        for h in handles:
            self.cache.tokens[h.slot].append(h.last_token)
        self.stats.steps += 1
        self.stats.batched_tokens += len(handles)
        if self.stats.on_step is not None:
            self.stats.on_step(len(handles))
        self._emit(handles, logits[:, -1])

    def _emit(self, handles: list[Handle], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of logits [B, V]; hand it on or end the request."""
        logits = logits.float()
        tokens = self._sample(handles, logits)
        logprobs = F.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        k = max(h.request.top_logprobs for h in handles)
        top = torch.topk(logprobs, k, dim=-1) if k else None
        now = time.monotonic()
        for i, (handle, token) in enumerate(zip(handles, tokens.tolist())):
            request = handle.request
            if token in request.stop_ids:
                self._leave(handle, "stop")
                continue
            alternatives = []
            if request.top_logprobs:
                ids, values = top.indices[i, : request.top_logprobs].tolist(), top.values[i, : request.top_logprobs].tolist()
                alternatives = list(zip(ids, values))
            handle.last_token = token
            handle.completion_tokens += 1
            handle.first_token_at = handle.first_token_at or now
            self._tell(handle, TokenEvent(token, chosen[i], alternatives))
            # the next pass would write position `length`: a full slot cannot take this token's keys
            if handle.completion_tokens >= request.max_tokens or self.cache.lengths[handle.slot] >= self.context:
                self._leave(handle, "length")

    def _sample(self, handles: list[Handle], logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits -> [B] tokens, each row with its request's settings: greedy rows by argmax, rows of a
        seeded request from its own generator, the rest together (grouped by their filters) from the engine's."""
        tokens = logits.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(handles):
            r = h.request
            if r.temperature > 0:
                key = (r.temperature, r.top_k, r.top_p, i if h.generator is not None else None)
                groups.setdefault(key, []).append(i)
        for (temperature, top_k, top_p, own), rows in groups.items():
            probs = F.softmax(filter_logits(logits[rows] / temperature, top_k, top_p), dim=-1)
            generator = handles[own].generator if own is not None else self.generator
            tokens[rows] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return tokens

    def _leave(self, handle: Handle, reason: str) -> None:
        """A running request is done: its slot goes to the end of the free list (kept for the prompt cache)."""
        del self.running[handle.slot]
        self.free.append(handle.slot)
        self._finish(handle, reason)

    def _finish(self, handle: Handle, reason: str, error: str | None = None) -> None:
        if handle.done:
            return
        handle.done = True
        done = DoneEvent(reason, len(handle.request.prompt), handle.completion_tokens, handle.cached_tokens, error)
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1
        self.stats.completion_tokens += handle.completion_tokens
        if self.stats.on_done is not None:
            self.stats.on_done(handle, done)
        self._tell(handle, done)

    def _tell(self, handle: Handle, event: Event) -> None:
        try:
            handle.on_event(event)
        except Exception:  # a listener gone wrong (its client's loop closed) ends its request, not the engine
            handle.cancel()
