"""The Validator on its own: the loss over the validation windows, bits per byte, best and patience, NaN,
and FSDP's padding (every rank runs as many forward passes)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from gptlab.data import iter_eval_batches
from gptlab.model import build_model
from gptlab.train.distributed import Dist
from gptlab.train.metrics import Diverged
from gptlab.train.validator import Validator

T = 32


@pytest.fixture
def model(tiny_model_config, single_thread):
    torch.manual_seed(0)
    return build_model(tiny_model_config.model_copy(update={"vocab_size": 400}))


def validator(model, data_dir, dist=None, eval_batches=2, patience=0, has_val=True, bytes_per_token=None):
    return Validator(model, data_dir, T, 4, eval_batches, patience, "fp32", dist or Dist(torch.device("cpu")), has_val,
                     bytes_per_token)


def test_the_loss_is_the_mean_over_the_scored_tokens_and_bits_per_byte_uses_the_split_ratio(model, tiny_shards):
    v = validator(model, tiny_shards, bytes_per_token=3.0)
    model.train()
    result = v(step=5)
    assert model.training  # left in training mode
    total, count = 0.0, 0
    with torch.no_grad():
        model.eval()
        for x, y in iter_eval_batches(tiny_shards, "val", 4, T, 2, 0, 1):
            total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)
    assert result["bpb"] == pytest.approx(result["loss"] / (math.log(2) * 3.0))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["best"] and v.best_val_loss == result["loss"]


def test_best_is_strictly_better_and_patience_counts_the_evaluations_since(model, tiny_shards, monkeypatch):
    v = validator(model, tiny_shards, patience=2)
    losses = iter([3.0, 2.5, 2.5, 2.6])
    monkeypatch.setattr(Validator, "evaluate", lambda self: {"loss": next(losses), "perplexity": 1.0})
    assert [v(step)["best"] for step in (1, 2, 3)] == [True, True, False]  # a tie is not better
    assert not v.patience_spent and v.state_dict() == {"best_val_loss": 2.5, "evals_since_best": 1}
    v(4)
    assert v.patience_spent
    again = validator(model, tiny_shards, patience=2)
    again.load_state_dict(v.state_dict())
    assert again.patience_spent


def test_a_nan_validation_loss_is_divergence_and_no_split_is_no_result(model, tiny_shards, monkeypatch):
    assert validator(model, tiny_shards, has_val=False)(step=1) is None
    monkeypatch.setattr(Validator, "evaluate", lambda self: {"loss": float("nan"), "perplexity": math.nan})
    with pytest.raises(Diverged, match="validation loss is nan at step 7"):
        validator(model, tiny_shards)(step=7)


def test_under_fsdp_every_rank_runs_as_many_forward_passes(model, tiny_shards):
    """The ranks' shares differ by one batch at most; the one that runs out pads with unscored passes."""
    windows = (json.loads((tiny_shards / "meta.json").read_text())["splits"]["val"]["tokens"] - 1) // T
    batches_total = math.ceil(windows / 2)  # 2 rows a rank = 4 rows a global batch
    counts = []
    for rank in (0, 1):
        dist = replace(Dist(torch.device("cpu")), rank=rank, world_size=2, mode="fsdp")
        passes = list(validator(model, tiny_shards, dist, eval_batches=None).batches())
        counts.append((len(passes), sum(y is not None for _, y in passes)))
    assert counts[0][0] == counts[1][0] == math.ceil(batches_total / 2)
    assert counts[0][1] + counts[1][1] == batches_total  # every window scored once
