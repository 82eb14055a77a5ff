"""Distillation while training: the student learns a teacher's next-token distributions, not only the data's
next tokens (train.teacher).

Where the teacher's distributions come from:

    LiveTeacher     a trained run, beside the student in memory, run on every batch (logit distillation);
                    with train.distill_on_policy = λ > 0, λ of every batch's rows are first rewritten by the
                    student itself and the teacher scores the student's own tokens (on-policy distillation,
                    GKD: Agarwal et al. 2024) -- the student learns where its own samples go wrong, not only
                    on text it would never write.
    StoredTeacher   the top-k log-probabilities `gptlab distill --logits` stored beside the shards: the same
                    loss without the teacher in memory (a teacher too big to run beside the student).

The divergence, train.distill_beta = β (TRL's GKD convention): 0 is the forward KL(teacher || student) of
Hinton et al. (2015), which spreads the student over everything the teacher finds likely; 1 is the reverse
KL(student || teacher), which lets a small student pick the teacher's main modes (MiniLLM); in between, the
generalised Jensen-Shannon divergence β KL(teacher || m) + (1 - β) KL(student || m), m = β teacher + (1 - β)
student. Both distributions are softened by the temperature T and the divergence is scaled by T^2, which keeps
its gradients' size across T.

A real row's loss is (1 - w) x cross-entropy + w x T^2 x divergence (w: train.distill_weight); a row the
student wrote has no true next token, so its loss is T^2 x divergence alone, on the tokens it wrote. A step
mixes the two by their share of the rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gptlab.model import KVCache


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalised JSD(β) between two distributions given as log-probabilities over the last dimension,
    per position (summed over that dimension): β = 0 forward KL(teacher || student), β = 1 reverse KL."""
    if beta == 0:
        return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
    if beta == 1:
        return F.kl_div(teacher_logp, student_logp, log_target=True, reduction="none").sum(-1)
    mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0)
    to_teacher = F.kl_div(mixture, teacher_logp, log_target=True, reduction="none").sum(-1)  # KL(teacher || m)
    to_student = F.kl_div(mixture, student_logp, log_target=True, reduction="none").sum(-1)  # KL(student || m)
    return beta * to_teacher + (1 - beta) * to_student


def top_k_buckets(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over k + 1 buckets -- the teacher's k most likely tokens and "everything else" --
    as log-probabilities [..., k + 1] (student, teacher), for a teacher stored as its top-k.

    The tail bucket keeps the divergence honest: a student that moves probability off the teacher's top k pays
    for it. With T != 1 the buckets, not the full distributions, are softened (the stored top k is all there is
    of the teacher): exact for the k tokens' relative odds, approximate for the tail.
    """
    student = student_logits.float().log_softmax(-1).gather(-1, ids.long())  # [..., k]
    teacher = teacher_logp.float()

    def with_tail(logp):
        kept = torch.logsumexp(logp, dim=-1, keepdim=True).clamp(max=-1e-6)  # log of the top k's mass, < 0
        return torch.cat([logp, torch.log(-torch.expm1(kept))], dim=-1)  # log(1 - mass) for the rest

    student, teacher = with_tail(student), with_tail(teacher)
    if temperature != 1:
        student, teacher = (student / temperature).log_softmax(-1), (teacher / temperature).log_softmax(-1)
    return student, teacher


class Distiller:
    """What the two teachers share: the mixed loss of a batch. `loss` gets the student's logits and its
    cross-entropy over the real rows, `written` ([B, T] bool, or None) marks the positions whose next token
    the student wrote itself (see LiveTeacher.rollout), `soft` the stored teacher's (ids, log-probabilities)."""

    def __init__(self, weight: float, temperature: float, beta: float):
        self.weight, self.temperature, self.beta = weight, temperature, beta
        self.step = 0  # the trainer's step, which seeds the student's samples (a resumed run draws them again)

    def teacher_logp(self, x: torch.Tensor, student_logits: torch.Tensor, soft) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probabilities at temperature T over the same buckets, [B, T, n]."""
        raise NotImplementedError

    def rollout(self, student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, micro_step: int):
        """(x, y, written): the batch as it is (no on-policy rows)."""
        return x, y, None

    def loss(self, x: torch.Tensor, y: torch.Tensor, student_logits: torch.Tensor, cross_entropy: torch.Tensor,
             written: torch.Tensor | None = None, soft=None) -> torch.Tensor:
        T = self.temperature
        student, teacher = self.teacher_logp(x, student_logits, soft)
        per_position = divergence(student, teacher, self.beta) * (T * T)  # [B, T]
        real_loss = (1 - self.weight) * cross_entropy + self.weight * _mean_over(per_position, y != -1)
        if written is None:
            return real_loss
        written_loss = _mean_over(per_position, written)
        share = self.written_share  # the rows the student wrote, of all rows (set by rollout: no host sync here)
        return written_loss if share == 1 else (1 - share) * real_loss + share * written_loss


def _mean_over(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


class LiveTeacher(Distiller):
    """A frozen trained model beside the student: its distributions at every position of every batch, and, with
    on_policy = λ > 0, λ of every batch's rows rewritten by the student before the teacher scores them."""

    def __init__(self, model: torch.nn.Module, weight: float, temperature: float, beta: float = 0.0,
                 on_policy: float = 0.0, new_tokens: int = 64, seed: int = 0):
        super().__init__(weight, temperature, beta)
        self.model = model.eval().requires_grad_(False)
        self.on_policy, self.new_tokens, self.seed = on_policy, new_tokens, seed

    def teacher_logp(self, x, student_logits, soft):
        with torch.no_grad():
            teacher_logits, _ = self.model(x)
        T = self.temperature
        return (student_logits.float() / T).log_softmax(-1), (teacher_logits.float() / T).log_softmax(-1)

    def rollout(self, student, x, y, micro_step):
        """The first round(λ B) rows of the batch keep their first T - N real tokens as a prompt and the student
        writes the other N (train.distill_new_tokens) and one more, the last row's target, at temperature 1.
        `written` marks the positions whose target the student wrote; those rows' y is -1 (no cross-entropy)."""
        rows = round(self.on_policy * x.size(0))
        if not rows:
            return x, y, None
        seq_len = x.size(1)
        new = min(self.new_tokens, seq_len - 1)
        prompt_len = seq_len - new
        self.written_share = rows / x.size(0)
        seed = int(np.random.SeedSequence([self.seed, self.step, micro_step]).generate_state(1)[0])
        generator = torch.Generator(device=x.device).manual_seed(seed)
        sequence = sample_from(student, x[:rows, :prompt_len], new + 1, generator)  # [rows, T + 1]
        x, y = x.clone(), y.clone()
        x[:rows], y[:rows] = sequence[:, :-1], -1
        written = torch.zeros_like(x, dtype=torch.bool)
        written[:rows, prompt_len - 1:] = True  # position p predicts token p + 1: the first written one is prompt_len
        return x, y, written


class StoredTeacher(Distiller):
    """The teacher's top-k log-probabilities per position, read with each batch (`soft`: ids and log-probabilities,
    [B, T, k] each), compared over the top k and the rest (top_k_buckets)."""

    def teacher_logp(self, x, student_logits, soft):
        ids, teacher_logp = soft
        return top_k_buckets(student_logits, ids, teacher_logp, self.temperature)


@torch.no_grad()
def sample_from(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """prompt [B, P] -> [B, P + new_tokens]: the model's own continuation at temperature 1, a token at a time
    through a KV cache (no padding, no stop tokens: what on-policy training needs of generation)."""
    was_training = model.training
    model.eval()  # no dropout in the student's samples
    try:
        cache = KVCache(prompt.size(0), prompt.size(1) + new_tokens - 1, prompt.device)
        logits, _ = model(prompt, cache=cache)
        out = [prompt]
        for i in range(new_tokens):
            token = torch.multinomial(logits[:, -1].float().softmax(-1), 1, generator=generator)
            out.append(token)
            if i < new_tokens - 1:
                logits, _ = model(token, cache=cache)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
