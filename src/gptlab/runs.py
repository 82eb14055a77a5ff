"""The run directory format, as every later stage reads it: find a run's checkpoints, read their info, load
the trained model. Writing it is the trainer's (train/checkpoint.py); reading it needs nothing of training.

    runs/NAME/
        config.toml        the resolved config the run was trained with
        tokenizer.json     the tokenizer its shards were made with
        metrics.csv, loss.png, lr.png, samples.md, summary.json
        status.json        training / finished / stopped, the trainer's process id and host (run_status)
        checkpoints/step_0001200/
            model.safetensors   weights (tied embeddings stored once)
            state.pt            optimizer, counters, RNGs, loader state (torch.load(weights_only=True))
            checkpoint.json     step, tokens, val_loss, model config, tokenizer checksum
            dcp/                a distributed run's sharded model + optimizer state
        checkpoints/best.json   {"checkpoint": "step_0001000", "val_loss": ...}

A run works from any folder, and after it has been moved or copied (with its data folder beside it, or
not): its config.toml holds every path (RUN_PATHS: the data folder, init_from, teacher, the sources...)
as an absolute path, and train.run_dir where the run was written. `load_run_config` reads each path
back where it lies relative to the run directory now (the data travelled with the run), or, where
nothing is there, as written (the data stayed put). Configs written before this rule (cwd-relative
paths) read back the same way.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptlab.config import Config, ModelConfig, Override, load_config, read_override, save_config
from gptlab.errors import GptlabError

CHECKPOINTS = "checkpoints"
BEST = "best.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
INFO = "checkpoint.json"
SHARDED = "dcp"
CONFIG = "config.toml"
STATUS = "status.json"

# The config's paths, as dotted keys ("*": every item of a list). hf:NAME values are not paths.
RUN_PATHS = ("train.data_dir", "train.init_from", "train.teacher", "data.out_dir", "data.sources.*.path",
             "data.val_sources.*.path", "tokenizer.gpt2_dir", "eval.data.*", "eval.hellaswag")


def _map_paths(cfg: Config, fn: Callable[[str], str], keep: Callable[[tuple[str, ...]], bool] = lambda key: False) -> Config:
    """A copy of cfg with fn applied to every path of RUN_PATHS (not to None, "", hf:NAME, or where keep(key))."""
    cfg = cfg.model_copy(deep=True)

    def visit(node, parts: list[str], key: tuple[str, ...]):
        head, rest = parts[0], parts[1:]
        items = list(enumerate(node)) if head == "*" else [(head, getattr(node, head))]
        for name, value in items:
            here = (*key, str(name))
            if rest:
                visit(value, rest, here)
            elif value and not value.startswith("hf:") and not keep(here):
                if head == "*":
                    node[name] = fn(value)
                else:
                    setattr(node, head, fn(value))

    for dotted in RUN_PATHS:
        visit(cfg, dotted.split("."), ())
    return cfg


def absolute_paths(cfg: Config) -> Config:
    """A copy of cfg whose paths (RUN_PATHS and train.run_dir) are absolute: where they lead from this folder."""
    cfg = _map_paths(cfg, lambda p: os.path.abspath(os.path.expanduser(p)))
    cfg.train.run_dir = os.path.abspath(cfg.train.run_dir)
    return cfg


def save_run_config(cfg: Config, run_dir: str | Path) -> None:
    """RUN/config.toml: cfg with absolute paths and train.run_dir = run_dir, as load_run_config reads it back."""
    cfg = absolute_paths(cfg)
    cfg.train.run_dir = os.path.abspath(run_dir)
    save_config(cfg, Path(run_dir) / CONFIG)


def _exists(path: str) -> bool:
    return os.path.exists(path) or (any(c in path for c in "*?[") and bool(glob.glob(path, recursive=True)))


def load_run_config(run_dir: str | Path, overrides: list[Override] | None = None) -> Config:
    """The config a run was trained with, its paths found again wherever the run is now (module docstring);
    train.run_dir = run_dir. Overrides (dotted, as on the command line) apply on top, their paths as given."""
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        raise GptlabError(f"{run} is not a gptlab run (it has no {CONFIG})", "give the folder that gptlab train wrote")
    overrides = overrides or []
    cfg = load_config(run / CONFIG, overrides)
    written_at = os.path.expanduser(cfg.train.run_dir)
    overridden = [tuple(read_override(arg)[0]) for arg in overrides]

    def find(path: str) -> str:
        path = os.path.expanduser(path)
        try:
            moved = os.path.normpath(os.path.join(run, os.path.relpath(path, written_at)))
        except ValueError:  # another drive (Windows): it cannot have moved with the run
            return path
        return moved if _exists(moved) else path

    cfg = _map_paths(cfg, find, keep=lambda key: any(key[: len(o)] == o for o in overridden))
    cfg.train.run_dir = str(run)
    return cfg


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
    try:
        path = pointer.parent / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{pointer} is damaged ({type(e).__name__})", "delete it: the last checkpoint is used then "
                          "(or pass --checkpoint last)") from None
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


def _damaged(path: Path, e: Exception) -> GptlabError:
    """A checkpoint file that no reader accepts: a crash mid-copy, a full disk, another program's file."""
    detail = " ".join(str(e).split())[:160]
    return GptlabError(f"{path} is damaged ({type(e).__name__}: {detail})",
                       f"copy the run again, or delete the folder {path.parent} to fall back to an earlier checkpoint")


def read_info(checkpoint: Path) -> dict:
    path = checkpoint / INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, e) from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise _damaged(path, ValueError("no model settings in it"))
    return info


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


def load_weights(model: torch.nn.Module, checkpoint: Path, grow: bool = False) -> None:
    """The checkpoint's weights into `model`. grow: the model's vocabulary may extend the checkpoint's
    (a tokenizer with tokens added after its last id, as the chat tokens are): see grow_vocab."""
    path = checkpoint / WEIGHTS
    device = next(model.parameters()).device
    try:
        weights = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise _damaged(path, e) from None
    if grow:
        weights = grow_vocab(weights, model.cfg.vocab_size)
    model.load_weights(weights, source=str(path))


VOCAB_MATRICES = ("tok_emb.weight", "lm_head.weight")  # [V, D]: one row per token (the head's, when untied)


def grow_vocab(weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """`weights` with the token embedding (and an untied output head) grown to `vocab_size` rows: the old rows
    as they were, every new row the mean of the old ones.

    Why the mean (Hewitt 2021, "Initializing new word embeddings for pretrained language models"; transformers'
    resize_token_embeddings starts new rows around the mean too, mean_resizing=True since 4.46): a new row drawn at random, as a fresh model's,
    can have a larger dot product with the hidden states than any trained row, so the new tokens would take
    much of the probability at once and the first steps of fine-tuning are spent undoing that. As the output
    row, the mean gives a new token the mean of the old tokens' logits, so the model's distribution over the
    old vocabulary barely moves; as the input row, it is an average token, inside the region the blocks were
    trained on. The new rows start equal; each token's own gradients (a role token is read, <|end|> is
    written) set them apart in the first steps.
    """
    out = dict(weights)
    for name in VOCAB_MATRICES:
        old = weights.get(name)
        if old is None or old.size(0) >= vocab_size:
            continue
        new_rows = old.float().mean(0, keepdim=True).to(old.dtype).expand(vocab_size - old.size(0), -1)
        out[name] = torch.cat([old, new_rows])
    return out


def load_state(checkpoint: Path, device: torch.device) -> dict:
    path = checkpoint / STATE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:  # garbage, a cut zip archive, no file
        raise _damaged(path, e) from None


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
    cfg = load_run_config(run)
    info = read_info(checkpoint)
    cfg.model = ModelConfig.model_validate(info["model"])
    tokenizer = load_tokenizer(run / "tokenizer.json")
    made_with = info.get("tokenizer_checksum")
    if made_with and made_with != tokenizer.checksum:  # same size or not, another tokenizer's ids mean other text
        raise GptlabError(f"{run / 'tokenizer.json'} is not the tokenizer {checkpoint.name} was trained with "
                          f"(checksum {tokenizer.checksum[:12]}, trained with {made_with[:12]})",
                          "put the run's own tokenizer.json back (a copy is in its data folder)")
    model = build_model(cfg.model, device)
    load_weights(model, checkpoint)
    return model.eval(), tokenizer, cfg


# --------------------------------------------------------------------------- status

# How a run that ended says so: summary.json's "stopped" -> "finished" or "stopped".
FINISHED_BY = ("max_steps", "max_tokens", "max_time", "early_stop")


def write_status(run_dir: str | Path, state: str, **details) -> None:
    """status.json: "training" (with this process' id and host), "finished" or "stopped" (with the reason)."""
    import socket
    import time

    from gptlab.files import atomic_write_json

    status = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **details}
    atomic_write_json(Path(run_dir) / STATUS, status)


def finished_summary(run_dir: str | Path) -> dict | None:
    """The run's summary.json if its training ended (a limit, early stopping, pruned...), None if it has none
    or was interrupted (it is to be resumed)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return None if summary.get("stopped") == "interrupted" else summary


def run_status(run_dir: str | Path) -> dict:
    """{"state": "training" | "finished" | "stopped" | "new", ...} from the run's files.

    A run whose status.json says "training" but whose process is gone (on this host) was killed: "stopped".
    Runs from before status.json read summary.json: a limit or early stopping is "finished", else "stopped".
    """
    import socket

    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = None
    if isinstance(status, dict) and status.get("state") in ("training", "finished", "stopped"):
        if status["state"] == "training" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
            return {**status, "state": "stopped", "reason": "the training process is gone"}
        return status
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        reason = summary.get("stopped")
        return {"state": "finished" if reason in FINISHED_BY else "stopped", "reason": reason}
    except (OSError, ValueError, AttributeError):
        pass
    return {"state": "stopped" if checkpoint_dirs(run_dir) else "new"}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
