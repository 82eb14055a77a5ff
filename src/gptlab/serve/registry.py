"""Which runs a server offers, by name, each loaded on first use with an Engine of its own.

`gptlab serve runs/tiny` offers one run, named "tiny"; `gptlab serve runs/` offers every run in the
folder (a subfolder with a config.toml and checkpoints, looked for again on each listing, so a run
started after the server is found). A name is a plain folder name (letters, digits, ".", "_", "-"):
anything else, "../x" included, is not a run, so no request reads outside the folder.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.config import Config
from gptlab.errors import GptlabError
from gptlab.generate import prompt_ids, start_id
from gptlab.runs import CHECKPOINTS, CONFIG, checkpoint_dirs, load_run
from gptlab.serve.engine import Engine, EngineStats
from gptlab.tokenizer.chat import ChatFormat, has_chat_tokens

RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_run(path: Path) -> bool:
    """A run folder (it may have no complete checkpoint yet)."""
    return (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir()


def servable(path: Path) -> bool:
    """A run with a complete checkpoint: what a server can load (a run that has only just started has none)."""
    return (path / CONFIG).is_file() and bool(checkpoint_dirs(path))


class UnknownModel(LookupError):
    """No run of that name in the folder (the server answers 404)."""


@dataclass
class ServedModel:
    """A loaded run: its model in an Engine, the tokenizer, and how its prompts start."""

    name: str
    run_dir: Path
    cfg: Config
    tokenizer: object
    engine: Engine
    chat: ChatFormat | None  # None: a base model (no chat tokens), which has no chat endpoint
    created: int = field(default=0)

    @property
    def context_length(self) -> int:
        return self.cfg.model.context_length

    def text_prompt(self, text: str) -> list[int]:
        """A completion prompt's ids, after the start token the run's documents followed (as `gptlab sample`)."""
        return prompt_ids(self.tokenizer, text, self.cfg.data)

    @property
    def start_id(self) -> int | None:
        return start_id(self.tokenizer, self.cfg.data)

    @property
    def stop_ids(self) -> frozenset[int]:
        """What ends a completion: the chat end token and EOS for a chat run, EOS for a base one."""
        if self.chat is not None:
            return frozenset(self.chat.stop_ids)
        return frozenset() if self.tokenizer.eos_id is None else frozenset({self.tokenizer.eos_id})


class Registry:
    """The runs a server offers; `get(name)` loads one (once, on first use) and `close()` stops their engines."""

    def __init__(self, path: str | Path, *, slots: int = 16, max_queue: int = 256, queue_timeout: float | None = 60.0,
                 device: str = "cpu", threads: int = 0):
        path = Path(path).resolve()
        if not path.exists():
            raise GptlabError(f"{path} does not exist", "give a run directory (runs/NAME) or a folder of runs (runs/)")
        if not path.is_dir():
            raise GptlabError(f"{path} is a file, not a run directory", "give a run directory (runs/NAME) or a folder of runs")
        self.single = path if is_run(path) else None
        self.root = path.parent if self.single else path
        if self.single is None and not self.names():
            raise GptlabError(f"{path} is neither a run nor a folder of runs (no config.toml and checkpoints/ found)",
                              "train one first (gptlab train / gptlab quickstart), or point at its folder")
        self.options = {"slots": slots, "max_queue": max_queue, "queue_timeout": queue_timeout}
        self.device, self.threads = device, threads
        self.stats = EngineStats()  # every engine adds to the same totals
        self.loaded: dict[str, ServedModel] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        """The runs offered, by name: the one run, or every run in the folder (trained or still training) that
        has a checkpoint to load."""
        if self.single is not None:
            return [self.single.name] if servable(self.single) else []
        return sorted(p.name for p in self.root.iterdir() if RUN_NAME.fullmatch(p.name) and servable(p))

    def run_dir(self, name: str) -> Path:
        """The folder of run `name`; UnknownModel for a name that is not a run offered here (never a path outside:
        a name is one plain folder name, looked up in the served folder alone)."""
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise UnknownModel(name)
        if (self.single is not None and name != self.single.name) or not servable(self.root / name):
            raise UnknownModel(name)
        return self.root / name

    def default(self) -> str | None:
        """The model a request without one gets: the single run, else the one run in the folder, else None."""
        names = self.names()
        return names[0] if len(names) == 1 else None

    def get(self, name: str) -> ServedModel:
        run_dir = self.run_dir(name)
        with self.lock:
            if name not in self.loaded:
                self.loaded[name] = self._load(name, run_dir)
            return self.loaded[name]

    def _load(self, name: str, run_dir: Path) -> ServedModel:
        if self.threads:
            torch.set_num_threads(self.threads)
        model, tokenizer, cfg = load_run(run_dir, device=self.device)
        chat = ChatFormat.of(tokenizer) if has_chat_tokens(tokenizer) else None
        engine = Engine(model, stats=self.stats, **self.options)
        created = int(run_dir.stat().st_mtime)
        return ServedModel(name, run_dir, cfg, tokenizer, engine, chat, created)

    def close(self) -> None:
        with self.lock:
            for served in self.loaded.values():
                served.engine.close()
            self.loaded.clear()
