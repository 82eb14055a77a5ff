"""The typed config: TOML + dotted overrides, one-line errors naming key, value and what is allowed."""

import types
import typing
from typing import Literal, get_args, get_origin

import annotated_types
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gptlab.config import (
    MODEL_PRESETS,
    NONE,
    Config,
    EvalConfig,
    ModelConfig,
    RegexRule,
    SourceConfig,
    TextConfig,
    TokenizerConfig,
    TrainConfig,
    allows_none,
    apply_overrides,
    config_from_dict,
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


# --------------------------------------------------------------------------- the round trip, None included


SECTIONS = {name: field.annotation for name, field in Config.model_fields.items() if isinstance(field.annotation, type)
            and issubclass(field.annotation, BaseModel)}


def _nested(section: type[BaseModel]) -> dict:
    """The required fields of a section inside a list (a source needs a path)."""
    return {name: "x.txt" for name, f in section.model_fields.items() if f.is_required()}


def _strategy(annotation, metadata=()) -> st.SearchStrategy:
    """Every value the schema allows for one field: its bounds, its choices, None where allowed."""
    options = []
    for t in get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,):
        if t is type(None):
            options.append(st.none())
        elif get_origin(t) is Literal:
            options.append(st.sampled_from(get_args(t)))
        elif t is bool:
            options.append(st.booleans())
        elif t is int:
            low = max([m.ge for m in metadata if isinstance(m, annotated_types.Ge)] + [m.gt + 1 for m in metadata if isinstance(m, annotated_types.Gt)] + [-(2**63)])
            high = min([m.le for m in metadata if isinstance(m, annotated_types.Le)] + [m.lt - 1 for m in metadata if isinstance(m, annotated_types.Lt)] + [2**63 - 1])
            options.append(st.one_of(st.sampled_from([v for v in (1, 2, 4, 8, 16) if low <= v <= high] or [low]), st.integers(low, high)))
        elif t is float:
            bounds = {}
            for m in metadata:
                for attr, key, exclude in (("ge", "min_value", None), ("gt", "min_value", "exclude_min"),
                                           ("le", "max_value", None), ("lt", "max_value", "exclude_max")):
                    if getattr(m, attr, None) is not None:
                        bounds[key] = float(getattr(m, attr))
                        if exclude:
                            bounds[exclude] = True
            options.append(st.floats(allow_nan=False, **bounds))
        elif t is str:
            options.append(st.text(max_size=12).filter(lambda s: s.lower() != NONE))  # "none" is None's spelling
        elif get_origin(t) is list:
            (item,) = get_args(t)
            if isinstance(item, type) and issubclass(item, BaseModel):
                options.append(st.lists(_section_values(item, _nested(item)), max_size=2))
            else:
                options.append(st.lists(_strategy(item), max_size=3))
        else:
            raise AssertionError(f"no strategy for {t!r}: teach _strategy the new type")
    return st.one_of(options)


# Names the loader looks up in a table (any other string is refused there, by name).
NAMED = {(ModelConfig, "preset"): st.none() | st.sampled_from(sorted(MODEL_PRESETS))}


def _section_values(section: type[BaseModel], required: dict | None = None) -> st.SearchStrategy:
    fields = {name: NAMED[section, name] if (section, name) in NAMED else _strategy(f.annotation, f.metadata)
              for name, f in section.model_fields.items()}
    required = required or {}
    return st.fixed_dictionaries({k: st.just(v) for k, v in required.items()},
                                 optional={k: v for k, v in fields.items() if k not in required})


def test_the_strategy_knows_every_field():
    for section in [*SECTIONS.values(), SourceConfig]:
        for f in section.model_fields.values():
            _strategy(f.annotation, f.metadata)  # raises for a type the property test would not draw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={name: _section_values(section) for name, section in SECTIONS.items()}),
       st.sampled_from([None, "cpu-fast"]))
def test_any_allowed_config_survives_save_and_load(tmp_path_factory, raw, profile):
    try:
        cfg = config_from_dict({**raw, "profile": profile})
    except GptlabError:  # a combination the cross-field checks refuse (n_head must divide d_model, ...)
        from hypothesis import reject

        reject()
    path = tmp_path_factory.mktemp("rt") / "config.toml"
    save_config(cfg, path)
    assert load_config(path) == cfg


NULLABLE = [(section, name) for section, model in SECTIONS.items() for name, f in model.model_fields.items()
            if allows_none(f.annotation)]


@pytest.mark.parametrize("section, key", NULLABLE)
def test_every_field_that_may_be_none_comes_back_none(tmp_path, section, key):
    """train.eval_batches=None (the whole split) must not come back as 20, tokenizer.eos_token=None as <|endoftext|>."""
    cfg = load_config(None, [f"--{section}.{key}=none"])
    assert getattr(getattr(cfg, section), key) is None
    save_config(cfg, tmp_path / "config.toml")
    assert getattr(getattr(load_config(tmp_path / "config.toml"), section), key) is None
    assert load_config(tmp_path / "config.toml") == cfg


def test_none_inside_a_list_of_sources_round_trips(tmp_path):
    cfg = load_config(None, ["--data.sources=[{path='a.txt', label='A', max_tokens=5}]", "--data.sources.0.label=none"])
    assert cfg.data.sources[0].label is None
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_none_is_spelled_none_only_where_a_field_may_be_none():
    assert load_config(None, ["--model.position=none"]).model.position == "none"  # a choice, not None
    assert load_config(None, ["--train.max_steps=None"]).train.max_steps is None
    with pytest.raises(GptlabError, match="train.batch_size = 'none' is not allowed"):
        load_config(None, ["--train.batch_size=none"])


# --------------------------------------------------------------------------- the schema describes itself


def _all_sections():
    return [Config, *SECTIONS.values(), SourceConfig, RegexRule]


@pytest.mark.parametrize("section", _all_sections(), ids=lambda s: s.__name__)
def test_every_field_has_a_one_line_description(section):
    for name, field in section.model_fields.items():
        assert field.description and "\n" not in field.description, f"{section.__name__}.{name} has no docstring"


def _choices(model: type[BaseModel], name: str) -> set:
    annotation = model.model_fields[name].annotation
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation)
    return {c for t in (get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,))
            for c in (get_args(t) if get_origin(t) is Literal else ())}


def _tables():
    from gptlab import device
    from gptlab.model import gpt
    from gptlab.text import normalize, sources
    from gptlab.tokenizer import KINDS
    from gptlab.train import metrics, optim

    return [
        (ModelConfig, "norm", set(gpt.NORMS)),
        (ModelConfig, "position", set(gpt.POSITIONS)),
        (ModelConfig, "attention", set(gpt.ATTENTION)),
        (ModelConfig, "mlp", set(gpt.MLPS)),
        (ModelConfig, "init", set(gpt.INITS)),
        (TokenizerConfig, "kind", set(KINDS)),
        (TextConfig, "normalize", set(normalize.STEPS) | set(normalize.CONFIGURED_STEPS)),
        (TrainConfig, "schedule", set(optim.DECAY)),
        (TrainConfig, "precision", set(device.DTYPES) | {"auto"}),
        (EvalConfig, "precision", set(device.DTYPES) | {"auto"}),
        (TrainConfig, "log", set(metrics._BACKENDS) | {"csv"}),
        (SourceConfig, "documents", set(sources.SPLITTERS) | {"auto", "record"}),
        (SourceConfig, "format", set(sources.FORMAT_OF_SUFFIX.values()) | set(sources.RECORD_FORMATS) | {"auto"}),
    ]


@pytest.mark.parametrize("index", range(13))
def test_each_literal_of_choices_equals_the_table_it_names(index):
    model, name, table = _tables()[index]
    assert _choices(model, name) == table, f"{model.__name__}.{name}: the Literal and the table differ"
