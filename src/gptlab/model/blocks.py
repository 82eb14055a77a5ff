"""The block language: a transformer block written as a string of parts.

    "Norm->Attn->+->Norm->MLP->+"            the pre-norm block of GPT-2 and Llama

A block reads the residual stream x and a branch value h that starts as x. Each part maps h to part(h);
`+` adds the branch to the stream (x = x + h) and `=` replaces the stream with it (x = h); after either,
the next branch starts from the new stream. Every branch ends with `+` or `=`, so a string says where each
value goes. A list of strings is parallel branches: each runs from the same x, and what each adds to x is
summed into one residual (GPT-J/PaLM's parallel block, Snowflake Arctic's dense + MoE residual).

The named layouts below are written in this language: there is one mechanism, not two. This file only
parses; the parts themselves are the PARTS table in model/gpt.py.
"""

from __future__ import annotations

import difflib

from gptlab.errors import GptlabError

LAYOUTS: dict[str, str | list[str]] = {
    "pre": "Norm->Attn->+->Norm->MLP->+",  # GPT-2 onwards: x + attn(norm(x)), then x + mlp(norm(x))
    "post": "Attn->+->Norm->=->MLP->+->Norm->=",  # the original Transformer: norm(x + attn(x)), then norm(x + mlp(x))
    "sandwich": "Norm->Attn->Norm->+->Norm->MLP->Norm->+",  # each sublayer's output normalised too (minGrok, Gemma 2)
    "parallel": ["Norm->Attn->+", "Norm->MLP->+"],  # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM)
}

# The parts a block string may name, and what each is; model/gpt.py's PARTS table builds them.
PARTS: dict[str, str] = {
    "Norm": "model.norm (layernorm, rmsnorm, cosinenorm) over d_model",
    "Attn": "causal self-attention: n_head heads, n_kv_head key/value heads, model.mask per layer",
    "MLP": "feed-forward d_model -> d_ff -> d_model with model.mlp's activation (gated for swiglu, geglu)",
    "MoE": "mixture of experts: moe_experts MLPs, each token routed to its moe_topk best (+ moe_shared always)",
    "CrossAttn": "attention from the sequence to a second one (memory=...), e.g. an encoder's output",
    "KAN": "experimental: a Kolmogorov-Arnold MLP, learned spline activations on every edge (Liu et al. 2024)",
}

ADD, REPLACE = "+", "="
ARROW = "->"


def layout_text(spec: str | list[str]) -> str | list[str]:
    """A layout name replaced by the strings it stands for; block strings unchanged."""
    if isinstance(spec, str) and spec.strip() in LAYOUTS:
        return LAYOUTS[spec.strip()]
    return spec


def parse_block(spec: str | list[str], parts: tuple[str, ...] = tuple(PARTS)) -> list[list[str]]:
    """A block spec (layout name, string or list of strings) -> its branches, each a list of tokens.

    Raises GptlabError naming the bad token, its place, and the parts there are.
    """
    text = layout_text(spec)
    branches = [text] if isinstance(text, str) else list(text)
    if not branches:
        raise GptlabError("model.block is an empty list", f"give at least one branch, e.g. {LAYOUTS['pre']!r}")
    return [_parse_branch(branch, parts) for branch in branches]


def _parse_branch(text: str, parts: tuple[str, ...]) -> list[str]:
    if not isinstance(text, str):
        raise GptlabError(f"model.block: {text!r} is not a string", f"write a branch like {LAYOUTS['pre']!r}")
    tokens = [t.strip() for t in text.split(ARROW)]
    open_parts = 0  # parts since the last + or =
    for i, token in enumerate(tokens):
        if token in (ADD, REPLACE):
            if open_parts == 0:
                _fail(text, tokens, i, f"{token!r} has no part before it to {'add' if token == ADD else 'write'}", parts)
            open_parts = 0
        elif token in parts:
            open_parts += 1
        else:
            case = {p.lower(): p for p in parts}.get(token.lower())
            names = [*parts, *LAYOUTS] if len(tokens) == 1 else list(parts)  # one word may be a mistyped layout
            close = case or next(iter(difflib.get_close_matches(token, names, n=1)), None)
            what = "an empty part (two arrows in a row?)" if not token else f"unknown part {token!r}"
            _fail(text, tokens, i, what + (f" (did you mean {close!r}?)" if close else ""), parts)
    if open_parts:
        _fail(text, tokens, len(tokens) - 1, "the string ends with a part", parts,
              fix="end every branch with + (add it to the residual stream) or = (replace the stream with it)")
    return tokens


def _fail(text: str, tokens: list[str], i: int, problem: str, parts: tuple[str, ...], fix: str | None = None):
    marked = ARROW.join(f"[{t}]" if j == i else t for j, t in enumerate(tokens))
    raise GptlabError(
        f"model.block {text!r}: {problem} at token {i + 1}: {marked}",
        fix or f"parts are {', '.join(parts)}; {ADD} adds the branch to the residual stream, {REPLACE} replaces it; "
        f"layouts are {', '.join(LAYOUTS)}",
    )


def ends_normalised(branches: list[list[str]]) -> bool:
    """Every branch leaves the stream as a norm's output ("...->Norm->="): the model needs no final norm."""
    return all(branch[-2:] == ["Norm", REPLACE] for branch in branches)


def name_parts(branches: list[list[str]]) -> list[list[tuple[str, str | None]]]:
    """Each token with the attribute name its part's module gets (None for + and =): the part in lower case,
    numbered from the second of its kind on (attn, attn2), norms always numbered (norm1, norm2). The pre-norm
    layout so keeps GPT-2-style names (norm1, attn, norm2, mlp), which the exporters and old checkpoints use."""
    seen: dict[str, int] = {}
    named = []
    for branch in branches:
        steps = []
        for token in branch:
            if token in (ADD, REPLACE):
                steps.append((token, None))
                continue
            base = _SNAKE.get(token, token.lower())
            seen[base] = seen.get(base, 0) + 1
            n = seen[base]
            steps.append((token, f"{base}{n}" if base == "norm" or n > 1 else base))
        named.append(steps)
    return named


_SNAKE = {"CrossAttn": "cross_attn"}


def block_label(spec: str | list[str]) -> str:
    """How a block reads in a table: a layout's name, or its string(s)."""
    branches = parse_block(spec)
    name = next((n for n in LAYOUTS if parse_block(n) == branches), None)
    text = " | ".join(ARROW.join(branch) for branch in branches)
    return f"{name}: {text}" if name else text
