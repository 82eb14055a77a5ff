"""The optimizers (AdamW with nanoGPT's parameter groups; Muon + AdamW) and the learning-rate schedules."""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist

from gptlab.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, ranks: tuple[int, int] = (0, 1)):
    """AdamW, or Muon for the blocks' matrices with AdamW for the rest (cfg.optimizer).

    Weight decay goes on matrices and embeddings (dim >= 2), none on norms'
    gains and biases (nanoGPT). Muon orthogonalises each update of a hidden
    matrix (Newton-Schulz); embeddings, the output head, gains and biases are
    not hidden matrices and stay with AdamW (modded-nanogpt). Muon's updates are
    scaled to AdamW's RMS, so train.lr and train.weight_decay mean the same for both.
    ranks: (this process's rank, the number of processes) of a DDP run, whose processes share Muon's work.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # a MoE's experts are [experts, out, in] stacks of matrices: Muon orthogonalises each expert's update on its
    # own (as Moonlight and Kimi K2 train their experts), not AdamW's per-weight steps, nor the stack as one
    # matrix, which would tie the experts' updates together
    muon = [p for n, p in named if cfg.optimizer == "muon" and p.dim() in (2, 3) and n.startswith("blocks.")]
    chosen = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in chosen]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # One fused kernel per step where PyTorch has it (CUDA, and CPU since 2.4); foreach elsewhere.
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
    kernel = {"fused": True} if fused else {"foreach": True}
    adamw = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel
    )
    if not muon:
        return adamw
    from gptlab.device import cpu_has_fast_bf16

    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    blocks = model.fused_matrices() if cfg.muon_split else {}
    return Optimizers(adamw, Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                  adjust_lr_fn="match_rms_adamw", ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32,
                                  blocks=blocks, ranks=ranks))


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in a chosen dtype, fused matrices split, no allocations
    beyond the iteration's own.

    PyTorch always runs the iteration in bf16, which a CPU without native bf16 (AVX2 only) emulates 5-10x
    slower than a whole fp32 training step; there it runs in fp32. `blocks` maps a weight that holds several
    matrices stacked by rows (Q, K and V; gate and up) to their row counts: each is orthogonalised on its own,
    as modded-nanogpt does, instead of the stack as one matrix. Same state ("momentum_buffer") and, without
    blocks, the same update as PyTorch's with adjust_lr_fn="match_rms_adamw"; the Nesterov step is taken in
    the gradient's memory (it is spent after the step) and the momentum buffer is made once.

    `ranks` (rank, world size) of a DDP run, whose processes hold the same averaged gradients: each one runs
    the Newton-Schulz iterations for its share of the matrices only (the most expensive first, each to the
    least loaded process); one all-reduce of the orthogonalised blocks gives every process all of them, which
    each adds as a single process would, so the weights stay bit for bit a single process's (modded-nanogpt
    shares the work the same way). Every process still keeps every momentum buffer (rank 0 checkpoints them).
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, blocks: dict | None = None,
                 ranks: tuple[int, int] = (0, 1), **kwargs):
        params = list(params)
        # PyTorch's Muon refuses anything but 2-D weights; stacks of experts (3-D) join the group after its check
        # (a MoE part always brings a 2-D router, so the group is never empty)
        super().__init__([p for p in params if p.dim() == 2], **kwargs)
        self.param_groups[0]["params"] += [p for p in params if p.dim() == 3]
        self.ns_dtype = ns_dtype
        self.blocks = blocks or {}
        self.rank, self.world_size = ranks
        self.owner = _share_out(params, self.world_size)
        if self.world_size > 1:  # every matrix's update, flat, whichever rank computes it: one all-reduce joins them
            self.updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
            self.update_of = {p: u.view_as(p) for p, u in zip(params, self.updates.split([p.numel() for p in params]))}

    @torch.no_grad()
    def step(self, closure=None):
        shared = self.world_size > 1
        if shared:
            self.updates.zero_()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if shared and self.owner[p] != self.rank:
                    continue  # another rank orthogonalises this one's update
                update = p.grad.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
                for target, block_update in self._matrices(p, self.update_of[p] if shared else p, update):
                    orthogonal = _orthogonalize(block_update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                                self.ns_dtype).to(p.dtype)
                    if shared:
                        target.copy_(orthogonal)  # applied below, once every rank's share is in
                    else:
                        target.add_(orthogonal, alpha=_muon_scale(group, target))
        if shared:
            dist.all_reduce(self.updates)  # each block is its owner's plus zeros: exact
            # the same add as one process's, so the weights are bit for bit those of a single process
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        for block, orthogonal in self._matrices(p, p, self.update_of[p]):
                            block.add_(orthogonal, alpha=_muon_scale(group, block))

    def _matrices(self, p, *tensors):
        """The blocks of `tensors` (shaped as p) that are orthogonalised one by one: a stack of experts
        [E, out, in] expert by expert, a fused weight (Q, K, V; gate and up) by its blocks' rows."""
        rows = self.blocks.get(p, (p.size(-2),))
        matrices = zip(*(t.unbind(0) for t in tensors)) if p.dim() == 3 else [tensors]
        for matrix in matrices:
            yield from zip(*(m.split(rows) for m in matrix))


def _muon_scale(group: dict, block: torch.Tensor) -> float:
    """-lr x Muon's update scale matched to AdamW's RMS (0.2 sqrt(max(rows, columns)), as torch.optim.Muon)."""
    return -group["lr"] * 0.2 * math.sqrt(max(block.shape))


def _share_out(params: list[torch.Tensor], world_size: int) -> dict:
    """Which rank orthogonalises each matrix: the costliest first, each to the least loaded rank so far (the
    same answer on every rank: it depends on the shapes alone). Cost: a Newton-Schulz step of an m x n matrix
    (m <= n) is ~m^2 n multiply-adds."""
    load, owner = [0] * world_size, {}
    for p in sorted(params, key=lambda p: -p.numel() * min(p.shape[-2:])):
        rank = load.index(min(load))
        owner[p] = rank
        load[rank] += p.numel() * min(p.shape[-2:])
    return owner


def _orthogonalize(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration (as in torch.optim._muon), in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Optimizers:
    """Several optimizers that step, zero and checkpoint as one (what the trainer and GradScaler need of one)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """The learning rate for `step` (0-based), where `progress` is the fraction of the run's budget spent once
    this step is done (the largest of steps, tokens and time over their limits; 1 on the last step).

    A linear warm-up over cfg.warmup_steps, then the schedule's decay from lr to its floor, lr x min_lr_ratio,
    which the last step of a run limited by steps or tokens reaches exactly (a run limited by time ends
    within a step of it). The floor is a fraction of the peak, so the rate never rises. The decay shape
    starts at progress 0, not at the end of the warm-up as in nanoGPT; with a warm-up of a few percent of
    the run the two differ by less than that.
    """
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay = DECAY[cfg.schedule](cfg, min(max(progress, 0.0), 1.0))
    return cfg.lr * warmup * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay)


def _cosine(cfg: TrainConfig, p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _linear(cfg: TrainConfig, p: float) -> float:
    return 1.0 - p


def _warmup_stable_decay(cfg: TrainConfig, p: float) -> float:
    """Flat at the peak, then linear to the floor over the last decay_fraction of the run."""
    return min(1.0, (1.0 - p) / cfg.decay_fraction)


def _constant(cfg: TrainConfig, p: float) -> float:
    return 1.0


# Each maps progress in [0, 1] to a weight in [0, 1] between the floor (0) and lr (1).
DECAY = {"cosine": _cosine, "linear": _linear, "wsd": _warmup_stable_decay, "constant": _constant}
