"""One optimizer step, shared by the trainer and benchmarks/train_throughput.py (so the benchmark times the trainer)."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable

import torch
from torch.profiler import record_function

from gptlab.device import autocast

if TYPE_CHECKING:
    from gptlab.train.distillation import Distiller


class TrainStep:
    """grad_accum micro-batches of forward + backward under autocast, then clip and step.

    The phases (forward, backward, clip, optimizer) carry torch.profiler labels,
    which benchmarks/speedrun_profile.py reports.

    Returns the mean loss and the gradient norm as tensors on the device: the
    caller decides when to pay for a host sync (`.item()`), normally only at
    log steps.

    `model` may be a DistributedDataParallel wrapper: its gradients are then
    averaged over the ranks once, in the last micro-step's backward (no_sync
    on the others). An FSDP2 model reduce-scatters every micro-step instead, so
    that gradients stay sharded; the norm is then a DTensor over all shards.

    `targets` (conversations, whose batches hold different numbers of targets): the micro-batches are
    weighed so that the step's loss is the mean over all the global batch's targets (GlobalTargets).

    `teacher` (train/distillation.py): the loss mixes in a teacher's distributions; an on-policy teacher first
    has the student rewrite some of each batch's rows.

    A model with auxiliary losses (MoE's load balancing and router z-loss) has them in its loss; their part
    of the step's loss is kept in `aux_loss` (the mean over the micro-steps; None for a model without).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str, grad_clip: float = 1.0, compile: bool = False, teacher: "Distiller | None" = None,
                 targets: "GlobalTargets | None" = None):
        self.model, self.optimizer, self.device, self.precision = model, optimizer, device, precision
        self.forward = torch.compile(model) if compile else model
        self.teacher, self.targets = teacher, targets
        self.grad_clip = grad_clip or math.inf  # inf: only measure the norm
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gpt = getattr(model, "module", model)  # under DDP: the GPT, which keeps its aux_loss
        self.aux_loss: torch.Tensor | None = None

    def __call__(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], grad_accum: int, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        no_sync = getattr(self.model, "no_sync", None)  # DDP
        self.aux_loss = None
        batches = [next_batch() for _ in range(grad_accum)]  # (x, y), or (x, y, the stored teacher's top k)
        weights = self.targets.weights([batch[1] for batch in batches]) if self.targets else None
        for i, (x, y, *soft) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            soft = tuple(t.to(self.device, non_blocking=True) for t in soft[0]) if soft else None
            with no_sync() if no_sync and i < grad_accum - 1 else contextlib.nullcontext():
                with record_function("forward"), autocast(self.device, self.precision):
                    if self.teacher:
                        x, y, written = self.teacher.rollout(self.gpt, x, y, i)  # on-policy: the student's own rows
                        logits, loss = self.forward(x, y, return_logits=True)
                        loss = self.teacher.loss(x, y, logits, loss, written, soft)
                    else:
                        _, loss = self.forward(x, y)
                loss = loss / grad_accum if weights is None else loss * weights[i]
                with record_function("backward"):
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
            aux = getattr(self.gpt, "aux_loss", None)  # set by this micro-step's forward (training mode)
            if aux is not None:
                self.aux_loss = aux / grad_accum if self.aux_loss is None else self.aux_loss + aux / grad_accum
        with record_function("clip"):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, reduced
            # A CPU reads the norm without waiting for a device: the pass over every gradient that scales them is
            # skipped when nothing clips (4m shape: 1.6 of ~380 ms a step). Elsewhere it always runs (no sync).
            if self.device.type != "cpu" or grad_norm > self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm, foreach=True)
        with record_function("optimizer"):
            if self.scaler:
                self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm


class GlobalTargets:
    """Weights that make a step's loss the mean over every target of the global batch, where batches hold
    different numbers of targets (conversations: the assistant's tokens).

    Each micro-batch's loss is the mean over its own targets, and the gradients are averaged over the
    micro-steps and the ranks (DDP/FSDP): a mean of means, which weighs a target of a sparse batch more than
    one of a dense batch, and so differs with the number of processes and grad_accum. Weighing micro-batch i
    of a rank by n_i x world_size / N (N: the targets of all micro-batches of all ranks, one tiny all-reduce
    a step, kept on the device) gives every target the weight 1/N: the same step on any number of processes.
    """

    def __init__(self, device: torch.device, world_size: int = 1, reduce: Callable | None = None):
        self.device, self.world_size, self.reduce = device, world_size, reduce or (lambda t: t)

    def weights(self, targets: list[torch.Tensor]) -> list[torch.Tensor]:
        kept = torch.stack([(y != -1).sum() for y in targets]).to(self.device, torch.float32)
        total = self.reduce(kept.sum()).clamp(min=1)  # a step without a target leaves the model as it is
        return list(kept * self.world_size / total)
