"""Attention masks beyond causal: which earlier tokens a query may see, per layer.

A rule is a function of query and key positions (integer tensors that broadcast against each other) that
returns True where the query may attend. Every rule is applied within the causal mask, so a model stays a
left-to-right language model whatever the rule says, and its KV cache stays valid; and a query always
sees itself. `model.mask` names one rule per layer (a list cycles over the layers: ["window", "window",
"window", "causal"] is Gemma's three local layers to one global); `model.window` sizes the built-in ones.

Your own rule is `--model.mask=package.module:function`, importable where the model is built (training,
sampling, serving, evaluating), with this signature:

    def function(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # q, k: integer positions (a token's index among its row's real tokens, from 0), shaped to
        # broadcast against each other (e.g. [T, 1] and [1, T], or [B, T, 1] and [B, 1, T_keys]).
        # Returns a bool tensor of their broadcast shape: True where query q may see key k.
        return (k == 0) | (q - k < 4)  # an attention sink (the first token) and a window of 4

It is only asked about k <= q (later keys are hidden whatever it says), a query sees itself even where it
says no, and it must be built from tensor operations (no .item(), no Python `if` on values): it runs
inside training and compiled decode steps. A user function has no span, so the KV cache keeps every
position of its layers; `window` layers keep only the window (model/cache.py's Ring).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from gptlab.errors import GptlabError

MaskFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskRule:
    """A layer's attention mask: `allows(q_pos, k_pos)` within causal, and `span`, the most recent keys a
    query can ever see (itself included), or None when it may see any earlier key. A cache may forget keys
    older than the span."""

    name: str
    # compared by name, not by function: each layer builds its own function object, and the rules of layers
    # with the same name must be equal, so that a forward pass builds one mask for all of them (Context.mask_for)
    allows: MaskFunction | None = field(compare=False)  # None: plain causal
    span: int | None = None

    @property
    def causal(self) -> bool:
        return self.allows is None


def sliding_window(window: int) -> MaskFunction:
    """The last `window` tokens, the query itself included (Longformer, Mistral; Gemma's local layers)."""
    return lambda q, k: q - k < window


def strided(window: int) -> MaskFunction:
    """Sparse Transformer's strided pattern (Child et al. 2019): the last `window` tokens, plus every
    window-th token before them, so any earlier token is at most two attention hops away."""
    return lambda q, k: (q - k < window) | ((q - k) % window == 0)


def mask_rule(name: str, window: int) -> MaskRule:
    """The rule `model.mask` names: causal, window, strided, or package.module:function."""
    if name == "causal":
        return MaskRule("causal", None)
    if name == "window":
        return MaskRule(f"window {window}", sliding_window(window), span=window)
    if name == "strided":
        return MaskRule(f"strided {window}", strided(window))
    return MaskRule(name, user_function(name))


def user_function(name: str) -> MaskFunction:
    """`package.module:function` imported: a function (q_pos, k_pos) -> bool tensor."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise GptlabError(
            f"model.mask {name!r} is not a mask",
            "use causal, window, strided, or package.module:function for a function of (q_pos, k_pos)",
        )
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise GptlabError(
            f"model.mask {name!r}: cannot import it ({e})", "check the module is on the Python path and defines it"
        ) from None
    if not callable(function):
        raise GptlabError(f"model.mask {name!r} is not a function", "point it at a function of (q_pos, k_pos)")
    # asked once here, so that a wrong function fails as the model is built, not deep inside attention
    q, k = torch.arange(4)[:, None], torch.arange(4)[None, :]
    try:
        allowed = function(q, k)
    except Exception as e:  # any error of the user's code
        raise GptlabError(f"model.mask {name!r} failed on positions ({type(e).__name__}: {e})",
                          "it is called with two integer tensors that broadcast, query and key positions") from None
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or allowed.shape != (4, 4):
        got = f"{allowed.dtype} {tuple(allowed.shape)}" if isinstance(allowed, torch.Tensor) else type(allowed).__name__
        raise GptlabError(f"model.mask {name!r} returned {got} for query positions [4, 1] and key positions [1, 4]",
                          "return a bool tensor of their broadcast shape ([4, 4]): True where q may see k")
    return function


def layer_rules(masks: str | list[str], window: int, n_layer: int) -> list[MaskRule]:
    """One rule per layer: `masks` cycled over the layers."""
    names = [masks] if isinstance(masks, str) else list(masks)
    if not names:
        raise GptlabError("model.mask is an empty list", 'give one mask, e.g. "causal", or a list to cycle')
    rules = {name: mask_rule(name, window) for name in dict.fromkeys(names)}
    return [rules[names[layer % len(names)]] for layer in range(n_layer)]


def rule_mask(rule: MaskRule, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool [.., T_q, T_k]: causal and the rule, from query positions [.., T_q] and key positions [.., T_k].
    A query always sees itself, whatever the rule: a softmax over no keys would be NaN."""
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    if rule.allows is None:
        return k <= q
    return (k <= q) & (rule.allows(q, k) | (k == q))
