"""A shape trace: one small batch through a model, and what every module took in and gave out.

    from gptlab.lab import trace, format_trace
    rows = trace(model, idx)            # idx [B, T] token ids; a model with CrossAttn gets a zero memory
    print(format_trace(rows))

Forward hooks (torch's register_forward_hook, with keyword arguments) record each call; nothing in the
model's code knows it is traced, so any part (MoE, KAN, your own) shows up as it is. The rows form the
module tree, children in the order they first ran (then those that never ran), each with its input and
output shapes and dtypes, its own parameters and, for a container, those of everything under it.
`gptlab model trace` prints it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


@dataclass
class TraceRow:
    """One module of a traced model."""

    name: str  # its dotted path in the model ("" for the model itself)
    kind: str  # its class
    depth: int  # 0 for the model, 1 for its children, ...
    inputs: list[str] = field(default_factory=list)  # each argument of its first call: "[2, 16, 64] float32", a class name
    outputs: list[str] = field(default_factory=list)  # each value it returned
    calls: int = 0  # times it ran in the pass (0: it never did, e.g. a position table read by indexing)
    params: int = 0  # its own parameters (a tied matrix counts once, with the module listed first)
    total: int = 0  # its own and all its submodules'
    tied: list[str] = field(default_factory=list)  # parameters it shares with a module listed before it
    children: int = 0  # its direct submodules (listed or not at this depth)
    ran_inside: bool = False  # it or a module under it ran

    @property
    def label(self) -> str:
        return self.name.rsplit(".", 1)[-1] if self.name else "model"


def describe(value) -> list[str]:
    """A value passed to or returned from a module, as short strings: tensors by shape and dtype."""
    if isinstance(value, torch.Tensor):
        return [f"[{', '.join(str(n) for n in value.shape)}] {str(value.dtype).removeprefix('torch.')}"]
    if isinstance(value, (tuple, list)):
        return [text for item in value for text in describe(item)]
    if isinstance(value, dict):
        return [f"{key}={text}" for key, item in value.items() for text in describe(item)]
    return ["None" if value is None else type(value).__name__]


def check_depth(depth: int | None) -> None:
    if depth is not None and depth < 0:
        raise GptlabError(f"--depth {depth} is negative", "give 0 (the model alone), 1 (its children), ... or leave it out for all")


def trace(model: nn.Module, idx: torch.Tensor, depth: int | None = None, memory: torch.Tensor | None = None) -> list[TraceRow]:
    """Run idx ([B, T] token ids) through `model` (in eval mode, without gradients) and return a row per module,
    down to `depth` levels below the model (None: all). A model with CrossAttn parts and no `memory` given
    reads a zero memory of T positions."""
    check_depth(depth)
    modules = dict(model.named_modules())
    if memory is None and _has_cross_attention(model):
        dtype = next(model.parameters()).dtype
        memory = torch.zeros(idx.size(0), idx.size(1), model.cfg.d_model, device=idx.device, dtype=dtype)
    calls: dict[str, dict] = {}

    def started(name):  # before the module runs: the order calls begin in, and the first call's inputs
        def hook(module, args, kwargs):
            if name not in calls:
                calls[name] = {"order": len(calls), "calls": 0, "inputs": describe(args) + describe(kwargs), "outputs": []}

        return hook

    def finished(name):
        def hook(module, args, kwargs, output):
            if not calls[name]["calls"]:
                calls[name]["outputs"] = describe(output)
            calls[name]["calls"] += 1

        return hook

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(started(name), with_kwargs=True))
        handles.append(module.register_forward_hook(finished(name), with_kwargs=True))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(idx) if memory is None else model(idx, memory=memory)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return _rows(model, modules, calls, depth)


def _has_cross_attention(model: nn.Module) -> bool:
    from gptlab.model.gpt import CrossAttention

    return any(isinstance(m, CrossAttention) for m in model.modules())


def _rows(model, modules: dict[str, nn.Module], calls: dict[str, dict], depth: int | None) -> list[TraceRow]:
    # each parameter belongs to the first module that holds it, as model.named_parameters() lists it once
    owner = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
    first_name = {id(p): name for name, p in model.named_parameters()}
    own, tied = {}, {}
    for name, module in modules.items():
        held = list(module.parameters(recurse=False))
        own[name] = sum(p.numel() for p in held if owner[id(p)] == name)
        tied[name] = [first_name[id(p)] for p in held if owner[id(p)] != name]

    # a module's place among its siblings: when it, or the first module under it, began running (a ModuleList,
    # or a positions module whose table is read by indexing, never runs itself)
    begun = {}
    for name in modules:
        orders = [calls[n]["order"] for n in modules if n in calls and _under(n, name)]
        begun[name] = min(orders) if orders else None
    rows = []

    def visit(name: str, module: nn.Module, level: int):
        subtree = [n for n in modules if _under(n, name)]
        call = calls.get(name, {})
        children = [(f"{name}.{child}" if name else child, m) for child, m in module.named_children()]
        children = [(n, m) for n, m in children if n in modules]  # a module registered twice is listed once
        rows.append(TraceRow(name, type(module).__name__, level, call.get("inputs", []), call.get("outputs", []),
                             call.get("calls", 0), own[name], sum(own[n] for n in subtree), tied[name], len(children),
                             begun[name] is not None))
        if depth is not None and level >= depth:
            return
        ran = sorted((c for c in children if begun[c[0]] is not None), key=lambda c: begun[c[0]])
        for child_name, child in ran + [c for c in children if begun[c[0]] is None]:
            visit(child_name, child, level + 1)

    visit("", model, 0)
    return rows


def _under(name: str, parent: str) -> bool:
    """The module `name` is `parent` or inside it ("" is the model)."""
    return not parent or name == parent or name.startswith(parent + ".")


def format_trace(rows: list[TraceRow]) -> str:
    """The rows as an indented table: module, class, input(s), output(s), own parameters, subtree total."""
    table = [("module", "class", "input", "output", "params", "total")]
    for row in rows:
        if row.calls:
            inputs, outputs = ", ".join(row.inputs), ", ".join(row.outputs)
            if row.calls > 1:
                outputs += f"  (ran {row.calls}x; shapes of the first)"
        else:  # a container that only holds what runs (a ModuleList), or a module the pass never used
            inputs, outputs = "-", "-" if row.ran_inside else "- (not run)"
        params = f"{row.params:,}" + (f" (tied: {', '.join(row.tied)})" if row.tied else "")
        total = f"{row.total:,}" if row.children else ""  # a leaf's total is its own
        table.append(("  " * row.depth + row.label, row.kind, inputs, outputs, params, total))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for line in table:
        cells = [cell.ljust(w) for cell, w in zip(line[:4], widths)] + [cell.rjust(w) for cell, w in zip(line[4:], widths[4:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def rows_as_json(rows: list[TraceRow]) -> list[dict]:
    return [asdict(row) for row in rows]


def trace_model(cfg, batch_size: int = 2, seq_len: int | None = None, depth: int | None = None,
                seed: int = 0) -> list[TraceRow]:
    """Build a model of `cfg` (a ModelConfig, random weights) and trace a batch of random token ids: batch_size
    rows of seq_len tokens (default: min(context_length, 16))."""
    from gptlab.model import GPT

    check_depth(depth)
    if batch_size < 1:
        raise GptlabError(f"--batch-size {batch_size} is not a batch", "give 1 or more rows")
    seq_len = min(cfg.context_length, 16) if seq_len is None else seq_len
    if seq_len < 1:
        raise GptlabError(f"--seq-len {seq_len} has no tokens", "give 1 or more")
    torch.manual_seed(seed)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return trace(model, idx, depth)
