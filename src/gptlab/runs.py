"""The run directory format, as every later stage reads it: find a run's checkpoints, read their info, load
the trained model. Writing it is the trainer's (train/checkpoint.py); reading it needs nothing of training.

    runs/NAME/
        config.toml        the resolved config the run was trained with
        tokenizer.json     the tokenizer its shards were made with
        metrics.csv, loss.png, lr.png, samples.md, summary.json
        checkpoints/step_0001200/
            model.safetensors   weights (tied embeddings stored once)
            state.pt            optimizer, counters, RNGs, loader state (torch.load(weights_only=True))
            checkpoint.json     step, tokens, val_loss, model config, tokenizer checksum
            dcp/                a distributed run's sharded model + optimizer state
        checkpoints/best.json   {"checkpoint": "step_0001000", "val_loss": ...}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptlab.config import ModelConfig, load_config
from gptlab.errors import GptlabError

CHECKPOINTS = "checkpoints"
BEST = "best.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
INFO = "checkpoint.json"
SHARDED = "dcp"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / INFO).is_file())


def best_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / BEST
    if not pointer.is_file():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / INFO).is_file() else None


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint folder from a run folder (its best or last) or from a checkpoint folder itself."""
    path = Path(path)
    if (path / INFO).is_file():
        return path
    if not path.is_dir():
        raise GptlabError(f"run directory not found: {path}", "check the path (runs are written by gptlab train)")
    ckpts = checkpoint_dirs(path)
    if not ckpts:
        raise GptlabError(f"{path} holds no checkpoint", "train it first with gptlab train (a checkpoint is written at every evaluation)")
    if which == "best":
        return best_checkpoint(path) or ckpts[-1]
    if which == "last":
        return ckpts[-1]
    raise GptlabError(f"unknown checkpoint choice {which!r}", "use best or last")


def read_info(checkpoint: Path) -> dict:
    return json.loads((checkpoint / INFO).read_text(encoding="utf-8"))


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (a tied output matrix is the embedding's)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().contiguous()
    return out


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    path = checkpoint / WEIGHTS
    device = next(model.parameters()).device
    model.load_weights(load_file(str(path), device=str(device)), source=str(path))


def load_state(checkpoint: Path, device: torch.device) -> dict:
    return torch.load(checkpoint / STATE, map_location=device, weights_only=True)


def model_config_diff(saved: dict, wanted: dict, ignore: tuple[str, ...] = ("dropout", "attention")) -> list[str]:
    """`model.key saved -> wanted` for every key that changes the weights' meaning or shape."""
    keys = sorted((set(saved) | set(wanted)) - set(ignore) - {"preset"})
    return [f"model.{k} {saved.get(k)} -> {wanted.get(k)}" for k in keys if saved.get(k) != wanted.get(k)]


def load_run(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config) of a trained run; `run_dir` may also be a checkpoint folder."""
    from gptlab.model import build_model
    from gptlab.tokenizer import load_tokenizer

    checkpoint = find_checkpoint(run_dir, which)
    run = run_dir_of(checkpoint)
    cfg = load_config(run / "config.toml")
    cfg.model = ModelConfig.model_validate(read_info(checkpoint)["model"])
    tokenizer = load_tokenizer(run / "tokenizer.json")
    model = build_model(cfg.model, device)
    load_weights(model, checkpoint)
    return model.eval(), tokenizer, cfg
