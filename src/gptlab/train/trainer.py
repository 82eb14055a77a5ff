"""The training loop: prepared shards + a model config -> a run directory.

    runs/NAME/
        config.toml        the resolved config (model.vocab_size filled in)
        tokenizer.json     the tokenizer the shards were made with
        metrics.csv        step, tokens, loss, val_loss, val_bpb, lr, grad_norm, tokens_per_s, mfu, elapsed
                           (+ aux_loss with MoE parts: the part of the loss that is their balancing losses)
        loss.png, lr.png   redrawn at every evaluation
        samples.md         a sample every train.sample_every steps
        summary.json       written when the run ends (why it stopped, final losses, versions)
        checkpoints/       see checkpoint.py

The Trainer sets up the parts and runs one flat loop over them: TrainStep
(step.py), a Checkpointer (checkpoint.py), a Validator (validator.py), a
RunClock paused around everything that is not training (clock.py), the checks
before anything starts (preflight.py). Each pass of the loop first finishes the
step just taken -- its row, evaluation, checkpoint, sample -- then takes the
next one; the pass that finds a limit, a signal or early stopping finishes its
step the same way and ends the loop (`stopped`): the final save is no tail.

Host syncs (`.item()`) happen only at log, evaluation, sample and checkpoint
steps; in between, the loss and gradient norm stay on the device. A loss that
becomes NaN/inf is therefore caught at the next of those steps, before any
checkpoint is written or sample drawn, so the last checkpoint on disk is always
a good one.

Under torchrun (distributed.py) every rank runs this same loop on its slice of
each batch; a process alone is a world of one whose collectives return their
input. Everything that decides what happens next -- the loss logged, the
validation loss, stopping on a limit or a signal -- is agreed between the ranks,
so they always take the same branch and meet at the same collectives; only rank
0 prints and writes the run directory's files.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.api import CheckpointException
from tqdm.auto import tqdm

import gptlab
from gptlab import runs
from gptlab.config import Config, Override, config_to_dict
from gptlab.device import DTYPES, cpu_count, keep_freed_memory, peak_flops, peak_memory, pick_precision, set_threads
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json, make_dirs
from gptlab.model import lora
from gptlab.train import checkpoint as ckpt
from gptlab.train import distributed, preflight
from gptlab.train.clock import RunClock
from gptlab.train.estimate import RunEstimate
from gptlab.train.metrics import (
    AUX_COLUMN,
    COLUMNS,
    Diverged,
    Interval,
    MemoryRows,
    MetricsLog,
    append_sample,
)
from gptlab.train.optim import build_optimizer, learning_rate
from gptlab.train.signals import StopSignals
from gptlab.train.step import GlobalTargets, TrainStep
from gptlab.train.validator import Validator

# Typical model FLOP utilisation, used only to guess the run's time before its first steps are measured.
# CPU: 0.5-0.65 measured for 1-4M-parameter models in fp32 against `gptlab bench peak` (2 AVX2 cores).
EXPECTED_MFU = {"cpu": 0.55, "cuda": 0.35, "mps": 0.2}
CHECKPOINT_BYTES_PER_S = 300e6  # a guess at writing a checkpoint: weights and optimizer state, 16 bytes a parameter
PAUSE_SECONDS = 0.2  # ... plus redrawing the plots and writing the small files, measured ~0.1-0.2 s on a CPU


def train(cfg: Config, resume: bool = False, *, on_step: Callable[[int], str | None] | None = None,
          on_eval: Callable[[int, dict], str | None] | None = None, verbose: bool = True) -> dict:
    """Train cfg.model on cfg.train.data_dir into cfg.train.run_dir; returns the summary (also summary.json).

    resume=True continues the run in cfg.train.run_dir from its last checkpoint,
    exactly: the same batches, RNG draws and optimizer state as if it had never
    stopped. `on_step(step)` is called after every optimizer step, `on_eval(step,
    result)` after every evaluation (result: the Validator's loss, bpb, best...);
    either may return a reason ("pruned", "out_of_memory") to stop the run there:
    it is evaluated, checkpointed and summarised with `stopped` = that reason.

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
            if dist.restart and not resume and runs.checkpoint_dirs(cfg.train.run_dir):
                resume = True
            try:
                trainer = Trainer(cfg, resume, verbose, dist)
                return trainer.run(on_step, on_eval)
            except (RuntimeError, torch.distributed.DistError, CheckpointException) as e:
                if dist.mode and distributed.is_comm_error(e):
                    raise distributed.lost_contact(e, dist, trainer.step if trainer else 0, cfg.train.dist_timeout) from e
                raise
    finally:
        torch.set_num_threads(threads)  # train.threads applies to the run, not to the rest of the process


def resume_config(run_dir: str | Path, overrides: list[Override] | None = None) -> Config:
    """The config a run was trained with (its config.toml), with dotted overrides such as a larger max_steps."""
    run = Path(run_dir)
    if not run.is_dir():
        raise GptlabError(f"run directory not found: {run}", "check the path given to --resume")
    return runs.load_run_config(run, overrides)


class Trainer:
    """A run's parts -- model, optimizer, loader, TrainStep, Checkpointer, Validator, RunClock -- set up from
    a config (checks first), and the loop that drives them (run)."""

    def __init__(self, cfg: Config, resume: bool, verbose: bool, dist: distributed.Dist):
        from gptlab.data import check_tokenizer, load_meta, training_loader
        from gptlab.data.conversations import is_chat_data
        from gptlab.model import build_model
        from gptlab.tokenizer import load_tokenizer

        cfg = cfg.model_copy(deep=True)  # model.vocab_size gets filled in; the caller's config stays as it was
        t = cfg.train
        self.cfg, self.dist, self.verbose = cfg, dist, verbose and dist.main  # main: the process that prints and writes files
        self.run_dir, self.data_dir = Path(t.run_dir), Path(t.data_dir)
        resume_from = preflight.resume_checkpoint(self.run_dir) if resume else preflight.check_fresh_run_dir(self.run_dir)
        preflight.check_length(t)
        self.meta = load_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        check_tokenizer(self.data_dir, self.tokenizer)
        init_from = preflight.init_from_checkpoint(t, self.tokenizer, self.data_dir) if t.init_from and not resume else None
        cfg.model = preflight.model_config_for(cfg.model, self.tokenizer, init_from)
        if resume_from:
            preflight.check_resumable(resume_from, cfg.model, self.meta, self.run_dir, self.data_dir, t.lora_rank)
        has_val, val_bytes_per_token = preflight.check_splits(cfg, self.meta, self.data_dir)

        # ---- the machine (the processes of a node share its cores)
        self.device = dist.device
        self.threads = set_threads(t.threads or max(1, cpu_count() // dist.local_world_size))
        keep_freed_memory(self.device)  # on a CPU: no page faults for the next step's tensors (device.py)
        self.precision = pick_precision(t.precision, self.device)
        dist.check(t, self.precision)

        # ---- model, optimizer, data
        ckpt.seed_everything(t.seed)  # the same weights on every rank: FSDP relies on it
        self.model = build_model(cfg.model, self.device)
        self.model.checkpointing = t.checkpointing
        # Weights from a single-process checkpoint go in before the model is spread over the ranks.
        weights_from = init_from or (resume_from if resume_from and not ckpt.is_sharded(resume_from) else None)
        if weights_from:  # a base model's vocabulary grows by the chat tokens where the shards' tokenizer added them
            runs.load_weights(self.model, weights_from, grow=bool(init_from))
        if t.lora_rank:  # the blocks frozen, adapters on their linear maps; checkpoints hold them merged
            preflight.check_lora(t, resume)
            lora.add_adapters(self.model, t.lora_rank, t.lora_alpha)
        self.flops_per_token = self.model.flops_per_token()
        weight_names = list(runs.unique_tensors(self.model))  # what model.safetensors keeps (before FSDP shards it)
        # self.model is the GPT (sharded in place under FSDP); self.wrapped is what the training step runs.
        self.wrapped = dist.wrap(self.model, self.precision)
        self.optimizer = build_optimizer(self.model, t, self.device, ranks=(dist.rank, dist.world_size))
        # Each rank draws its slice of every global batch of t.batch_size rows (with stored teacher logits: and
        # the teacher's top k at its positions).
        self.loader = training_loader(self.data_dir, split="train", batch_size=t.batch_size // dist.world_size,
                                  seq_len=cfg.model.context_length, seed=t.seed, mode=t.loader,
                                  rank=dist.rank, world_size=dist.world_size,
                                  teacher_logits=preflight.stored_teacher_logits(t, self.meta, self.data_dir))
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context_length
        about = {"model": config_to_dict(cfg.model), "tokenizer_checksum": self.tokenizer.checksum,
                 "data_fingerprint": preflight.data_fingerprint(self.meta), **({"lora_rank": t.lora_rank} if t.lora_rank else {})}
        self.checkpointer = ckpt.Checkpointer(self.run_dir, t.keep_last, dist, self.model, self.wrapped, self.optimizer,
                                              weight_names, about, plain=self._plain_weights if t.lora_rank else None)
        self.validator = Validator(self.model, self.data_dir, cfg.model.context_length, t.batch_size, t.eval_batches,
                                   t.early_stop_patience, self.precision, dist, has_val, val_bytes_per_token)
        state = self.checkpointer.load(resume_from) if resume_from else {}
        self.step, self.tokens = state.get("step", 0), state.get("tokens", 0)
        self.clock = RunClock(state.get("elapsed", 0.0))  # seconds spent training (evaluation, sampling, checkpoints not counted)
        if state:
            self.loader.load_state_dict(_loader_state_for(state["loader"], self.loader))
            self.validator.load_state_dict(state)
            if t.lora_rank:  # the frozen weights and adapters: the checkpoint's weights are their merged sum
                lora.load_adapter_state(self.model, state["lora"])

        # MFU is measured against every device's peak; rank 0 measures it and decides compile for all.
        self.peak = (t.peak_flops or dist.on_main(lambda: peak_flops(self.device, DTYPES[self.precision]))) * dist.world_size
        self.estimate = RunEstimate(self._guessed_pace(), t.eval_every, t.sample_every)
        self.compile = dist.pick_compile(t.compile, self.expected_seconds())
        self.teacher = preflight.load_teacher(cfg, self.tokenizer, self.data_dir, self.device) if t.teacher else None
        # conversations: batches hold different numbers of targets; each step's loss is the mean over all of them
        targets = GlobalTargets(self.device, dist.world_size, dist.sum_) if is_chat_data(self.meta) else None
        self.train_step = TrainStep(self.wrapped, self.optimizer, self.device, self.precision, t.grad_clip, self.compile,
                                    self.teacher, targets)
        if state.get("scaler") and self.train_step.scaler:
            self.train_step.scaler.load_state_dict(state["scaler"])
        # Dropout draws from here on, so last (measuring the peak and building the teacher draw random numbers):
        # each rank its own masks; a resumed run continues the draws where its checkpoint stopped.
        if state:
            ckpt.restore_rng(state["rng"], dist.rank, dist.world_size, t.seed, self.step)
        else:
            ckpt.seed_everything(t.seed, dist.rank)

        # ---- the run directory (rank 0 writes it; every rank must see it: a shared filesystem across nodes)
        if dist.main:
            make_dirs(self.run_dir)
            runs.save_run_config(cfg, self.run_dir)
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            has_moe = any("MoE" in branch for branch in cfg.model.layout)  # its balancing losses get a column
            self.metrics = MetricsLog(self.run_dir, self.step if resume_from else None, t.log, config_to_dict(cfg),
                                      COLUMNS + [AUX_COLUMN] if has_moe else COLUMNS)
        else:
            self.metrics = MemoryRows()
        self.signals = StopSignals(relayed=distributed.launched_by_torchrun())

    # ------------------------------------------------------------------ the loop

    def run(self, on_step: Callable[[int], str | None] | None = None,
            on_eval: Callable[[int, dict], str | None] | None = None) -> dict:
        """Train until a limit, a signal or early stopping. The step the run stops at is logged, evaluated
        (unless a signal stopped it) and checkpointed in the loop's last pass, like any evaluation step."""
        t, clock = self.cfg.train, self.clock
        self._wall_start, self._corrected = time.perf_counter(), None
        self._startup_seconds = self._time_left()["total"]
        self._print(self.startup_line())
        bar = self._progress_bar()
        interval, first, stopped, asked = self._interval(), self.step, None, None  # asked: on_step's reason
        self.model.train()
        if self.dist.main:
            runs.write_status(self.run_dir, "training", step=self.step)
        clock.start()
        # Python's cycle collector rescans every object that has survived: in a process holding a large heap (a
        # notebook, a test session, torch.compile's graphs) each full pass stalls training for 0.1-1 s. What is
        # alive as training starts, and after the first (compiling) step, is set aside for the run (gc.freeze).
        gc.freeze()
        try:
            with self.signals.caught():
                while True:
                    elapsed = self._agree_elapsed_and_signals()
                    stopped = self._limit_reached(elapsed) or asked or ("interrupted" if self.signals.name else None)
                    trained = self.step > first  # this step was trained here, not loaded from a checkpoint
                    with clock.paused():  # evaluation, sampling and checkpoints are not training time
                        paused_at = time.perf_counter()
                        evaluate = trained and (self.step % t.eval_every == 0 or stopped not in (None, "interrupted"))
                        # the row first: a loss gone NaN is reported as such, not as a NaN validation loss
                        row = self._row(interval, bar) if trained and (evaluate or stopped or self.step % t.log_every == 0) else None
                        result = self.validator(self.step) if evaluate else None
                        if result and self.validator.patience_spent:
                            stopped = "early_stop"
                        if result and on_eval and not stopped:
                            stopped = on_eval(self.step, result) or None
                        if row:
                            interval = self._log(row, result)
                        if evaluate or stopped:
                            self._checkpoint(result)
                            self.estimate.timed_pause("eval", time.perf_counter() - paused_at)
                        if trained and t.sample_every and self.step % t.sample_every == 0:
                            sampled_at = time.perf_counter()
                            self._sample(interval)
                            self.estimate.timed_pause("sample", time.perf_counter() - sampled_at)
                    if stopped:
                        break
                    lr = learning_rate(t, self.step, self._progress(elapsed))
                    if self.teacher:
                        self.teacher.step = self.step  # seeds the student's own samples: a resumed run draws the same
                    loss, grad_norm = self.train_step(self.loader.next_batch, t.grad_accum, lr)
                    interval.add(loss, grad_norm, lr, self.train_step.aux_loss)  # loss includes aux_loss
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    if self.step == first + 1:
                        gc.freeze()
                    self.estimate.timed_step(self.step, clock.elapsed())
                    if self._corrected is None and self.estimate.settled(clock.elapsed()):
                        self._corrected = self._correct_estimate()
                    bar.update(int(clock.elapsed()) - bar.n if self._bar_in_seconds else 1)
                    if on_step:
                        asked = on_step(self.step) or None
                clock.stop()
                self.checkpointer.finish()
        except Diverged as e:
            last = self.checkpointer.last
            good = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise GptlabError(f"training diverged: {e}; {good}",
                              "lower train.lr, raise train.warmup_steps or keep train.grad_clip on, then start again") from None
        finally:
            gc.unfreeze()
            bar.close()
            self.metrics.close()
            if self.dist.main and stopped is None:  # diverged, or an exception
                runs.write_status(self.run_dir, "stopped", reason="error", step=self.step)
        return self._finish(stopped)

    def _interval(self) -> Interval:
        # fp16: the scaler skips steps whose gradients overflowed, so only the loss must stay finite;
        # the loss logged is the mean over every rank's rows (the gradient norm is global already)
        return Interval(self.device, self.tokens, self.clock.elapsed(), watch_grad_norm=self.train_step.scaler is None,
                        reduce=lambda loss: self.dist.sum_(loss) / self.dist.world_size)

    def _row(self, interval: Interval, bar) -> dict:
        """The metrics row of the steps since the last one (a host sync)."""
        row = interval.row(self.step, self.tokens, self.clock.elapsed(), self.flops_per_token, self.peak)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
        return row

    def _log(self, row: dict, result: dict | None) -> Interval:
        """Write `row` with the validation result if any; returns the next interval."""
        if result:
            row.update(val_loss=result["loss"], val_bpb=result.get("bpb"))
            bpb = f", {result['bpb']:.4f} bits/byte" if result.get("bpb") is not None else ""
            self._print(f"step {self.step}: train loss {row['loss']:.4f}, val loss {result['loss']:.4f}, "
                        f"perplexity {result['perplexity']:.2f}{bpb}")
        self.metrics.log(row)
        return self._interval()

    def _checkpoint(self, result: dict | None) -> None:
        state = {"step": self.step, "tokens": self.tokens, "elapsed": self.clock.elapsed(),
                 "scaler": self.train_step.scaler.state_dict() if self.train_step.scaler else {},
                 "loader": self.loader.state_dict(), **self.validator.state_dict(),
                 **({"lora": lora.adapter_state(self.model)} if self.cfg.train.lora_rank else {})}
        self.checkpointer.save(self.step, self.tokens, state, result and result["loss"], bool(result and result["best"]))
        self.metrics.plot(self.run_dir)

    def _plain_weights(self) -> dict:
        """What model.safetensors holds in a LoRA run: the adapters merged into their matrices."""
        return lora.merged_weights(self.model, runs.unique_tensors(self.model))

    def _sample(self, interval: Interval) -> None:
        from gptlab.generate import generate
        from gptlab.model import build_model

        interval.check(self.step)  # a loss gone NaN stops here with its message, not inside sampling
        t = self.cfg.train
        sample_cfg = self.cfg.sample.model_copy(update={"prompts": [t.sample_prompt], "max_new_tokens": t.sample_tokens,
                                                        "num_samples": 1})
        # Sampling (and building the copy FSDP gathers into) leaves the training RNG as it was.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = self.dist.whole_model(self.model, lambda: build_model(self.cfg.model, self.device))
            if model is None:  # not rank 0: nothing to write
                return
            model.eval()
            text = generate(model, self.tokenizer, [t.sample_prompt], sample_cfg, data=self.cfg.data)[0]
            model.train()
        append_sample(self.run_dir, self.step, t.sample_prompt, text)
        self._print(f"step {self.step} sample: {(t.sample_prompt + text)[:200]!r}")

    def _agree_elapsed_and_signals(self) -> float:
        """The training time the limits and the schedule go by. Distributed, the ranks agree on it (the
        slowest rank's) and on a stop signal any of them received: one tiny CPU all-reduce a step, so that
        all ranks stop at the same step and use the same learning rate."""
        elapsed, signum = self.dist.agree(self.clock.elapsed(), self.signals.number)
        if signum and not self.signals.name:
            self.signals.name = signal.Signals(int(signum)).name
        self.clock.at_least(elapsed)
        return elapsed

    def _limit_reached(self, elapsed: float) -> str | None:
        t = self.cfg.train
        limits = {"max_steps": t.max_steps and self.step >= t.max_steps, "max_tokens": t.max_tokens and self.tokens >= t.max_tokens,
                  "max_time": t.max_time and elapsed >= t.max_time}
        return next((name for name, reached in limits.items() if reached), None)

    def _progress(self, elapsed: float) -> float:
        """The fraction of the budget spent once the coming step is done (so the last step trains at the
        schedule's floor): the largest over the limits that are set."""
        t = self.cfg.train
        return max((self.step + 1) / t.max_steps if t.max_steps else 0.0,
                   (self.tokens + self.tokens_per_step) / t.max_tokens if t.max_tokens else 0.0,
                   elapsed / t.max_time if t.max_time else 0.0)

    def _planned_steps(self) -> int | None:
        t = self.cfg.train
        limits = [t.max_steps, t.max_tokens and math.ceil(t.max_tokens / self.tokens_per_step)]
        return min((x for x in limits if x), default=None)

    def _finish(self, stopped: str) -> dict:
        rows = [r for r in self.metrics.rows if r.get("loss") not in ("", None)]
        best, last, elapsed = runs.best_checkpoint(self.run_dir), self.checkpointer.last, self.clock.elapsed()
        best_val = self.validator.best_val_loss
        summary = {
            "run_dir": str(self.run_dir), "stopped": stopped, "steps": self.step, "tokens": self.tokens,
            "elapsed": round(elapsed, 2), "train_loss": float(rows[-1]["loss"]) if rows else None,
            "val_loss": _last(self.metrics.rows, "val_loss"), "val_bpb": _last(self.metrics.rows, "val_bpb"),
            "best_val_loss": best_val if math.isfinite(best_val) else None,
            "tokens_per_s": round(self.tokens / elapsed, 1) if elapsed else None,
            "checkpoint": str(last) if last else None, "best_checkpoint": str(best) if best else None,
            "device": self.device.type, "precision": self.precision, "compile": self.compile,
            "processes": self.dist.world_size, "distributed": self.dist.mode,
            "wall_s": round(time.perf_counter() - self._wall_start, 2),  # this process's loop, pauses included
            "estimate": {"startup_s": round(self._startup_seconds, 2), **(self._corrected or {})},
            "peak_memory": peak_memory(self.device),  # this process's (CPU: resident set's high-water mark)
            "versions": {"gptlab": gptlab.__version__, "torch": torch.__version__},
        }
        if self.dist.main:
            atomic_write_json(self.run_dir / "summary.json", summary)
            runs.write_status(self.run_dir, "finished" if stopped in runs.FINISHED_BY else "stopped", reason=stopped, step=self.step)
        how = {"interrupted": f"interrupted by {self.signals.name}; resume with: gptlab train --resume {self.run_dir}",
               "early_stop": f"stopped early: no better validation loss in {self.cfg.train.early_stop_patience} evaluations"}
        self._print(how.get(stopped, f"done ({stopped})") + f"; {self.step} steps, {self.tokens:,} tokens in {elapsed:.0f} s"
                    + (f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""))
        return summary

    # ------------------------------------------------------------------ progress and printing

    def _progress_bar(self) -> tqdm:
        # A run limited only by time shows its progress in seconds, any other in steps.
        self._bar_in_seconds = self._planned_steps() is None
        total, done, unit = ((round(self.cfg.train.max_time), int(self.clock.elapsed()), "s") if self._bar_in_seconds
                             else (self._planned_steps(), self.step, "step"))
        return tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True, disable=not self.verbose, desc=self.run_dir.name)

    def expected_seconds(self) -> float:
        """Training time the run has left (evaluation and the other pauses not counted): max_time, or the steps
        left at the pace measured, or before any step at a typical MFU."""
        return self._time_left()["train"]

    def _guessed_pace(self) -> dict[str, float]:
        """Seconds a step, an evaluation pause (its forward passes, then the checkpoint) and a sample pause
        (one forward a token), at a typical MFU: the estimate before anything is measured."""
        t, flops_per_s = self.cfg.train, self.peak * EXPECTED_MFU[self.device.type]
        eval_tokens = self.validator.rows_per_evaluation() * self.cfg.model.context_length
        checkpoint = self.model.num_params() * 16 / CHECKPOINT_BYTES_PER_S
        forward = self.flops_per_token / 3  # flops_per_token counts forward + backward
        return {"step": self.tokens_per_step * self.flops_per_token / flops_per_s,
                "eval": eval_tokens * forward / flops_per_s + checkpoint + PAUSE_SECONDS,
                "sample": t.sample_tokens * (forward / flops_per_s + 2e-3)}  # + a few ms of overhead a token

    def _time_left(self) -> dict[str, float]:
        """{"train", "pauses", "total"} seconds the run has left at the pace measured so far (guessed before)."""
        t, planned = self.cfg.train, self._planned_steps()
        return self.estimate.seconds_left(self.step, planned - self.step if planned else None,
                                          max(t.max_time - self.clock.elapsed(), 0.0) if t.max_time else None)

    def _correct_estimate(self) -> dict:
        """Print the estimate from the steps (and evaluation) measured; returns it for the summary."""
        left, wall = self._time_left(), time.perf_counter() - self._wall_start
        step_s = self.estimate.pace("step")
        tokens_per_s = self.tokens_per_step / step_s
        evals = f", {self.estimate.pace('eval'):.1f} s an evaluation" if "eval" in self.estimate.measured else ""
        self._print(f"gptlab train: measured {tokens_per_s:,.0f} tokens/s (MFU {tokens_per_s * self.flops_per_token / self.peak:.0%})"
                    f"{evals}: about {_duration(left['total'])} to go, {_duration(wall + left['total'])} in all"
                    f" (the start-up guess was {_duration(self._startup_seconds)})")
        return {"corrected_s": round(wall + left["total"], 2), "corrected_at_step": self.step}

    def startup_line(self) -> str:
        parts = [
            f"{self.device.type}" + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            f"{self.threads} threads", self.precision, f"compile {'on' if self.compile else 'off'}",
            *([f"{self.dist.world_size} processes ({self.dist.mode})"] if self.dist.mode else []),
            f"{self.model.num_params() / 1e6:.2f}M parameters ({self.model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding)",
            f"{self.tokens_per_step:,} tokens/step",
        ]
        if self.cfg.train.lora_rank:
            parts.append(f"LoRA rank {self.cfg.train.lora_rank}: {lora.trainable_parameters(self.model) / 1e6:.2f}M parameters trained")
        if self.teacher:
            t = self.cfg.train
            divergence = {0.0: "forward KL", 1.0: "reverse KL"}.get(t.distill_beta, f"JSD beta {t.distill_beta:g}")
            on_policy = (f", on-policy: {t.distill_on_policy:g} of the rows written by the student, {t.distill_new_tokens} tokens each"
                         if t.distill_on_policy else "")
            parts.append(f"distilling from {t.teacher} ({divergence}, weight {t.distill_weight:g}, temperature "
                         f"{t.distill_temperature:g}{on_policy})")
        left = self._time_left()
        tokens = left["train"] / self.estimate.pace("step") * self.tokens_per_step
        pauses = f" ({_duration(left['pauses'])} of it evaluating and saving)" if left["pauses"] > 0.05 * left["total"] else ""
        parts.append(f"{tokens:,.0f} tokens to go, about {_duration(left['total'])}{pauses}")
        if self.step:
            parts.insert(0, f"resuming at step {self.step}")
        return "gptlab train: " + " | ".join(parts)

    def _print(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(msg)


# --------------------------------------------------------------------------- helpers


def _loader_state_for(state: dict, loader) -> dict:
    """A saved loader state as this run's loader would have written it: a run resumed on another number
    of processes draws the same global batches when batch_size x world_size is the same."""
    if state.get("batch_size", 0) * state.get("world_size", 0) == loader.batch_size * loader.world_size:
        return {**state, "batch_size": loader.batch_size, "world_size": loader.world_size}
    return state


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
