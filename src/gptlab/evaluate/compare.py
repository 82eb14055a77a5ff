"""Reading finished runs back, and comparing them: `gptlab compare RUN...` and `gptlab plot RUN`.

What a run directory holds is written by the training stage (metrics.csv, config.toml,
summary.json) and by `gptlab eval` (eval.json); nothing here needs the weights, so comparing
runs is instant whatever their size.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.files import atomic_write_bytes, atomic_write_text

X_AXES = {"tokens": ("tokens", "tokens seen"), "time": ("elapsed", "training time (s)"), "step": ("step", "step")}
STEADY_NOTE = ("tokens/s: steady state, the median of the logged intervals after the first (which holds the "
               "warm-up and torch.compile's compilation); a run with a single interval: its overall average.")
# run_dir differs between any two runs and names them already; [eval] settings are not the run's.
IGNORED_KEYS = ("train.run_dir", "eval.")


def read_metrics(run_dir: str | Path) -> list[dict[str, float | None]]:
    """metrics.csv as rows of floats (None where a column is empty); GptlabError if the run has none."""
    path = Path(run_dir) / "metrics.csv"
    if not Path(run_dir).is_dir():
        raise GptlabError(f"run directory not found: {run_dir}", "check the path (runs are written by gptlab train)")
    if not path.is_file():
        raise GptlabError(f"{run_dir} has no metrics.csv", "give runs written by gptlab train (or leave this one out)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [{k: float(v) if v not in ("", None) else None for k, v in r.items()} for r in csv.DictReader(f)]
    except (UnicodeDecodeError, ValueError, TypeError, csv.Error) as e:  # binary, a cut or hand-edited row
        raise GptlabError(f"{path} is damaged ({type(e).__name__}: {e})", "restore it from a copy, or leave this run out") from None
    if not rows:
        raise GptlabError(f"{path} has no rows yet", "let the run reach its first log step, or leave it out")
    return rows


def series(rows: list[dict], y: str, x: str = "step") -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def best_val_row(rows: list[dict]) -> dict | None:
    """The row with the lowest validation loss: where it stopped improving."""
    scored = [r for r in rows if r.get("val_loss") is not None]
    return min(scored, key=lambda r: r["val_loss"]) if scored else None


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    return out


def run_summary(run_dir: str | Path) -> dict:
    """One row of the comparison: sizes, losses, bits per byte, HellaSwag, speed, and the flat config."""
    import torch

    from gptlab.config import config_to_dict
    from gptlab.model import build_model
    from gptlab.runs import CONFIG, load_run_config

    run = Path(run_dir)
    rows = read_metrics(run)
    cfg = load_run_config(run) if (run / CONFIG).is_file() else None
    summary = _read_json(run / "summary.json")
    evaluation = _read_json(run / "eval.json")
    params = None
    if cfg is not None and cfg.model.vocab_size:
        with torch.device("meta"):  # shapes only: no memory, no time, whatever the model's size
            params = build_model(cfg.model).num_params()
    best = best_val_row(rows)
    val = [r for r in rows if r.get("val_loss") is not None]
    out = {
        "run": str(run),
        "parameters": params,
        "tokens_seen": int(summary.get("tokens") or rows[-1].get("tokens") or 0),
        "steps": int(summary.get("steps") or rows[-1].get("step") or 0),
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_step": int(best["step"]) if best else None,
        "final_val_bpb": val[-1].get("val_bpb") if val else None,
        "best_val_bpb": best.get("val_bpb") if best else None,
        "tokens_per_s": steady_tokens_per_s(rows) or summary.get("tokens_per_s"),
        "eval_bpb": evaluation["datasets"][0].get("bpb") if evaluation.get("datasets") else None,
        "hellaswag_acc_norm": evaluation.get("hellaswag", {}).get("acc_norm"),
        "config": flatten(config_to_dict(cfg)) if cfg is not None else {},
        "metrics": rows,
    }
    return out


def steady_tokens_per_s(rows: list[dict]) -> float | None:
    """The median speed of the logged intervals after the first. The first interval holds the warm-up
    (torch.compile's compilation, when on: seconds to minutes), which an average over the run would spread
    over every step; None with fewer than two intervals."""
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") and r.get("loss") is not None][1:]
    return statistics.median(speeds) if speeds else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def differing_keys(configs: list[dict[str, str]]) -> list[str]:
    """Dotted keys whose values differ between the runs that have a config.toml."""
    configs = [c for c in configs if c]
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if not k.startswith(IGNORED_KEYS) and len({c.get(k, "") for c in configs}) > 1]


def _names(runs: list[dict]) -> list[str]:
    names = [Path(r["run"]).name for r in runs]
    return names if len(set(names)) == len(names) else [r["run"] for r in runs]


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}"


def format_comparison(runs: list[dict]) -> str:
    names = _names(runs)
    columns = [("parameters", "parameters", 0), ("tokens_seen", "tokens seen", 0), ("final_val_loss", "final val loss", 4),
               ("best_val_loss", "best val loss", 4), ("best_val_bpb", "best val bits/byte", 4),
               ("eval_bpb", "eval bits/byte", 4), ("hellaswag_acc_norm", "HellaSwag acc_norm", 4),
               ("tokens_per_s", "tokens/s", 0)]
    columns = [c for c in columns if any(r[c[0]] is not None for r in runs)]
    lines = ["| run | " + " | ".join(title for _, title, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, r in zip(names, runs):
        cells = [_fmt(round(r[key]) if digits == 0 and r[key] is not None else r[key], digits) for key, _, digits in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    keys = differing_keys([r["config"] for r in runs])
    if keys:
        lines += ["", "Config keys that differ:", "", "| key | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(r["config"].get(key, "") for r in runs) + " |")
    elif sum(bool(r["config"]) for r in runs) > 1:
        lines += ["", "The runs' configs are the same (apart from train.run_dir)."]
    missing = [name for name, r in zip(names, runs) if not r["config"]]
    if missing:
        lines += ["", f"No config.toml in: {', '.join(missing)}."]
    if any(r["tokens_per_s"] is not None for r in runs):
        lines += ["", STEADY_NOTE]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path = ".", x: str = "tokens") -> dict:
    """Write OUT/compare.md (table) and OUT/compare.png (training and validation curves); returns both."""
    if x not in X_AXES:
        raise GptlabError(f"unknown x axis {x!r}", f"use one of: {', '.join(X_AXES)}")
    if not run_dirs:
        raise GptlabError("no runs to compare", "give one or more run directories")
    runs = [run_summary(r) for r in run_dirs]
    out_dir = Path(out_dir)
    table = format_comparison(runs)
    atomic_write_text(out_dir / "compare.md", "# Runs compared\n\n" + table)
    plot_comparison(runs, out_dir / "compare.png", x)
    return {"table": table, "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in runs],
            "markdown": str(out_dir / "compare.md"), "plot": str(out_dir / "compare.png")}


# --------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def short_number(x: float, _pos=None) -> str:
    """A tick label: 950, 100k, 1.2M, 3G (raw counts of six digits and more run into each other)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def plot_comparison(runs: list[dict], path: Path, x: str = "tokens") -> None:
    """Training loss, and validation loss beside it when any run logged some, against `x` for every run."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt = _pyplot()
    column, label = X_AXES[x]
    has_val = any(series(run["metrics"], "val_loss", column)[0] for run in runs)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 6.5, 4.5), dpi=100, sharex=True, sharey=True, squeeze=False)
    train_ax, val_ax = axes[0][0], axes[0][1] if has_val else None
    for name, run in zip(_names(runs), runs):
        line = train_ax.plot(*series(run["metrics"], "loss", column), label=name, linewidth=1)[0]
        if val_ax is not None:
            val_ax.plot(*series(run["metrics"], "val_loss", column), label=name, marker="o", markersize=3, color=line.get_color())
    for ax, title in ((train_ax, "training loss" if has_val else "training loss (no validation logged)"), (val_ax, "validation loss")):
        if ax is None:
            continue
        ax.set_title(title)
        ax.set_xlabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.grid(alpha=0.3)
    train_ax.set_ylabel("loss (nats/token)")
    (val_ax or train_ax).legend(fontsize=8)
    save_figure(fig, path)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """One figure (RUN/plot.png): loss and validation loss, learning rate, gradient norm and tokens/s
    against the step, with the step where validation loss stopped improving marked on every panel."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    run = Path(run_dir)
    rows = read_metrics(run)
    path = Path(out) if out else run / "plot.png"
    best = best_val_row(rows)
    last_step = rows[-1]["step"]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), dpi=100, sharex=True)
    loss_ax, lr_ax, norm_ax, speed_ax = axes
    loss_ax.plot(*series(rows, "loss"), label="training", linewidth=1)
    loss_ax.plot(*series(rows, "val_loss"), label="validation", marker="o", markersize=3)
    loss_ax.set_ylabel("loss (nats/token)")
    lr_ax.plot(*series(rows, "lr"))
    lr_ax.set_ylabel("learning rate")
    norm_ax.plot(*series(rows, "grad_norm"))
    norm_ax.set_ylabel("gradient norm")
    speed_ax.plot(*series(rows, "tokens_per_s"))
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    speed_ax.xaxis.set_major_formatter(FuncFormatter(short_number))  # shared by every panel
    if best is not None:
        for ax in axes:
            ax.axvline(best["step"], color="tab:red", linestyle="--", linewidth=1)
        if best["step"] < last_step:  # trained on past the best: the overfitting stretch
            loss_ax.axvspan(best["step"], last_step, color="tab:red", alpha=0.08)
        right_half = best["step"] > (rows[0]["step"] + last_step) / 2  # keep the label inside the axes
        loss_ax.annotate(f"best val loss {best['val_loss']:.4f}\nat step {int(best['step'])}",
                         (best["step"], best["val_loss"]), textcoords="offset points", xytext=(-6 if right_half else 6, 12),
                         ha="right" if right_half else "left", fontsize=8, color="tab:red")
    for ax in axes:
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    loss_ax.set_title(run.name)
    save_figure(fig, path)
    return {"plot": str(path), "best_step": int(best["step"]) if best else None,
            "best_val_loss": best["val_loss"] if best else None, "last_step": int(last_step)}
