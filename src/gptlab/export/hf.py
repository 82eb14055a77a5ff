"""`gptlab export RUN --to hf DIR` and `gptlab import hf DIR --run RUN`.

Export writes a folder transformers loads with no custom code:

    DIR/config.json              LlamaForCausalLM, ArceeForCausalLM, GPT2LMHeadModel or MixtralForCausalLM (families.py picks)
    DIR/model.safetensors        the weights under transformers' names (a tied output matrix stored once)
    DIR/generation_config.json   start/end/pad ids (a chat run's <|end|> among the end ids) and the run's [sample] settings
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json   (a chat run's: with its chat_template)
    DIR/README.md                the model card

Import reads such a folder (GPT-2, Llama, Arcee or Mixtral; built by transformers' save_pretrained or
exported by gptlab) into a run directory that `gptlab sample`, `gptlab eval` and
`train.init_from` use like any trained run:

    RUN/config.toml, RUN/tokenizer.json, RUN/checkpoints/step_0000000/{model.safetensors, checkpoint.json, state.pt}

Both write into a hidden temporary folder renamed into place at the end, so a
failure leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptlab.config import (
    Config,
    DataConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
    config_to_dict,
    save_config,
)
from gptlab.errors import GptlabError
from gptlab.export.card import model_card
from gptlab.export.families import GPT2, Family, family_for, family_of_hf
from gptlab.export.folders import building, check_free
from gptlab.export.hf_tokenizer import (
    hf_tokenizer_files,
    special_token_ids,
    stop_ids,
    tokenizer_from_hf,
)
from gptlab.files import atomic_write_json, atomic_write_text
from gptlab.generate import start_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_export(run: str | Path, which: str = "best"):
    """(model, tokenizer, config, checkpoint folder, its checkpoint.json) of a trained run."""
    from gptlab.runs import find_checkpoint, load_run, read_info, run_dir_of

    checkpoint = find_checkpoint(run, which)
    run_dir = run_dir_of(checkpoint)
    for name in ("config.toml", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise GptlabError(f"{run_dir} has a checkpoint but no {name}", "export a run directory written by gptlab train")
    model, tokenizer, cfg = load_run(checkpoint)
    return model, tokenizer, cfg, checkpoint, read_info(checkpoint)


def hf_state_dict(model, family: Family, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The weights under transformers' names, each its own contiguous tensor (safetensors refuses shared memory)."""
    sd = family.to_hf(model.state_dict(), model.cfg)
    return {name: t.detach().to(DTYPES[dtype]).contiguous().clone() for name, t in sd.items()}


def generation_config(sample: SampleConfig, ids: dict[str, int | None], stop: list[int] | None = None) -> dict:
    """The run's [sample] settings as transformers' defaults for generate(). The length is max_new_tokens
    only: a max_length beside it makes transformers warn on every generate(max_new_tokens=...) call.
    `stop`: the ids generate() stops at where more than the EOS (a chat run's <|end|> too)."""
    stop = stop or ([ids["eos"]] if ids["eos"] is not None else [])
    out = {"bos_token_id": ids["bos"], "eos_token_id": stop if len(stop) > 1 else (stop[0] if stop else None),
           "pad_token_id": ids["pad"] if ids["pad"] is not None else (stop[0] if stop else None),  # the EOS, first
           "max_new_tokens": sample.max_new_tokens}
    if sample.temperature > 0:
        out |= {"do_sample": True, "temperature": sample.temperature, "top_p": sample.top_p, "top_k": sample.top_k or 0}
    return out


def export_hf(run: str | Path, out_dir: str | Path, *, which: str = "best", dtype: str = "float32", force: bool = False,
              repo_id: str | None = None) -> dict:
    """Write a transformers model folder from a run's best (or last) checkpoint; returns what was written."""
    if dtype not in DTYPES:
        raise GptlabError(f"unknown dtype {dtype!r}", f"choose one of: {', '.join(DTYPES)}")
    out = Path(out_dir)
    check_free(out, force, "output folder")
    model, tokenizer, cfg, checkpoint, info = load_for_export(run, which)
    family = family_for(cfg.model)
    start = start_id(tokenizer, cfg.data)
    tokenizer_files = hf_tokenizer_files(tokenizer, cfg.model.context_length, start)
    ids = special_token_ids(tokenizer, start)
    config = {**family.hf_config(cfg.model, ids), "torch_dtype": dtype}
    weights = hf_state_dict(model, family, dtype)
    card = model_card(name=repo_id or out.resolve().name, family=family, cfg=cfg, tokenizer=tokenizer, info=info,
                      run_dir=checkpoint.parent.parent, start=start,  # RUN/checkpoints/step_N
                      parameters=model.num_params(), repo_id=repo_id)
    with building(out, force) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "generation_config.json", generation_config(cfg.sample, ids, stop_ids(tokenizer)))
        for name, content in tokenizer_files.items():
            atomic_write_json(tmp / name, content)
        atomic_write_text(tmp / "README.md", card)
    return {"out_dir": str(out), "architecture": family.architecture, "checkpoint": str(checkpoint),
            "parameters": model.num_params(), "tokens": info.get("tokens"), "files": sorted(p.name for p in out.iterdir())}


# --------------------------------------------------------------------------- import


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: model.safetensors, its shards (model.safetensors.index.json), or pytorch_model.bin."""
    single, index, legacy = folder / "model.safetensors", folder / "model.safetensors.index.json", folder / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise GptlabError(f"{folder} lacks the weight shard {missing[0]} listed in {index.name}", "copy every shard of the model")
            return {k: v for s in shards for k, v in load_file(str(folder / s)).items()}
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except GptlabError:
        raise
    except Exception as e:  # a truncated or foreign file: every library raises its own kind
        raise GptlabError(f"cannot read the weights in {folder} ({type(e).__name__}: {str(e)[:160]})", "copy the model folder again") from None
    raise GptlabError(f"{folder} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
                      "give a folder saved by transformers' save_pretrained")


def read_hf_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise GptlabError(f"model folder not found: {folder}", "give a local folder saved by transformers' save_pretrained")
    path = folder / "config.json"
    if not path.is_file():
        raise GptlabError(f"{folder} has no config.json, so it is not a transformers model folder", "give a folder saved by save_pretrained")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is corrupt ({e})", "copy the model folder again") from None


def import_hf(hf_dir: str | Path, run_dir: str | Path, *, context_length: int | None = None, force: bool = False) -> dict:
    """A transformers GPT-2 / Llama folder -> a gptlab run directory with one checkpoint (step 0)."""
    from gptlab.model import build_model
    from gptlab.train.checkpoint import save_checkpoint

    folder, run = Path(hf_dir), Path(run_dir)
    hf_config = read_hf_config(folder)
    family = family_of_hf(hf_config, str(folder))
    check_free(run, force, "--run folder")
    model_cfg = family.config_from_hf(hf_config)
    tokenizer = tokenizer_from_hf(folder, hf_config)
    notes = []
    if isinstance(family, GPT2) and hf_config.get("activation_function", "gelu_new") != "gelu":
        notes.append(f"activation {hf_config.get('activation_function', 'gelu_new')} (tanh-approximate GELU) is imported "
                     "as exact GELU: logits differ slightly (about 1e-3) from the original")
    weights = family.from_hf(read_hf_weights(folder), model_cfg)
    weights, model_cfg = _fit_vocabulary(weights, model_cfg, tokenizer, notes)
    if context_length is not None:
        weights, model_cfg = _fit_context(weights, model_cfg, context_length)
    model = build_model(model_cfg)
    model.load_weights(weights, source=f"the weights in {folder}")

    cfg = Config(
        model=model_cfg,
        tokenizer=TokenizerConfig(kind=tokenizer.kind, vocab_size=tokenizer.vocab_size, bos_token=tokenizer.specials.bos,
                                  eos_token=tokenizer.specials.eos, pad_token=tokenizer.specials.pad,
                                  extra_special_tokens=list(tokenizer.specials.extra)),
        data=_start_rule(folder, tokenizer),
        train=TrainConfig(run_dir=str(run)),
    )
    info = {"step": 0, "tokens": 0, "val_loss": None, "model": config_to_dict(model_cfg),
            "tokenizer_checksum": tokenizer.checksum, "data_fingerprint": None,
            "imported_from": str(folder.resolve()), "architecture": family.architecture}
    with building(run, force) as tmp:
        save_config(cfg, tmp / "config.toml")
        tokenizer.save(tmp / "tokenizer.json")
        checkpoint = save_checkpoint(tmp, 0, model, {}, info)
    return {"run_dir": str(run), "architecture": family.architecture, "parameters": model.num_params(),
            "checkpoint": str(run / checkpoint.relative_to(tmp)), "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "context_length": model_cfg.context_length, "notes": notes}


def _start_rule(folder: Path, tokenizer) -> DataConfig:
    """The folder tokenizer's way of starting a text, as the [data] settings gptlab.generate.start_id reads:
    its own BOS where tokenizer_config.json adds it (Llama's default; gptlab's export of a data.add_bos run);
    else the EOS where its BOS is its EOS (GPT-2's way of saying "after the document before", and gptlab's
    export of an EOS-separated run) or it names no BOS; nothing where it adds none (add_bos_token false)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}  # read (and checked) by tokenizer_from_hf
    first = config.get("bos_token", tokenizer.specials.bos)
    first = first.get("content") if isinstance(first, dict) else first
    if config.get("add_bos_token", True):
        return DataConfig(add_bos=first is not None and first == tokenizer.specials.bos)
    return DataConfig() if first is not None and first == tokenizer.specials.eos else DataConfig(add_bos=False, add_eos=False)


def _fit_vocabulary(weights: dict, cfg, tokenizer, notes: list[str]):
    """Models often pad their embedding past the tokenizer (to a multiple of 64); gptlab's vocabulary is the tokenizer's."""
    if cfg.vocab_size == tokenizer.vocab_size:
        return weights, cfg
    if cfg.vocab_size < tokenizer.vocab_size:
        raise GptlabError(f"the model has {cfg.vocab_size} token embeddings but its tokenizer {tokenizer.vocab_size} tokens",
                          "give a folder whose tokenizer belongs to its model")
    notes.append(f"dropped {cfg.vocab_size - tokenizer.vocab_size} padding rows of the embedding (ids the tokenizer never makes)")
    for name in ("tok_emb.weight", "lm_head.weight"):
        weights[name] = weights[name][: tokenizer.vocab_size]
    return weights, cfg.model_copy(update={"vocab_size": tokenizer.vocab_size})


def _fit_context(weights: dict, cfg, context_length: int):
    """A shorter context (Llama folders often declare 128k): RoPE needs no weights; learned positions keep their first rows."""
    if context_length > cfg.context_length and cfg.position == "learned":
        raise GptlabError(f"--context-length {context_length} is longer than the {cfg.context_length} positions the model learned",
                          f"use at most {cfg.context_length}")
    if "positions.table.weight" in weights:
        weights["positions.table.weight"] = weights["positions.table.weight"][:context_length]
    return weights, cfg.model_copy(update={"context_length": context_length})
