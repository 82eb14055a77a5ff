"""Configuration: one typed schema for the whole pipeline.

A run is configured by a TOML file (every section optional) plus dotted
command-line overrides such as `--tokenizer.vocab_size=4096`. Every value is
typed and validated here, before any work starts; a bad value becomes one
GptlabError line naming the key, the value and what is allowed. The resolved
config is saved next to every output so a result can always be traced back.

Each field's docstring is its description (`gptlab config` lists them). TOML has
no null, so a field that may be None takes the string "none" for it, in a file
(`eval_batches = "none"`) and on the command line (`--train.eval_batches=none`).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w
import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text

NONE = "none"
"""How None is spelled where there is no null (TOML, the command line); a field that may be None never holds it."""


def allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, docstrings describe."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _none_spelling(cls, value: Any, info) -> Any:
        """"none" (any case) is None in a field that may be None."""
        if isinstance(value, str) and value.lower() == NONE and allows_none(cls.model_fields[info.field_name].annotation):
            return None
        return value


# --------------------------------------------------------------------------- text


class SourceConfig(Section):
    """One corpus source: a local file/dir/glob, or `hf:NAME` for a Hugging Face dataset."""

    path: str
    """a file, folder or glob of .txt/.jsonl/.json/.parquet files, or hf:NAME for a Hugging Face dataset"""
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "hf"] = "auto"
    """how to read it; auto: from the hf: prefix or the files' extensions"""
    text_field: str = "text"
    """the jsonl/json/parquet column or Hugging Face dataset field that holds the text"""
    kind: Literal["auto", "text", "chat"] = "auto"
    """text: documents; chat: conversations (messages, ShareGPT, Alpaca or prompt/completion records) for fine-tuning; auto: chat when the first record is a conversation"""
    label: str | None = None
    """the name shown in meta.json and `data inspect`; none: the path"""
    documents: Literal["auto", "separator", "blank_lines", "file", "record", "line"] = "auto"
    """how the text is cut into documents; auto: txt by separator, records one per record"""
    separator: str = "<|endoftext|>"
    """the line that ends a document (usually alone on its line, as in TinyStories)"""
    group_by: str | None = None
    """join consecutive records sharing this field ("book,chapter": these fields) into one document"""
    weight: int = Field(1, ge=1, le=1000)
    """repeat the source N times (AureliusGPT doubles Meditations)"""
    max_tokens: int | None = Field(None, ge=1)
    """stop taking this source after N tokens; none: all of it"""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """strict: a byte that is not UTF-8 is an error; replace: it becomes U+FFFD"""
    split: str = "train"
    """the Hugging Face dataset split to read (hf: sources only)"""
    hf_config: str | None = None
    """the Hugging Face dataset configuration, e.g. a language (hf: sources only)"""
    streaming: bool = True
    """stream the Hugging Face dataset instead of downloading it whole (hf: sources only)"""


class RegexRule(Section):
    """One regular-expression replacement of the "regex" normalisation step."""

    pattern: str
    """a Python regular expression"""
    replacement: str = ""
    """what each match becomes (\\1 refers to a group)"""


NormalizeStep = Literal["nfc", "nfkc", "greek_to_latin", "strip_gutenberg", "whitespace", "regex", "lowercase"]


class TextConfig(Section):
    """How every document is normalised before tokenisation."""

    normalize: list[NormalizeStep] = []
    """steps applied in order to every document"""
    regex_rules: list[RegexRule] = []
    """the rules of the "regex" step, applied in order"""


# --------------------------------------------------------------------------- tokenizer


class TokenizerConfig(Section):
    """The tokenizer `gptlab tokenizer train` makes."""

    kind: Literal["bpe", "sentencepiece", "gpt2", "char"] = "bpe"
    """bpe: byte-level BPE; sentencepiece; gpt2: GPT-2's own (read from gpt2_dir); char: one token per character"""
    vocab_size: int = Field(4096, ge=1, le=1_000_000)
    """tokens in the vocabulary, specials included (bpe/sentencepiece; gpt2 and char ignore it)"""
    sp_model_type: Literal["bpe", "unigram"] = "bpe"
    """the SentencePiece algorithm (sentencepiece only)"""
    gpt2_dir: str | None = None
    """a folder with GPT-2's encoder.json and vocab.bpe (gpt2 only; never downloaded)"""
    min_frequency: int = Field(2, ge=1)
    """a pair seen fewer times is not merged (bpe)"""
    train_max_bytes: int | None = Field(200_000_000, ge=1)
    """text sampled for training the tokenizer; none: the whole corpus"""
    bos_token: str | None = None
    """the beginning-of-sequence special token; none: no BOS"""
    eos_token: str | None = "<|endoftext|>"
    """the end-of-sequence special token that ends every document; none: no EOS"""
    pad_token: str | None = None
    """the padding special token; none: no padding token"""
    extra_special_tokens: list[str] = []
    """more special tokens, each kept whole and never merged"""


# --------------------------------------------------------------------------- data


class DataConfig(Section):
    """The corpus and how `gptlab data prepare` turns it into token shards."""

    sources: list[SourceConfig] = []
    """the corpus: files, folders, globs, .jsonl/.parquet files or hf:NAME datasets"""
    val_sources: list[SourceConfig] = []
    """the validation corpus; if set, the validation split is these instead of a val_fraction of the documents"""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """fraction of the documents held out for validation"""
    out_dir: str = "data/prepared"
    """the folder the shards, meta.json, tokenizer and config are written to"""
    shard_size: int = Field(100_000_000, ge=1)
    """tokens per shard file"""
    max_tokens: int | None = Field(None, ge=1)
    """stop after this many training tokens; none: the whole corpus"""
    workers: int = Field(0, ge=0)
    """encoding processes; 0 = all cores"""
    seed: int = 1337
    """seed of the train/validation draw"""
    add_bos: bool = False
    """put the tokenizer's BOS before every document"""
    add_eos: bool = True
    """put the tokenizer's EOS after every document"""


# --------------------------------------------------------------------------- model

# Named architectures. A preset fills the [model] section; keys the user sets win. Parameter counts
# (`gptlab model info PRESET`) are checked by tests/test_model_presets.py.
_GPT2 = dict(norm="layernorm", position="learned", mlp="gelu", bias=True, init="gpt2")
# DefaultGPT's trained 0.5m models (trained/customGPT_0.5m_*/model_config.json): width 64 with 16-wide heads
# independent of it, grouped K/V heads (its "mqa.py"), gated SiLU MLP, its 2,048-token TinyStories tokenizer.
_DEFAULTGPT = dict(
    d_model=64, head_size=16, context_length=512, vocab_size=2048, norm="rmsnorm", norm_eps=1e-6,
    position="rope", rope_theta=10000.0, mlp="swiglu", bias=False, tie_embeddings=True,
)
# TinyStories-scale models; vocab_size comes from the tokenizer (sizes below are at 4,096 tokens).
_TINY = dict(norm="rmsnorm", position="rope", mlp="gelu", bias=False, tie_embeddings=True)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (Radford et al. 2019; nanoGPT): 124,439,808 parameters
    "gpt2-124m": {**_GPT2, "n_layer": 12, "d_model": 768, "n_head": 12, "context_length": 1024,
                  "vocab_size": 50257, "tie_embeddings": True},
    # seed 004, GPT 2.5: RMSNorm, pre-norm, SwiGLU 2048, RoPE, no bias, truncated init: 123,551,232
    "gpt2.5-124m": {"n_layer": 12, "d_model": 768, "n_head": 12, "d_ff": 2048, "context_length": 1024,
                    "vocab_size": 50257, "norm": "rmsnorm", "position": "rope",
                    "rope_theta": 10000.0, "mlp": "swiglu", "bias": False, "tie_embeddings": True,
                    "init": "trunc_normal"},
    # seed 003, SmollGPT: GPT-2 blocks, 8 x 768, 8 heads; "around 130M" needs an untied output head: 134,685,696
    "smollgpt-130m": {**_GPT2, "n_layer": 8, "d_model": 768, "n_head": 8, "context_length": 1024,
                      "vocab_size": 50257, "tie_embeddings": False},
    # seed 000, AureliusGPT-Torch: Vaswani blocks (post-norm LayerNorm, sinusoids, ReLU, biases, untied output
    # layer, PyTorch init), 6 blocks, 4 heads, its 2,000-token SentencePiece, 512 context. Width 80 and
    # d_ff 384 are the shape closest to its stated 845k at that vocabulary: 848,864
    "aurelius-845k": {"n_layer": 6, "d_model": 80, "n_head": 4, "d_ff": 384, "context_length": 512,
                      "vocab_size": 2000, "norm": "layernorm", "block": "post", "position": "sinusoidal",
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
    """The GPT's architecture."""

    preset: str | None = None
    """a named architecture from `gptlab model info list` that fills this section; keys set here win"""
    vocab_size: int | None = Field(None, ge=1)
    """tokens in the embedding and output head; none: taken from the tokenizer"""
    context_length: int = Field(256, ge=1)
    """the longest sequence of tokens the model sees"""
    n_layer: int = Field(4, ge=1)
    """transformer blocks"""
    d_model: int = Field(256, ge=1)
    """width of the residual stream"""
    n_head: int = Field(4, ge=1)
    """attention (query) heads per block"""
    n_kv_head: int | None = Field(None, ge=1)
    """key/value heads; none: = n_head (multi-head); 1: multi-query; between: grouped-query"""
    head_size: int | None = Field(None, ge=1)
    """width of one head; none: d_model // n_head (DefaultGPT sets it apart from d_model)"""
    norm: Literal["layernorm", "rmsnorm", "cosinenorm"] = "rmsnorm"
    """the normalisation layer"""
    norm_affine: bool = True
    """norms have a learned gain (and a bias if bias = true)"""
    norm_eps: float = Field(1e-5, gt=0)
    """the epsilon that keeps a norm from dividing by zero"""
    block: str | list[str] = "pre"
    """each block's layout: pre, post, sandwich, parallel, or a string of parts like "Norm->Attn->+->Norm->MLP->+" (+ adds the branch to the residual stream, = replaces it; a list of strings is parallel branches) — see `gptlab model parts`"""
    position: Literal["learned", "sinusoidal", "rope", "none"] = "rope"
    """how positions are encoded: a learned table, fixed sinusoids, rotary (RoPE) or not at all"""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE's base wavelength"""
    mask: str | list[str] = "causal"
    """the attention mask of each layer (a list cycles over the layers: ["window", "window", "causal"] is two local layers to one global): causal; window (the last model.window tokens); strided (Sparse Transformer: the window plus every window-th token before it); or package.module:function for your own, given query and key positions — always within causal"""
    window: int = Field(128, ge=1)
    """tokens a window or strided mask lets a query see (itself included)"""
    attention: Literal["sdpa", "plain"] = "sdpa"
    """sdpa: PyTorch's fused attention; plain: the readable reference path"""
    qk_norm: bool = False
    """normalise queries and keys before attention"""
    mlp: Literal["relu", "gelu", "silu", "relu2", "swiglu", "geglu"] = "gelu"
    """the feed-forward block: a plain MLP with that activation, or a gated one (swiglu, geglu)"""
    d_ff: int | None = Field(None, ge=1)
    """the MLP's hidden width; none: mlp_ratio * d_model"""
    mlp_ratio: float = Field(4.0, gt=0)
    """the MLP's hidden width over d_model, when d_ff is none"""
    moe_experts: int = Field(8, ge=1)
    """MoE parts: expert MLPs in each"""
    moe_topk: int = Field(2, ge=1)
    """MoE parts: experts each token is routed to"""
    moe_shared: int = Field(0, ge=0)
    """MoE parts: experts every token also goes through (DeepSeekMoE's shared experts)"""
    moe_d_ff: int | None = Field(None, ge=1)
    """MoE parts: each expert's hidden width; none: d_ff"""
    moe_capacity: float | None = Field(None, gt=0)
    """MoE parts, in training: an expert takes at most capacity x tokens x topk / experts tokens a batch, the rest skip it (Switch Transformer); none: dropless, every routed token is computed (evaluation and generation always are)"""
    moe_aux_weight: float = Field(0.01, ge=0)
    """MoE parts: weight of the load-balancing loss (Switch Transformer) added to the training loss"""
    moe_z_weight: float = Field(0.001, ge=0)
    """MoE parts: weight of the router z-loss (ST-MoE), which keeps router logits small"""
    kan_grid: int = Field(5, ge=1)
    """KAN parts: spline grid intervals of each learned activation"""
    kan_order: int = Field(3, ge=1)
    """KAN parts: the splines' order (3: cubic)"""
    bias: bool = False
    """linear layers (and norms) have biases"""
    tie_embeddings: bool = True
    """the output head shares the token embedding's matrix"""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """dropout probability while training"""
    init: Literal["gpt2", "trunc_normal", "pytorch"] = "gpt2"
    """gpt2: normal(init_std), residual projections / sqrt(2 n_layer); trunc_normal: the same within 3 std without the residual scaling (GPT 2.5); pytorch: each layer's own default"""
    init_std: float = Field(0.02, gt=0)
    """standard deviation of the gpt2 and trunc_normal inits"""

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """Configs saved before block strings said norm_placement = pre|post|sandwich: the layout of that name."""
        if isinstance(data, dict) and "norm_placement" in data:
            data = dict(data)
            data.setdefault("block", data.pop("norm_placement"))
            data.pop("norm_placement", None)
        return data

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
        if self.moe_topk > self.moe_experts:
            raise ValueError(
                f"model.moe_topk={self.moe_topk} is more than model.moe_experts={self.moe_experts}; "
                f"route each token to at most {self.moe_experts} experts"
            )
        if self.mask == []:
            raise ValueError('model.mask is an empty list; give one mask, e.g. "causal", or a list to cycle over the layers')
        for name in [self.mask] if isinstance(self.mask, str) else self.mask:
            if name not in ("causal", "window", "strided") and ":" not in name:  # a function is imported at build
                raise ValueError(
                    f"model.mask {name!r} is not a mask; use causal, window, strided, or package.module:function"
                )
        from gptlab.model.blocks import parse_block  # no torch: checks the string as the config is read

        parse_block(self.block)
        return self

    @property
    def layout(self) -> list[list[str]]:
        """The block's branches, each a list of tokens (model/blocks.py)."""
        from gptlab.model.blocks import parse_block

        return parse_block(self.block)

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
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)  # a huge n must not take forever


# --------------------------------------------------------------------------- train


class TrainConfig(Section):
    """How `gptlab train` trains: data, run folder, budget, optimizer, schedule, precision, logging."""

    data_dir: str = "data/prepared"
    """prepared data: the output of `gptlab data prepare`"""
    run_dir: str = "runs/default"
    """the run directory to write: config, checkpoints, metrics, plots, samples"""
    init_from: str | None = None
    """a run dir or checkpoint whose weights a new run starts from (new data or hyper-parameters, fresh optimizer)"""
    teacher: str | None = None
    """whose next-token distributions the student also learns (logit distillation): a trained run with the same tokenizer, or the top-k logits `gptlab distill --logits` stored for these shards; none: off"""
    distill_weight: float = Field(0.5, ge=0, le=1)
    """loss = (1 - distill_weight) x cross-entropy + distill_weight x T^2 x divergence(teacher_T, student_T)"""
    distill_temperature: float = Field(1.0, gt=0)
    """T, the temperature both distributions are softened with for the distillation loss"""
    distill_beta: float = Field(0.0, ge=0, le=1)
    """the divergence: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the generalised Jensen-Shannon divergence of GKD"""
    distill_on_policy: float = Field(0.0, ge=0, le=1)
    """on-policy distillation: the share of each batch's rows the student writes itself before the teacher scores them (GKD's lambda); 0: off"""
    distill_new_tokens: int = Field(64, ge=1)
    """on-policy rows: the student continues the window's first context_length - N real tokens with N of its own"""
    batch_size: int = Field(16, ge=1)
    """sequences a micro-step trains on, over all processes (a step: batch_size x grad_accum)"""
    grad_accum: int = Field(1, ge=1)
    """micro-steps whose gradients one optimizer step adds up: a step of batch_size x grad_accum sequences in the memory of one micro-batch"""
    max_steps: int | None = Field(None, ge=1)
    """stop after this many steps; none: no step limit"""
    max_tokens: int | None = Field(None, ge=1)
    """stop after this many training tokens; none: no token limit"""
    max_time: float | None = Field(None, gt=0)
    """stop after this many seconds of training; none: no time limit"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw; muon: Muon on the blocks' matrices, AdamW on the rest"""
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    """Muon's momentum"""
    muon_split: bool = True
    """Muon orthogonalises Q, K, V (and gate, up) one by one, as modded-nanogpt does, not stacked as one matrix"""
    lr: float = Field(1e-3, gt=0)
    """the peak learning rate, reached at the end of the warm-up"""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """the learning rate's floor as a fraction of lr, reached on the last step (0.1: lr/10)"""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """the decay from lr to its floor: cosine, linear, wsd (warm-up, stable, decay) or constant"""
    warmup_steps: int = Field(100, ge=0)
    """steps of linear warm-up from 0 to lr"""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd: the share of the run spent decaying"""
    weight_decay: float = Field(0.1, ge=0)
    """decoupled weight decay on matrices and embeddings (none on gains and biases)"""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW's first-moment decay"""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW's second-moment decay"""
    eps: float = Field(1e-8, gt=0)
    """AdamW's epsilon"""
    grad_clip: float = Field(1.0, ge=0)
    """clip the gradients' global norm to this; 0 = off"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """autocast precision; auto: bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32"""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model; auto: when the run is long enough to pay the compile time back"""
    checkpointing: bool = False
    """activation checkpointing: each block keeps only its input and runs again in backward (less memory, ~1/3 more compute)"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """where to train; auto: cuda, else mps, else cpu"""
    threads: int = Field(0, ge=0)
    """CPU threads; 0 = all cores"""
    seed: int = 1337
    """seed of the initial weights, the batches and dropout"""
    eval_every: int = Field(100, ge=1)
    """steps between evaluations (each also writes a checkpoint)"""
    eval_batches: int | None = Field(20, ge=1)
    """validation batches per evaluation; none: the whole validation split"""
    early_stop_patience: int = Field(0, ge=0)
    """stop after this many evaluations without a better validation loss; 0 = off"""
    sample_every: int = Field(0, ge=0)
    """steps between samples written to samples.md; 0 = off"""
    sample_prompt: str = ""
    """the prompt of those samples ("" = from nothing)"""
    sample_tokens: int = Field(64, ge=1)
    """tokens generated per sample"""
    log_every: int = Field(10, ge=1)
    """steps between rows of metrics.csv"""
    keep_last: int = Field(2, ge=1)
    """checkpoints kept besides the best"""
    log: list[Literal["csv", "tensorboard", "wandb"]] = ["csv"]
    """where metrics go: csv (metrics.csv), tensorboard, wandb"""
    loader: Literal["random", "sequential"] = "random"
    """random windows (nanoGPT) or shuffled epochs of consecutive windows"""
    peak_flops: float | None = Field(None, gt=0)
    """FLOP/s of one process's device that MFU is measured against; none: measured (`gptlab bench peak`)"""
    nproc: int = Field(1, ge=1)
    """processes on this machine; more than 1 launches torchrun (ignored in a process torchrun started)"""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """how several processes share the model: ddp = a whole model per process, fsdp = each holds a shard"""
    dist_timeout: float = Field(600.0, gt=0)
    """seconds a process waits for the others before it gives up"""
    lora_rank: int = Field(0, ge=0)
    """fine-tune low-rank adapters of this rank on the blocks' linear maps (LoRA; with init_from), the blocks frozen; 0 = every weight"""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA's update is scaled by lora_alpha / lora_rank"""

    @model_validator(mode="before")
    @classmethod
    def _absolute_min_lr(cls, data: Any) -> Any:
        """Configs written before min_lr_ratio set an absolute `min_lr`: read it as the same floor."""
        if not isinstance(data, dict) or "min_lr" not in data:
            return data
        data = dict(data)
        min_lr = data.pop("min_lr")
        lr = data.get("lr", cls.model_fields["lr"].default)
        try:
            ratio = float(min_lr) / float(lr)
        except (TypeError, ValueError, ZeroDivisionError):
            raise ValueError(f"train.min_lr={min_lr!r} with train.lr={lr!r}: write the floor as train.min_lr_ratio "
                             "(a fraction of lr, e.g. 0.1)") from None
        if not 0 <= ratio <= 1:
            raise ValueError(f"train.min_lr={min_lr} is above train.lr={lr}, so the learning rate would rise: "
                             f"write the floor as train.min_lr_ratio (a fraction of lr, e.g. 0.1)")
        data["min_lr_ratio"] = ratio
        return data


# --------------------------------------------------------------------------- sample


class SampleConfig(Section):
    """What `gptlab sample` generates (a run's own [sample] section is the starting point)."""

    prompts: list[str] = [""]
    """the prompts ("" = from nothing, after the start token)"""
    max_new_tokens: int = Field(200, ge=1)
    """tokens generated per sample at most"""
    temperature: float = Field(0.8, ge=0)
    """softmax temperature; 0 = greedy"""
    top_k: int | None = Field(None, ge=1)
    """sample from the k most likely tokens only; none: all"""
    top_p: float = Field(1.0, gt=0, le=1)
    """sample from the smallest set of tokens whose probabilities add up to p (nucleus); 1 = all"""
    num_samples: int = Field(1, ge=1)
    """samples per prompt"""
    seed: int = 1337
    """seed of the sampling"""
    stop_at_eos: bool = True
    """end a sample at the EOS token"""
    best_of: int = Field(1, ge=1)
    """draw N candidates per sample, keep the one with the highest mean log-probability"""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the decode step; auto: when the generation is long enough to pay the compile time back"""


# --------------------------------------------------------------------------- eval


class EvalConfig(Section):
    """What `gptlab eval RUN` measures (every part optional; by default the run's own validation split)."""

    data: list[str] = []
    """text files, folders, globs, hf:NAME sources or prepared data folders to score; [] = the run's validation split"""
    split: str = "val"
    """the split scored in a prepared data folder"""
    max_tokens: int | None = Field(None, ge=1)
    """tokens scored per dataset; none: all of it"""
    normalize: bool = True
    """apply the run's [text] normalisation to text files, as training did"""
    hellaswag: str | None = None
    """a HellaSwag JSONL file (official or preprocessed), or hf:Rowan/hellaswag; none: no HellaSwag"""
    limit: int | None = Field(None, ge=1)
    """the first N HellaSwag items; none: all 10,042"""
    batch_size: int = Field(16, ge=1)
    """windows (text) or items (HellaSwag) per forward pass"""
    checkpoint: Literal["best", "last"] = "best"
    """which checkpoint of the run to score"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """where to run; auto: cuda, else mps, else cpu"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """autocast precision; fp32: numbers that do not depend on the machine"""
    threads: int = Field(0, ge=0)
    """CPU threads; 0 = all cores (1 is faster on a machine busy with other work)"""
    topk: list[int] = [1, 5, 10]
    """k of the teacher-forced top-k accuracy"""
    prompts: list[str] = ["Once upon a time", "One day, a little girl named Lily", "The meaning of life is", ""]
    """the fixed prompts of the report's samples"""
    sample_tokens: int = Field(64, ge=0)
    """tokens generated per prompt; 0 = no samples"""
    conversations: str | None = None
    """a conversation file (JSON lines: messages, ShareGPT, Alpaca or prompt/completion) whose assistant tokens are scored"""
    instructions: str | None = None
    """an instruction file (conversations with "constraints": {words, name}): how often a generated reply follows them"""
    instruction_limit: int | None = Field(None, ge=1)
    """the first N instructions; none: all of them"""
    chat_format: Literal["auto", "chat", "text"] = "auto"
    """chat: the run's chat format; text: plain text (a base model); auto: chat, and for instructions text where the run has no chat tokens"""


# --------------------------------------------------------------------------- root


# Named sets of defaults (`profile = "cpu-fast"` in a config, or --profile=cpu-fast), laid under the
# config's own settings. cpu-fast: what won the 10-minute CPU speedrun (benchmarks/SPEEDRUN.md), tuned on
# models of 1-4M parameters; larger models want a lower train.lr.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu-fast": {
        "train": {"optimizer": "muon", "schedule": "wsd", "decay_fraction": 0.3, "lr": 1.2e-2, "min_lr_ratio": 0.1,
                  "warmup_steps": 50},
    },
    # gptlab sft's defaults (chat/sft.py) for fine-tuning a small pretrained model on conversations: AdamW,
    # a 5% warm-up (sft sets warmup_steps from the run's length), a linear decay to 5% of the peak, no weight
    # decay (a short run from trained weights, which decay would only pull towards zero), and the whole
    # validation split at every evaluation (held-out conversations are few). The rate is measured
    # (benchmarks/sft_defaults.py, the table in chat/sft.py): on 1M-parameter TinyStories bases 3e-3 beat
    # 1e-3 and 3e-4, with a warm-up; a larger or longer-trained base wants less (GPT-2 small is commonly fine-tuned at 5e-5 to 1e-4).
    "sft": {
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "linear", "min_lr_ratio": 0.05, "warmup_steps": 10,
                  "weight_decay": 0.0, "eval_batches": None},
    },
}


# --------------------------------------------------------------------------- distill


class DistillConfig(Section):
    """What `gptlab distill` asks of the teacher (sequence-level knowledge distillation)."""

    tokens: int = Field(100_000, ge=1)
    """stop once the teacher has written this many tokens (counted by its tokenizer)"""
    batch_size: int = Field(8, ge=1)
    """prompts per generation call; the prompts are taken in turn, round and round"""
    max_new_tokens: int = Field(256, ge=1)
    """tokens per sample at most"""
    temperature: float = Field(0.8, ge=0)
    """softmax temperature; 0 = greedy"""
    top_k: int | None = Field(None, ge=1)
    """sample from the k most likely tokens only; none: all"""
    top_p: float = Field(0.95, gt=0, le=1)
    """nucleus sampling: the smallest set of tokens whose probabilities add up to p; 1 = all"""
    seed: int = 1337
    """batch k is drawn with seed + k, so an interrupted run continues as if it had not stopped"""
    chat: bool = False
    """wrap each prompt in the teacher's chat template and keep only its answer"""
    best_of: int = Field(1, ge=1)
    """the teacher writes N candidates per prompt and the best one (by --rank-by; default its own log-probability) is kept"""


# --------------------------------------------------------------------------- filter


class FilterConfig(Section):
    """Cleaning a synthetic corpus (`gptlab filter`, and `gptlab distill` once its corpus is written). The filters run
    in this order -- exact duplicates, near duplicates, length, perplexity -- each counting only what it removed."""

    dedup: Literal["none", "exact", "near"] = "none"
    """duplicates to drop, the first copy kept: exact (the same text once case and whitespace are ignored); near (exact, then texts whose word 5-grams overlap an earlier kept text's with Jaccard >= near_threshold, found by MinHash LSH); `gptlab filter` uses near unless told otherwise"""
    near_threshold: float = Field(0.8, gt=0, le=1)
    """the Jaccard similarity of two texts' sets of word 5-grams from which the later text is a near duplicate"""
    min_tokens: int | None = Field(None, ge=0)
    """drop samples shorter than this: a record's "tokens" (the teacher's tokens in its continuation), or its text's words where it has none; none: no bound"""
    max_tokens: int | None = Field(None, ge=1)
    """drop samples longer than this, counted as for min_tokens; none: no bound"""
    reference: str | None = None
    """a gptlab run (e.g. the model trained on the real data) that scores each sample's text for the perplexity filter; none: no perplexity filter"""
    perplexity: str | None = None
    """the reference's perplexities kept, LOW:HIGH inclusive: numbers (5:40), percentiles of the corpus's own perplexities (p5:p95), or one side open (:200); none: p5:p95 when there is a reference"""
    batch_size: int = Field(16, ge=1)
    """windows of the reference's context scored per forward pass"""
    report: str | None = None
    """the markdown report's path (its JSON summary beside it, .json); none: beside the output, OUT.report.md"""


class Config(Section):
    """The whole pipeline's settings: one section per stage."""

    profile: str | None = None
    """a named set of defaults, e.g. "cpu-fast", laid under the file's settings and overrides"""
    text: TextConfig = TextConfig()
    """normalisation"""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """the tokenizer"""
    data: DataConfig = DataConfig()
    """the corpus and its shards"""
    model: ModelConfig = ModelConfig()
    """the architecture"""
    train: TrainConfig = TrainConfig()
    """training"""
    sample: SampleConfig = SampleConfig()
    """sampling"""
    eval: EvalConfig = EvalConfig()
    """evaluation"""
    distill: DistillConfig = DistillConfig()
    """the teacher's corpus"""
    filter: FilterConfig = FilterConfig()
    """cleaning a synthetic corpus"""


# --------------------------------------------------------------------------- loading


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--a.b=value` -> (['a', 'b'], value); the value is read as a TOML literal, else kept as a string
    (so `--train.eval_batches=none` gives "none", which a field that may be None reads as None)."""
    if not arg.startswith("--") or "=" not in arg:
        raise GptlabError(f"cannot read override {arg!r}", "write it as --section.key=value, e.g. --tokenizer.vocab_size=4096")
    key, raw = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


Override = str | tuple[str, Any]
"""`--section.key=value` as typed, or (dotted key, value) as a command-line flag already gave it."""


def read_override(arg: Override) -> tuple[list[str], Any]:
    """(keys, value) of either spelling of an override."""
    return parse_override(arg) if isinstance(arg, str) else (arg[0].split("."), arg[1])


def apply_overrides(raw: dict, overrides: list[Override]) -> dict:
    """Set each override in `raw`, in order: a later one wins."""
    for arg in overrides:
        keys, value = read_override(arg)
        node = raw
        for k in keys[:-1]:
            node = _child(node, k, arg)
        if isinstance(node, list):
            node[_list_index(node, keys[-1], arg)] = value
        else:
            node[keys[-1]] = value
    return raw


def _child(node, key: str, arg):
    """Step into a section, or into item N of a list of tables (`--data.sources.0.weight=2`)."""
    if isinstance(node, list):
        return node[_list_index(node, key, arg)]
    child = node.setdefault(key, {})
    if not isinstance(child, (dict, list)):
        raise GptlabError(f"override {arg!r}: {key} is not a section")
    return child


def _list_index(node: list, key: str, arg) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise GptlabError(f"override {arg!r}: {key!r} is not an index of a list of {len(node)} items", "count from 0")
    return int(key)


def _named(value: Any) -> str | None:
    """A profile or preset name, None where it is unset or spelled "none"."""
    return None if not value or (isinstance(value, str) and value.lower() == NONE) else value


def _resolve_profile(raw: dict) -> dict:
    """Lay the profile's settings under the config's own: what the file or an override sets wins."""
    name = _named(raw.get("profile"))
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
    if not isinstance(model, dict) or not _named(model.get("preset")):
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


def load_config(path: str | Path | None = None, overrides: list[Override] | None = None, base: dict | None = None) -> Config:
    """Read a TOML file (or nothing), apply overrides in order, validate. `base`, a dict of sections, lies under
    the file (`gptlab sample` starts from the run's own [sample] section)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"config file not found: {path}", "check the path given to --config")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise GptlabError(f"config file {path} is not UTF-8 text (binary, or another encoding)", "give a TOML file saved as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise GptlabError(f"config file {path} is not valid TOML: {e}") from None
    for section, settings in (base or {}).items():
        if isinstance(raw.get(section, {}), dict):
            raw[section] = {**settings, **raw.get(section, {})}
    return config_from_dict(apply_overrides(raw, overrides or []))


def config_to_dict(config: BaseModel) -> dict:
    """Every field as plain JSON-ready data, None included (see save_config for TOML)."""
    return config.model_dump(mode="json")


def _spell_none(obj):
    if obj is None:
        return NONE
    if isinstance(obj, dict):
        return {k: _spell_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_spell_none(v) for v in obj]
    return obj


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as TOML, atomically; every field is written, None as "none" (TOML has no null),
    so load_config reads back exactly this config."""
    atomic_write_text(path, config_to_toml(config))


def config_to_toml(config: BaseModel) -> str:
    """The TOML that save_config writes."""
    return tomli_w.dumps(_spell_none(config_to_dict(config)))


# --------------------------------------------------------------------------- describing the schema


def describe_keys(section: str | None = None) -> list[dict]:
    """Every config key (`section.key`; a list of tables' fields as `section.key[].field`) with its type, default
    and description, taken from the schema itself: what `gptlab config` lists."""
    if section is not None and section not in _SECTIONS:
        raise GptlabError(f"unknown config section {section!r}", f"choose one of: {', '.join(_SECTIONS)}")
    rows = [] if section else [_row("profile", Config.model_fields["profile"])]
    for name in [section] if section else list(_SECTIONS):
        rows += _rows(_SECTIONS[name], name)
    return rows


def _rows(model: type[BaseModel], prefix: str) -> list[dict]:
    rows = []
    for name, field in model.model_fields.items():
        rows.append(_row(f"{prefix}.{name}", field))
        item = typing.get_args(field.annotation)[0] if typing.get_origin(field.annotation) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):
            rows += _rows(item, f"{prefix}.{name}[]")
    return rows


def _row(key: str, field) -> dict:
    default = "(required)" if field.is_required() else field.default
    return {"key": key, "type": _type_name(field.annotation), "default": NONE if default is None else default,
            "description": field.description or ""}


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return NONE
    if origin is Literal:
        return "|".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


_SECTIONS: dict[str, type[BaseModel]] = {name: f.annotation for name, f in Config.model_fields.items()
                                         if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def format_keys(section: str | None = None) -> str:
    """describe_keys as text: `key  type = default` and the description under it."""
    rows = describe_keys(section)
    width = max(len(r["key"]) for r in rows)
    show = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)  # noqa: E731
    return "\n".join(f"{r['key']:<{width}}  {r['type']} = {show(r['default'])}\n{'':<{width}}  {r['description']}" for r in rows)
