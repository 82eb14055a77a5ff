"""What a model costs before it is trained: parameters, FLOPs and memory.

Parameters come from building the model on PyTorch's "meta" device (shapes
only, no memory), so they are exact for any config. Memory for training with
AdamW: fp32 weights, fp32 gradients, two fp32 moments, plus the activations
autograd keeps for the backward pass. Activations are an estimate: the
per-layer accounting of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", sec. 4.1: s*b*h*(34 + 5*a*s/h)
bytes for GPT-2 blocks in 16-bit), redone term by term for this model's parts
(grouped K/V heads, gated MLPs, extra norms, fused attention that keeps no
s*s matrix) and for 4-byte (fp32) or 2-byte (bf16 autocast) activations.
The peak ("total") is a CPU training process's resident memory: the fused
loss's buffers, gradients that never sit beside the activations, and what the
runtime and malloc keep; benchmarks/memory.py measures it (benchmarks/MEMORY.md:
within 12% on 20 rows from 0.5M to 124M parameters, 2 threads, glibc).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model.blocks import block_label

if TYPE_CHECKING:  # config.py imports the model package (its block check) before Config exists
    from gptlab.config import Config


def activation_bytes(cfg: ModelConfig, batch_size: int, bytes_per_value: int, seq_len: int | None = None,
                     loss: str = "plain", checkpointing: bool = False) -> int:
    """Bytes of activations autograd keeps for backward in one step (activation_terms: per layer and outside
    the blocks). checkpointing: activation checkpointing (train.checkpointing): every block keeps only its
    fp32 input, and one block's activations exist at a time, while backward runs it again."""
    per_layer, outside = activation_terms(cfg, batch_size, bytes_per_value, seq_len, loss)
    if checkpointing:
        s, b = seq_len or cfg.context_length, batch_size
        return cfg.n_layer * s * b * cfg.d_model * 4 + per_layer + outside
    return cfg.n_layer * per_layer + outside


def activation_terms(cfg: ModelConfig, batch_size: int, bytes_per_value: int, seq_len: int | None = None,
                     loss: str = "plain") -> tuple[int, int]:
    """Bytes of activations autograd keeps for backward, (one layer's, outside the blocks), an estimate (see
    the module docstring).

    bytes_per_value is 4 (fp32) or 2 (bf16 autocast) for matmul inputs and outputs; the residual stream, and
    so every norm on it, stays fp32 under autocast (the weights are fp32). A dropout keeps a mask of the
    activations' dtype (CPU); the fused attention drops values (a mask and the dropped copy, per token), the
    plain path drops probabilities and keeps the s x s matrices.

    loss: the head's loss (model/loss.py). "plain" keeps the logits and their fp32 log-softmax; "fused" (the
    CPU's) keeps neither: what it holds instead is loss_bytes'.
    """
    s, b, p = seq_len or cfg.context_length, batch_size, bytes_per_value
    h, f, V = cfg.d_model, cfg.ff_dim, cfg.vocab_size
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    dropout = cfg.dropout > 0

    # the parts of a block, counted (model/blocks.py); parts other than norms, attention and MLPs (MoE, KAN,
    # cross-attention) are counted as the MLP or attention they replace, times their active copies
    tokens = [token for branch in cfg.layout for token in branch]
    n_norm, n_attn = tokens.count("Norm"), tokens.count("Attn") + tokens.count("CrossAttn")
    n_mlp = tokens.count("MLP") + tokens.count("KAN") + tokens.count("MoE") * (cfg.moe_topk + cfg.moe_shared)
    # per token and layer: the norms on the residual stream (two in a pre-norm block) keep their fp32 input
    # (RMS and cosine norms also their normalised output); more norms (sandwich) keep the sublayer outputs
    norm_copies = 1 if cfg.norm == "layernorm" else 2
    per_token = min(n_norm, 2) * norm_copies * h * 4 + max(n_norm - 2, 0) * norm_copies * h * p
    # attention: input of the QKV matmul, its output, new Q and K after QK-norm and after RoPE, the attention
    # output (the fused kernel keeps it) and its copy that enters the output projection
    rewrites = int(cfg.qk_norm) + int(cfg.position == "rope")
    fused = cfg.attention == "sdpa"
    per_token += n_attn * (h + (q_dim + 2 * kv_dim) + rewrites * (q_dim + kv_dim) + q_dim * (1 + fused)) * p
    per_token += n_attn * 2 * kv_dim * p * dropout * fused  # the values' dropout mask and dropped copy
    # MLP: its input, then gate+up, activation and product (gated), or the hidden layer before and after
    # the activation (ReLU keeps only its output)
    hidden = {"swiglu": 4, "geglu": 4, "relu": 1}.get(cfg.mlp, 2) * f
    per_token += n_mlp * (h + hidden) * p
    per_token += (n_attn + n_mlp) * h * p * dropout  # masks of the residual dropouts
    if fused:  # flash attention recomputes the s x s matrix in backward: only a log-sum-exp per row
        attention_matrix = n_attn * cfg.n_head * b * s * 4
    else:  # softmax output, plus the dropout mask and dropped probabilities
        attention_matrix = n_attn * cfg.n_head * b * s * s * p * (1 + 2 * dropout)
    per_layer = s * b * per_token + attention_matrix

    # outside the blocks: the final norm's fp32 input, the head's input, the logits (the caller holds them
    # through backward) and the fp32 log-softmax of the loss; the fused loss keeps none of the last three
    head = h * p + V * (p + 4) if loss == "plain" else 0
    outside = s * b * (norm_copies * h * 4 + head + h * p * dropout)
    return per_layer, outside


def loss_bytes(cfg: ModelConfig, batch_size: int, bytes_per_value: int, seq_len: int | None = None) -> tuple[int, int]:
    """The fused loss's memory at the end of the forward pass (model/loss.py's LinearCrossEntropy): what it
    keeps for backward, and the most its chunk loop holds besides.

    It computes both input gradients in the forward pass and keeps them: grad_x [N, D] in the dtype of its
    input (fp32: the final norm's output) and grad_w [V, D] fp32. A chunk of c rows holds its fp32 logits
    [c, V] (exponentiated in place), under autocast also their bf16 matmul output or bf16 copy for the
    gradient's matmuls, and the [V, D] product that is added to grad_w (or the weight's bf16 copy).
    Measured on a CPU (benchmarks/MEMORY.md): within a few MiB of torch.profiler's live tensors.
    """
    from gptlab.model.loss import FUSED_CHUNK

    n = batch_size * (seq_len or cfg.context_length)
    D, V = cfg.d_model, cfg.vocab_size
    c = min(FUSED_CHUNK, n)
    kept = n * D * 4 + V * D * 4
    chunk = c * V * 4 + V * D * 4 + ((c * V + V * D) * 2 if bytes_per_value == 2 else 0)
    return kept, chunk


# What a training process holds on a CPU beyond its tensors (benchmarks/MEMORY.md, 2 threads, glibc malloc):
# the kernels' code and thread pools paged in by the first step (15-27 MiB measured with malloc returning
# every freed block), and the free memory glibc keeps in its heap once freed activations have raised its
# mmap threshold (blocks up to 32 MiB then come from the heap, which fragments and is not trimmed): 0.2-0.6
# of the activations measured, about the same share of their fp32 size under bf16 autocast as in fp32 (so
# counted on the fp32 size: 0.3); run to run it moves by up to 15% of the peak at the small shapes.
RUNTIME_BYTES = 30 * 2**20
MALLOC_KEEP = 0.3
# With activation checkpointing the peak is in backward (gradients beside the blocks' inputs and a block run
# again); malloc keeps less of the whole activations and some of a block's (fitted on 16 rows: within 15% but
# one, benchmarks/MEMORY.md)
CHECKPOINTING_MALLOC_KEEP = 0.15
CHECKPOINTING_BLOCK_KEEP = 0.5
# With grad_accum > 1 malloc keeps more still: 0.4 of the activations (fitted on 20 rows at grad_accum 2)
ACCUM_MALLOC_KEEP = 0.4
# torch.compile on a CPU (benchmarks/MEMORY.md): dynamo's and inductor's modules and compiled code (~75 MiB),
# and fewer activations kept (inductor fuses pointwise ops and recomputes cheap ones in backward: ~0.7x)
COMPILE_BYTES = 75 * 2**20
COMPILE_ACTIVATIONS = 0.75
# The process itself, which a memory budget must hold too. On a CPU: Python with PyTorch and gptlab's
# training modules imported is 305 MiB resident (Python 3.11, torch 2.13 CPU); a whole `gptlab train` adds
# matplotlib for its plots (32 MiB), validation batches, checkpoint writes and the data's pages: runs of
# 0.1-0.5M parameters (sweep trials) peaked at 432-451 MiB where their steps were predicted 38-58 MiB. On a
# GPU, the CUDA context (~0.5 GiB, outside torch.cuda.max_memory_allocated). benchmarks/memory.py measures
# the peak's increase over the process's start, so it compares total - process.
PROCESS_BYTES = {"cpu": 384 * 2**20, "cuda": 512 * 2**20}
# On a GPU the caching allocator keeps freed blocks to reuse them: a fit leaves this share of the card unused.
CUDA_FRAGMENTATION = 0.1
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class TrainingSetup:
    """How a model is trained, as far as its memory goes (`gptlab model info --batch-size --precision ...`)."""

    batch_size: int = 16
    """sequences one process runs through the model at once (the micro-batch)"""
    precision: str = "fp32"
    """fp32, or bf16/fp16 autocast"""
    optimizer: str = "adamw"
    """adamw (two fp32 moments a weight) or muon (one momentum a block matrix, AdamW for the rest)"""
    device: str = "cpu"
    """cpu: the resident set's peak; cuda: max_memory_allocated (plus the context, reported apart)"""
    compile: bool = False
    checkpointing: bool = False
    """activation checkpointing: blocks keep only their inputs, one block's activations at a time"""
    grad_accum: int = 1
    """micro-steps a step: from the second one on, gradients sit beside the activations"""
    processes: int = 1
    distributed: str = "ddp"
    """ddp: a whole model, its gradients and optimizer in each process; fsdp: a 1/processes shard of them"""
    loss: str | None = None
    """the head's loss (model/loss.py); none: the device's (fused on a CPU, plain elsewhere)"""


def setup_for(cfg: Config, device: str | None = None) -> TrainingSetup:
    """The setup `gptlab train` would use for cfg: each process runs train.batch_size / nproc sequences at a
    time; precision resolved for the device as training resolves it; compile=auto counts as eager (the
    estimate measured; a compiled CPU run holds ~75 MiB more and fewer activations)."""
    from gptlab.device import cpu_has_fast_bf16

    t = cfg.train
    device = device or ("cuda" if t.device == "auto" and torch.cuda.is_available() else "cpu" if t.device == "auto" else t.device)
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" or (device == "cpu" and cpu_has_fast_bf16()) else "fp32"
    processes = t.nproc if t.nproc > 1 else 1
    return TrainingSetup(batch_size=max(1, t.batch_size // processes), precision=precision,
                         optimizer=t.optimizer, device=device, compile=t.compile is True,
                         checkpointing=t.checkpointing, grad_accum=t.grad_accum, processes=processes,
                         distributed=t.distributed if processes > 1 else "ddp")


def memory_parts(cfg: ModelConfig, setup: TrainingSetup, model=None) -> dict[str, int]:
    """Bytes one training process holds, by part, and its peak ("total"), for `setup`: what a memory budget
    must hold, the process itself ("process": Python, PyTorch and the trainer, or the CUDA context) included.

    CPU, AdamW, eager, one process: the formula benchmarks/MEMORY.md measured (within 12% on 20 shapes). The
    peak comes at the end of a forward pass after the first step (weights, optimizer state, activations and
    the loss's buffers; no gradients, zero_grad sets them to None) or at the end of backward (gradients
    instead of activations); with grad_accum > 1 the gradients are there through every later forward pass.
    FSDP: weights, gradients and optimizer are 1/processes shards, plus the largest block gathered twice
    (the one running and the next one prefetched) and the root's (embeddings, head) gathered all step.
    """
    from gptlab.model.loss import loss_for

    if model is None:
        from gptlab.model.gpt import GPT

        with torch.device("meta"):  # shapes only: a 124M model costs no memory and no time
            model = GPT(cfg)
    params = model.num_params()
    p = BYTES[setup.precision]
    loss = setup.loss or loss_for(setup.device)
    b = setup.batch_size
    # autocast keeps a bf16 copy of every weight a block's matmuls read, from the forward pass into backward
    # (the head's is cast chunk by chunk, not kept)
    cast = sum(w.numel() for w in model.blocks.parameters() if w.dim() >= 2)
    copies = 2 * cast if p == 2 else 0
    muon = sum(w.numel() for w in model.blocks.parameters() if w.dim() in (2, 3)) if setup.optimizer == "muon" else 0
    optimizer = 8 * (params - muon) + 4 * muon  # AdamW: two fp32 moments; Muon: one momentum buffer
    weights, gradients = 4 * params, 4 * params
    if setup.distributed == "fsdp" and setup.processes > 1:
        n = setup.processes
        block = max(sum(w.numel() for w in blk.parameters()) for blk in model.blocks)
        root = params - sum(w.numel() for w in model.blocks.parameters())
        gathered = (2 * block + root) * (p if setup.device == "cuda" else 4)
        weights, gradients, optimizer, copies = weights // n + gathered, gradients // n + 4 * 2 * block, optimizer // n, copies // n
    elif setup.processes > 1:  # DDP: gradient buckets, a flat copy of the gradients being averaged
        gradients += 4 * params
    activations = activation_bytes(cfg, b, p, loss=loss, checkpointing=setup.checkpointing)
    fp32_activations = activation_bytes(cfg, b, 4, loss=loss)  # malloc's share follows the uncheckpointed size
    if setup.compile:
        activations, fp32_activations = int(activations * COMPILE_ACTIVATIONS), int(fp32_activations * COMPILE_ACTIVATIONS)
    kept, chunk = loss_bytes(cfg, b, p) if loss == "fused" else (0, 0)
    if setup.device == "cuda":
        runtime = int(CUDA_FRAGMENTATION * (activations + kept + chunk))
    elif setup.checkpointing:  # each block's activations made and freed twice, in forward and in backward
        runtime = RUNTIME_BYTES + int(CHECKPOINTING_MALLOC_KEEP * fp32_activations
                                      + CHECKPOINTING_BLOCK_KEEP * activation_terms(cfg, b, 4, loss=loss)[0])
    else:
        runtime = RUNTIME_BYTES + int(MALLOC_KEEP * fp32_activations)
    if setup.grad_accum > 1 and setup.device != "cuda":  # every micro-step's activations made and freed anew
        runtime += int(ACCUM_MALLOC_KEEP * activations)
    runtime += COMPILE_BYTES if setup.compile and setup.device == "cpu" else 0
    process = PROCESS_BYTES.get(setup.device, PROCESS_BYTES["cpu"])
    # end of forward: activations and the loss's buffers (and the gradients accumulated so far, if any);
    # end of backward: the gradients, the embedding's dense gradient being added, the bf16 copies freed
    forward = activations + kept + chunk + (gradients if setup.grad_accum > 1 else 0)
    backward = gradients + 4 * cfg.vocab_size * cfg.d_model - copies
    if setup.checkpointing:  # backward holds the blocks' inputs, a block run again and its activations' gradients
        backward += activations + activation_terms(cfg, b, p, loss=loss)[0]
    return {
        "weights": weights + copies,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "loss": kept + chunk,
        "runtime": runtime,
        "process": process,
        "total": process + weights + copies + optimizer + max(forward, backward) + runtime,
    }


def model_info(cfg: ModelConfig, batch_size: int, loss: str | None = None, setup: TrainingSetup | None = None,
               precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """Parameters, training FLOPs per token and per step of `batch_size` sequences of context_length, and
    training memory (memory_bytes[precision] = memory_parts) for `setup` at each of `precisions`.

    setup: default a CPU, AdamW, eager, one process running all `batch_size` sequences at once; `loss`
    ("plain") prices a CPU run with the logits built, as older builds did.
    """
    if cfg.vocab_size is None:
        raise GptlabError("model.vocab_size is not set", "pass --model.vocab_size=N (the tokenizer's vocabulary size)")
    from gptlab.model.gpt import GPT
    from gptlab.model.loss import loss_for

    setup = replace(setup or TrainingSetup(batch_size=batch_size), **({"loss": loss} if loss else {}))
    with torch.device("meta"):  # shapes only: a 124M model costs no memory and no time
        model = GPT(cfg)
    params = model.num_params()
    non_embedding = model.num_params(non_embedding=True)
    tokens = batch_size * cfg.context_length
    flops = model.flops_per_token()
    memory = {precision: memory_parts(cfg, replace(setup, precision=precision), model) for precision in precisions}
    return {
        "parameters": params,
        "embedding_parameters": params - non_embedding,
        "non_embedding_parameters": non_embedding,
        "active_parameters": params - model.idle_parameters(),  # a token goes through (less than all with MoE parts)
        "flops_per_token": flops,
        "batch_size": batch_size,
        "context_length": cfg.context_length,
        "tokens_per_step": tokens,
        "flops_per_step": flops * tokens,
        "loss": setup.loss or loss_for(setup.device),
        "setup": setup,
        "memory_bytes": memory,
    }


def planned_model(cfg: Config):
    """(cfg's model section, the model built on "meta": shapes only, no memory), its vocabulary the size the
    [tokenizer] section asks for when the tokenizer is to decide it."""
    from gptlab.model.gpt import GPT
    from gptlab.tokenizer import planned_vocab_size

    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        model_cfg = model_cfg.model_copy(update={"vocab_size": planned_vocab_size(cfg.tokenizer)})
    with torch.device("meta"):
        return model_cfg, GPT(model_cfg)


def training_memory(cfg: Config, device: str | None = None, planned=None) -> dict[str, int]:
    """memory_parts for the way `gptlab train` would train cfg (setup_for); `planned`: planned_model(cfg),
    when the caller has built it already."""
    model_cfg, model = planned or planned_model(cfg)
    return memory_parts(model_cfg, setup_for(cfg, device), model)


def describe(cfg: ModelConfig) -> str:
    """One line naming the architecture's shape and parts."""
    kv = {cfg.n_head: "MHA", 1: "MQA"}.get(cfg.kv_heads, f"GQA {cfg.kv_heads} kv heads")
    tokens = {token for branch in cfg.layout for token in branch}
    masks = [cfg.mask] if isinstance(cfg.mask, str) else cfg.mask
    mask = "" if masks == ["causal"] else f" mask {'/'.join(masks)}" + (f" {cfg.window}" if {"window", "strided"} & set(masks) else "") + ","
    moe = (f" MoE {cfg.moe_experts} x {cfg.moe_d_ff or cfg.ff_dim} top-{cfg.moe_topk}"
           + (f" + {cfg.moe_shared} shared" if cfg.moe_shared else "") + ",") if "MoE" in tokens else ""
    return (
        f"{cfg.n_layer} layers x {cfg.d_model}, {cfg.n_head} heads x {cfg.head_dim} ({kv}),{mask} "
        f"ctx {cfg.context_length}, vocab {cfg.vocab_size:,}; block {block_label(cfg.block)}; {cfg.norm}, "
        f"{cfg.position} positions, {cfg.mlp} MLP {cfg.ff_dim},{moe} "
        f"{'bias' if cfg.bias else 'no bias'}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings"
    )


def describe_setup(setup: TrainingSetup, context_length: int) -> str:
    """'micro-batch 8 x 1,024, bf16 autocast, Muon, compiled, activation checkpointing, 8 processes (FSDP), CUDA'"""
    parts = [f"micro-batch {setup.batch_size} x {context_length:,}"]
    parts += [f"grad-accum {setup.grad_accum}"] if setup.grad_accum > 1 else []
    parts += ["Muon + AdamW" if setup.optimizer == "muon" else "AdamW", "compiled" if setup.compile else "eager"]
    parts += ["activation checkpointing"] if setup.checkpointing else []
    parts += [f"{setup.processes} processes ({setup.distributed.upper()}), per process"] if setup.processes > 1 else []
    return ", ".join(parts + [setup.device.upper() if setup.device == "cuda" else setup.device])


def format_model_info(info: dict, title: str, cfg: ModelConfig) -> str:
    """The table `gptlab model info` prints."""
    mem, setup = info["memory_bytes"], info["setup"]
    precisions = list(mem)
    names = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    rows = [
        f"{title}: {describe(cfg)}",
        "",
        f"parameters          {format_count(info['parameters']):>10}   "
        f"(embedding {format_count(info['embedding_parameters'])}, non-embedding {format_count(info['non_embedding_parameters'])}"
        + (f"; {format_count(info['active_parameters'])} a token goes through" if info["active_parameters"] != info["parameters"] else "")
        + ")",
        f"FLOPs per token     {format_count(info['flops_per_token']):>10}   (training: forward + backward, 6N + attention)",
        f"FLOPs per step      {format_count(info['flops_per_step']):>10}   "
        f"(batch {info['batch_size']} x {info['context_length']} = {info['tokens_per_step']:,} tokens)",
        "",
        f"training memory: {describe_setup(setup, info['context_length'])}",
        f"{'':<28}" + "".join(f"{names[p]:>15}" for p in precisions),
    ]
    cuda = setup.device == "cuda"
    labels = {
        "weights": "weights (+ bf16 copies)",
        "gradients": "gradients (fp32)",
        "optimizer": ("Muon + AdamW state" if setup.optimizer == "muon" else "AdamW moments (2 x fp32)"),
        "activations": "activations (estimate)",
        "loss": f"{info['loss']} loss buffers",
        "runtime": "allocator's free blocks" if cuda else "runtime + malloc kept",
        "process": "CUDA context" if cuda else "Python, PyTorch, trainer",
        "total": "total (peak, per process)" if setup.processes > 1 else "total (peak)",
    }
    for key, label in labels.items():
        if key == "loss" and not any(mem[p]["loss"] for p in precisions):
            continue
        rows.append(f"  {label:<26}" + "".join(f"{format_bytes(mem[p][key]):>15}" for p in precisions))
    return "\n".join(rows)


def format_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
