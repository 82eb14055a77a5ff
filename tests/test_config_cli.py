"""What every command shares: the common flags, the alias flags' one table and one precedence rule, and
`gptlab config`, which lists every key of the schema."""

from __future__ import annotations

import argparse
import json

import pytest

from gptlab.cli import ALIASES, _config, build_parser, main, parse_args
from gptlab.config import describe_keys


def _commands(parser: argparse.ArgumentParser, path=()):
    """Every leaf command of the parser, as (path, its parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _commands(child, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def test_the_parser_has_the_commands_we_expect():
    assert {"tokenizer train", "data prepare", "train", "sample", "eval", "distill", "export", "config"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_the_common_flags_and_shows_examples(command, capsys):
    options = COMMANDS[command]._option_string_actions
    for flag in ("--quiet", "-q", "--debug", "--config", "-c"):
        assert flag in options, f"gptlab {command} lacks {flag}"
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "examples:" in printed and "gptlab config" in printed


def test_tokenizer_train_takes_quiet(tmp_path, tiny_corpus, capsys):
    """`gptlab tokenizer train -q` was refused as an unrecognized argument."""
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "-q", "--data", str(tiny_corpus), "--out", str(out), "--tokenizer.vocab_size=300"]) == 0
    assert out.is_file() and capsys.readouterr().out == ""


def test_every_alias_names_a_key_of_the_schema_and_its_command():
    keys = {row["key"] for row in describe_keys()}
    for command, flags in ALIASES.items():
        assert command in COMMANDS
        for flag, key in flags.items():
            assert key.partition("=")[0] in keys, f"{command} {flag}: {key}"
            assert all(name in COMMANDS[command]._option_string_actions for name in flag.split())


@pytest.mark.parametrize("argv, expected", [
    ([], 0.5),                                                     # the file
    (["--temperature", "0.7"], 0.7),                               # an alias flag over the file
    (["--temperature", "0.7", "--sample.temperature=0.9"], 0.9),   # a dotted override over both
    (["--sample.temperature=0.9", "-t", "0.7"], 0.9),              # whatever the order on the line
])
def test_one_precedence_rule(tmp_path, argv, expected):
    toml = tmp_path / "c.toml"
    toml.write_text("[sample]\ntemperature = 0.5\n[distill]\ntemperature = 0.5\n")
    for command in ("sample", "distill"):
        positional = ["RUN"] if command == "sample" else ["T", "--prompts", "p", "--out", "o"]
        args = parse_args([command, *positional, "-c", str(toml), *(a.replace("sample.", f"{command}.") for a in argv)])
        assert getattr(_config(args), command).temperature == expected


def test_alias_flags_take_none_and_typed_values():
    args = parse_args(["sample", "RUN", "--top-k", "none", "--seed", "7", "-p", "a", "-p", "b"])
    sample = _config(args).sample
    assert sample.top_k is None and sample.seed == 7 and sample.prompts == ["a", "b"]
    assert _config(parse_args(["train", "--distributed", "fsdp", "--train.eval_batches=none"])).train.eval_batches is None


def test_config_lists_every_key_with_type_default_and_description(capsys):
    assert main(["config"]) == 0
    printed = capsys.readouterr().out
    rows = describe_keys()
    for row in rows:
        assert row["key"] in printed and row["description"] in printed
    assert {"train.lr", "train.min_lr_ratio", "data.sources[].path", "model.norm"} <= {r["key"] for r in rows}
    assert main(["config", "train", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in listed] == [r["key"] for r in describe_keys("train")]
    eval_batches = next(r for r in listed if r["key"] == "train.eval_batches")
    assert eval_batches == {"key": "train.eval_batches", "type": "int | none", "default": 20,
                            "description": "validation batches per evaluation; none: the whole validation split"}
    assert main(["config", "nosuch"]) == 2
    assert "unknown config section 'nosuch'" in capsys.readouterr().err


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    import tomllib

    assert main(["config", "--show", "recipes/aurelius.toml", "--train.lr=1e-3", "--train.eval_batches=none"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["train"]["lr"] == 1e-3 and shown["train"]["eval_batches"] == "none" and shown["model"]["n_layer"] == 6


def test_a_runs_own_sample_section_lies_under_the_file_and_the_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[sample]\ntop_p = 0.5\n")
    own = {"sample": {"temperature": 0.3, "top_p": 0.9, "num_samples": 4}}
    sample = _config(parse_args(["sample", "RUN", "-c", str(toml), "--num-samples", "2"]), base=own).sample
    assert (sample.temperature, sample.top_p, sample.num_samples) == (0.3, 0.5, 2)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_example_in_the_help_parses(command):
    import shlex

    examples = COMMANDS[command].epilog.split("examples:\n", 1)[1].split("\n\n")[0]
    for line in examples.splitlines():
        line = line.split("  #")[0].split(" > ")[0].strip()  # no comment, no shell redirection
        if line.startswith(("gptlab ", "torchrun ")):
            parse_args(shlex.split(line.split("gptlab ", 1)[1]))  # exits (2) on a flag the parser lacks
