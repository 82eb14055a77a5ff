"""Training on several processes with PyTorch's own engine: torchrun starts them, DDP or FSDP2 spreads the model.

    torchrun --nproc_per_node 2 -m gptlab train --config X.toml --train.distributed=fsdp
    gptlab train --nproc 2 --config X.toml                      # the same, torchrun launched for you (train.nproc)

torchrun starts one process per device and tells each its place through the
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, and
TORCHELASTIC_RESTART_COUNT after a restart). A process started any other way
trains alone, exactly as before. The backend follows the device: NCCL between
GPUs (plus gloo for the small CPU-side messages and asynchronous checkpoints),
gloo between CPU processes, so the whole path runs on a laptop.

The global batch stays the config's whatever the world size: each of N ranks
runs batch_size / N rows per micro-step (the loader gives every rank its own
slice of the same global batch), so N processes train the same model as one
process would, step for step.

    ddp   every rank holds the whole model; gradients are averaged once per
          optimizer step (no_sync on the other micro-steps)
    fsdp  FSDP2 (fully_shard) per Transformer block and then the root: each rank
          holds 1/N of the weights, gradients and optimizer state; blocks are
          gathered just in time for their forward and backward
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import (
    CheckpointException,  # a BaseException: a checkpoint's collectives failed
)

from gptlab.config import Config, TrainConfig, save_config
from gptlab.errors import GptlabError

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass
class Dist:
    """This process's place among the processes training together. A process started alone is a world of
    size 1 whose collectives do nothing, so the trainer reads the same either way; `Group` is torchrun's."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    restart: int = 0  # how many times torchrun restarted the workers (--max-restarts)
    mode: str | None = None  # "ddp" or "fsdp" under torchrun; None: one process
    checkpoint_group: Any = None  # asynchronous checkpoints talk on their own group, never on the training one

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def agree(self, *values: float) -> list[float]:
        return [float(v) for v in values]

    def on_main(self, compute: Callable[[], Any]):
        """compute() run on rank 0 only, its result on every rank (a measurement all must go by)."""
        return compute()

    def gather(self, value) -> list:
        """Every rank's value, in rank order, on every rank."""
        return [value]

    def check(self, cfg: TrainConfig, precision: str) -> None:
        pass

    def wrap(self, model: torch.nn.Module, precision: str) -> torch.nn.Module:
        return model

    def pick_compile(self, requested, planned_seconds: float | None) -> bool:
        return pick_compile(requested, self.device, self.mode, planned_seconds)

    def whole_model(self, model: torch.nn.Module, rebuild) -> torch.nn.Module | None:
        """The model with all its weights on rank 0, None elsewhere (a collective: every rank calls it)."""
        return model if self.main else None


class Group(Dist):
    """A rank of a torchrun world: the same questions answered by collectives over the process group."""

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return sum_(tensor)

    def agree(self, *values: float) -> list[float]:
        return agree(*values)

    def on_main(self, compute: Callable[[], Any]):
        return from_main(compute() if self.main else None)

    def gather(self, value) -> list:
        box = [None] * self.world_size
        dist.all_gather_object(box, value, group=self.checkpoint_group)  # gloo: CPU objects, even under NCCL
        return box

    def check(self, cfg: TrainConfig, precision: str) -> None:
        check_config(cfg, self.world_size, precision)

    def wrap(self, model: torch.nn.Module, precision: str) -> torch.nn.Module:
        return wrap(model, self, precision)

    def pick_compile(self, requested, planned_seconds: float | None) -> bool:
        return from_main(super().pick_compile(requested, planned_seconds))  # rank 0 decides for all

    def whole_model(self, model: torch.nn.Module, rebuild) -> torch.nn.Module | None:
        """Under FSDP, the weights are gathered into a copy that `rebuild()` makes on rank 0."""
        if self.mode != "fsdp":
            return super().whole_model(model, rebuild)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        whole = rebuild()
        whole.load_weights(full)
        return whole


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ENV)


def check_config(cfg: TrainConfig, world_size: int, precision: str | None = None) -> None:
    """What cannot work with `world_size` processes, as one-line errors before anything starts."""
    if cfg.batch_size % world_size:
        raise GptlabError(
            f"train.batch_size={cfg.batch_size} does not split over {world_size} processes",
            f"set train.batch_size to a multiple of {world_size}: it is the global batch of a micro-step, "
            f"each process runs batch_size/{world_size} rows of it",
        )
    if cfg.distributed == "fsdp" and cfg.optimizer == "muon":
        raise GptlabError("train.optimizer=muon cannot run under train.distributed=fsdp: Muon orthogonalises whole "
                          "matrices and FSDP gives each process a slice of them",
                          "use --train.distributed=ddp with Muon, or train.optimizer=adamw with FSDP")
    if cfg.lora_rank:
        raise GptlabError(f"train.lora_rank={cfg.lora_rank} trains in one process, not {world_size}",
                          "fine-tune with LoRA in one process (it is for memory, not speed), or fully "
                          "(train.lora_rank=0) on several")
    if cfg.distributed == "fsdp" and precision == "fp16":
        raise GptlabError("train.precision=fp16 is not supported with train.distributed=fsdp",
                          "use train.precision=bf16 (FSDP keeps fp32 master weights and reduces in fp32)")


@contextmanager
def process_group(cfg: TrainConfig):
    """A Group while the process group is up, when torchrun launched this process; else a Dist of one."""
    from gptlab.device import pick_device

    if not launched_by_torchrun():
        yield Dist(pick_device(cfg.device))
        return

    rank, local_rank, world = (int(os.environ[name]) for name in ENV)
    check_config(cfg, world)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for tensors on the GPU, gloo for CPU tensors (control, checkpoints)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise GptlabError(f"distributed training runs on CUDA GPUs (NCCL) or on CPUs (gloo), not on {device.type}",
                          "use train.device=cpu, or train in a single process")
    # The timeout bounds every collective: a rank that hangs makes the others fail after it instead of waiting forever.
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    store, attempt = _attempt_store(rank, world, timeout)
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                            **({"store": store, "rank": rank, "world_size": world} if store else {}))
    # A rank that seems hung can be asked where it is: `kill -USR1 PID` prints every thread's stack to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # After a restart, the workers of a node that did not fail still see TORCHELASTIC_RESTART_COUNT=0.
    restart = attempt if store else int(agree(float(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))[0])
    yield Group(rank=rank, local_rank=local_rank, world_size=world,
               local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), restart=restart,
               mode=cfg.distributed, device=device, checkpoint_group=dist.new_group(backend="gloo", timeout=timeout))
    # Only after a clean finish: when the run failed, a peer may be unresponsive and tearing the group down
    # can wait for it forever, while the process is about to end anyway.
    _tear_down()


def _tear_down() -> None:
    """Destroy the process groups once every rank is done with them."""
    dist.barrier()
    # A gloo thread that has just finished a collective frees its tensors under the GIL, while the thread that
    # destroys the group (here, or when the DDP wrapper goes) holds the GIL and joins gloo's threads
    # (pytorch/pytorch#56297): a rank that got there first hung for good. Letting go of the GIL for a moment
    # lets gloo's threads finish first.
    time.sleep(0.2)
    dist.destroy_process_group()


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> tuple[dist.Store | None, int]:
    """A store of this attempt's own, and the attempt's number (0 for the first), when torchrun's agent hosts it.

    The agent keeps one store across restarts (--max-restarts), and keys a failed attempt left there can be
    read by the next one: gloo then dials the dead workers' ports and the restart fails. So every attempt
    works under its own prefix. Every rank counts its own starts in the store; all ranks restart together,
    so their counts agree (the restart counter torchrun passes is per node, not global).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None, 0
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    attempt = agent.add(f"gptlab/starts/rank{rank}", 1) - 1
    return dist.PrefixStore(f"gptlab/attempt{attempt}/", agent), attempt


def pick_compile(requested, device: torch.device, mode: str | None, planned_seconds: float | None) -> bool:
    """train.compile resolved for a run of `mode` (None: one process, "ddp", "fsdp"): device.pick_compile's
    rule, except that FSDP on a CPU is not compiled unless asked."""
    from gptlab.device import pick_compile as pick_for_device

    if device.type == "cpu" and mode == "fsdp" and requested == "auto":
        return False  # DDP's compiled CPU step is measured (1.6x the speedrun's eager one); FSDP's is not
    return pick_for_device(requested, device, planned_seconds)


def wrap(model: torch.nn.Module, d: Dist, precision: str) -> torch.nn.Module:
    """The module the training step runs: DDP around the model, or the model itself sharded in place by FSDP2."""
    if d.mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # The only buffers are constant position tables, equal on every rank: no broadcast before each forward.
        quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                 else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **quiet)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On GPUs, gather bf16 weights (half the traffic) and average gradients in fp32; the sharded master weights
    # and the optimizer stay fp32. On CPUs bf16 is slow unless native, and autocast already decides the compute.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if d.device.type == "cuda" and precision == "bf16" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    # The root takes what is left (embeddings, final norm, head); its weights are needed again right at the
    # start of backward, so they stay gathered after forward.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


# --------------------------------------------------------------------------- messages between ranks


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) in place: gloo has no average."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree(*values: float) -> list[float]:
    """The largest of each value over the ranks, through a CPU tensor: no device sync under NCCL."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def from_main(value):
    """Rank 0's value of a picklable object on every rank (decisions that must not differ between ranks)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def is_comm_error(e: BaseException) -> bool:
    """A collective that failed because another rank died, hung past train.dist_timeout or the network broke."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, (RuntimeError, CheckpointException)) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out"))


class LostContact(GptlabError):
    # Threads still blocked on the silent peer (an asynchronous checkpoint, gloo's workers) would keep the
    # interpreter from exiting, so the CLI ends the process right after printing the message.
    exit_at_once = True


def lost_contact(e: BaseException, d: Dist, step: int, timeout: float) -> LostContact:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)  # gloo's source location
    return LostContact(
        f"rank {d.rank} of {d.world_size} lost contact with the others at step {step}: {first[:200]} "
        f"(another rank died, or hung for more than train.dist_timeout={timeout:g} s)",
        "see the other ranks' output for the cause; torchrun --max-restarts N restarts the workers and "
        "gptlab train resumes from the last checkpoint by itself",
    )


def train_in_processes(cfg: Config, resume: bool, verbose: bool) -> dict:
    """Train cfg with cfg.train.nproc processes on this machine (torchrun runs `gptlab train` on a copy of
    cfg); returns the summary rank 0 wrote."""
    n = cfg.train.nproc
    check_config(cfg.train, n)  # once here, rather than once per process
    summary = Path(cfg.train.run_dir) / "summary.json"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gptlab-") as tmp:
        config = Path(tmp) / "config.toml"
        save_config(cfg, config)
        argv = ["train", "--config", str(config), *(["--resume-here"] if resume else []), *([] if verbose else ["--quiet"])]
        # Ctrl-C reaches torchrun and its workers from the terminal; this process only waits for them to save and stop.
        previous = signal.signal(signal.SIGINT, lambda *_: None)
        try:
            code = subprocess.call(torchrun_command(n, argv))
        finally:
            signal.signal(signal.SIGINT, previous)
    if summary.is_file() and summary.stat().st_mtime >= started:
        return json.loads(summary.read_text())  # also after Ctrl-C: the run stopped "interrupted", with a checkpoint
    raise GptlabError(f"training in {n} processes failed (torchrun's exit code {code})",
                      "the workers' messages above say why; train.nproc=1 trains in this process")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine with `nproc` processes running `python -m gptlab ARGV`."""
    # --standalone: a rendezvous on a free local port, so several runs on one machine do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "gptlab", *argv]
