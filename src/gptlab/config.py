"""Configuration: one typed schema for the whole pipeline.

A run is configured by a TOML file (every section optional) plus dotted
command-line overrides such as `--tokenizer.vocab_size=4096`. Every value is
typed and validated here, before any work starts; a bad value becomes one
GptlabError line naming the key, the value and what is allowed. The resolved
config is saved next to every output so a result can always be traced back.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- text


class SourceConfig(Section):
    """One corpus source: a local file/dir/glob, or `hf:NAME` for a Hugging Face dataset."""

    path: str
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "hf"] = "auto"
    text_field: str = "text"  # jsonl/json/parquet column or HF dataset field
    label: str | None = None  # name used in meta.json and `data inspect`; defaults to the path
    # How the text is cut into documents. auto: txt -> separator, records -> record.
    documents: Literal["auto", "separator", "blank_lines", "file", "record", "line"] = "auto"
    separator: str = "<|endoftext|>"  # ends a document (usually alone on its line, as in TinyStories)
    group_by: str | None = None  # join consecutive records sharing this field ("book,chapter": these fields)
    weight: int = Field(1, ge=1, le=1000)  # repeat the source N times (AureliusGPT doubles Meditations)
    max_tokens: int | None = Field(None, ge=1)  # stop taking this source after N tokens
    encoding_errors: Literal["strict", "replace"] = "strict"
    # Hugging Face datasets only
    split: str = "train"
    hf_config: str | None = None
    streaming: bool = True


class RegexRule(Section):
    pattern: str
    replacement: str = ""


NormalizeStep = Literal["nfc", "nfkc", "greek_to_latin", "strip_gutenberg", "whitespace", "regex", "lowercase"]


class TextConfig(Section):
    normalize: list[NormalizeStep] = []  # applied in order to every document
    regex_rules: list[RegexRule] = []  # used by the "regex" step


# --------------------------------------------------------------------------- tokenizer


class TokenizerConfig(Section):
    kind: Literal["bpe", "sentencepiece", "gpt2", "char"] = "bpe"
    vocab_size: int = Field(4096, ge=1, le=1_000_000)  # bpe/sentencepiece; gpt2 and char ignore it
    sp_model_type: Literal["bpe", "unigram"] = "bpe"  # sentencepiece only
    gpt2_dir: str | None = None  # folder with encoder.json + vocab.bpe (gpt2 only; never downloaded)
    min_frequency: int = Field(2, ge=1)
    train_max_bytes: int | None = Field(200_000_000, ge=1)  # text sampled for training the tokenizer
    bos_token: str | None = None
    eos_token: str | None = "<|endoftext|>"
    pad_token: str | None = None
    extra_special_tokens: list[str] = []


# --------------------------------------------------------------------------- data


class DataConfig(Section):
    sources: list[SourceConfig] = []
    val_sources: list[SourceConfig] = []  # if set, the validation split is these, not a fraction
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # fraction of documents held out
    out_dir: str = "data/prepared"
    shard_size: int = Field(100_000_000, ge=1)  # tokens per shard
    max_tokens: int | None = Field(None, ge=1)  # stop after this many training tokens
    workers: int = Field(0, ge=0)  # encoding processes; 0 = all cores
    seed: int = 1337
    add_bos: bool = False  # put the tokenizer's BOS before every document
    add_eos: bool = True  # put the tokenizer's EOS after every document


# --------------------------------------------------------------------------- model

# Named architectures. A preset fills the [model] section; keys the user sets win. Parameter counts
# (`gptlab model info PRESET`) are checked by tests/test_model_presets.py.
_GPT2 = dict(norm="layernorm", norm_placement="pre", position="learned", mlp="gelu", bias=True, init="gpt2")
# DefaultGPT's trained 0.5m models (trained/customGPT_0.5m_*/model_config.json): width 64 with 16-wide heads
# independent of it, grouped K/V heads (its "mqa.py"), gated SiLU MLP, its 2,048-token TinyStories tokenizer.
_DEFAULTGPT = dict(
    d_model=64, head_size=16, context_length=512, vocab_size=2048, norm="rmsnorm", norm_eps=1e-6,
    norm_placement="pre", position="rope", rope_theta=10000.0, mlp="swiglu", bias=False, tie_embeddings=True,
)
# TinyStories-scale models; vocab_size comes from the tokenizer (sizes below are at 4,096 tokens).
_TINY = dict(norm="rmsnorm", norm_placement="pre", position="rope", mlp="gelu", bias=False, tie_embeddings=True)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (Radford et al. 2019; nanoGPT): 124,439,808 parameters
    "gpt2-124m": {**_GPT2, "n_layer": 12, "d_model": 768, "n_head": 12, "context_length": 1024,
                  "vocab_size": 50257, "tie_embeddings": True},
    # seed 004, GPT 2.5: RMSNorm, pre-norm, SwiGLU 2048, RoPE, no bias, truncated init: 123,551,232
    "gpt2.5-124m": {"n_layer": 12, "d_model": 768, "n_head": 12, "d_ff": 2048, "context_length": 1024,
                    "vocab_size": 50257, "norm": "rmsnorm", "norm_placement": "pre", "position": "rope",
                    "rope_theta": 10000.0, "mlp": "swiglu", "bias": False, "tie_embeddings": True,
                    "init": "trunc_normal"},
    # seed 003, SmollGPT: GPT-2 blocks, 8 x 768, 8 heads; "around 130M" needs an untied output head: 134,685,696
    "smollgpt-130m": {**_GPT2, "n_layer": 8, "d_model": 768, "n_head": 8, "context_length": 1024,
                      "vocab_size": 50257, "tie_embeddings": False},
    # seed 000, AureliusGPT-Torch: Vaswani blocks (post-norm LayerNorm, sinusoids, ReLU, biases, untied output
    # layer, PyTorch init), 6 blocks, 4 heads, its 2,000-token SentencePiece, 512 context. Width 80 and
    # d_ff 384 are the shape closest to its stated 845k at that vocabulary: 848,864
    "aurelius-845k": {"n_layer": 6, "d_model": 80, "n_head": 4, "d_ff": 384, "context_length": 512,
                      "vocab_size": 2000, "norm": "layernorm", "norm_placement": "post", "position": "sinusoidal",
                      "mlp": "relu", "bias": True, "tie_embeddings": False, "init": "pytorch"},
    # seed 002, DefaultGPT's three 0.5M shapes: 492,608 / 492,096 / 501,056
    "defaultgpt-0.5m": {**_DEFAULTGPT, "n_layer": 8, "n_head": 8, "n_kv_head": 2, "d_ff": 128},
    "defaultgpt-0.5m-short-thick": {**_DEFAULTGPT, "n_layer": 4, "n_head": 16, "n_kv_head": 4, "d_ff": 256},
    "defaultgpt-0.5m-tall-skinny": {**_DEFAULTGPT, "n_layer": 10, "n_head": 10, "n_kv_head": 2, "d_ff": 64},
    # TinyStories scale (at vocab 4,096): 1,311,872 / 4,196,608 (the throughput benchmark's 4M) / 15,735,168
    "tiny-1m": {**_TINY, "n_layer": 4, "d_model": 128, "n_head": 4, "context_length": 256},
    "tiny-4m": {**_TINY, "n_layer": 4, "d_model": 256, "n_head": 4, "context_length": 256},
    "tiny-16m": {**_TINY, "n_layer": 8, "d_model": 384, "n_head": 6, "context_length": 256},
}


class ModelConfig(Section):
    preset: str | None = None
    vocab_size: int | None = Field(None, ge=1)  # None: taken from the tokenizer
    context_length: int = Field(256, ge=1)
    n_layer: int = Field(4, ge=1)
    d_model: int = Field(256, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1)  # None: = n_head (MHA); 1: MQA; between: GQA
    head_size: int | None = Field(None, ge=1)  # None: d_model // n_head (DefaultGPT sets it apart from d_model)
    norm: Literal["layernorm", "rmsnorm", "cosinenorm"] = "rmsnorm"
    norm_affine: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"
    position: Literal["learned", "sinusoidal", "rope", "none"] = "rope"
    rope_theta: float = Field(10000.0, gt=0)
    attention: Literal["sdpa", "plain"] = "sdpa"  # plain: the readable reference path
    qk_norm: bool = False
    mlp: Literal["relu", "gelu", "silu", "relu2", "swiglu", "geglu"] = "gelu"
    d_ff: int | None = Field(None, ge=1)  # None: mlp_ratio * d_model
    mlp_ratio: float = Field(4.0, gt=0)
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # gpt2: normal(init_std), residual projections / sqrt(2 n_layer); trunc_normal: the same within 3 std,
    # no residual scaling (GPT 2.5); pytorch: each layer's own default
    init: Literal["gpt2", "trunc_normal", "pytorch"] = "gpt2"
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.head_size is None and self.d_model % self.n_head:
            raise ValueError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}; "
                f"pick n_head from {_divisors(self.d_model)}"
            )
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(
                f"model.n_kv_head={kv} does not divide model.n_head={self.n_head}; "
                f"pick n_kv_head from {_divisors(self.n_head)}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got d_model/n_head = {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or int(self.mlp_ratio * self.d_model)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


# --------------------------------------------------------------------------- train


class TrainConfig(Section):
    data_dir: str = "data/prepared"  # output of `gptlab data prepare`
    run_dir: str = "runs/default"
    init_from: str | None = None  # a run dir or checkpoint to continue from (new data / hyper-parameters)
    # Logit distillation: a trained run with the same tokenizer whose next-token distributions the student also
    # learns; loss = (1 - distill_weight) x cross-entropy + distill_weight x T^2 x KL(teacher_T || student_T).
    teacher: str | None = None
    distill_weight: float = Field(0.5, ge=0, le=1)
    distill_temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_time: float | None = Field(None, gt=0)  # seconds
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the blocks' matrices, AdamW on the rest
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_split: bool = True  # Muon orthogonalises Q, K, V (and gate, up) one by one, not stacked as one matrix
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: share of steps spent decaying
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(0, ge=0)  # 0 = all cores
    seed: int = 1337
    eval_every: int = Field(100, ge=1)
    eval_batches: int | None = Field(20, ge=1)  # None: the whole validation split
    early_stop_patience: int = Field(0, ge=0)  # evaluations without improvement; 0 = off
    sample_every: int = Field(0, ge=0)  # 0 = off
    sample_prompt: str = ""
    sample_tokens: int = Field(64, ge=1)
    log_every: int = Field(10, ge=1)
    keep_last: int = Field(2, ge=1)  # checkpoints kept besides the best
    log: list[Literal["csv", "tensorboard", "wandb"]] = ["csv"]
    loader: Literal["random", "sequential"] = "random"  # random windows (nanoGPT) or shuffled epochs
    peak_flops: float | None = Field(None, gt=0)  # FLOP/s of one process's device that MFU is measured against; None: measured
    # Processes on this machine; more than 1 runs the training under torchrun (DDP unless `distributed` says
    # fsdp), the cores shared out between them. Ignored in a process that torchrun started.
    nproc: int = Field(1, ge=1)
    # Under torchrun (several processes): ddp = a whole model per process, fsdp = each process holds a shard.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    dist_timeout: float = Field(600.0, gt=0)  # seconds a process waits for the others before it gives up


# --------------------------------------------------------------------------- sample


class SampleConfig(Section):
    prompts: list[str] = [""]
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0)  # 0 = greedy
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    num_samples: int = Field(1, ge=1)
    seed: int = 1337
    stop_at_eos: bool = True
    best_of: int = Field(1, ge=1)  # draw N candidates per sample, keep the highest mean log-probability


# --------------------------------------------------------------------------- eval


class EvalConfig(Section):
    """What `gptlab eval RUN` measures (every part optional; by default the run's own validation split)."""

    data: list[str] = []  # text files/folders/globs or prepared data folders; [] = the run's validation split
    split: str = "val"  # the split scored in a prepared data folder
    max_tokens: int | None = Field(None, ge=1)  # tokens scored per dataset; None = all of it
    normalize: bool = True  # apply the run's [text] normalisation to text files, as training did
    hellaswag: str | None = None  # a HellaSwag JSONL file, or hf:Rowan/hellaswag
    limit: int | None = Field(None, ge=1)  # HellaSwag items (None = all 10,042)
    batch_size: int = Field(16, ge=1)  # windows (text) or items (HellaSwag) per forward pass
    checkpoint: Literal["best", "last"] = "best"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # fp32: numbers that do not depend on the machine
    threads: int = Field(0, ge=0)  # 0 = all cores; 1 is faster on a machine busy with other work
    topk: list[int] = [1, 5, 10]  # teacher-forced top-k accuracy
    prompts: list[str] = ["Once upon a time", "One day, a little girl named Lily", "The meaning of life is", ""]
    sample_tokens: int = Field(64, ge=0)  # tokens generated per prompt; 0 = no samples


# --------------------------------------------------------------------------- root


# Named sets of defaults (`profile = "cpu-fast"` in a config, or --profile=cpu-fast), laid under the
# config's own settings. cpu-fast: what won the 10-minute CPU speedrun (benchmarks/SPEEDRUN.md), tuned on
# models of 1-4M parameters; larger models want a lower train.lr.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu-fast": {
        "train": {"optimizer": "muon", "schedule": "wsd", "decay_fraction": 0.3, "lr": 1.2e-2, "min_lr": 1.2e-3,
                  "warmup_steps": 50},
    },
}


# --------------------------------------------------------------------------- distill


class DistillConfig(Section):
    """What `gptlab distill` asks of the teacher (sequence-level knowledge distillation)."""

    tokens: int = Field(100_000, ge=1)  # stop once the teacher has written this many tokens (counted by its tokenizer)
    batch_size: int = Field(8, ge=1)  # prompts per generation call; the prompts are taken in turn, round and round
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.8, ge=0)  # 0 = greedy
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 1337  # batch k is drawn with seed + k, so an interrupted run continues as if it had not stopped
    chat: bool = False  # wrap each prompt in the teacher's chat template and keep only its answer


class Config(Section):
    profile: str | None = None  # a set of defaults from PROFILES, e.g. "cpu-fast"; the file and overrides win
    text: TextConfig = TextConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    distill: DistillConfig = DistillConfig()


# --------------------------------------------------------------------------- loading


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--a.b=value` -> (['a', 'b'], value); the value is read as a TOML literal, else kept as a string."""
    if not arg.startswith("--") or "=" not in arg:
        raise GptlabError(f"cannot read override {arg!r}", "write it as --section.key=value, e.g. --tokenizer.vocab_size=4096")
    key, raw = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for arg in overrides:
        keys, value = parse_override(arg)
        node = raw
        for k in keys[:-1]:
            node = _child(node, k, arg)
        if isinstance(node, list):
            node[_list_index(node, keys[-1], arg)] = value
        else:
            node[keys[-1]] = value
    return raw


def _child(node, key: str, arg: str):
    """Step into a section, or into item N of a list of tables (`--data.sources.0.weight=2`)."""
    if isinstance(node, list):
        return node[_list_index(node, key, arg)]
    child = node.setdefault(key, {})
    if not isinstance(child, (dict, list)):
        raise GptlabError(f"override {arg!r}: {key} is not a section")
    return child


def _list_index(node: list, key: str, arg: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise GptlabError(f"override {arg!r}: {key!r} is not an index of a list of {len(node)} items", "count from 0")
    return int(key)


def _resolve_profile(raw: dict) -> dict:
    """Lay the profile's settings under the config's own: what the file or an override sets wins."""
    name = raw.get("profile")
    if not name:
        return raw
    if name not in PROFILES:
        raise GptlabError(f"unknown profile {name!r}", f"choose one of: {', '.join(sorted(PROFILES))}")
    merged = {**raw}
    for section, settings in PROFILES[name].items():
        merged[section] = {**settings, **raw.get(section, {})}
    return merged


def _resolve_preset(raw: dict) -> dict:
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return raw
    name = model["preset"]
    if name not in MODEL_PRESETS:
        raise GptlabError(
            f"unknown model preset {name!r}", f"choose one of: {', '.join(sorted(MODEL_PRESETS))}"
        )
    raw["model"] = {**MODEL_PRESETS[name], **model}
    return raw


def format_validation_error(err: ValidationError, raw: dict | None = None) -> str:
    """The first error as one line: the dotted key, the value given, and what is allowed."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        parent = _section_model(e["loc"][:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
        hint = f"did you mean {'.'.join(map(str, e['loc'][:-1] + (close[0],)))}?" if close else f"allowed keys: {', '.join(allowed)}"
        return f"config: unknown key {loc} — {hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error":
        return f"config: {msg}"
    return f"config: {loc} = {e.get('input')!r} is not allowed: {msg}"


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def config_from_dict(raw: dict) -> Config:
    raw = _resolve_preset(_resolve_profile(raw))
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise GptlabError(format_validation_error(err, raw)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or nothing), apply dotted overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"config file not found: {path}", "check the path given to --config")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise GptlabError(f"config file {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise GptlabError(f"config file {path} is not UTF-8 text (binary, or another encoding)", "give a TOML file saved as UTF-8") from None
    return config_from_dict(apply_overrides(raw, overrides or []))


def config_to_dict(config: BaseModel) -> dict:
    """A TOML-ready dict: None values dropped (TOML has no null)."""
    return _drop_none(config.model_dump(mode="json"))


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as TOML, atomically."""
    atomic_write_text(path, tomli_w.dumps(config_to_dict(config)))
