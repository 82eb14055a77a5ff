"""TrainStep: one optimizer step of forward, backward, gradient clipping."""

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.model import build_model
from gptlab.train.step import TrainStep


@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_clipping_scales_the_gradients_only_when_their_norm_exceeds_it(clip):
    """The step returns the gradients' norm before clipping; SGD with lr 1 moves the weights by exactly the
    gradients the optimizer got: scaled to norm `clip` when larger (1e-3), untouched when not (1e3: on a CPU
    the scaling pass is skipped then)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, d_model=16, n_head=2, context_length=8, vocab_size=32))
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"), "fp32", grad_clip=clip)
    x = torch.randint(0, 32, (2, 8))
    _, grad_norm = step(lambda: (x, x), 1, 1.0)
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]).norm()
    assert 1e-3 < grad_norm.item() < 1e3
    assert moved.item() == pytest.approx(min(clip, grad_norm.item()), rel=1e-4)
