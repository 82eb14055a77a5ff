"""Validation while training: the loss over the validation split, bits per byte, and patience.

Distributed, each rank scores its share of the same windows and the sums are all-reduced, so the loss is the
single-process one, on every rank. A chat run's validation split is its held-out conversations, packed whole
into rows in order; its loss is the mean over the assistant's tokens (the targets the loss mask keeps), each
scored once.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gptlab.device import autocast
from gptlab.train.metrics import Diverged


class Validator:
    """Scores `model` on train.eval_batches batches of consecutive windows (or packed conversations) of the val
    split (None: all of it);
    keeps the best loss so far and how many evaluations ago it was (early stopping's patience).

    `has_val`: the data has a validation split of at least one window. `bytes_per_token` is the whole val split's ratio: bits per byte = loss * tokens / (ln 2 * bytes).
    """

    def __init__(self, model: torch.nn.Module, data_dir: Path, context_length: int, batch_size: int,
                 eval_batches: int | None, patience: int, precision: str, dist, has_val: bool,
                 bytes_per_token: float | None):
        self.model, self.data_dir, self.context_length = model, Path(data_dir), context_length
        self.batch_size, self.eval_batches, self.patience = batch_size, eval_batches, patience
        self.precision, self.dist, self.has_val, self.bytes_per_token = precision, dist, has_val, bytes_per_token
        self.best_val_loss, self.evals_since_best = math.inf, 0

    def __call__(self, step: int) -> dict | None:
        """Evaluate, and count it toward the best loss and the patience: {"loss", "perplexity", "bpb"?, "best"}
        (None: the data has no validation split)."""
        if not self.has_val:
            return None
        result = self.evaluate()
        if result is None:  # nothing scored (no target in the split): no validation, as without a split
            return None
        if not math.isfinite(result["loss"]):
            raise Diverged(f"the validation loss is {result['loss']} at step {step}")
        result["best"] = result["loss"] < self.best_val_loss  # strictly better: a tie keeps the earlier best
        if result["best"]:
            self.best_val_loss, self.evals_since_best = result["loss"], 0
        else:
            self.evals_since_best += 1
        return result

    @property
    def patience_spent(self) -> bool:
        return bool(self.patience) and self.evals_since_best >= self.patience

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """{"loss", "perplexity", "bpb"?}: the mean loss over every target scored (conversations: over the
        assistant's tokens, each once), on all ranks together; None where no target was scored."""
        device = self.dist.device
        self.model.eval()
        total, count = torch.zeros((), device=device), 0
        for x, y in self.batches():
            kept = 0 if y is None else int((y != -1).sum())
            with autocast(device, self.precision):
                # every rank runs the forward pass (FSDP gathers weights in it); a batch without targets
                # is not scored: its mean loss is 0/0 = NaN, which times 0 targets is still NaN
                _, loss = self.model(x.to(device), y.to(device) if kept else None)
            if kept:
                total += loss.float() * kept
                count += kept
        self.model.train()
        loss_sum, count = self.dist.sum_(torch.tensor([total.item(), count], dtype=torch.float64)).tolist()
        if not count:
            return None
        loss = loss_sum / count
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.bytes_per_token:
            result["bpb"] = loss / (math.log(2) * self.bytes_per_token)
        return result

    def batches(self):
        """This rank's validation batches. Under FSDP every rank must run as many forward passes as the others
        (each gathers weights from all), so a rank that runs out repeats its last batch with no weight."""
        from gptlab.data import iter_eval_batches

        size, T, world = self.batch_size // self.dist.world_size, self.context_length, self.dist.world_size
        batches = iter_eval_batches(self.data_dir, "val", size, T, self.eval_batches, self.dist.rank, world)
        if self.dist.mode != "fsdp":
            yield from batches
            return
        total = math.ceil(self._rows() / size)
        if self.eval_batches:
            total = min(total, self.eval_batches * world)
        x = torch.zeros((1, T), dtype=torch.long)
        for _ in range(math.ceil(total / world)):
            batch = next(batches, None)
            if batch is None:
                yield x, None  # a forward pass that is not scored
            else:
                x = batch[0]
                yield batch

    def rows_per_evaluation(self) -> int:
        """Rows of context_length tokens one evaluation scores, on all ranks together."""
        if not self.has_val:
            return 0
        return min(self._rows(), self.eval_batches * self.batch_size) if self.eval_batches else self._rows()

    def _rows(self) -> int:
        """Rows of the whole val split, as iter_eval_batches cuts it: packed conversations, or windows of text."""
        from gptlab.data.conversations import eval_rows, is_chat_data
        from gptlab.data.loader import TokenSplit
        from gptlab.data.meta import META_FILE, load_meta

        if (self.data_dir / META_FILE).exists() and is_chat_data(load_meta(self.data_dir)):
            return len(eval_rows(self.data_dir, "val", self.context_length)[1])
        return (len(TokenSplit(self.data_dir, "val")) - 1) // self.context_length

    def state_dict(self) -> dict:
        return {"best_val_loss": self.best_val_loss, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best_val_loss, self.evals_since_best = state["best_val_loss"], state["evals_since_best"]
