"""Writing checkpoints into a run directory (reading them back is gptlab.runs).

    runs/NAME/checkpoints/step_0001200/
        model.safetensors   weights (tied embeddings stored once; a LoRA run's adapters merged in)
        state.pt            optimizer, step, tokens, every RNG, loader state, early-stopping
                            counters: only tensors, dicts, lists and numbers, so
                            torch.load(weights_only=True) reads it (no pickle); a LoRA run's adapters
                            and the frozen weights they adapt ("lora"), for resuming exactly
        checkpoint.json     step, tokens, val_loss, model config, tokenizer checksum (and lora_rank)
    runs/NAME/checkpoints/best.json   {"checkpoint": "step_0001000", "val_loss": ...}

A checkpoint is written into a hidden temporary folder, flushed to the disk
(its files, then the folder) and renamed into place, and the rename is flushed
too: a folder named step_* is always complete, also after a crash or a power
cut. The last `keep_last` and the best are kept; older ones are deleted only
after a newer one is on the disk. A temporary folder left by a killed run is
removed by the next save.

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
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from gptlab.files import atomic_write_json, fsync_dir, fsync_file
from gptlab.runs import (
    BEST,
    CHECKPOINTS,
    INFO,
    SHARDED,
    STATE,
    WEIGHTS,
    best_checkpoint,
    checkpoint_dirs,
    load_state,
    read_info,
    unique_tensors,
)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, info: dict,
                    weights: dict | None = None) -> Path:
    """`weights`: what model.safetensors holds, if not the model's own tensors (a LoRA run's, merged)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    if final.exists():  # already saved at this step (e.g. an evaluation step that is also the last)
        return final
    _remove_stale(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        _write_files(tmp, unique_tensors(model) if weights is None else weights, state, info)
        _rename_durably(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_files(folder: Path, weights: dict, state: dict, info: dict) -> None:
    """model.safetensors, state.pt and checkpoint.json, each on the disk when this returns."""
    save_file(weights, str(folder / WEIGHTS), metadata={"gptlab_model_config": json.dumps(info["model"])})
    torch.save(state, folder / STATE)
    for name in (WEIGHTS, STATE):
        fsync_file(folder / name)
    atomic_write_json(folder / INFO, info)  # flushed, and so is the folder


def _rename_durably(tmp: Path, final: Path) -> None:
    fsync_dir(tmp)
    tmp.rename(final)
    fsync_dir(final)
    fsync_dir(final.parent)  # the rename


def _remove_stale(root: Path) -> None:
    """Temporary folders of a save that never finished (the process was killed): nothing refers to them."""
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


class Checkpointer:
    """A run's checkpoints over its life: save one at a step (distributed, the shards are written in the
    background and the checkpoint is finished -- renamed into place -- when the next one starts or the run
    ends), point best.json at it when its validation loss is the best so far, prune older ones once it is on
    the disk, and load one back into the model and optimizer.

    `about` is what every checkpoint.json records besides step, tokens and val_loss (model config, tokenizer
    checksum, data fingerprint). `plain()`, where given, gives the weights model.safetensors holds instead of
    the model's own (a LoRA run's adapters merged; one process only). Only the main process writes files;
    every rank calls save and finish.
    """

    def __init__(self, run_dir: Path, keep_last: int, dist, model: torch.nn.Module, wrapped: torch.nn.Module,
                 optimizer, weight_names: list[str], about: dict, plain: Callable[[], dict] | None = None):
        self.run_dir, self.keep_last, self.dist, self.about, self.plain = Path(run_dir), keep_last, dist, about, plain
        self.model, self.wrapped, self.optimizer, self.weight_names = model, wrapped, optimizer, weight_names
        self.last: Path | None = None  # the newest checkpoint, finished or being finished
        self._saving: ShardedSave | None = None
        self._pending: tuple[bool, float | None] = (False, None)

    def save(self, step: int, tokens: int, state: dict, val_loss: float | None = None, best: bool = False) -> Path:
        """A checkpoint of this step (nothing new if the last one is of this step); `state` holds the run's
        counters, to which this adds every rank's RNGs and, in one process, the optimizer."""
        self.finish()
        if self.last is not None and self.last.name == f"step_{step:07d}":
            return self.last
        info = {"step": step, "tokens": tokens, "val_loss": val_loss, **self.about, "best": best}
        state = {**state, "rng": self.dist.gather(rng_state())}
        if self.dist.mode is None:
            state["optimizer"] = self.optimizer.state_dict()
            path = save_checkpoint(self.run_dir, step, self.model, state, info, self.plain() if self.plain else None)
            self._done(path, best, val_loss)
            return path
        self._saving = save_sharded(self.run_dir, step, self.wrapped, self.optimizer, state, info,
                                    self.weight_names, self.dist.main, self.dist.checkpoint_group)
        self._pending, self.last = (best, val_loss), self._saving.final
        return self.last

    def finish(self) -> None:
        """Wait for a checkpoint still being written and put it into place (a no-op in one process)."""
        if self._saving:
            saving, self._saving = self._saving, None
            self._done(saving.finish(), *self._pending)

    def _done(self, path: Path, best: bool, val_loss: float | None) -> None:
        """`path` is on the disk: only now may it become the best and older checkpoints go."""
        if self.dist.main:
            if best:
                mark_best(self.run_dir, path, val_loss)
            prune_checkpoints(self.run_dir, self.keep_last)
        self.last = path

    def load(self, checkpoint: Path) -> dict:
        """Optimizer state (and, from the dcp/ shards, the model's) from `checkpoint`; returns its state.pt.
        Also does what a run killed right after writing it left undone: mark it best, prune older ones."""
        state = load_state(checkpoint, self.dist.device)
        if is_sharded(checkpoint):
            load_sharded(checkpoint, self.wrapped, self.optimizer)
        elif self.dist.mode == "fsdp":  # the weights went in before sharding; now the optimizer
            load_full_optimizer(self.model, self.optimizer, state["optimizer"])
        else:  # one process, or DDP: every rank holds the parameters the optimizer state was saved for
            self.optimizer.load_state_dict(state["optimizer"])
        info = read_info(checkpoint)
        self._done(checkpoint, info.get("best", False) and best_checkpoint(self.run_dir) != checkpoint, info["val_loss"])
        return state


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
            _rename_durably(self.tmp, self.final)
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
        _remove_stale(root)
        (tmp / SHARDED).mkdir(parents=True)
        _write_files(tmp, {k: full[k].contiguous() for k in weights}, state, info)
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


def seed_everything(*key: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device's) from `key`: (seed,) gives the weights'
    initialisation, (seed, rank) each rank its own stream of dropout masks after it (SeedSequence: keys that
    differ in any part give independent streams)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0]) if len(key) > 1 else key[0]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng(saved, rank: int, world_size: int, *fresh_key: int) -> None:
    """This rank's RNGs from a checkpoint's (one state per rank; older checkpoints hold rank 0's alone).
    Resumed on another number of processes, the draws cannot continue exactly: each rank starts a fresh
    stream from `fresh_key` + its rank."""
    saved = saved if isinstance(saved, list) else [saved]
    if len(saved) == world_size:
        set_rng_state(saved[rank])
    else:
        seed_everything(*fresh_key, rank)
