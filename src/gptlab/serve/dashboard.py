"""What the dashboard shows of the runs in a folder, read from their files: which runs there are, each one's
state and latest numbers, its metrics rows (from a given row on, so a page polling a run that trains fetches
only what is new), its recent samples, its eval results and its config.

A run here is any subfolder with a config.toml or a metrics.csv -- one still training, with no checkpoint
yet, included (the model registry offers only runs with checkpoints). Names are checked against the
registry's RUN_NAME before anything is read, so a request never reaches outside the folder.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from gptlab.evaluate.report import EVAL_JSON, EVAL_MD
from gptlab.runs import CONFIG, STATUS, checkpoint_dirs, run_status
from gptlab.serve.registry import RUN_NAME
from gptlab.train.metrics import COLUMNS

METRICS = "metrics.csv"
SAMPLES = "samples.md"
SUMMARY = "summary.json"
MAX_TEXT = 1_000_000  # the most characters of a text file (config, samples, eval.md) a response carries
MAX_ROWS = 20_000  # the most metrics rows one response carries (~3 MB of JSON)


class UnknownRun(LookupError):
    """No run of that name in the folder (the server answers 404)."""


def is_dashboard_run(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG).is_file() or (path / METRICS).is_file())


def list_runs(root: Path, only: set[str] | None = None) -> list[str]:
    """The runs in `root` (or those of them named in `only`), by name, sorted."""
    try:
        children = list(root.iterdir())
    except OSError:
        return []
    return sorted(p.name for p in children if RUN_NAME.fullmatch(p.name) and (only is None or p.name in only)
                  and not p.is_symlink() and is_dashboard_run(p))


def find_run(root: Path, name: str, only: set[str] | None = None) -> Path:
    """The folder of run `name` in `root` (if in `only`); UnknownRun for anything else (a path-like name included)."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or (only is not None and name not in only):
        raise UnknownRun(name)
    path = root / name
    if path.is_symlink() or not is_dashboard_run(path):  # a link could lead outside the folder
        raise UnknownRun(name)
    return path


def _number(text: str):
    """A metrics.csv cell as a JSON number: int for counters, float otherwise; None for an empty or nan cell."""
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def _metric_lines(run_dir: Path) -> tuple[list[str], list[str]]:
    """metrics.csv's columns and its complete rows, one line each (its numbers hold no comma, quote or line
    break). The trainer appends whole rows and flushes, but a read can still land mid-write: a last line
    without its newline is left for the next read."""
    try:
        data = (run_dir / METRICS).read_bytes()
    except OSError:
        return [], []
    lines = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines()
    if not lines:
        return [], []
    return next(csv.reader(lines[:1])), [line for line in lines[1:] if line.strip()]


def _rows(header: list[str], lines):
    """The rows of these lines as numbers (a generator: a reader going backwards stops when it has enough)."""
    for values in csv.reader(lines):
        row = dict(zip(header, values))
        if row.get("step"):
            yield {k: _number(row.get(k, "")) for k in COLUMNS}


def metrics_since(run_dir: Path, since: int = 0, limit: int = MAX_ROWS) -> dict:
    """Up to `limit` rows from row `since` on; `next` is the since of the next call, `total` the rows there are
    (a long run's history comes in a few calls). A resumed run rewrites metrics.csv without the rows after
    its checkpoint, so fewer rows than `since`: `reset` says to start again from 0."""
    header, lines = _metric_lines(run_dir)
    reset = since > len(lines)
    start = 0 if reset else max(since, 0)
    piece = lines[start:start + limit]
    return {"columns": COLUMNS, "rows": list(_rows(header, piece)), "since": start, "next": start + len(piece),
            "total": len(lines), "reset": reset}


def _latest(header: list[str], lines: list[str], keys: tuple[str, ...]) -> dict:
    """The last value of each key, reading back from the end only as far as needed (validation rows are sparse)."""
    found: dict = {}
    for row in _rows(header, reversed(lines)):
        for key in keys:
            if key not in found and row[key] is not None:
                found[key] = row[key]
        if len(found) == len(keys):
            break
    return found


def _mtime(run_dir: Path) -> float | None:
    times = []
    for name in (METRICS, STATUS, SUMMARY, CONFIG):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times) if times else None


def run_summary(run_dir: Path) -> dict:
    """One line of the runs table: state, latest step and tokens, last losses, when the run last wrote."""
    header, lines = _metric_lines(run_dir)
    latest = _latest(header, lines, ("step", "tokens", "loss", "val_loss", "lr", "tokens_per_s"))
    status = run_status(run_dir)
    return {
        "name": run_dir.name,
        "state": status.get("state", "new"),
        "reason": status.get("reason"),
        **{key: latest.get(key) for key in ("step", "tokens", "loss", "val_loss", "lr", "tokens_per_s")},
        "rows": len(lines),
        "updated": _mtime(run_dir),
        "checkpoints": len(checkpoint_dirs(run_dir)),
        "has": {"samples": (run_dir / SAMPLES).is_file(), "eval": (run_dir / EVAL_JSON).is_file(),
                "config": (run_dir / CONFIG).is_file()},
    }


def _read_text(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.read(MAX_TEXT)
    except OSError:
        return None


_SAMPLE_HEAD = re.compile(r"^## step (\d+)(?: \(prompt: (.*)\))?$")


def read_samples(run_dir: Path, last: int = 10) -> list[dict]:
    """The newest `last` samples of samples.md, newest first: {step, prompt, text} (text includes the prompt,
    as the trainer writes it)."""
    text = _read_text(run_dir / SAMPLES)
    if not text:
        return []
    samples, current, body = [], None, None  # body: the lines of the open ``` block, None outside one
    for line in text.splitlines():
        if body is not None:
            if line == "```":
                current["text"], body = "\n".join(body), None
            else:
                body.append(line)
        elif head := _SAMPLE_HEAD.match(line):
            current = {"step": int(head.group(1)), "prompt": _unrepr(head.group(2)), "text": ""}
            samples.append(current)
        elif current is not None and line.startswith("```"):
            body = []
    return samples[::-1][:last]


def _unrepr(text: str | None) -> str:
    """The prompt of a sample's heading, written with Python's repr: read back without eval."""
    if not text:
        return ""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return text


def read_eval(run_dir: Path) -> dict:
    """What `gptlab eval` wrote in the run folder: eval.json (the report) and eval.md (its rendering)."""
    report = None
    text = _read_text(run_dir / EVAL_JSON)
    if text:
        try:
            report = json.loads(text)
        except ValueError:
            report = None
    return {"report": report, "markdown": _read_text(run_dir / EVAL_MD)}


def read_config(run_dir: Path) -> dict:
    return {"toml": _read_text(run_dir / CONFIG)}
