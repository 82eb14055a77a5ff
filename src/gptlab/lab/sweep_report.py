"""The report of a sweep: what every trial of an Optuna study gave, as a table, a CSV, a figure and a comparison.

    write_report(sweep_dir, study=None, best=3) -> dict    results.md, results.csv, sweep.png, compare/ (below)
    load_study(sweep_dir) -> optuna.Study                  the study named by SWEEP_DIR/spec.toml, from its storage
    trial_rows(study) -> list[dict]                        one row per trial, raw numbers (searched values in "params")
    format_table(rows, keys, objective) -> str             the ranked trials as plain text, for a terminal 100 wide
    format_skipped(rows, keys=None) -> str                 a markdown table of configurations skipped for memory
    plot_sweep(rows, keys, objective, path)                sweep.png on its own
    format_bytes(n), format_count(n), format_value(v)      2.31 GiB, 12.3M, 3e-04 / 512 / rmsnorm
    format_failed(rows, keys), format_budget(budget), searched_keys(study), storage_url(sweep_dir)

The study follows the sweep contract (see gptlab.lab.sweep): study.user_attrs "objective", "keys", "max_memory",
"budget"; each trial's params keyed by dotted config key, user_attrs "run_dir" (relative to SWEEP_DIR),
"predicted_memory", "parameters", "peak_memory", "tokens", "elapsed", "tokens_per_s", "stopped", and "skipped"
(a PRUNED trial that never started: its predicted memory was over the budget) or "error" (a FAIL). Everything
here reads the study only, so the report can be rewritten at any time, during a sweep as well as after it.

A row's "state" is one of complete, pruned, skipped, failed, running, waiting. Pruned trials are listed with the
objective at their last evaluation, which came earlier in training than a complete trial's: they are shown,
not ranked.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import tomllib

from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text

# objective -> (what it is, its unit after a number, its axis label)
OBJECTIVES = {"val_bpb": ("validation bits per byte", "bpb", "val_bpb (bits/byte)"),
              "val_loss": ("validation loss", "nats", "val_loss (nats/token)")}
STATES = ("complete", "pruned", "skipped", "failed", "running", "waiting")
# The CSV's fixed columns; the searched keys come between "value" and "parameters".
CSV_HEAD = ["number", "state", "rank", "value", "last_step"]
CSV_TAIL = ["parameters", "predicted_memory", "peak_memory", "memory_ratio", "tokens", "elapsed", "tokens_per_s",
            "stopped", "run_dir", "skipped", "error"]


# --------------------------------------------------------------------------- the study


def _spec(sweep_dir: Path) -> dict:
    path = sweep_dir / "spec.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is not valid TOML ({e})", "restore the sweep's copy of its spec") from None


def _spec_value(spec: dict, *names: str):
    """The first of `names` set at the spec's top level or in its [sweep] table."""
    for table in (spec, spec.get("sweep") if isinstance(spec.get("sweep"), dict) else {}):
        for name in names:
            if table.get(name) not in (None, ""):
                return table[name]
    return None


def storage_url(sweep_dir: Path, spec: dict | None = None) -> str:
    """The spec's storage (a URL, or a path to an SQLite file relative to SWEEP_DIR), else SWEEP_DIR/study.db."""
    storage = _spec_value(spec if spec is not None else _spec(sweep_dir), "storage")
    if storage and "://" in str(storage):
        return str(storage)
    path = Path(storage) if storage else Path("study.db")
    path = path if path.is_absolute() else sweep_dir / path
    if not path.is_file():  # opening a missing SQLite file would create an empty study database
        raise GptlabError(f"no study found in {sweep_dir} ({path} does not exist)", "run gptlab sweep SPEC.toml first")
    return f"sqlite:///{path.resolve()}"


def load_study(sweep_dir: str | Path):
    """The sweep's study: spec.toml's `name` in spec.toml's storage (or SWEEP_DIR/study.db); the storage's only
    study when the spec names none or a name the storage does not hold."""
    import optuna

    sweep_dir = Path(sweep_dir)
    spec = _spec(sweep_dir)
    url = storage_url(sweep_dir, spec)
    names = optuna.study.get_all_study_names(storage=url)
    name = _spec_value(spec, "name")
    if name not in names:
        if len(names) != 1:
            raise GptlabError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}) and none is named {name!r}",
                              "set `name` in spec.toml to the study to report")
        name = names[0]
    return optuna.load_study(study_name=name, storage=url)


def _state(trial) -> str:
    from optuna.trial import TrialState

    if trial.state == TrialState.PRUNED and trial.user_attrs.get("skipped"):
        return "skipped"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
            TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[trial.state]


def searched_keys(study, trials=None) -> list[str]:
    """study.user_attrs["keys"] (spec order); else every param any trial has, in the order first seen."""
    keys = list(study.user_attrs.get("keys") or [])
    for trial in trials if trials is not None else study.get_trials(deepcopy=False):
        keys += [k for k in trial.params if k not in keys]
    return keys


def trial_rows(study) -> list[dict]:
    """One row per trial, raw numbers: the objective (a pruned trial's: its last reported value, at last_step),
    the searched values under "params", memory predicted and measured, tokens, seconds, speed, run dir, reasons.
    Sorted as the report lists them: complete trials ranked by objective, then pruned, running, skipped, failed."""
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        state = _state(trial)
        value, last_step = trial.value, None
        if state != "complete" and trial.intermediate_values:
            last_step = max(trial.intermediate_values)
            value = trial.intermediate_values[last_step]
        predicted, peak = attrs.get("predicted_memory"), attrs.get("peak_memory")
        rows.append({
            "number": trial.number, "state": state, "rank": None,
            "value": value if value is not None and math.isfinite(value) else None, "last_step": last_step,
            "params": dict(trial.params), "parameters": attrs.get("parameters"),
            "predicted_memory": predicted, "peak_memory": peak,
            "memory_ratio": peak / predicted if peak and predicted else None,
            "tokens": attrs.get("tokens"), "elapsed": attrs.get("elapsed"), "tokens_per_s": attrs.get("tokens_per_s"),
            "stopped": attrs.get("stopped"), "run_dir": attrs.get("run_dir"),
            "skipped": attrs.get("skipped"), "error": attrs.get("error"),
            "choices": {k: list(d.choices) for k, d in trial.distributions.items() if hasattr(d, "choices")},
            "log": {k: bool(getattr(d, "log", False)) for k, d in trial.distributions.items()},
        })
    order = {s: i for i, s in enumerate(("complete", "pruned", "running", "waiting", "skipped", "failed"))}
    rows.sort(key=lambda r: (order[r["state"]], r["value"] is None, sign * (r["value"] or 0), r["number"]))
    for rank, row in enumerate((r for r in rows if r["state"] == "complete" and r["value"] is not None), 1):
        row["rank"] = rank
    return rows


# --------------------------------------------------------------------------- numbers for people


def format_bytes(n) -> str:
    """2.31 GiB, 512 MiB, 12.0 KiB, 100 B ('' for None)."""
    if n is None:
        return ""
    for unit, size, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 0), ("KiB", 2**10, 1)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n:.0f} B"


def format_count(n) -> str:
    """12.3M, 1.23G, 45.6k, 950 ('' for None)."""
    if n is None:
        return ""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_value(v) -> str:
    """A searched value as the spec would write it: 3e-04, 0.1, 512, true, rmsnorm ('' for a missing one)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.0e}" if v != 0 and abs(v) < 1e-3 and float(f"{v:.0e}") == v else f"{v:.3g}"
    return str(v)


def _objective(study) -> str:
    return study.user_attrs.get("objective") or "val_loss"


def _label(objective: str) -> str:
    return OBJECTIVES[objective][2] if objective in OBJECTIVES else objective


def _format_objective(value, objective: str, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _minutes(seconds) -> str:
    return "" if seconds is None else f"{seconds / 60:.2f}" if seconds < 600 else f"{seconds / 60:.1f}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def format_budget(budget) -> str:
    """{"minutes": 5} -> '5 minutes of training per trial'; {"tokens": 1e6} -> '1M tokens per trial'."""
    if not budget:
        return "not recorded"
    if not isinstance(budget, dict):
        return str(budget)
    parts = []
    for kind, amount in budget.items():
        if kind in ("tokens", "steps"):
            parts.append(f"{format_count(amount)} {kind}")
        elif kind in ("minutes", "seconds", "hours"):
            parts.append(f"{format_value(amount)} {kind} of training")
        else:
            parts.append(f"{kind} {format_value(amount)}")
    return " and ".join(parts) + " per trial"


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key by its last dotted part ("model.n_layer" -> "n_layer") where that part is unique among keys."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


# --------------------------------------------------------------------------- tables


def _md_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    def clean(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _config(params: dict, keys: list[str]) -> str:
    names = short_names(keys)
    return ", ".join(f"{names.get(k, k)}={format_value(params[k])}" for k in keys if k in params)


def results_table(rows: list[dict], keys: list[str], objective: str) -> str:
    """The markdown table of the trials that ran (complete, pruned, running), best first."""
    header = (["rank", "trial", "state"] + keys
              + [_label(objective), "parameters", "predicted memory", "peak memory",
                 "peak / predicted", "tokens", "minutes", "tokens/s", "stopped", "run dir"])
    table = []
    for r in rows:
        if r["state"] not in ("complete", "pruned", "running"):
            continue
        value = _format_objective(r["value"], objective)
        if value and r["state"] != "complete" and r["last_step"] is not None:
            value += f" (step {r['last_step']})"
        table.append([r["rank"] or "", r["number"], r["state"]] + [format_value(r["params"].get(k)) for k in keys]
                     + [value, format_count(r["parameters"]), format_bytes(r["predicted_memory"]),
                        format_bytes(r["peak_memory"]), _ratio(r["memory_ratio"]), format_count(r["tokens"]),
                        _minutes(r["elapsed"]), format_count(r["tokens_per_s"]), r["stopped"] or "", r["run_dir"] or ""])
    if not table:
        return "No trial has run yet.\n"
    return _md_table(header, table, right={0, 1} | set(range(3 + len(keys), 3 + len(keys) + 8)))


def format_skipped(rows: list[dict], keys: list[str] | None = None) -> str:
    """A markdown table of configurations skipped for memory: one row per configuration with its reason.

    Each row is a mapping with "params" (dotted key -> value) and the reason under "skipped" (a trial_rows row) or
    "reason"; "number" (the trial) and "predicted_memory" (bytes) are shown when present. The engine can write
    skipped.md with it before any trial has started. "None.\n" when there are no rows."""
    if not rows:
        return "None.\n"
    keys = keys or list(dict.fromkeys(k for r in rows for k in r.get("params", {})))
    with_numbers = any(r.get("number") is not None for r in rows)
    header = (["trial"] if with_numbers else []) + ["configuration", "predicted memory", "reason"]
    table = [([r.get("number", "")] if with_numbers else [])
             + [_config(r.get("params", {}), keys), format_bytes(r.get("predicted_memory")), r.get("skipped") or r.get("reason") or ""]
             for r in rows]
    return _md_table(header, table, right={0} if with_numbers else set())


def format_failed(rows: list[dict], keys: list[str]) -> str:
    """A markdown table of failed trials with their error."""
    if not rows:
        return "None.\n"
    table = [[r["number"], _config(r["params"], keys), r["run_dir"] or "", r["error"] or "(no error recorded)"] for r in rows]
    return _md_table(["trial", "configuration", "run dir", "error"], table, right={0})


def format_table(rows: list[dict], keys: list[str], objective: str, width: int = 100) -> str:
    """The trials that ran, best first, as aligned plain text for a terminal; the memory columns go first
    when the table is wider than `width`, then the searched values are cut."""
    names = short_names(keys)
    ran = [r for r in rows if r["state"] in ("complete", "pruned", "running")]
    if not ran:
        return "No trial has run yet."
    columns = ([("rank", lambda r: r["rank"] or "-"), ("trial", lambda r: r["number"]), ("state", lambda r: r["state"])]
               + [(names[k], lambda r, k=k: format_value(r["params"].get(k))) for k in keys]
               + [(objective, lambda r: _format_objective(r["value"], objective)),
                  ("params", lambda r: format_count(r["parameters"])),
                  ("peak mem", lambda r: format_bytes(r["peak_memory"])),
                  ("predicted", lambda r: format_bytes(r["predicted_memory"])),
                  ("tok/s", lambda r: format_count(r["tokens_per_s"])), ("min", lambda r: _minutes(r["elapsed"])),
                  ("stopped", lambda r: r["stopped"] or "")])
    cells = [[title for title, _ in columns]] + [[str(get(r)) for _, get in columns] for r in ran]
    def too_wide() -> bool:
        return sum(max(len(c[i]) for c in cells) + 2 for i in range(len(cells[0]))) - 2 > width

    for drop in ("predicted", "min", "stopped", "peak mem", "tok/s", "params"):
        if not too_wide():
            break
        i = cells[0].index(drop)
        cells = [c[:i] + c[i + 1:] for c in cells]
    key_columns = range(3, 3 + len(keys))
    if too_wide():  # long key names over short values: shorten the names to their values' width (at least 6)
        for i in key_columns:
            room = max(6, max(len(c[i]) for c in cells[1:]))
            cells[0][i] = cells[0][i] if len(cells[0][i]) <= room else cells[0][i][:room - 1] + "~"
    left_out = []
    while too_wide() and len(key_columns) > 1:  # still too wide: the last searched keys go (results.md has them)
        i = key_columns[-1]
        left_out.insert(0, keys[len(key_columns) - 1])
        cells = [c[:i] + c[i + 1:] for c in cells]
        key_columns = key_columns[:-1]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    numeric = {i for i, title in enumerate(cells[0]) if title not in ("state", "stopped")}
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if left_out:
        lines.append(f"(not shown, to fit {width} columns: {', '.join(left_out)}; see results.md)")
    return "\n".join(lines)


def _counts(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["state"] == s for r in rows) for s in STATES}


def _header(study, rows: list[dict], spec: dict, best_row: dict | None, live: bool) -> list[str]:
    attrs = study.user_attrs
    objective = _objective(study)
    what, unit, _ = OBJECTIVES.get(objective, (objective, "", objective))
    counts = _counts(rows)
    trials = ", ".join(f"{counts[s]} {'skipped for memory' if s == 'skipped' else s}" for s in STATES
                       if counts[s] or s in ("complete", "pruned", "failed", "skipped"))
    # a study loaded from storage gets Optuna's default sampler, not the sweep's: name it only when handed over
    sampler = (_spec_value(spec, "sampler", "method", "search") or attrs.get("sampler")
               or (type(study.sampler).__name__ if live else "not recorded"))
    pruner = _spec_value(spec, "pruner") or attrs.get("pruner")
    memory = attrs.get("max_memory")
    lines = [f"# Sweep {study.study_name}", "",
             f"- objective: {objective} ({what}, {'higher' if study.direction.name == 'MAXIMIZE' else 'lower'} is better)",
             f"- budget: {format_budget(attrs.get('budget'))}",
             f"- memory budget: {format_bytes(memory) + ' (configurations predicted to need more were skipped before they started)' if memory else 'not recorded'}",
             f"- sampler: {format_value(sampler)}" + (f", pruner: {format_value(pruner)}" if pruner else ""),
             f"- trials: {trials} ({len(rows)} in all)"]
    if best_row:
        lines.append(f"- best: trial {best_row['number']}, {objective} {best_row['value']:.4f}{' ' + unit if unit else ''}"
                     f" ({_config(best_row['params'], searched_keys(study))}; {best_row['run_dir'] or 'no run dir'})")
    else:
        lines.append("- best: none yet (no trial has completed)")
    return lines


# --------------------------------------------------------------------------- the figure


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _axis(rows: list[dict], key: str) -> dict:
    """How to place `key`'s values on an axis: numbers (log when they span > 20x or were sampled on a log
    scale), or categories at positions 0..n-1 in the order the spec listed them."""
    values = [r["params"][key] for r in rows if key in r["params"]]
    if values and all(_is_number(v) for v in values):
        lo, hi = min(values), max(values)
        log = lo > 0 and (hi / lo > 20 or any(r["log"].get(key) for r in rows))
        return {"kind": "number", "log": log, "lo": lo, "hi": hi}
    categories = []
    for r in rows:
        categories += [c for c in r["choices"].get(key, []) if c not in categories]
    categories += [v for v in values if v not in categories]
    return {"kind": "category", "categories": categories}


def _position(axis: dict, value) -> float | None:
    if value is None:
        return None
    if axis["kind"] == "category":
        return float(axis["categories"].index(value)) if value in axis["categories"] else None
    return float(value)


def _normalised(axis: dict, value) -> float | None:
    """value on [0, 1] along a parallel-coordinates axis (0.5 when the axis holds one value)."""
    x = _position(axis, value)
    if x is None:
        return None
    if axis["kind"] == "category":
        n = len(axis["categories"])
        return x / (n - 1) if n > 1 else 0.5
    lo, hi, f = axis["lo"], axis["hi"], (math.log if axis["log"] else float)
    return (f(x) - f(lo)) / (f(hi) - f(lo)) if hi > lo else 0.5


def _jitter(axis: dict, x: float, number: int) -> float:
    """Categories: spread a column's points a little, by trial number (the same figure every time)."""
    return x + 0.16 * ((number * 0.618) % 1) - 0.08 if axis["kind"] == "category" else x


def plot_sweep(rows: list[dict], keys: list[str], objective: str, path: str | Path, title: str = "") -> str:
    """sweep.png: the objective against each searched key (complete trials; pruned ones at their last reported
    value; the best starred), and a parallel-coordinates panel of every complete trial across keys and objective."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    from gptlab.evaluate.compare import _pyplot, save_figure, short_number

    plt = _pyplot()
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["value"] is not None]
    ylabel = _label(objective)
    if not done and not pruned or not keys:
        fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
        ax.axis("off")
        reason = "no searched keys recorded" if not keys else "no trial has finished yet"
        ax.text(0.5, 0.5, f"{title}\n\n{reason}: nothing to plot", ha="center", va="center", fontsize=13)
        save_figure(fig, Path(path))
        return str(path)

    best = next((r for r in done if r["rank"] == 1), None)
    names = short_names(keys)
    axes_of = {k: _axis(done + pruned, k) for k in keys}
    ncols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / ncols)
    parallel = len(done) >= 2
    fig = plt.figure(figsize=(max(4.2 * ncols, 10), 3.4 * nrows + (4.6 if parallel else 0) + 0.6), dpi=100,
                     layout="constrained")
    grid = fig.add_gridspec(nrows + parallel, ncols, height_ratios=[1] * nrows + ([1.35] if parallel else []))
    scatter_axes = []
    for i, key in enumerate(keys):
        ax = fig.add_subplot(grid[i // ncols, i % ncols], sharey=scatter_axes[0] if scatter_axes else None)
        scatter_axes.append(ax)
        axis = axes_of[key]
        for group, style in ((done, dict(marker="o", color="tab:blue", label="complete", s=28, zorder=3)),
                             (pruned, dict(marker="x", color="tab:orange", label="pruned (last value)", s=30, zorder=2))):
            points = [(_position(axis, r["params"].get(key)), r["value"], r["number"]) for r in group]
            points = [(_jitter(axis, x, n), y) for x, y, n in points if x is not None]
            if points:
                ax.scatter(*zip(*points), alpha=0.85, linewidths=1.2 if style["marker"] == "x" else 0.5,
                           edgecolors="white" if style["marker"] == "o" else None, **style)
        if best is not None and key in best["params"]:
            ax.scatter([_jitter(axis, _position(axis, best["params"][key]), best["number"])], [best["value"]], marker="*", s=220, color="tab:red",
                       edgecolors="black", linewidths=0.6, zorder=4, label=f"best (trial {best['number']})")
        if axis["kind"] == "category":
            ax.set_xticks(range(len(axis["categories"])), [format_value(c) for c in axis["categories"]],
                          rotation=30 if sum(len(format_value(c)) for c in axis["categories"]) > 24 else 0)
            ax.set_xlim(-0.5, len(axis["categories"]) - 0.5)
        elif axis["log"]:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_value(float(f"{v:.3g}"))))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(6, integer=all(isinstance(r["params"].get(key, 0), int) for r in done + pruned)))
            if axis["hi"] >= 1e4:
                ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.set_title(names[key], fontsize=11, fontweight="bold")
        ax.set_xlabel(key + (" (log scale)" if axis.get("log") else ""), fontsize=9)
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        else:
            ax.tick_params(labelleft=False)
    handles, labels = scatter_axes[0].get_legend_handles_labels()
    for ax in scatter_axes[1:]:  # the first panel may lack a group (a key a trial did not sample)
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    scatter_axes[0].legend(handles, labels, fontsize=8, loc="best")

    if parallel:
        ax = fig.add_subplot(grid[nrows, :])
        _parallel_coordinates(ax, done, pruned, keys, axes_of, objective, ylabel, best, fig)
    note = "" if parallel else "  (parallel coordinates need two complete trials)"
    fig.suptitle(f"{title}: {len(done)} complete, {len(pruned)} pruned{note}" if title else
                 f"{len(done)} complete, {len(pruned)} pruned{note}", fontsize=12)
    save_figure(fig, Path(path))
    return str(path)


def _parallel_coordinates(ax, done, pruned, keys, axes_of, objective, ylabel, best, fig) -> None:
    """Each trial a line across the keys' axes and the objective's, all scaled to [0, 1]; complete trials
    coloured by objective (dark = low), pruned ones in grey, the best in red on top."""
    import matplotlib
    from matplotlib import cm, colors

    names = short_names(keys)
    values = [r["value"] for r in done + pruned]
    objective_axis = {"kind": "number", "log": False, "lo": min(values), "hi": max(values)}
    n = len(keys) + 1
    norm = colors.Normalize(min(r["value"] for r in done), max(r["value"] for r in done))
    cmap = matplotlib.colormaps["viridis"]

    def line(r):
        ys = [_normalised(axes_of[k], r["params"].get(k)) for k in keys] + [_normalised(objective_axis, r["value"])]
        return [(x, y) for x, y in enumerate(ys) if y is not None]

    for r in pruned:
        ax.plot(*zip(*line(r)), color="0.6", linestyle="--", linewidth=0.9, alpha=0.6, zorder=1)
    for r in sorted(done, key=lambda r: -r["value"]):  # the best drawn last, on top
        ax.plot(*zip(*line(r)), color=cmap(norm(r["value"])), linewidth=1.6, alpha=0.85, zorder=2)
    if best is not None:
        ax.plot(*zip(*line(best)), color="tab:red", linewidth=3, zorder=3, label=f"best (trial {best['number']})")
    if pruned:
        ax.plot([], [], color="0.6", linestyle="--", label="pruned (last value)")
    for x, axis in enumerate([axes_of[k] for k in keys] + [objective_axis]):
        ax.axvline(x, color="0.25", linewidth=1, zorder=0)
        if axis["kind"] == "category":
            ticks = [(_normalised(axis, c), format_value(c)) for c in axis["categories"]]
        elif axis["hi"] > axis["lo"]:
            fmt = format_value if x < len(keys) else (lambda v: f"{v:.4f}")
            ticks = [(0.0, fmt(axis["lo"])), (1.0, fmt(axis["hi"]))]
        else:
            ticks = [(0.5, format_value(axis["lo"]))]
        for y, label in ticks:
            ax.text(x + 0.04, y, label, fontsize=8, va="center", ha="left",
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8), zorder=4)
    ax.set_xticks(range(n), [names[k] for k in keys] + [ylabel], rotation=20 if n > 6 else 0, fontsize=9)
    ax.set_xlim(-0.15, n - 1 + 0.6)
    ax.set_ylim(-0.06, 1.06)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title("parallel coordinates: every trial across the searched keys and the objective (axes scaled min..max)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.12 if n > 6 else -0.08), ncols=2, frameon=False)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=ylabel, pad=0.01, fraction=0.03)


# --------------------------------------------------------------------------- the report


def _csv_text(rows: list[dict], keys: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEAD + keys + CSV_TAIL)
    for r in sorted(rows, key=lambda r: r["number"]):
        writer.writerow([("" if r[c] is None else r[c]) for c in CSV_HEAD]
                        + [("" if r["params"].get(k) is None else r["params"][k]) for k in keys]
                        + [("" if r[c] is None else r[c]) for c in CSV_TAIL])
    return buf.getvalue()


def _compare_best(sweep_dir: Path, done: list[dict], best: int) -> tuple[str | None, str]:
    """compare_runs over the `best` best complete trials that left a run dir; (compare dir or None, a note)."""
    from gptlab.evaluate import compare_runs

    runs = [r for r in done if r["run_dir"] and (sweep_dir / r["run_dir"] / "metrics.csv").is_file()][:best]
    if best < 2:
        return None, "Not compared (asked for fewer than two runs)."
    if len(runs) < 2:
        return None, (f"Not compared: {len(runs)} complete trial{'s' if len(runs) != 1 else ''} with a run directory "
                      "(a comparison needs two).")
    out = sweep_dir / "compare"
    try:
        compare_runs([sweep_dir / r["run_dir"] for r in runs], out)
    except GptlabError as e:  # a damaged run dir must not cost the rest of the report
        return None, f"Not compared: {e}"
    trials = ", ".join(f"trial {r['number']}" for r in runs)
    return str(out), f"The {len(runs)} best complete trials ({trials}): [compare/compare.md](compare/compare.md), ![curves](compare/compare.png)"


def write_report(sweep_dir: str | Path, study=None, best: int = 3) -> dict:
    """Write SWEEP_DIR/results.md, results.csv, sweep.png and compare/ (the `best` best complete trials'
    runs compared, when there are two or more) from the study (loaded from SWEEP_DIR when None).

    Returns {"table": plain-text table for the terminal, "markdown", "csv", "plot": paths, "compare": path or None,
    "best": {"number", "value", "params", "run_dir"} or None}."""
    sweep_dir = Path(sweep_dir)
    live = study is not None
    study = study if live else load_study(sweep_dir)
    spec = _spec(sweep_dir)
    rows = trial_rows(study)
    keys = searched_keys(study)
    objective = _objective(study)
    done = [r for r in rows if r["rank"] is not None]
    best_row = done[0] if done else None

    csv_path, md_path, plot_path = sweep_dir / "results.csv", sweep_dir / "results.md", sweep_dir / "sweep.png"
    plot_sweep(rows, keys, objective, plot_path, title=f"Sweep {study.study_name}")
    compare_dir, compare_note = _compare_best(sweep_dir, done, best)
    atomic_write_text(csv_path, _csv_text(rows, keys))

    ran = [r for r in rows if r["state"] in ("complete", "pruned", "running")]
    skipped = [r for r in rows if r["state"] == "skipped"]
    failed = [r for r in rows if r["state"] == "failed"]
    lines = _header(study, rows, spec, best_row, live)
    lines += ["", "![the objective against each searched key](sweep.png)", "", "## Results", "", results_table(rows, keys, objective)]
    if any(r["state"] == "pruned" for r in ran):
        lines += ["Pruned trials show the objective at their last evaluation (step in brackets): earlier in training "
                  "than a complete trial, so they are not ranked.", ""]
    if any(r["memory_ratio"] for r in ran):
        lines += ["peak / predicted: the measured peak memory of the run over gptlab's prediction "
                  "(gptlab.model.info.training_memory) that the memory budget was checked against.", ""]
    lines += ["## Skipped for memory (never started)", "", format_skipped(skipped, keys),
              "## Failed", "", format_failed(failed, keys), "## Best trials compared", "", compare_note, ""]
    atomic_write_text(md_path, "\n".join(lines))
    return {"table": format_table(rows, keys, objective), "markdown": str(md_path), "csv": str(csv_path),
            "plot": str(plot_path), "compare": compare_dir,
            "best": {"number": best_row["number"], "value": best_row["value"], "params": best_row["params"],
                     "run_dir": best_row["run_dir"]} if best_row else None}
