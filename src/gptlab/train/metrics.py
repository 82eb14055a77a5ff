"""What a run records: metrics.csv, loss.png and lr.png, samples.md, and optional TensorBoard / W&B; the rows'
numbers (Interval), and the check that the loss is still finite.

metrics.csv is an append-only log (one whole row per write, flushed), the way
a training log is read while it grows; on resume it is rewritten atomically
without the rows logged after the checkpoint being resumed. The plots and
samples.md are rewritten atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Callable

import torch

from gptlab.errors import GptlabError
from gptlab.files import atomic_write_bytes, atomic_write_text

COLUMNS = ["step", "tokens", "loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed"]
AUX_COLUMN = "aux_loss"  # a model with MoE parts: the part of `loss` that is their balancing losses


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None, backends: list[str], config: dict,
                 columns: list[str] = COLUMNS):
        self.path, self.columns = run_dir / "metrics.csv", columns
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("elapsed") and int(r["step"]) <= resume_step]
        self._rewrite()
        self.file = self.path.open("a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, self.columns)
        self.extra = [_BACKENDS[name](run_dir, config) for name in backends if name != "csv"]

    def _rewrite(self) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())

    def log(self, row: dict) -> None:
        row = {k: _fmt(row.get(k)) for k in self.columns}
        self.rows.append(row)
        self.writer.writerow(row)
        self.file.flush()
        for backend in self.extra:
            backend.log({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}, int(row["step"]))

    def plot(self, run_dir: Path) -> None:
        """Redraw loss.png and lr.png from every row so far."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(int(r["step"]), float(r["loss"])) for r in self.rows if r["loss"]]
        val = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r["val_loss"]]
        lrs = [(int(r["step"]), float(r["lr"])) for r in self.rows if r["lr"]]
        for name, series, ylabel in [("loss.png", [("train", train), ("validation", val)], "loss (nats/token)"),
                                     ("lr.png", [("learning rate", lrs)], "learning rate")]:
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            for label, points in series:
                if points:
                    ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None, markersize=3)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(series) > 1 and any(points for _, points in series):
                ax.legend()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            plt.close(fig)
            atomic_write_bytes(run_dir / name, buf.getvalue())

    def close(self) -> None:
        self.file.close()
        for backend in self.extra:
            backend.close()


class Diverged(Exception):
    """The loss (or the gradient norm) is no longer finite: the trainer stops with the last good checkpoint."""


class Interval:
    """Sums of the loss and gradient norm since the last metrics row, kept on the device (no sync per step).

    `watch_grad_norm`: an infinite gradient norm is divergence too (not under fp16, whose scaler skips the
    steps where gradients overflowed).
    """

    def __init__(self, device: torch.device, tokens: int, elapsed: float, watch_grad_norm: bool = True,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss):
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.aux_loss = None  # the auxiliary losses' part of the loss, for a model that has them
        self.steps, self.tokens, self.elapsed, self.lr = 0, tokens, elapsed, None
        self.watch_grad_norm, self.reduce = watch_grad_norm, reduce  # reduce: the mean over the processes

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, aux_loss: torch.Tensor | None = None) -> None:
        self.loss += loss
        if aux_loss is not None:
            self.aux_loss = aux_loss if self.aux_loss is None else self.aux_loss + aux_loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.lr = lr

    def check(self, step: int) -> tuple[float, float]:
        """The mean loss and gradient norm of the interval's steps (a host sync); Diverged if not finite."""
        steps = max(self.steps, 1)
        loss, norm = (self.reduce(self.loss.clone()) / steps).item(), (self.grad_norm / steps).item()
        watched = loss + norm if self.watch_grad_norm else loss
        if not math.isfinite(watched):
            first = step - self.steps + 1
            where = f"at step {first}" if self.steps == 1 else f"between steps {first} and {step}"
            raise Diverged(f"the loss or gradient norm became {'nan' if math.isnan(loss + norm) else 'inf'} {where}")
        return loss, norm

    def row(self, step: int, tokens: int, elapsed: float, flops_per_token: float, peak: float) -> dict:
        loss, norm = self.check(step)
        tok_s = (tokens - self.tokens) / max(elapsed - self.elapsed, 1e-9)
        row = {"step": step, "tokens": tokens, "loss": loss, "lr": self.lr, "grad_norm": norm,
               "tokens_per_s": tok_s, "mfu": tok_s * flops_per_token / peak, "elapsed": elapsed}
        if self.aux_loss is not None:  # the mean over the processes, as the loss
            row[AUX_COLUMN] = (self.reduce(self.aux_loss.clone()) / max(self.steps, 1)).item()
        return row


class MemoryRows:
    """What processes other than the main one keep of the metrics: the rows, in memory (the main one writes
    the files)."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def plot(self, run_dir: Path) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def append_sample(run_dir: Path, step: int, prompt: str, text: str) -> None:
    path = run_dir / "samples.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Samples\n"
    shown_prompt = f" (prompt: {prompt!r})" if prompt else ""
    atomic_write_text(path, f"{old}\n## step {step}{shown_prompt}\n\n```text\n{prompt}{text}\n```\n")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GptlabError("train.log includes tensorboard, which is not installed", "pip install tensorboard") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise GptlabError("train.log includes wandb, which is not installed", "pip install wandb") from None
        # Offline unless the user asks for online (WANDB_MODE) or has a key: a run never waits on a network
        # or a login prompt; `wandb sync RUN/wandb/offline-run-*` uploads it later.
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        try:
            self.run = wandb.init(project="gptlab", name=run_dir.name, dir=str(run_dir), config=config, mode=mode)
        except Exception as e:  # wandb raises its own kinds (no key, no network, bad settings)
            raise GptlabError(f"wandb could not start in {mode} mode ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})",
                              "set WANDB_MODE=offline to log locally, or log in with wandb login") from None

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB}
