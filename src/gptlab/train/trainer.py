"""The training loop: prepared shards + a model config -> a run directory.

    runs/NAME/
        config.toml        the resolved config (model.vocab_size filled in)
        tokenizer.json     the tokenizer the shards were made with
        metrics.csv        step, tokens, loss, val_loss, val_bpb, lr, grad_norm, tokens_per_s, mfu, elapsed
        loss.png, lr.png   redrawn at every evaluation
        samples.md         a sample every train.sample_every steps
        summary.json       written when the run ends (why it stopped, final losses)
        checkpoints/       see checkpoint.py

Host syncs (`.item()`) happen only at log, evaluation and checkpoint steps; in
between, the loss and gradient norm stay on the device. A loss that becomes
NaN/inf is therefore caught at the next of those steps, before any checkpoint
is written, so the last checkpoint on disk is always a good one.

Under torchrun (distributed.py) every rank runs this same loop on its slice of
each batch. Everything that decides what happens next -- the loss logged, the
validation loss, stopping on a limit or a signal -- is agreed between the ranks,
so they always take the same branch and meet at the same collectives; only rank
0 prints and writes the run directory's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException
from tqdm.auto import tqdm

from gptlab import runs
from gptlab.config import Config, ModelConfig, config_to_dict, load_config, save_config
from gptlab.data.prepare import cpu_count
from gptlab.device import (
    DTYPES,
    autocast,
    peak_flops,
    pick_compile,
    pick_device,
    pick_precision,
    set_threads,
)
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json
from gptlab.train import checkpoint as ckpt
from gptlab.train import distributed
from gptlab.train.metrics import MetricsLog, append_sample
from gptlab.train.optim import build_optimizer, learning_rate
from gptlab.train.step import Teacher, TrainStep

# Typical model FLOP utilisation, used only for the start-up line's time estimate (the bar's ETA is measured).
# CPU: 0.5-0.65 measured for 1-4M-parameter models in fp32 against `gptlab bench peak` (2 AVX2 cores).
EXPECTED_MFU = {"cpu": 0.55, "cuda": 0.35, "mps": 0.2}


def train(cfg: Config, resume: bool = False, *, on_step: Callable[[int], None] | None = None, verbose: bool = True) -> dict:
    """Train cfg.model on cfg.train.data_dir into cfg.train.run_dir; returns the summary (also summary.json).

    resume=True continues the run in cfg.train.run_dir from its last checkpoint,
    exactly: the same batches, RNG draws and optimizer state as if it had never
    stopped. `on_step(step)` is called after every optimizer step.

    Launched by torchrun, this process is one rank of a distributed run (see
    distributed.py), and cfg.train.nproc > 1 launches torchrun for you; when
    torchrun restarts the workers after a failure (--max-restarts), the run
    resumes from its last checkpoint by itself.
    """
    if cfg.train.nproc > 1 and not distributed.launched_by_torchrun():
        return distributed.train_in_processes(cfg, resume, verbose)
    threads, trainer = torch.get_num_threads(), None
    try:
        with distributed.process_group(cfg.train) as dist:
            if dist and dist.restart and not resume and runs.checkpoint_dirs(cfg.train.run_dir):
                resume = True
            try:
                trainer = Trainer(cfg, resume, verbose, dist)
                return trainer.run(on_step)
            except (RuntimeError, torch.distributed.DistError, CheckpointException) as e:
                if dist and distributed.is_comm_error(e):
                    raise distributed.lost_contact(e, dist, trainer.step if trainer else 0, cfg.train.dist_timeout) from e
                raise
    finally:
        torch.set_num_threads(threads)  # train.threads applies to the run, not to the rest of the process


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run was trained with (its config.toml), with dotted overrides such as a larger max_steps."""
    run = Path(run_dir)
    if not run.is_dir():
        raise GptlabError(f"run directory not found: {run}", "check the path given to --resume")
    if not (run / "config.toml").is_file():
        raise GptlabError(f"{run} is not a gptlab run (it has no config.toml)", "give the folder that gptlab train wrote")
    return load_config(run / "config.toml", [*(overrides or []), f"--train.run_dir={json.dumps(str(run))}"])


class Diverged(Exception):
    pass


class Trainer:
    def __init__(self, cfg: Config, resume: bool, verbose: bool, dist: distributed.Dist | None = None):
        from gptlab.data import check_tokenizer, load_meta
        from gptlab.tokenizer import load_tokenizer

        cfg = cfg.model_copy(deep=True)  # model.vocab_size gets filled in; the caller's config stays as it was
        t = cfg.train
        self.dist, self.main = dist, dist is None or dist.main  # main: the process that prints and writes files
        self.world = dist.world_size if dist else 1
        self.cfg, self.verbose = cfg, verbose and self.main
        self.run_dir, self.data_dir = Path(t.run_dir), Path(t.data_dir)
        resume_from = self._resume_checkpoint() if resume else self._check_fresh_run_dir()
        if not any((t.max_steps, t.max_tokens, t.max_time)):
            raise GptlabError("the run has no length", "set train.max_steps, train.max_tokens or train.max_time")

        self.meta = load_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        check_tokenizer(self.data_dir, self.tokenizer)
        init_from = self._init_from_checkpoint() if t.init_from and not resume else None
        cfg.model = _model_config_for(cfg.model, self.tokenizer, init_from)
        if resume_from:
            self._check_resumable(resume_from)
        self._check_splits()

        # ---- the machine
        self.device = dist.device if dist else pick_device(t.device)
        if dist and self.device.type == "cpu" and not t.threads:  # the cores are shared by the node's processes
            self.threads = set_threads(max(1, cpu_count() // dist.local_world_size))
        else:
            self.threads = set_threads(t.threads)
        self.precision = pick_precision(t.precision, self.device)
        if dist:
            distributed.check_config(t, self.world, self.precision)
        _seed_everything(t.seed)  # the same on every rank: FSDP relies on every rank building the same weights

        # ---- model, optimizer, data
        from gptlab.data import BatchLoader
        from gptlab.model import build_model

        self.model = build_model(cfg.model).to(self.device)
        # Weights from a single-process checkpoint go in before the model is spread over the ranks.
        weights_from = init_from or (resume_from if resume_from and not ckpt.is_sharded(resume_from) else None)
        if weights_from:
            runs.load_weights(self.model, weights_from)
        self.weight_names = list(runs.unique_tensors(self.model))  # what model.safetensors keeps
        self.flops_per_token = self.model.flops_per_token()
        # self.model is the GPT (sharded in place under FSDP); self.wrapped is what the training step runs.
        self.wrapped = distributed.wrap(self.model, dist, self.precision) if dist else self.model
        self.optimizer = build_optimizer(self.model, t, self.device)
        # Each rank draws its slice of every global batch of t.batch_size rows.
        self.loader = BatchLoader(self.data_dir, "train", batch_size=t.batch_size // self.world,
                                  seq_len=cfg.model.context_length, seed=t.seed, mode=t.loader,
                                  rank=dist.rank if dist else 0, world_size=self.world)
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context_length
        self.step = self.tokens = 0
        self.elapsed = 0.0  # seconds spent training (evaluation, sampling and checkpoints not counted)
        self.best_val_loss, self.evals_since_best = math.inf, 0
        self.last_checkpoint: Path | None = None
        self._saving: tuple[ckpt.ShardedSave, float | None] | None = None  # a distributed checkpoint being written
        scaler_state = self._load_state(resume_from) if resume_from else None

        # MFU is measured against every device's peak; rank 0 measures it and decides compile for all.
        peak = t.peak_flops or (peak_flops(self.device, DTYPES[self.precision]) if self.main else 0.0)
        self.peak = (distributed.from_main(peak) if dist else peak) * self.world
        if dist and self.device.type == "cpu" and t.compile == "auto":
            self.compile = False  # torch.compile under gloo buys little on a CPU for its warm-up
        else:
            self.compile = pick_compile(t.compile, self.device, self.expected_seconds())
        if dist:
            self.compile = distributed.from_main(self.compile)
        self.teacher = self._load_teacher() if t.teacher else None
        self.train_step = TrainStep(self.wrapped, self.optimizer, self.device, self.precision, t.grad_clip, self.compile,
                                    self.teacher)
        if scaler_state and self.train_step.scaler:
            self.train_step.scaler.load_state_dict(scaler_state)

        # ---- the run directory (rank 0 writes it; every rank must see it: a shared filesystem across nodes)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            self.metrics = MetricsLog(self.run_dir, self.step if resume_from else None, t.log, config_to_dict(cfg))
        else:
            self.metrics = _Rows()
        self.stop_signal: str | None = None

    # ------------------------------------------------------------------ checks before anything runs

    def _check_fresh_run_dir(self) -> None:
        existing = runs.checkpoint_dirs(self.run_dir)
        if existing:
            raise GptlabError(
                f"{self.run_dir} already holds a run (last checkpoint {existing[-1].name})",
                f"continue it with gptlab train --resume {self.run_dir}, or choose another --run",
            )

    def _resume_checkpoint(self) -> Path:
        if not self.run_dir.is_dir():
            raise GptlabError(f"run directory not found: {self.run_dir}", "check the path given to --resume")
        found = runs.checkpoint_dirs(self.run_dir)
        if not found:
            raise GptlabError(f"{self.run_dir} has no checkpoint to resume from",
                              "start it again without --resume (a checkpoint is written at every evaluation)")
        return found[-1]

    def _load_teacher(self) -> Teacher:
        t = self.cfg.train
        model, tokenizer, _ = runs.load_run(t.teacher, device=self.device)
        if tokenizer.checksum != self.tokenizer.checksum:
            raise GptlabError(f"train.teacher={t.teacher} has another tokenizer than the shards in {self.data_dir}",
                              "logit distillation needs one tokenizer; with another, let the teacher write a corpus "
                              "(gptlab distill) and train on that")
        if model.cfg.context_length < self.cfg.model.context_length:
            raise GptlabError(f"train.teacher={t.teacher} reads {model.cfg.context_length} tokens, fewer than the "
                              f"student's model.context_length={self.cfg.model.context_length}",
                              "train the student with a context the teacher covers")
        return Teacher(model, t.distill_weight, t.distill_temperature)

    def _init_from_checkpoint(self) -> Path:
        source = runs.find_checkpoint(self.cfg.train.init_from, "best")
        made_with = runs.read_info(source).get("tokenizer_checksum")
        if made_with != self.tokenizer.checksum:
            raise GptlabError(
                f"train.init_from={self.cfg.train.init_from} was trained with another tokenizer than the shards in {self.data_dir}",
                f"prepare the new data with {runs.run_dir_of(source) / 'tokenizer.json'} (gptlab data prepare)",
            )
        return source

    def _check_resumable(self, checkpoint: Path) -> None:
        info = runs.read_info(checkpoint)
        changed = runs.model_config_diff(info["model"], config_to_dict(self.cfg.model))
        if changed:
            raise GptlabError(f"checkpoint {checkpoint} is another architecture: {', '.join(changed)}",
                              "resume with the run's own [model] settings, or start a new run with train.init_from")
        if info["data_fingerprint"] != _data_fingerprint(self.meta):
            what = "tokenizer" if info["tokenizer_checksum"] != self.meta["tokenizer_checksum"] else "token shards"
            raise GptlabError(
                f"the data in {self.data_dir} changed since {self.run_dir} started (its {what} differ)",
                f"resume with the original data, or continue on the new data with a new run: --train.init_from={self.run_dir}",
            )

    def _check_splits(self) -> None:
        window = self.cfg.model.context_length + 1
        splits = self.meta["splits"]
        train_tokens = splits.get("train", {}).get("tokens", 0)
        if train_tokens < window:
            raise GptlabError(f"the training split of {self.data_dir} has {train_tokens:,} tokens, fewer than one window of {window}",
                              "lower model.context_length or add data")
        val = splits.get("val", {})
        self.has_val = val.get("tokens", 0) >= window
        if not self.has_val and self.cfg.train.early_stop_patience:
            raise GptlabError(f"early stopping needs a validation split of at least {window} tokens; {self.data_dir} has {val.get('tokens', 0):,}",
                              "raise data.val_fraction (or add data.val_sources), or set train.early_stop_patience=0")
        # bits per byte = loss_nats * tokens / (ln 2 * bytes), with the whole val split's bytes/token ratio
        self.val_bytes_per_token = val["bytes"] / val["tokens"] if val.get("bytes") and val.get("tokens") else None

    def _planned_steps(self) -> int | None:
        t = self.cfg.train
        limits = [t.max_steps, t.max_tokens and math.ceil(t.max_tokens / self.tokens_per_step)]
        return min((x for x in limits if x), default=None)

    # ------------------------------------------------------------------ state

    def _state(self) -> dict:
        state = {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
            "scaler": self.train_step.scaler.state_dict() if self.train_step.scaler else {},
            "loader": self.loader.state_dict(), "rng": ckpt.rng_state(),
            "best_val_loss": self.best_val_loss, "evals_since_best": self.evals_since_best,
        }
        if not self.dist:  # distributed runs keep the optimizer in the checkpoint's dcp/ shards
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _load_state(self, checkpoint: Path) -> dict:
        """Weights, optimizer, loader, RNGs and counters from a checkpoint; returns the fp16 scaler's state.

        Every rank loads the same state.pt (rank 0's RNGs and counters); the model and optimizer come from
        the dcp/ shards of a distributed checkpoint, or from a single-process one's files.
        """
        state = runs.load_state(checkpoint, self.device)
        if ckpt.is_sharded(checkpoint):
            ckpt.load_sharded(checkpoint, self.wrapped, self.optimizer)
        elif self.dist and self.dist.mode == "fsdp":  # the weights went in before sharding; now the optimizer
            ckpt.load_full_optimizer(self.model, self.optimizer, state["optimizer"])
        else:  # one process, or DDP: every rank holds the parameters the optimizer state was saved for
            self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(_loader_state_for(state["loader"], self.loader))
        ckpt.set_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.best_val_loss, self.evals_since_best = state["best_val_loss"], state["evals_since_best"]
        self.last_checkpoint = checkpoint
        return state["scaler"]

    def save_checkpoint(self, val_loss: float | None) -> Path:
        """Write a checkpoint of this step. Distributed, it is finished (renamed into place) when the next
        one starts or the run ends, so the shards are written while training goes on."""
        self._finish_checkpoint()
        info = {"step": self.step, "tokens": self.tokens, "val_loss": val_loss,
                "model": config_to_dict(self.cfg.model), "tokenizer_checksum": self.tokenizer.checksum,
                "data_fingerprint": _data_fingerprint(self.meta)}
        best = val_loss if val_loss is not None and val_loss <= self.best_val_loss else None
        if not self.dist:
            return self._checkpoint_done(ckpt.save_checkpoint(self.run_dir, self.step, self.model, self._state(), info), best)
        saving = ckpt.save_sharded(self.run_dir, self.step, self.wrapped, self.optimizer, self._state(), info,
                                   self.weight_names, self.main, self.dist.checkpoint_group)
        self._saving = (saving, best)
        return saving.final

    def _finish_checkpoint(self) -> None:
        if self._saving:
            saving, best = self._saving
            self._saving = None
            self._checkpoint_done(saving.finish(), best)

    def _checkpoint_done(self, path: Path, best: float | None) -> Path:
        if self.main:
            if best is not None:
                ckpt.mark_best(self.run_dir, path, best)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ the loop

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        t = self.cfg.train
        self._print(self.startup_line())
        # A run limited only by time shows its progress in seconds, any other in steps.
        self._bar_in_seconds = self._planned_steps() is None
        if self._bar_in_seconds:
            total, done, unit = round(t.max_time), int(self.elapsed), "s"
        else:
            total, done, unit = self._planned_steps(), self.step, "step"
        self.bar = tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True, disable=not self.verbose,
                        desc=self.run_dir.name)
        self._interval = Interval(self.device, self.tokens, self.elapsed)
        self._clock = time.perf_counter()
        self.model.train()
        try:
            with self._stop_on_signals():
                stopped = None
                while not stopped:
                    elapsed = self._agree_elapsed_and_signals()
                    stopped = self._limit_reached(elapsed) or ("interrupted" if self.stop_signal else None)
                    if stopped:
                        # The run took the time the limits went by: distributed, the slowest rank's.
                        self._tick()
                        self.elapsed = max(self.elapsed, elapsed)
                        break
                    lr = learning_rate(t, self.step, self._progress(elapsed))
                    self._interval.add(*self.train_step(self.loader.next_batch, t.grad_accum, lr), lr)
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    self.bar.update(int(self._elapsed_now()) - self.bar.n if self._bar_in_seconds else 1)
                    if self.step % t.eval_every == 0:
                        self._log(evaluate=True)
                        if t.early_stop_patience and self.evals_since_best >= t.early_stop_patience:
                            stopped = "early_stop"
                    elif self.step % t.log_every == 0:
                        self._log(evaluate=False)
                    if t.sample_every and self.step % t.sample_every == 0:
                        self._sample()
                    if on_step:
                        on_step(self.step)
                # The final state: log what is not logged yet, evaluate it (unless stopping on a signal), keep it.
                if self._interval.steps:
                    self._log(evaluate=stopped != "interrupted", checkpoint=True)
                else:
                    self._finish_checkpoint()
                    if self.last_checkpoint is None or _step_of(self.last_checkpoint) != self.step:
                        self.save_checkpoint(None)
                        if self.main:  # the last row was logged without a plot
                            self.metrics.plot(self.run_dir)
                self._finish_checkpoint()
        except Diverged as e:
            good = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
            raise GptlabError(f"training diverged: {e}; {good}",
                              "lower train.lr, raise train.warmup_steps or keep train.grad_clip on, then start again") from None
        finally:
            self.bar.close()
            self.metrics.close()
        return self._finish(stopped)

    def _log(self, evaluate: bool, checkpoint: bool = False) -> None:
        """A metrics row for the steps since the last one (a host sync); when evaluating, also validate and checkpoint."""
        self._tick()
        if self.dist:  # the loss logged is the mean over every rank's rows (the gradient norm is global already)
            self._interval.loss = distributed.sum_(self._interval.loss) / self.world
        row = self._interval.row(self)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
        self._interval = Interval(self.device, self.tokens, self.elapsed)
        result = self.evaluate() if evaluate else None
        if result:
            row.update(val_loss=result["loss"], val_bpb=result.get("bpb"))
            if result["loss"] < self.best_val_loss:
                self.best_val_loss, self.evals_since_best = result["loss"], 0
            else:
                self.evals_since_best += 1
            bpb = f", {result['bpb']:.4f} bits/byte" if result.get("bpb") is not None else ""
            self._print(f"step {self.step}: train loss {row['loss']:.4f}, val loss {result['loss']:.4f}, "
                        f"perplexity {result['perplexity']:.2f}{bpb}")
        self.metrics.log(row)
        if evaluate or checkpoint:
            self.save_checkpoint(result["loss"] if result else None)
            if self.main:
                self.metrics.plot(self.run_dir)
        self._clock = time.perf_counter()  # evaluation and checkpointing are not training time

    def _agree_elapsed_and_signals(self) -> float:
        """The training time the limits and the schedule go by. Distributed, the ranks agree on it (the
        slowest rank's) and on a stop signal any of them received: one tiny CPU all-reduce a step, so that
        all ranks stop at the same step and use the same learning rate."""
        elapsed = self._elapsed_now()
        if not self.dist:
            return elapsed
        elapsed, signum = distributed.agree(elapsed, signal.Signals[self.stop_signal].value if self.stop_signal else 0)
        if signum and not self.stop_signal:
            self.stop_signal = signal.Signals(int(signum)).name
        return elapsed

    def _limit_reached(self, elapsed: float) -> str | None:
        t = self.cfg.train
        if t.max_steps and self.step >= t.max_steps:
            return "max_steps"
        if t.max_tokens and self.tokens >= t.max_tokens:
            return "max_tokens"
        if t.max_time and elapsed >= t.max_time:
            return "max_time"
        return None

    def _progress(self, elapsed: float) -> float:
        """The fraction of the budget spent once the coming step is done: the largest over the limits that are set."""
        t = self.cfg.train
        fractions = [(self.step + 1) / t.max_steps if t.max_steps else 0.0,
                     (self.tokens + self.tokens_per_step) / t.max_tokens if t.max_tokens else 0.0,
                     elapsed / t.max_time if t.max_time else 0.0]
        return max(fractions)

    def _elapsed_now(self) -> float:
        return self.elapsed + time.perf_counter() - self._clock

    def _tick(self) -> None:
        """Count the training time since the clock last started; what follows (evaluation...) is not counted."""
        now = time.perf_counter()
        self.elapsed += now - self._clock
        self._clock = now

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Validation loss over train.eval_batches batches of consecutive windows (None: the whole split).

        Distributed, each rank scores its share of the same windows and the sums are all-reduced, so the
        loss is the single-process one, on every rank.
        """
        if not self.has_val:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for x, y in self._eval_batches():
            with autocast(self.device, self.precision):
                _, loss = self.model(x.to(self.device), None if y is None else y.to(self.device))
            if y is not None:
                total += loss.float() * y.numel()
                count += y.numel()
        self.model.train()
        if self.dist:
            loss_sum, count = distributed.sum_(torch.tensor([total.item(), count], dtype=torch.float64)).tolist()
            loss = loss_sum / count
        else:
            loss = (total / count).item()
        if not math.isfinite(loss):
            raise Diverged(f"the validation loss is {loss} at step {self.step}")
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.val_bytes_per_token:
            result["bpb"] = loss / (math.log(2) * self.val_bytes_per_token)
        return result

    def _eval_batches(self):
        """This rank's validation batches. Under FSDP every rank must run as many forward passes as the others
        (each gathers weights from all), so a rank that runs out repeats its last batch with no weight."""
        from gptlab.data import iter_eval_batches
        from gptlab.data.loader import TokenSplit

        t, T = self.cfg.train, self.cfg.model.context_length
        size, rank = t.batch_size // self.world, self.dist.rank if self.dist else 0
        batches = iter_eval_batches(self.data_dir, "val", size, T, t.eval_batches, rank, self.world)
        if not (self.dist and self.dist.mode == "fsdp"):
            yield from batches
            return
        total = math.ceil(((len(TokenSplit(self.data_dir, "val")) - 1) // T) / size)
        if t.eval_batches:
            total = min(total, t.eval_batches * self.world)
        x = torch.zeros((1, T), dtype=torch.long)
        for _ in range(math.ceil(total / self.world)):
            batch = next(batches, None)
            if batch is None:
                yield x, None  # a forward pass that is not scored
            else:
                x = batch[0]
                yield batch

    def _sample(self) -> None:
        from gptlab.generate import generate

        self._tick()
        t = self.cfg.train
        sample_cfg = self.cfg.sample.model_copy(update={"prompts": [t.sample_prompt], "max_new_tokens": t.sample_tokens,
                                                        "num_samples": 1})
        model = self._whole_model()
        if model is None:  # not rank 0: nothing to write
            self._clock = time.perf_counter()
            return
        model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            text = generate(model, self.tokenizer, [t.sample_prompt], sample_cfg)[0]
        model.train()
        append_sample(self.run_dir, self.step, t.sample_prompt, text)
        self._print(f"step {self.step} sample: {(t.sample_prompt + text)[:200]!r}")
        self._clock = time.perf_counter()

    def _whole_model(self) -> torch.nn.Module | None:
        """The model with all its weights, on rank 0 (None elsewhere). Under FSDP it is gathered into a copy
        (a collective: every rank calls this)."""
        if not (self.dist and self.dist.mode == "fsdp"):
            return self.model if self.main else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        from gptlab.model import build_model

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        model = build_model(self.cfg.model).to(self.device)
        model.load_weights(full)
        return model

    def _finish(self, stopped: str) -> dict:
        rows = [r for r in self.metrics.rows if r.get("loss") not in ("", None)]
        best = runs.best_checkpoint(self.run_dir)
        summary = {
            "run_dir": str(self.run_dir), "stopped": stopped, "steps": self.step, "tokens": self.tokens,
            "elapsed": round(self.elapsed, 2), "train_loss": float(rows[-1]["loss"]) if rows else None,
            "val_loss": _last(self.metrics.rows, "val_loss"), "val_bpb": _last(self.metrics.rows, "val_bpb"),
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "tokens_per_s": round(self.tokens / self.elapsed, 1) if self.elapsed else None,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "best_checkpoint": str(best) if best else None,
            "device": self.device.type, "precision": self.precision, "compile": self.compile,
        }
        if self.dist:
            summary.update(processes=self.world, distributed=self.dist.mode)
        if self.main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        how = {"interrupted": f"interrupted by {self.stop_signal}; resume with: gptlab train --resume {self.run_dir}",
               "early_stop": f"stopped early: no better validation loss in {self.cfg.train.early_stop_patience} evaluations"}
        self._print(how.get(stopped, f"done ({stopped})") + f"; {self.step} steps, {self.tokens:,} tokens in {self.elapsed:.0f} s"
                    + (f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""))
        return summary

    # ------------------------------------------------------------------ signals and printing

    @contextmanager
    def _stop_on_signals(self):
        """Ctrl-C / SIGTERM finish the current step, save a checkpoint and return; a second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        first: list[float] = []

        def request_stop(signum, frame):
            # Under torchrun a Ctrl-C arrives twice within moments (from the terminal, then relayed by the
            # agent): only a second signal more than a second later means "stop at once".
            if self.stop_signal and not (self.dist and time.monotonic() - first[0] < 1.0):
                raise KeyboardInterrupt
            if not self.stop_signal:
                self.stop_signal = signal.Signals(signum).name
                first.append(time.monotonic())

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def expected_seconds(self) -> float | None:
        """Training time the run is expected to take: max_time, or the steps left at a typical MFU (a rough guess)."""
        t, planned = self.cfg.train, self._planned_steps()
        estimates = [t.max_time - self.elapsed if t.max_time else None,
                     max(planned - self.step, 0) * self.tokens_per_step / self.expected_tokens_per_s() if planned else None]
        return min((e for e in estimates if e is not None), default=None)

    def expected_tokens_per_s(self) -> float:
        return self.peak * EXPECTED_MFU[self.device.type] / self.flops_per_token

    def startup_line(self) -> str:
        parts = [
            f"{self.device.type}" + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            f"{self.threads} threads", self.precision, f"compile {'on' if self.compile else 'off'}",
            *([f"{self.world} processes ({self.dist.mode})"] if self.dist else []),
            f"{self.model.num_params() / 1e6:.2f}M parameters ({self.model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding)",
            f"{self.tokens_per_step:,} tokens/step",
        ]
        if self.teacher:
            t = self.cfg.train
            parts.append(f"distilling from {t.teacher} (weight {t.distill_weight:g}, temperature {t.distill_temperature:g})")
        seconds, planned = self.expected_seconds(), self._planned_steps()
        tokens = max(planned - self.step, 0) * self.tokens_per_step if planned else seconds * self.expected_tokens_per_s()
        if planned and seconds * self.expected_tokens_per_s() < tokens:  # max_time comes first
            tokens = seconds * self.expected_tokens_per_s()
        parts.append(f"{tokens:,.0f} tokens to go, about {_duration(seconds)}")
        if self.step:
            parts.insert(0, f"resuming at step {self.step}")
        return "gptlab train: " + " | ".join(parts)

    def _print(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(msg)


# --------------------------------------------------------------------------- helpers


class Interval:
    """Sums of the loss and gradient norm since the last metrics row, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device, tokens: int, elapsed: float):
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.steps, self.tokens, self.elapsed, self.lr = 0, tokens, elapsed, None

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.lr = lr

    def row(self, trainer: "Trainer") -> dict:
        # fp16: the scaler skips steps whose gradients overflowed, so only the loss must stay finite
        watched = self.loss if trainer.train_step.scaler else self.loss + self.grad_norm
        loss, norm = (self.loss / self.steps).item(), (self.grad_norm / self.steps).item()
        if not math.isfinite(watched.item()):
            first = trainer.step - self.steps + 1
            where = f"at step {first}" if self.steps == 1 else f"between steps {first} and {trainer.step}"
            raise Diverged(f"the loss or gradient norm became {'nan' if math.isnan(loss + norm) else 'inf'} {where}")
        tok_s = (trainer.tokens - self.tokens) / max(trainer.elapsed - self.elapsed, 1e-9)
        return {"step": trainer.step, "tokens": trainer.tokens, "loss": loss, "lr": self.lr, "grad_norm": norm,
                "tokens_per_s": tok_s, "mfu": tok_s * trainer.flops_per_token / trainer.peak, "elapsed": trainer.elapsed}


class _Rows:
    """What ranks other than 0 keep of the metrics: the rows, in memory (rank 0 writes the files)."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def _loader_state_for(state: dict, loader) -> dict:
    """A saved loader state as this run's loader would have written it: a run resumed on another number
    of processes draws the same global batches when batch_size x world_size is the same."""
    if state.get("batch_size", 0) * state.get("world_size", 0) == loader.batch_size * loader.world_size:
        return {**state, "batch_size": loader.batch_size, "world_size": loader.world_size}
    return state


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])


def _model_config_for(model: ModelConfig, tokenizer, init_from: Path | None) -> ModelConfig:
    from gptlab.model import check_vocab

    if init_from:  # continuing a trained model: its architecture, whatever [model] says
        model = ModelConfig.model_validate(runs.read_info(init_from)["model"])
    return check_vocab(model, tokenizer)


def _data_fingerprint(meta: dict) -> str:
    """What identifies the shards a run trains on: the tokenizer and every split's size."""
    splits = {name: {k: s.get(k) for k in ("tokens", "bytes", "documents")} for name, s in meta["splits"].items()}
    blob = json.dumps({"tokenizer": meta["tokenizer_checksum"], "splits": splits}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _last(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) not in ("", None)]
    return float(values[-1]) if values else None


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
