"""The typed config: TOML + dotted overrides, one-line errors naming key, value and what is allowed."""

import pytest
import tomllib

from gptlab.config import (
    Config,
    apply_overrides,
    load_config,
    parse_override,
    save_config,
)
from gptlab.errors import GptlabError


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.tokenizer.kind == "bpe"


def test_toml_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[tokenizer]\nkind = "char"\nvocab_size = 100\n[[data.sources]]\npath = "a.txt"\nweight = 2\n')
    cfg = load_config(toml, ["--tokenizer.vocab_size=4096", "--train.compile=false", "--sample.prompts=['a', 'b']"])
    assert cfg.tokenizer.kind == "char"  # from the file
    assert cfg.tokenizer.vocab_size == 4096  # the override wins
    assert cfg.train.compile is False
    assert cfg.sample.prompts == ["a", "b"]
    assert cfg.data.sources[0].weight == 2


def test_override_values_are_typed():
    assert parse_override("--a.b=3") == (["a", "b"], 3)
    assert parse_override("--a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("--a.b=true") == (["a", "b"], True)
    assert parse_override("--a.b=hello world") == (["a", "b"], "hello world")  # not TOML: kept as a string
    assert apply_overrides({}, ["--x.y.z=1"]) == {"x": {"y": {"z": 1}}}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--tokenizer.vocab_size=abc", ["tokenizer.vocab_size", "'abc'", "integer"]),
        ("--tokenizer.kind=wordpiece", ["tokenizer.kind", "'wordpiece'", "'bpe'", "'char'"]),
        ("--data.val_fraction=1.5", ["data.val_fraction", "1.5", "less than 1"]),
        ("--tokenizer.vocab_sze=10", ["unknown key tokenizer.vocab_sze", "did you mean tokenizer.vocab_size"]),
        ("--model.n_head=5", ["model.n_head=5", "does not divide", "model.d_model=256"]),
        ("--model.n_kv_head=3", ["model.n_kv_head=3", "does not divide model.n_head=4"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(GptlabError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(GptlabError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tokenizer\nkind=")
    with pytest.raises(GptlabError, match="not valid TOML"):
        load_config(bad)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["--tokenizer.vocab_size=1234", "--data.sources=[{path='x.txt', weight=3}]"])
    save_config(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again == cfg
    assert tomllib.loads((tmp_path / "config.toml").read_text())["tokenizer"]["vocab_size"] == 1234
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_override_into_a_list_of_tables(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[[data.sources]]\npath = "a.txt"\n[[data.sources]]\npath = "b.txt"\n')
    cfg = load_config(toml, ["--data.sources.1.documents=blank_lines", "--data.sources.0.weight=3"])
    assert cfg.data.sources[1].documents == "blank_lines"
    assert cfg.data.sources[0].weight == 3
    with pytest.raises(GptlabError, match="not an index"):
        load_config(toml, ["--data.sources.2.weight=3"])


def test_atomic_files_get_the_usual_mode(tmp_path):
    import os

    from gptlab.files import atomic_write_text

    atomic_write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_profile_lays_defaults_under_the_config_and_overrides_win(tmp_path):
    from gptlab.config import PROFILES

    cfg = load_config(None, ["--profile=cpu-fast"])
    for key, value in PROFILES["cpu-fast"]["train"].items():
        assert getattr(cfg.train, key) == value
    toml = tmp_path / "c.toml"
    toml.write_text('profile = "cpu-fast"\n[train]\nlr = 0.01\n')
    cfg = load_config(toml, ["--train.schedule=cosine"])
    assert cfg.train.lr == 0.01 and cfg.train.schedule == "cosine"  # the file, then the override, win
    assert cfg.train.optimizer == PROFILES["cpu-fast"]["train"]["optimizer"]
    with pytest.raises(GptlabError, match="unknown profile 'fastest'.*cpu-fast"):
        load_config(None, ["--profile=fastest"])
