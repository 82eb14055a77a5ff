"""Writing checkpoints into a run directory (reading them back is gptlab.runs).

    runs/NAME/checkpoints/step_0001200/
        model.safetensors   weights (tied embeddings stored once)
        state.pt            optimizer, step, tokens, every RNG, loader state, early-stopping
                            counters: only tensors, dicts, lists and numbers, so
                            torch.load(weights_only=True) reads it (no pickle)
        checkpoint.json     step, tokens, val_loss, model config, tokenizer checksum
    runs/NAME/checkpoints/best.json   {"checkpoint": "step_0001000", "val_loss": ...}

A checkpoint is written into a hidden temporary folder and renamed into place,
so a folder named step_* is always complete. The last `keep_last` and the best
are kept; older ones are deleted only after a newer one is complete.

A run of several processes (distributed.py) writes the same folder, but its
model and optimizer state go into a torch.distributed.checkpoint folder, each
rank writing its own shards (in the background where it can), and state.pt has
no optimizer:

        dcp/                {"model": ..., "optimizer": ...} keyed by parameter name, sharded as trained
        model.safetensors   the whole model, gathered on rank 0: sampling, eval and export read it as usual

DCP reshards on load, so such a checkpoint resumes on any number of processes,
under DDP or FSDP, or in a single process; a single-process checkpoint resumes
under either too (its optimizer state is mapped to parameter names).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from gptlab.files import atomic_write_json
from gptlab.runs import (
    BEST,
    CHECKPOINTS,
    INFO,
    SHARDED,
    STATE,
    WEIGHTS,
    best_checkpoint,
    checkpoint_dirs,
    unique_tensors,
)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, info: dict) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    if final.exists():  # already saved at this step (e.g. an evaluation step that is also the last)
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_file(unique_tensors(model), str(tmp / WEIGHTS), metadata={"gptlab_model_config": json.dumps(info["model"])})
        torch.save(state, tmp / STATE)
        atomic_write_json(tmp / INFO, info)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------- several processes (torch.distributed.checkpoint)


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED).is_dir()


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))  # train.optim.Optimizers holds several


class ShardedSave:
    """A distributed checkpoint being written; finish() waits for every rank's shards and renames it into place."""

    def __init__(self, tmp: Path, final: Path, future, main: bool):
        self.tmp, self.final, self.future, self.main = tmp, final, future, main

    def finish(self) -> Path:
        import torch.distributed as dist

        if self.future is not None:
            self.future.result()
        dist.barrier()  # every rank's shards are on disk
        if self.main:
            self.tmp.rename(self.final)
        dist.barrier()  # and every rank sees the complete folder before going on
        return self.final


def save_sharded(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, state: dict, info: dict,
                 weights: list[str], main: bool, group=None, background: bool = True) -> ShardedSave:
    """Start writing a checkpoint from every rank; call .finish() on the result (all ranks) to complete it.

    `model` is what the ranks train (a DDP wrapper or an FSDP-sharded module), `weights` the parameter
    names model.safetensors keeps (a tied matrix once). Rank 0 (`main`) writes model.safetensors, state.pt
    and checkpoint.json; the shards go through dcp.async_save on `group` when `background`, else dcp.save.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp"  # one name all ranks know
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # on rank 0
    if main:
        for stale in root.glob(".step_*.tmp"):  # left by a run that died while saving
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / SHARDED).mkdir(parents=True)
        save_file({k: full[k].contiguous() for k in weights}, str(tmp / WEIGHTS),
                  metadata={"gptlab_model_config": json.dumps(info["model"])})
        torch.save(state, tmp / STATE)
        atomic_write_json(tmp / INFO, info)
    del full
    dist.barrier()  # the folder exists before any rank writes into it
    model_state, optimizer_state = get_state_dict(model, _optimizers(optimizer))
    shards = {"model": model_state, "optimizer": optimizer_state}
    if background:  # copies the state to CPU memory now, writes it while training goes on
        future = dcp.async_save(shards, checkpoint_id=tmp / SHARDED, process_group=group)
    else:
        dcp.save(shards, checkpoint_id=tmp / SHARDED, process_group=group)
        future = None
    return ShardedSave(tmp, final, future, main)


def load_sharded(checkpoint: Path, model: torch.nn.Module, optimizer) -> None:
    """Model and optimizer state from a checkpoint's dcp/ folder, resharded for however `model` is spread now."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = _optimizers(optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizers)  # the layout wanted, filled in by load
    shards = {"model": model_state, "optimizer": optimizer_state}
    alone = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # loading without a process group is what we mean; DCP warns all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(shards, checkpoint_id=checkpoint / SHARDED, no_dist=alone)
    set_state_dict(model, optimizers, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])


def load_full_optimizer(model: torch.nn.Module, optimizer, saved: dict) -> None:
    """A single-process checkpoint's optimizer state (torch's own, keyed by position) into an optimizer
    over sharded parameters: keyed by parameter name, then split by set_optimizer_state_dict."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    optimizers = _optimizers(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    merged: dict = {"state": {}, "param_groups": []}
    for opt, state in zip(optimizers, saved.get("optimizers", [saved]), strict=True):
        order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        merged["state"].update({order[i]: s for i, s in state["state"].items()})
        merged["param_groups"] += [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    set_optimizer_state_dict(model, optimizers, merged, options=StateDictOptions(full_state_dict=True))


def mark_best(run_dir: str | Path, checkpoint: Path, val_loss: float) -> None:
    atomic_write_json(Path(run_dir) / CHECKPOINTS / BEST, {"checkpoint": checkpoint.name, "val_loss": val_loss})


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    best = best_checkpoint(run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        if old != best:
            shutil.rmtree(old)


# --------------------------------------------------------------------------- RNG state, weights_only-safe


def rng_state() -> dict:
    """Every RNG a step may draw from, as tensors, lists and numbers (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].cpu())
