"""Hyper-parameter sweeps: `gptlab sweep SPEC.toml` trains many small configurations and keeps the best.

A spec is a TOML file; every key is optional but [space]:

    name = "defaultgpt-2gb"        # the Optuna study's name (default: the spec file's stem)
    out = "sweeps/defaultgpt-2gb"  # the sweep folder, relative to the current folder (default sweeps/<stem>)
    base = "../recipes/x.toml"     # a config every trial starts from, relative to the spec file (default: the defaults)
    sampler = "tpe"                # grid | random | tpe (Optuna's GridSampler / RandomSampler / TPESampler)
    trials = 12                    # trials to run (grid: default every point that fits; random/tpe: required)
    objective = "val_bpb"          # val_bpb | val_loss: the last evaluation's, lower is better
    budget = { minutes = 5 }       # or { tokens = 2000000 } or { steps = 500 }: each trial's train.max_time /
                                   # max_tokens / max_steps
    max_memory = "2GB"             # memory budget of one trial (--max-memory wins); default: what is free now
    pruner = "median"              # median | hyperband | none, fed the objective at every evaluation
    seed = 0                       # the sampler's seed
    storage = "sqlite:///x.db"     # Optuna storage (default: sqlite SWEEP/study.db); a postgresql:// URL lets
                                   # machines share one study

    [config]                       # config sections laid on top of base for every trial (as in a config TOML)
    train = { eval_every = 50 }

    [space]                        # dotted config keys -> what to try
    "model.n_layer" = [2, 4, 6]                            # a list: choices
    "model.d_model" = { choices = [64, 128] }              # the same, spelled out
    "train.lr" = { low = 1e-4, high = 1e-2, log = true }   # a float range (log scale)
    "model.n_head" = { low = 1, high = 8, step = 1 }       # an int range (int low and high)
    "tokenizer.vocab_size" = [1024, 2048]                  # data keys too: data prepared once per setting
    "model.n_kv_head" = { choices = [1, 2], when = { "model.attention" = "sdpa" } }  # only where that holds

Before any trial runs, the spec is checked (keys, types, ranges) and every candidate configuration -- each
grid point, or for random/TPE every corner of the space (choices x {low, high}) -- is priced with
`training_memory(cfg)["total"]`; those over the budget, or that are not valid configs, are listed with the
reason (screen and SWEEP/skipped.md) and never trained. A sampled configuration over budget is told to Optuna
as PRUNED with user_attr "skipped" (so TPE learns to avoid it) and does not count as a trial.

Each trial trains in a fresh child process (its peak memory is its own; a crash does not end the sweep) into
SWEEP/trials/NNNN, a normal run directory: its on_eval reports the objective and stops a trial the pruner
prunes, its on_step stops one whose resident memory goes over the budget ("out_of_memory").

Resuming: the study lives in Optuna storage, so running the same command again continues. A trial whose
worker died (kill -9) stops sending heartbeats, is failed after GRACE_S seconds and retried with the same
parameters (RetryFailedTrialCallback), resuming its run directory from its last checkpoint; Ctrl-C or
SIGTERM fails and re-queues the running trial at once. Several workers (--workers N, or the same command
in another terminal or machine with the same storage URL) share the study; asking for a trial is serialised
by a file lock in the sweep folder, so local workers never overshoot `trials`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from gptlab.config import Config, allows_none, apply_overrides, config_from_dict, config_to_dict, describe_keys
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text
from gptlab.model.info import format_count

SPEC_KEYS = ("name", "out", "base", "sampler", "trials", "objective", "budget", "max_memory", "pruner", "seed",
             "storage", "config", "space")
# What must stay the same for a sweep folder to be continued (trials, max_memory, storage and out may change).
IDENTITY_KEYS = ("name", "base", "sampler", "objective", "budget", "pruner", "seed", "config", "space")
SAMPLERS = ("grid", "random", "tpe")
OBJECTIVES = {"val_bpb": "bpb", "val_loss": "loss"}  # the spec's objective -> the key of an evaluation's result
PRUNERS = ("median", "hyperband", "none")
BUDGETS = {"minutes": "max_time", "tokens": "max_tokens", "steps": "max_steps"}
HEARTBEAT_S, GRACE_S = 10.0, 60.0  # a RUNNING trial silent for GRACE_S seconds belongs to a dead worker
MAX_CANDIDATES = 100_000  # grid points / corners priced before anything runs
GIB = 2**30


# --------------------------------------------------------------------------- the spec


@dataclass
class Param:
    """One searched config key: choices, or a low..high range (int when low and high are ints)."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False
    when: dict = field(default_factory=dict)

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        if self.choices is not None:
            return list(self.choices)
        return list(range(int(self.low), int(self.high) + 1, int(self.step)))

    def corners(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def active(self, params: dict, base: Config) -> bool:
        """Whether the condition holds for a trial whose earlier parameters are `params` (else base's value)."""
        for key, wanted in self.when.items():
            value = params[key] if key in params else dotted(base, key)
            if value not in (wanted if isinstance(wanted, list) else [wanted]):
                return False
        return True


@dataclass
class Spec:
    path: Path
    name: str
    out: Path
    sampler: str
    trials: int | None
    objective: str
    budget: dict
    max_memory: int
    pruner: str
    seed: int
    storage: str
    space: list[Param]
    raw: dict  # the spec file as read
    base_raw: dict  # base + [config] + budget + overrides: every trial's config before its parameters
    base: Config = None  # base_raw validated

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.space]


def load_spec(path: str | Path, trials: int | None = None, max_memory: str | None = None, storage: str | None = None,
              out: str | None = None, overrides: list | None = None) -> Spec:
    """Read and check a sweep spec (module docstring); the arguments are the command line's, which win."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"sweep spec not found: {path}", "give the TOML file that describes the sweep")
    raw = _read_toml(path, f"sweep spec {path}")
    for key in raw:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            raise GptlabError(f"sweep spec: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                              f"the keys are: {', '.join(SPEC_KEYS)}")
    sampler = _one_of(raw.get("sampler", "tpe"), SAMPLERS, "sampler")
    objective = _one_of(raw.get("objective", "val_bpb"), tuple(OBJECTIVES), "objective")
    pruner = _one_of(raw.get("pruner", "median"), PRUNERS, "pruner")
    budget = raw.get("budget", {"steps": 200})
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGETS \
            or not _number(next(iter(budget.values()))) or next(iter(budget.values())) <= 0:
        raise GptlabError(f"sweep spec: budget = {budget!r} is not a budget",
                          "write budget = { minutes = 5 }, { tokens = 2000000 } or { steps = 500 }")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise GptlabError(f"sweep spec: seed = {seed!r} is not an integer")

    base_raw = _base_raw(path, raw, budget, overrides or [])
    try:
        base = config_from_dict(copy.deepcopy(base_raw))
    except GptlabError as e:
        raise GptlabError(f"sweep spec: the base config does not validate: {e}") from None
    space = _read_space(raw.get("space"), sampler)

    trials = trials if trials is not None else raw.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise GptlabError(f"sweep spec: trials = {trials!r} is not a positive count")
    if trials is None and sampler != "grid":
        raise GptlabError(f"the {sampler} sampler needs a number of trials", "set trials = N in the spec, or --trials N")

    from gptlab.device import free_memory, parse_memory
    from gptlab.model.info import setup_for

    memory = max_memory if max_memory is not None else raw.get("max_memory")
    memory = parse_memory(memory, "max_memory") if memory is not None else free_memory(setup_for(base).device)
    name = raw.get("name", path.stem)
    out_dir = Path(out or raw.get("out") or Path("sweeps") / path.stem)
    storage = storage or raw.get("storage") or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    for what, value in (("name", name), ("out", str(out_dir)), ("storage", storage)):
        if not isinstance(value, str) or not value:
            raise GptlabError(f"sweep spec: {what} = {value!r} is not a string")
    return Spec(path=path, name=name, out=out_dir, sampler=sampler, trials=trials, objective=objective, budget=budget,
                max_memory=memory, pruner=pruner, seed=seed, storage=storage, space=space, raw=raw,
                base_raw=base_raw, base=base)


def _read_toml(path: Path, what: str) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise GptlabError(f"{what} is not valid TOML: {e}", "fix the file (TOML: key = value, [section])") from None


def _one_of(value, allowed: tuple, what: str) -> str:
    if value not in allowed:
        raise GptlabError(f"sweep spec: {what} = {value!r} is not known", f"choose one of: {', '.join(allowed)}")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _base_raw(path: Path, raw: dict, budget: dict, overrides: list) -> dict:
    """The config every trial starts from: the base file, [config] on top, the budget, then the overrides."""
    base: dict = {}
    if raw.get("base") is not None:
        file = path.parent / raw["base"]
        if not file.is_file():
            raise GptlabError(f"sweep spec: base config not found: {file}", "base is relative to the spec file")
        base = _read_toml(file, f"sweep spec: base {file}")
    extra = raw.get("config", {})
    if not isinstance(extra, dict):
        raise GptlabError("sweep spec: [config] must be a table of config sections")
    for section, settings in extra.items():
        if isinstance(settings, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **settings}
        else:
            base[section] = copy.deepcopy(settings)
    (kind, amount), = budget.items()
    train = base.setdefault("train", {})
    for limit in BUDGETS.values():  # the budget is the one limit of every trial
        train.pop(limit, None)
    train[BUDGETS[kind]] = amount * 60 if kind == "minutes" else int(amount)
    return apply_overrides(base, overrides)


def _config_keys() -> dict[str, str]:
    """Every dotted key a sweep may search (not the fields of lists of tables), with its type's name."""
    return {row["key"]: row["type"] for row in describe_keys() if "[]" not in row["key"]}


def _field(key: str):
    """The pydantic field of a dotted config key."""
    section, _, name = key.partition(".")
    if not name:
        return Config.model_fields[section]
    return Config.model_fields[section].annotation.model_fields[name]


def _check_value(key: str, value) -> str | None:
    """Why `value` is not a value of `key`'s type and limits (strictly: "4" is no int), else None."""
    from pydantic import TypeAdapter, ValidationError

    f = _field(key)
    if isinstance(value, str) and value.lower() == "none" and allows_none(f.annotation):
        return None
    try:
        kind = typing.Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation  # with its limits (ge=1...)
        TypeAdapter(kind).validate_python(value, strict=True)
    except ValidationError as e:
        return e.errors()[0]["msg"]
    return None


def _is_int(key: str) -> bool:
    args = typing.get_args(_field(key).annotation) or (_field(key).annotation,)
    return int in args and float not in args


def _read_space(space, sampler: str) -> list[Param]:
    if not isinstance(space, dict) or not space:
        raise GptlabError("sweep spec: [space] is missing or empty", 'add e.g. [space] "model.n_layer" = [2, 4]')
    known = _config_keys()
    params = []
    for key, what in space.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            raise GptlabError(f"space key {key!r} is not a config key" + (f" (did you mean {close[0]!r}?)" if close else ""),
                              "`gptlab config` lists every key")
        params.append(_read_param(key, what, sampler))
    keys = [p.key for p in params]
    for i, p in enumerate(params):
        for cond in p.when:
            if cond not in known:
                raise GptlabError(f"space {key!r}: when names {cond!r}, which is not a config key")
            if cond in keys and keys.index(cond) > i:
                raise GptlabError(f"space {p.key!r}: its condition on {cond!r} must come after {cond!r} in [space]")
    return params


def _read_param(key: str, what, sampler: str) -> Param:
    if isinstance(what, list):
        what = {"choices": what}
    if not isinstance(what, dict):
        raise GptlabError(f"space {key!r} = {what!r} is not a search range",
                          "give a list of choices, { choices = [...] } or { low = .., high = .. }")
    allowed = {"choices", "low", "high", "step", "log", "when"}
    if set(what) - allowed:
        raise GptlabError(f"space {key!r}: unknown field(s) {', '.join(sorted(set(what) - allowed))}",
                          f"a range has: {', '.join(sorted(allowed))}")
    when = what.get("when", {})
    if not isinstance(when, dict):
        raise GptlabError(f"space {key!r}: when = {when!r} is not a table", 'write when = { "model.attention" = "sdpa" }')
    if "choices" in what:
        choices = what["choices"]
        if not isinstance(choices, list) or not choices:
            raise GptlabError(f"space {key!r}: choices must be a non-empty list")
        for value in choices:
            problem = _check_value(key, value)
            if problem:
                raise GptlabError(f"space {key!r}: choice {value!r} is not a {_config_keys()[key]}: {problem}")
            if not isinstance(value, (str, int, float, bool)):
                raise GptlabError(f"space {key!r}: choice {value!r} is not a number, string or bool (Optuna stores those)")
        if len({json.dumps(v) for v in choices}) < len(choices):
            raise GptlabError(f"space {key!r}: choices repeat a value")
        return Param(key, choices=choices, when=when)
    low, high, step, log = what.get("low"), what.get("high"), what.get("step"), what.get("log", False)
    if not (_number(low) and _number(high)):
        raise GptlabError(f"space {key!r}: low = {low!r}, high = {high!r} must both be numbers")
    if low >= high:
        raise GptlabError(f"space {key!r}: low = {low} must be below high = {high}")
    if not isinstance(log, bool):
        raise GptlabError(f"space {key!r}: log = {log!r} is not true or false")
    if log and low <= 0:
        raise GptlabError(f"space {key!r}: a log range needs low > 0 (low = {low})")
    if step is not None and (not _number(step) or step <= 0):
        raise GptlabError(f"space {key!r}: step = {step!r} is not a positive number")
    if step is not None and log:
        raise GptlabError(f"space {key!r}: a range is either log or stepped, not both")
    integer = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
    if _is_int(key) and not integer:
        raise GptlabError(f"space {key!r} is an int key: give int low, high and step (low = {low!r}, high = {high!r})")
    for value in (low, high):
        problem = _check_value(key, value if integer else float(value))
        if problem:
            raise GptlabError(f"space {key!r}: {value!r} is not a {_config_keys()[key]}: {problem}")
    if sampler == "grid" and not (integer and step is not None):
        raise GptlabError(f"space {key!r}: grid needs choices or an int range with step",
                          "give choices = [...], or int low/high with step, or use sampler = \"random\" / \"tpe\"")
    return Param(key, low=low, high=high, step=step, log=log, integer=integer, when=when)


def dotted(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# --------------------------------------------------------------------------- candidates and their memory


def trial_config(spec: Spec, params: dict) -> Config:
    """The config of one point of the space (GptlabError when it does not validate)."""
    raw = apply_overrides(copy.deepcopy(spec.base_raw), list(params.items()))
    return config_from_dict(raw)


def price(spec: Spec, params: dict) -> dict:
    """{"params", "config", "predicted", "parameters", "reason"}: reason is why it is skipped (None: it fits)."""
    from gptlab.model.info import planned_model, training_memory

    point = {"params": params, "config": None, "predicted": None, "parameters": None, "reason": None}
    try:
        cfg = point["config"] = trial_config(spec, params)
        planned = planned_model(cfg)  # built once (on "meta"): its parameters and its memory
        point["predicted"] = training_memory(cfg, planned=planned)["total"]
        point["parameters"] = planned[1].num_params()
    except GptlabError as e:
        point["reason"] = str(e).removeprefix("config: ")
        return point
    if point["predicted"] > spec.max_memory:
        point["reason"] = f"predicted {gib(point['predicted'])} > budget {gib(spec.max_memory)}"
    return point


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def candidates(spec: Spec) -> list[dict]:
    """Every grid point (grid) or every corner of the space (random/TPE), priced; points that differ only in a
    parameter whose condition does not hold are one configuration."""
    values = [p.grid() if spec.sampler == "grid" else p.corners() for p in spec.space]
    total = math.prod(len(v) for v in values)
    if total > MAX_CANDIDATES:
        if spec.sampler == "grid":
            raise GptlabError(f"the grid has {total:,} points", "search fewer values, or use sampler = \"tpe\"")
        values = [sorted({min(v), max(v)}) if all(_number(x) for x in v) else v for v in values]
    seen, out = set(), []
    for combo in itertools.product(*values):
        params = active_params(spec, dict(zip(spec.keys, combo)))
        signature = json.dumps(params, sort_keys=True)
        if signature not in seen:
            seen.add(signature)
            out.append(price(spec, params))
    return out


def active_params(spec: Spec, values: dict) -> dict:
    """`values` without the parameters whose condition does not hold (in spec order)."""
    params = {}
    for p in spec.space:
        if p.key in values and p.active(params, spec.base):
            params[p.key] = values[p.key]
    return params


def describe_params(params: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def empty_space_error(spec: Spec, points: list[dict]) -> GptlabError:
    valid = [p for p in points if p["predicted"] is not None]
    if not valid:
        return GptlabError(f"search space is empty: no configuration is valid ({points[0]['reason']})",
                           "change the [space] or the base config")
    small = min(valid, key=lambda p: p["predicted"])
    return GptlabError(f"search space is empty under {gib(spec.max_memory)}: the smallest configuration "
                       f"({describe_params(small['params'])}) needs {gib(small['predicted'])}",
                       "raise --max-memory, or search smaller settings")


def format_candidates(spec: Spec, points: list[dict]) -> str:
    what = "grid points" if spec.sampler == "grid" else "corners of the space"
    fits = sum(p["reason"] is None for p in points)
    lines = [f"{len(points)} {what}, {fits} within {gib(spec.max_memory)}:"]
    for p in points:
        memory = gib(p["predicted"]) if p["predicted"] is not None else "-"
        lines.append(f"  {'fits   ' if p['reason'] is None else 'skipped'}  {memory:>10}  {describe_params(p['params'])}"
                     + (f"  ({p['reason']})" if p["reason"] else ""))
    return "\n".join(lines)


def write_skipped(spec: Spec, points: list[dict], study=None) -> Path:
    """SWEEP/skipped.md: the candidates and the sampled trials that were never trained, with the reason."""
    rows = [(describe_params(p["params"]), p["reason"]) for p in points if p["reason"]]
    if study is not None:
        rows += [(f"trial {t.number}: {describe_params(t.params)}", t.user_attrs["skipped"])
                 for t in study.get_trials(deepcopy=False) if "skipped" in t.user_attrs]
    text = (f"# Skipped configurations of sweep {spec.name}\n\nMemory budget {gib(spec.max_memory)} "
            f"(`training_memory(cfg)[\"total\"]`, predicted before training). Never trained:\n\n"
            "| configuration | reason |\n|---|---|\n" + "".join(f"| {c} | {r} |\n" for c, r in rows))
    path = spec.out / "skipped.md"
    atomic_write_text(path, text if rows else text + "| (none) | |\n")
    return path


# --------------------------------------------------------------------------- the study


def _sampler(spec: Spec, seed: int | None = None):
    import optuna

    seed = spec.seed if seed is None else seed
    if spec.sampler == "grid":
        return _GridSampler({p.key: p.grid() for p in spec.space}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(kind: str):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}[kind]()


def _grid_sampler_class():
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """GridSampler that leaves ending the sweep to the worker loop: its after_trial calls study.stop(),
        which raises outside study.optimize (the sweep asks and tells)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

        def before_trial(self, study, trial) -> None:
            # a retry of a dead or interrupted worker's trial runs that trial's point: it takes its grid id
            # (GridSampler would give it an unvisited one, which then never runs, and run this point twice)
            first = trial.system_attrs.get("failed_trial")
            if first is not None and "grid_id" not in trial.system_attrs:
                original = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
                    study._study_id, first))
                if "grid_id" in original.system_attrs:
                    for key in ("search_space", "grid_id"):
                        study._storage.set_trial_system_attr(trial._trial_id, key, original.system_attrs[key])
                    return
            super().before_trial(study, trial)

    return Grid


def _GridSampler(search_space: dict, seed: int):  # noqa: N802 - a class, built on first use (optuna imports slowly)
    return _grid_sampler_class()(search_space, seed=seed)


def _quiet_optuna() -> None:
    """Optuna's log lines and its warnings about experimental features (heartbeats, the retry callback) and
    heartbeats outside study.optimize (the sweep beats itself) say nothing to a user of the sweep."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")


def _retry():
    """The callback that queues a failed trial again with its parameters (renamed in Optuna 4.9)."""
    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return retry(max_retry=3)


def retried_trial_number(trial) -> int | None:
    """The first trial of the chain this trial retries (its run directory), else None."""
    return trial.system_attrs.get("failed_trial")


def storage_of(spec: Spec, heartbeat: float = HEARTBEAT_S, grace: float = GRACE_S):
    import optuna

    _quiet_optuna()
    import inspect

    stale = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
             in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    return optuna.storages.RDBStorage(spec.storage, heartbeat_interval=max(1, round(heartbeat)),
                                      grace_period=max(1, round(grace)), **{stale: _retry()})


def open_study(spec: Spec, heartbeat: float = HEARTBEAT_S, grace: float = GRACE_S):
    """The sweep's Optuna study (made if new), its user_attrs per the study contract."""
    import optuna

    study = optuna.create_study(storage=storage_of(spec, heartbeat, grace), study_name=spec.name,
                                direction="minimize", sampler=_sampler(spec), pruner=_pruner(spec.pruner),
                                load_if_exists=True)
    attrs = {"objective": spec.objective, "keys": spec.keys, "max_memory": spec.max_memory, "budget": spec.budget}
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    return study


def _retried(trials) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def counted(trials) -> int:
    """Trials that count toward `trials`: finished, running or queued, less the skipped and the retried."""
    from optuna.trial import TrialState

    retried = _retried(trials)
    return sum(1 for t in trials if not ("skipped" in t.user_attrs and t.state == TrialState.PRUNED)
               and not (t.state == TrialState.FAIL and t.number in retried))


def _done(spec: Spec, study, target: int, grid_points: int) -> str | None:
    """"done", "wait" (enough trials, but some still run elsewhere: one may be a dead worker's, to resume once
    its heartbeat is stale) or None (ask for another)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return None  # a retry of a dead worker's trial is queued
    enough = counted(trials) >= target or (
        spec.sampler == "grid" and len({t.system_attrs.get("grid_id") for t in trials} - {None}) >= grid_points)
    if not enough:
        return None
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes of this machine (fcntl), held while the block runs."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_sweep_dir(spec: Spec) -> None:
    """SWEEP/spec.toml: saved by the first run; a later run must have the same space, objective, base..."""
    saved = spec.out / "spec.toml"
    if saved.is_file():
        old = tomllib.loads(saved.read_text(encoding="utf-8"))
        changed = [k for k in IDENTITY_KEYS if old.get(k) != spec.raw.get(k)]
        if changed:
            raise GptlabError(f"{spec.out} was made with another spec ({', '.join(changed)} differ)",
                              "use another out (--out DIR) or delete it")
    else:
        spec.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, spec.path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- data


def data_key(cfg: Config) -> str:
    """A short hash of the settings that decide the prepared data (where it is written and how fast aside)."""
    d = config_to_dict(cfg)
    data = {k: v for k, v in d["data"].items() if k not in ("out_dir", "workers")}
    blob = json.dumps({"text": d["text"], "tokenizer": d["tokenizer"], "data": data}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def prepare_trial_data(cfg: Config, sweep_dir: Path, say=print, verbose: bool = False) -> Path:
    """The trial's prepared-data folder SWEEP/data/<hash>, made once (a file lock keeps two workers from
    preparing one folder at the same time). Without data.sources, train.data_dir is used as it is."""
    from gptlab.data import prepare_data
    from gptlab.quickstart import _tokenizer_stage

    if not cfg.data.sources:
        if not (Path(cfg.train.data_dir) / "meta.json").is_file():
            raise GptlabError(f"the trials have no data: no data.sources, and {cfg.train.data_dir} is not prepared",
                              "set [[data.sources]] (or a prepared train.data_dir) in the base or [config]")
        return Path(cfg.train.data_dir)
    key = data_key(cfg)
    folder = sweep_dir / "data" / key
    with file_lock(sweep_dir / "data" / f"{key}.lock"):
        if not (folder / "meta.json").is_file():
            cfg = cfg.model_copy(deep=True)
            cfg.data.out_dir = str(folder)
            tokenizer_dir = sweep_dir / "data" / f"{key}-tokenizer"
            tokenizer_dir.mkdir(parents=True, exist_ok=True)
            say(f"data: a {cfg.tokenizer.kind} tokenizer of {cfg.tokenizer.vocab_size:,} and its shards -> {folder} "
                "(once for every trial with these settings)")
            tokenizer = _tokenizer_stage(cfg, tokenizer_dir, folder, say if verbose else _say(True))
            prepare_data(cfg, tokenizer, progress=verbose)
    return folder


# --------------------------------------------------------------------------- one trial, in a child process


def _trial_process(job: dict, conn) -> None:
    """A child process: train one trial, reporting the objective to the study at each evaluation."""
    import optuna
    import psutil

    try:
        _quiet_optuna()
        study = optuna.load_study(study_name=job["study"], storage=job["storage"], pruner=_pruner(job["pruner"]))
        trial = optuna.trial.Trial(study, job["trial_id"])
        cfg = config_from_dict(job["config"])
        process, parent, over = psutil.Process(), os.getppid(), {}
        cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and _cuda())

        def on_eval(step: int, result: dict):
            value = result.get(OBJECTIVES[job["objective"]])
            if value is None:
                return None
            trial.report(float(value), step)
            return "pruned" if trial.should_prune() else None

        def on_step(step: int):
            if os.getppid() != parent:
                return "interrupted"  # the worker died: stop at a checkpoint; a later worker resumes the trial
            if cuda:
                import torch

                used = torch.cuda.max_memory_allocated()
            else:
                used = process.memory_info().rss
            if used > job["max_memory"]:
                over.update(step=step, used=used)
                return "out_of_memory"
            return None

        from gptlab.train import train

        summary = train(cfg, resume=job["resume"], on_step=on_step, on_eval=on_eval, verbose=job["verbose"])
        message = {"summary": summary, **over}
    except BaseException as e:  # noqa: BLE001 - whatever it was, the sweep records it and goes on
        text = " ".join(str(e).split()) or type(e).__name__
        message = {"error": text if isinstance(e, GptlabError) else f"{type(e).__name__}: {text}"}
    try:
        conn.send(message)
    except OSError:  # the worker is gone (Ctrl-C reached both): the run directory has the trial's checkpoint
        pass
    finally:
        conn.close()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_child(job: dict) -> dict:
    """Run _trial_process in a fresh spawned process; its message, or an error if it died without one."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_trial_process, args=(job, send), daemon=False)
    process.start()
    send.close()
    result = None
    try:
        while result is None and (process.is_alive() or receive.poll()):
            if receive.poll(0.2):
                try:
                    result = receive.recv()
                except EOFError:
                    break
    finally:
        process.join()  # on Ctrl-C the child got it too: it checkpoints and returns
    return result or {"error": f"the trial's process died (exit code {process.exitcode})"}


# --------------------------------------------------------------------------- workers


def _sample(spec: Spec, trial) -> tuple[dict, str | None]:
    """The trial's parameters (those whose condition holds) and, for a grid point equal to another one, why
    it is skipped."""
    params, duplicate = {}, None
    for p in spec.space:
        if p.active(params, spec.base):
            params[p.key] = p.suggest(trial)
        elif spec.sampler == "grid":  # the grid fixes every parameter; only its first value is tried when unused
            value = p.suggest(trial)
            if value != p.grid()[0]:
                duplicate = f"the same configuration as another grid point ({p.key} is not used here)"
    return params, duplicate


def _say(quiet: bool):
    return (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))


def work(spec: Spec, target: int, grid_points: int, threads: int, quiet: bool = False, verbose: bool = False,
         heartbeat: float = HEARTBEAT_S, grace: float = GRACE_S, worker: int = 0) -> int:
    """One worker: ask for a trial, train it, tell the result, until the sweep has `target` trials. Returns the
    number of trials this worker trained."""
    import optuna
    from optuna.trial import TrialState

    from gptlab.runs import checkpoint_dirs, finished_summary

    say = _say(quiet)
    study = open_study(spec, heartbeat, grace)
    # workers, and runs that continue a study, each draw their own points; never the grid: its seed also shuffles
    # the grid's order, and a grid id must name the same point in every worker
    if (study.trials or worker) and spec.sampler != "grid":
        mix = f"{spec.seed}:{len(study.trials)}:{worker}:{socket.gethostname()}:{os.getpid()}"
        study.sampler = _sampler(spec, seed=int(hashlib.sha1(mix.encode()).hexdigest()[:8], 16))
    trained = 0
    with _stop_on_sigterm():
        while True:
            with file_lock(spec.out / "ask.lock"):  # one asks at a time: no point twice, no trial too many
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> FAIL -> queued again
                state = _done(spec, study, target, grid_points)
                if state is None:
                    trial = study.ask()
                    params, duplicate = _sample(spec, trial)  # TPE draws from the trials told so far
            if state == "done":
                break
            if state == "wait":
                time.sleep(heartbeat)
                continue
            point = price(spec, params)
            reason = duplicate or point["reason"]
            if reason:
                trial.set_user_attr("skipped", reason)
                if point["predicted"] is not None:
                    trial.set_user_attr("predicted_memory", point["predicted"])
                study.tell(trial, state=TrialState.PRUNED)
                say(f"trial {trial.number:>4}  skipped  {describe_params(params)}  ({reason})")
                continue

            frozen = study._storage.get_trial(trial._trial_id)
            first = retried_trial_number(frozen)
            run_dir = Path("trials") / f"{trial.number if first is None else first:04d}"
            cfg = point["config"]
            for key, value in {"run_dir": str(run_dir), "predicted_memory": point["predicted"],
                               "parameters": point["parameters"], "worker": f"{socket.gethostname()}:{os.getpid()}"}.items():
                trial.set_user_attr(key, value)
            say(f"trial {trial.number:>4}  starts   {describe_params(params)}  ({format_count(point['parameters'])} "
                f"parameters, predicted {gib(point['predicted'])}) -> {spec.out / run_dir}")
            try:
                cfg.train.data_dir = str(prepare_trial_data(cfg, spec.out, say, verbose))
            except GptlabError as e:
                _tell_error(study, trial, str(e), say, params)
                continue
            cfg.train.run_dir = str(spec.out / run_dir)
            if cfg.train.threads == 0:
                cfg.train.threads = threads
            finished = finished_summary(spec.out / run_dir)
            beat = optuna.storages._heartbeat.get_heartbeat_thread(trial._trial_id, study._storage)
            beat.start()
            started = time.time()
            try:
                if finished:  # trained before its worker died: only the telling was missing
                    result = {"summary": finished}
                else:
                    job = {"study": spec.name, "storage": spec.storage, "pruner": spec.pruner, "trial_id": trial._trial_id,
                           "config": config_to_dict(cfg), "resume": bool(checkpoint_dirs(cfg.train.run_dir)),
                           "objective": spec.objective, "max_memory": spec.max_memory, "verbose": verbose and not quiet}
                    if not job["resume"] and (spec.out / run_dir).exists():
                        shutil.rmtree(spec.out / run_dir)  # a start without a checkpoint: begin it clean
                    result = _run_child(job)
            except KeyboardInterrupt:
                _tell_interrupted(study, trial)
                raise
            finally:
                beat.join()
            trained += 1
            _tell(spec, study, trial, params, point, result, time.time() - started, say)
    return trained




@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM as Ctrl-C: the running trial is checkpointed and queued again before the worker ends."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tell_interrupted(study, trial) -> None:
    """Fail the trial and queue it again at once (a later run resumes its run directory)."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        # queued first: the copy takes the trial's user_attrs, which must not carry this trial's error
        _retry()(study, study._storage.get_trial(trial._trial_id))
        trial.set_user_attr("error", "interrupted (queued again: a later run resumes it)")
        study.tell(trial, state=TrialState.FAIL)


def _tell_error(study, trial, error: str, say, params: dict) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)
    say(f"trial {trial.number:>4}  failed   {describe_params(params)}  ({error})")


def _tell(spec: Spec, study, trial, params: dict, point: dict, result: dict, seconds: float, say) -> None:
    """Tell the study how the trial ended (per the study contract) and print its line."""
    from optuna.trial import TrialState

    if "error" in result:
        return _tell_error(study, trial, result["error"], say, params)
    summary = result["summary"]
    for key in ("peak_memory", "tokens", "elapsed", "tokens_per_s", "stopped"):
        trial.set_user_attr(key, summary.get(key))
    memory = f"memory {gib(point['predicted'])} predicted / {gib(summary.get('peak_memory') or 0)} peak"
    value = summary.get(spec.objective)
    if summary.get("stopped") == "interrupted":
        _tell_interrupted(study, trial)
        say(f"trial {trial.number:>4}  interrupted  {describe_params(params)}  (queued again)")
        return None
    if summary.get("stopped") == "out_of_memory":
        used = result.get("used", summary.get("peak_memory") or 0)
        return _tell_error(study, trial, f"went over the memory budget at step {result.get('step', '?')}: "
                                         f"{gib(used)} > {gib(spec.max_memory)}", say, params)
    if summary.get("stopped") == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        say(f"trial {trial.number:>4}  pruned   {describe_params(params)}  {spec.objective} {_short(value)} at step "
            f"{summary.get('steps')}  {seconds:.1f}s  {memory}")
        return None
    if value is None or not math.isfinite(value):
        why = ("no bits per byte (the data has no byte counts): use objective = \"val_loss\""
               if value is None else f"{spec.objective} is {value}")
        return _tell_error(study, trial, why, say, params)
    study.tell(trial, float(value))
    say(f"trial {trial.number:>4}  {spec.objective} {value:.4f}  {describe_params(params)}  {seconds:.1f}s  {memory}")
    return None


def _worker_main(spec: Spec, target: int, grid_points: int, threads: int, quiet: bool, verbose: bool,
                 heartbeat: float, grace: float, worker: int) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        work(spec, target, grid_points, threads, quiet, verbose, heartbeat, grace, worker)


def run_sweep(spec: Spec, workers: int = 1, quiet: bool = False, verbose: bool = False, dry_run: bool = False,
              heartbeat: float = HEARTBEAT_S, grace: float = GRACE_S, report: bool = True) -> dict:
    """Check, price and run the sweep (module docstring); returns {"study", "points", "report"}.

    dry_run: print the candidates and their memory, run nothing."""
    if workers < 1:
        raise GptlabError(f"--workers {workers} is not a count", "give --workers 1 or more")
    say = _say(quiet)
    points = candidates(spec)
    fitting = [p for p in points if p["reason"] is None]
    if dry_run:
        print(format_candidates(spec, points))
        if not fitting:
            raise empty_space_error(spec, points)
        return {"study": None, "points": points, "report": None}
    if not fitting:
        raise empty_space_error(spec, points)
    check_sweep_dir(spec)
    skipped_md = write_skipped(spec, points)
    if verbose:
        say(format_candidates(spec, points))
    else:  # the count, and the few largest skipped: the whole list is in skipped.md (--dry-run prints it)
        skipped = [p for p in points if p["reason"]]
        what = "grid points" if spec.sampler == "grid" else "corners of the space"
        say(f"{len(points)} {what}: {len(fitting)} fit in {gib(spec.max_memory)}"
            + (f", {len(skipped)} skipped before training (all in {skipped_md}), e.g.:" if skipped else ""))
        for p in skipped[:3]:
            say(f"  skipped  {describe_params(p['params'])}  ({p['reason']})")
    study = open_study(spec, heartbeat, grace)
    grid_points = len(points) if spec.sampler == "grid" else 0
    target = spec.trials or len(fitting)
    if spec.sampler == "grid":
        target = min(target, len(fitting))
    threads = max(1, (os.cpu_count() or 1) // workers)
    say(f"sweep {spec.name}: {target} trials, {spec.sampler} sampler, {workers} worker(s), storage {spec.storage}")
    if workers == 1:
        work(spec, target, grid_points, threads, quiet, verbose, heartbeat, grace)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(spec, target, grid_points, threads, quiet, verbose,
                                                        heartbeat, grace, i)) for i in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.join()  # each worker queues its running trial again before it ends
            raise
    write_skipped(spec, points, study)
    result = {"study": study, "points": points, "report": None}
    if report:
        result["report"] = report_sweep(spec.out, study, quiet)
    return result


def report_sweep(sweep_dir: Path, study=None, quiet: bool = False) -> dict | None:
    """write_report (gptlab.lab.sweep_report) of the sweep, printed with the best trial and a compare hint."""
    from optuna.trial import TrialState

    try:
        from gptlab.lab.sweep_report import write_report  # imported here: the report is its own module
    except ModuleNotFoundError as e:
        if e.name != "gptlab.lab.sweep_report":
            raise
        print("report: gptlab.lab.sweep_report is not in this build; the study is in the sweep folder")
        return None
    report = write_report(Path(sweep_dir), study)
    if quiet:
        return report
    print(report.get("table", ""))
    files = [str(v) for k, v in report.items() if k != "table" and isinstance(v, (str, Path))]
    if files:
        print("written: " + ", ".join(files))
    if study is not None:
        done = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value)
        if done:
            runs = [str(Path(sweep_dir) / t.user_attrs["run_dir"]) for t in done[:3]]
            print(f"best: trial {done[0].number} ({study.user_attrs.get('objective')} {done[0].value:.4f}), {runs[0]}")
            print(f"compare the best: gptlab compare {' '.join(runs)}")
    return report


def load_sweep_study(spec: Spec):
    """The study of an existing sweep (for --report)."""
    import optuna

    if not (spec.out / "spec.toml").is_file():
        raise GptlabError(f"{spec.out} is not a sweep folder (no spec.toml)", "run the sweep first, or give its --out")
    try:
        return optuna.load_study(study_name=spec.name, storage=storage_of(spec))
    except KeyError:
        raise GptlabError(f"no study {spec.name!r} in {spec.storage}", "run the sweep first") from None
