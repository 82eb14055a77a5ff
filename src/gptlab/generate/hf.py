"""Other models as judges and teachers: which kind a name is (a gptlab run, a Hugging Face model folder, hf:NAME),
and loading a Hugging Face causal LM through transformers, each failure one line.

Ranking (gptlab.generate.ranking) and distillation (gptlab.distill) both load models this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from gptlab.errors import GptlabError
from gptlab.runs import CHECKPOINTS, INFO
from gptlab.text.sources import HF_PREFIX, check_hub_reachable


def model_kind(name: str | Path, what: str = "teacher") -> Literal["gptlab", "hf"]:
    """"gptlab" for a run directory or checkpoint folder, "hf" for a Hugging Face model folder or hf:NAME.
    `what` names the model in the errors ("teacher not found: ...")."""
    name = str(name)
    if name.startswith(HF_PREFIX):
        return "hf"
    path = Path(name)
    if not path.exists():
        raise GptlabError(f"{what} not found: {path}", "give a gptlab run directory, a Hugging Face model folder, or hf:NAME")
    if (path / "config.toml").is_file() or (path / INFO).is_file() or (path / CHECKPOINTS).is_dir():  # a run or a checkpoint
        return "gptlab"
    if (path / "config.json").is_file():
        return "hf"
    raise GptlabError(f"{path} is neither a gptlab run nor a Hugging Face model folder (no config.toml or config.json)",
                      "give the folder gptlab train or transformers' save_pretrained wrote")


def load_hf_causal_lm(name: str, device: str | torch.device = "cpu", what: str = "teacher"):
    """(transformers model in eval mode on `device`, its tokenizer) from a local folder or hf:NAME (the Hub)."""
    try:
        import transformers
    except ImportError:
        raise GptlabError(f"a Hugging Face {what} needs transformers", "pip install 'gptlab[distill]'") from None
    local = not name.startswith(HF_PREFIX)
    where = name if local else name.removeprefix(HF_PREFIX)
    if not local:
        check_hub_reachable(where, "download the model elsewhere and give its folder")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=local)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, local_files_only=local).to(device).eval()
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"could not load the {what} {name}: {first[:200]}",
                          "check the name and your connection, or download it and give its folder") from None
    return model, tokenizer
