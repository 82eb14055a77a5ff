"""gptlab GPT <-> the Hugging Face architectures it can become: Llama, Arcee, GPT-2 and Mixtral.

A family says which [model] configs it can express, writes the transformers
config.json for one, and renames (and reshapes) the weights both ways:

    gptlab                          Llama (LlamaForCausalLM)             GPT-2 (GPT2LMHeadModel)
    tok_emb                         model.embed_tokens                   transformer.wte
    positions.table                 (RoPE, no table)                     transformer.wpe
    blocks.i.norm1                  model.layers.i.input_layernorm       transformer.h.i.ln_1
    blocks.i.attn.qkv  [Q;K;V]      self_attn.{q,k,v}_proj               attn.c_attn (Conv1D: transposed)
    blocks.i.attn.proj              self_attn.o_proj                     attn.c_proj (transposed)
    blocks.i.norm2                  post_attention_layernorm             ln_2
    blocks.i.mlp.fc    [gate;up]    mlp.{gate,up}_proj                   mlp.c_fc (transposed)
    blocks.i.mlp.proj               mlp.down_proj                        mlp.c_proj (transposed)
    norm_f                          model.norm                           transformer.ln_f
    lm_head                         lm_head (absent when tied)           lm_head (absent when tied)

Arcee (ArceeForCausalLM, transformers >= 4.53) is Llama with an ungated MLP
(up_proj -> activation -> down_proj): it carries gptlab's RMSNorm + RoPE runs
with a plain relu/gelu/silu/relu2 MLP, the default [model] and the tiny-* presets.

Mixtral (MixtralForCausalLM) is Llama with MoE parts for MLPs: blocks.i.moe.router is
block_sparse_moe.gate, and expert e of blocks.i.moe.fc [E, gate;up, D] / proj [E, D, F] is
block_sparse_moe.experts.e.w1 (gate), w3 (up) and w2 (down).

gptlab's RoPE already rotates the two halves of each head (the layout
transformers' Llama uses), so q/k need no permutation for Hugging Face; GGUF
wants the interleaved layout and permutes them itself (llamacpp.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.model.blocks import parse_block

StateDict = dict[str, torch.Tensor]


class Family:
    """One Hugging Face architecture. Subclasses fill in the tables and the two weight maps."""

    name: str = ""  # as users know it
    architecture: str = ""  # config.json "architectures"
    model_type: str = ""
    # [model] key -> the values this architecture has; anything else blocks the export
    allowed: dict[str, tuple] = {}
    # the block layouts it has (model/blocks.py: a layout name or a block string)
    blocks: tuple[str, ...] = ("pre",)
    # further shape constraints: (check(cfg) -> True when fine, the blocker as "model.key=value" for that cfg)
    shape_checks: list[tuple[Callable[[ModelConfig], bool], Callable[[ModelConfig], str]]] = []

    def blockers(self, cfg: ModelConfig) -> list[str]:
        """Every `model.key=value` of cfg this architecture cannot express (empty: it can)."""
        found = []
        layouts = [parse_block(block) for block in self.blocks]
        if cfg.layout not in layouts:  # the block's layout first: it is the largest difference
            known = {token for layout in layouts for branch in layout for token in branch}
            foreign = sorted({token for branch in cfg.layout for token in branch} - known)
            found.append(f"model.block={_fmt(cfg.block)}" + (f" (its {', '.join(foreign)})" if foreign else ""))
        found += [f"model.{key}={_fmt(getattr(cfg, key))}" for key, ok in self.allowed.items() if getattr(cfg, key) not in ok]
        return found + [blocker(cfg) for fits, blocker in self.shape_checks if not fits(cfg)]

    def hf_config(self, cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict:
        raise NotImplementedError

    def to_hf(self, sd: StateDict, cfg: ModelConfig) -> StateDict:
        raise NotImplementedError

    def config_from_hf(self, hf: dict) -> ModelConfig:
        raise NotImplementedError

    def from_hf(self, hf_sd: StateDict, cfg: ModelConfig) -> StateDict:
        raise NotImplementedError


def _fmt(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _norm_params(sd: StateDict, prefix: str, cfg: ModelConfig, with_bias: bool) -> dict[str, torch.Tensor]:
    """A norm's weight (and bias), with the identity filled in where gptlab has none (norm_affine/bias off)."""
    out = {"weight": sd.get(f"{prefix}.weight", torch.ones(cfg.d_model))}
    if with_bias:
        out["bias"] = sd.get(f"{prefix}.bias", torch.zeros(cfg.d_model))
    return out


def _linear_params(sd: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {part: sd[f"{prefix}.{part}"] for part in ("weight", "bias") if f"{prefix}.{part}" in sd}


def _common_config(cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }


def _require(hf: dict, key: str, source: str):
    if key not in hf:
        raise GptlabError(f"{source} lacks {key!r}", "give a folder saved by transformers' save_pretrained")
    return hf[key]


# --------------------------------------------------------------------------- Llama


class Llama(Family):
    name, architecture, model_type = "Llama", "LlamaForCausalLM", "llama"
    # SwiGLU is Llama's MLP; GeGLU is the same with hidden_act="gelu" (exact GELU, as gptlab's).
    allowed = {"norm": ("rmsnorm",), "mask": ("causal",), "position": ("rope",), "mlp": ("swiglu", "geglu"),
               "qk_norm": (False,)}
    activations = {"swiglu": "silu", "geglu": "gelu"}  # gptlab mlp -> hidden_act
    mlp_in = ("gate_proj", "up_proj")  # the halves of gptlab's fused mlp.fc, in order
    default_act = "silu"  # transformers' default hidden_act

    def hf_config(self, cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **_common_config(cfg, token_ids),
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ff_dim,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": self.activations[cfg.mlp],
            "max_position_embeddings": cfg.context_length,
            "rms_norm_eps": cfg.norm_eps,
            # transformers >= 5 reads rope_parameters, earlier versions (and llama.cpp's converter) rope_theta
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias,
            "attention_dropout": 0.0,
            "mlp_bias": cfg.bias,
            "pretraining_tp": 1,
        }

    def to_hf(self, sd: StateDict, cfg: ModelConfig) -> StateDict:
        q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        out = {"model.embed_tokens.weight": sd["tok_emb.weight"]}
        for i in range(cfg.n_layer):
            g, h = f"blocks.{i}.", f"model.layers.{i}."
            for part, tensor in _linear_params(sd, g + "attn.qkv").items():
                for name, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv])):
                    out[f"{h}self_attn.{name}.{part}"] = piece
            out |= {f"{h}self_attn.o_proj.{p}": t for p, t in _linear_params(sd, g + "attn.proj").items()}
            out |= self.mlp_to_hf(sd, g, h, cfg)
            out[f"{h}input_layernorm.weight"] = _norm_params(sd, g + "norm1", cfg, False)["weight"]
            out[f"{h}post_attention_layernorm.weight"] = _norm_params(sd, g + "norm2", cfg, False)["weight"]
        out["model.norm.weight"] = _norm_params(sd, "norm_f", cfg, False)["weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        return out

    def mlp_to_hf(self, sd: StateDict, g: str, h: str, cfg: ModelConfig) -> StateDict:
        """Block g's feed-forward weights under layer h's transformers names."""
        out = {}
        for part, tensor in _linear_params(sd, g + "mlp.fc").items():
            out |= {f"{h}mlp.{name}.{part}": piece for name, piece in zip(self.mlp_in, tensor.chunk(len(self.mlp_in)))}
        return out | {f"{h}mlp.down_proj.{p}": t for p, t in _linear_params(sd, g + "mlp.proj").items()}

    def mlp_from_hf(self, take, g: str, h: str, cfg: ModelConfig) -> StateDict:
        parts = ("weight", "bias") if cfg.bias else ("weight",)
        out = {f"{g}mlp.fc.{p}": torch.cat([take(f"{h}mlp.{name}.{p}") for name in self.mlp_in]) for p in parts}
        return out | {f"{g}mlp.proj.{p}": take(f"{h}mlp.down_proj.{p}") for p in parts}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        src = "config.json"
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise GptlabError(f"RoPE scaling {rope_type!r} cannot be expressed by gptlab's RoPE", "import a model with plain RoPE (rope_type default)")
        act = hf.get("hidden_act", self.default_act)
        mlp = {v: k for k, v in self.activations.items()}.get(act)
        if mlp is None:
            raise GptlabError(f"hidden_act={act!r} cannot be expressed by gptlab's {self.name} MLP",
                              f"import a model whose hidden_act is one of: {', '.join(self.activations.values())}")
        bias = bool(hf.get("attention_bias", False))
        if bool(hf.get("mlp_bias", False)) != bias:
            raise GptlabError("attention_bias and mlp_bias differ, which gptlab's single model.bias cannot express",
                              "import a model with biases everywhere or nowhere")
        d_model, n_head = _require(hf, "hidden_size", src), _require(hf, "num_attention_heads", src)
        head_dim = hf.get("head_dim") or d_model // n_head
        return ModelConfig(
            vocab_size=_require(hf, "vocab_size", src), context_length=hf.get("max_position_embeddings", 2048),
            n_layer=_require(hf, "num_hidden_layers", src), d_model=d_model, n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_size=None if head_dim * n_head == d_model else head_dim,
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope",
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), mlp=mlp,
            d_ff=_require(hf, "intermediate_size", src), bias=bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        )

    def from_hf(self, hf_sd: StateDict, cfg: ModelConfig) -> StateDict:
        take = _taker(hf_sd)
        out = {"tok_emb.weight": take("model.embed_tokens.weight")}
        parts = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.n_layer):
            g, h = f"blocks.{i}.", f"model.layers.{i}."
            for p in parts:
                out[f"{g}attn.qkv.{p}"] = torch.cat([take(f"{h}self_attn.{n}_proj.{p}") for n in "qkv"])
                out[f"{g}attn.proj.{p}"] = take(f"{h}self_attn.o_proj.{p}")
            out |= self.mlp_from_hf(take, g, h, cfg)
            out[f"{g}norm1.weight"] = take(f"{h}input_layernorm.weight")
            out[f"{g}norm2.weight"] = take(f"{h}post_attention_layernorm.weight")
        out["norm_f.weight"] = take("model.norm.weight")
        out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
        return out


class Arcee(Llama):
    name, architecture, model_type = "Arcee", "ArceeForCausalLM", "arcee"
    allowed = {**Llama.allowed, "mlp": ("gelu", "relu", "silu", "relu2")}
    activations = {"gelu": "gelu", "relu": "relu", "silu": "silu", "relu2": "relu2"}  # transformers' exact GELU, relu(x)^2
    mlp_in = ("up_proj",)
    default_act = "relu2"


# --------------------------------------------------------------------------- Mistral


class Mistral(Llama):
    """Llama whose every layer sees the last `sliding_window` tokens (MistralForCausalLM): a run with
    model.mask = "window". transformers' window, kv_idx > q_idx - sliding_window, is gptlab's q - k < window.
    Mistral's attention and MLP have no biases."""

    name, architecture, model_type = "Mistral", "MistralForCausalLM", "mistral"
    allowed = {**Llama.allowed, "mask": ("window",), "bias": (False,)}

    def hf_config(self, cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict:
        config = super().hf_config(cfg, token_ids)
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):  # not Mistral's keys
            del config[key]
        return config | {"sliding_window": cfg.window}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        cfg = super().config_from_hf(hf)
        window = hf.get("sliding_window")  # null: every layer sees the whole context (Mistral 7B v0.2 onwards)
        return cfg if window is None else cfg.model_copy(update={"mask": "window", "window": window})


# --------------------------------------------------------------------------- Mixtral


class Mixtral(Llama):
    """Llama with a mixture of experts in place of the MLP: "Norm->Attn->+->Norm->MoE->+" blocks.

    transformers' checkpoint layout (what save_pretrained writes, in version 5 too, which fuses the experts
    in memory only): block_sparse_moe.gate is the router, experts.E.w1 / w3 / w2 each expert's gate, up
    and down. Its routing is gptlab's (softmax over all experts, top k, renormalised). gptlab's capacity
    (moe_capacity) applies in training only, so a capped run computes as Mixtral does; shared experts have
    no place in it.
    """

    name, architecture, model_type = "Mixtral", "MixtralForCausalLM", "mixtral"
    allowed = {**Llama.allowed, "bias": (False,), "moe_shared": (0,)}
    blocks = ("Norm->Attn->+->Norm->MoE->+",)

    def hf_config(self, cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict:
        config = super().hf_config(cfg, token_ids)
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):  # Llama's, not Mixtral's
            del config[key]
        return config | {
            "intermediate_size": cfg.moe_d_ff or cfg.ff_dim,
            "num_local_experts": cfg.moe_experts,
            "num_experts_per_tok": cfg.moe_topk,
            # transformers' balancing loss sums f_i over the k choices: k times gptlab's, so its weight is 1/k of ours
            "router_aux_loss_coef": cfg.moe_aux_weight / cfg.moe_topk,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }

    def mlp_to_hf(self, sd: StateDict, g: str, h: str, cfg: ModelConfig) -> StateDict:
        out = {f"{h}block_sparse_moe.gate.weight": sd[f"{g}moe.router.weight"]}
        for e, (fc, proj) in enumerate(zip(sd[f"{g}moe.fc.weight"], sd[f"{g}moe.proj.weight"])):
            gate, up = fc.chunk(2)
            expert = f"{h}block_sparse_moe.experts.{e}."
            out |= {f"{expert}w1.weight": gate, f"{expert}w3.weight": up, f"{expert}w2.weight": proj}
        return out

    def mlp_from_hf(self, take, g: str, h: str, cfg: ModelConfig) -> StateDict:
        expert = f"{h}block_sparse_moe.experts.{{}}.{{}}.weight"
        return {
            f"{g}moe.router.weight": take(f"{h}block_sparse_moe.gate.weight"),
            f"{g}moe.fc.weight": torch.stack([torch.cat([take(expert.format(e, "w1")), take(expert.format(e, "w3"))])
                                              for e in range(cfg.moe_experts)]),
            f"{g}moe.proj.weight": torch.stack([take(expert.format(e, "w2")) for e in range(cfg.moe_experts)]),
        }

    def config_from_hf(self, hf: dict) -> ModelConfig:
        src = "config.json"
        if hf.get("sliding_window") is not None:
            raise GptlabError(f"sliding_window={hf['sliding_window']} (attention over the last tokens only) is not "
                              "imported by gptlab's Mixtral", "import a Mixtral with sliding_window null")
        llama = super().config_from_hf(hf).model_dump()
        topk = _require(hf, "num_experts_per_tok", src)
        return ModelConfig(**{**llama, "block": self.blocks[0], "moe_experts": _require(hf, "num_local_experts", src),
                              "moe_topk": topk, "moe_aux_weight": hf.get("router_aux_loss_coef", 0.001) * topk})


# --------------------------------------------------------------------------- GPT-2


class GPT2(Family):
    name, architecture, model_type = "GPT-2", "GPT2LMHeadModel", "gpt2"
    # gptlab's GELU is the exact one: transformers' "gelu" (GPT-2's own "gelu_new" is the tanh approximation)
    allowed = {"norm": ("layernorm",), "mask": ("causal",), "position": ("learned",), "mlp": ("gelu",),
               "qk_norm": (False,)}
    shape_checks = [
        (lambda cfg: cfg.kv_heads == cfg.n_head, lambda cfg: f"model.n_kv_head={cfg.n_kv_head}"),
        (lambda cfg: cfg.head_dim * cfg.n_head == cfg.d_model, lambda cfg: f"model.head_size={cfg.head_size}"),
    ]
    # activations whose import is exact, and the tanh approximations imported as exact GELU
    exact_activations = ("gelu",)
    approximate_activations = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

    def hf_config(self, cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **_common_config(cfg, token_ids),
            "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ff_dim,
            "activation_function": "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }

    def to_hf(self, sd: StateDict, cfg: ModelConfig) -> StateDict:
        out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["positions.table.weight"]}
        # GPT-2 always has biases and affine norms: where gptlab has none, zeros and ones are the same function
        modules = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        for i in range(cfg.n_layer):
            g, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in modules.items():
                weight = sd[f"{g}{ours}.weight"]
                out[f"{h}{theirs}.weight"] = weight.t()  # Conv1D stores [in, out]
                out[f"{h}{theirs}.bias"] = sd.get(f"{g}{ours}.bias", torch.zeros(weight.size(0)))
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out |= {f"{h}{theirs}.{p}": t for p, t in _norm_params(sd, g + ours, cfg, True).items()}
        out |= {f"transformer.ln_f.{p}": t for p, t in _norm_params(sd, "norm_f", cfg, True).items()}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        return out

    def config_from_hf(self, hf: dict) -> ModelConfig:
        src = "config.json"
        act = hf.get("activation_function", "gelu_new")
        if act not in self.exact_activations + self.approximate_activations:
            raise GptlabError(f"activation_function={act!r} cannot be expressed by gptlab", "import a GPT-2 with a GELU MLP")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(key):
                raise GptlabError(f"{key}=true cannot be expressed by gptlab's attention", "import a plain GPT-2")
        if not hf.get("scale_attn_weights", True):
            raise GptlabError("scale_attn_weights=false cannot be expressed by gptlab's attention", "import a plain GPT-2")
        d_model = _require(hf, "n_embd", src)
        return ModelConfig(
            vocab_size=_require(hf, "vocab_size", src), context_length=_require(hf, "n_positions", src),
            n_layer=_require(hf, "n_layer", src), d_model=d_model, n_head=_require(hf, "n_head", src),
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
            mlp="gelu", d_ff=hf.get("n_inner") or 4 * d_model, bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=hf.get("initializer_range", 0.02),
        )

    def from_hf(self, hf_sd: StateDict, cfg: ModelConfig) -> StateDict:
        # The original GPT-2 files name tensors without the "transformer." prefix.
        hf_sd = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf_sd.items()}
        take = _taker(hf_sd)
        out = {"tok_emb.weight": take("transformer.wte.weight"), "positions.table.weight": take("transformer.wpe.weight")}
        modules = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        for i in range(cfg.n_layer):
            g, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in modules.items():
                out[f"{g}{ours}.weight"] = take(f"{h}{theirs}.weight").t()
                out[f"{g}{ours}.bias"] = take(f"{h}{theirs}.bias")
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                for p in ("weight", "bias"):
                    out[f"{g}{ours}.{p}"] = take(f"{h}{theirs}.{p}")
        for p in ("weight", "bias"):
            out[f"norm_f.{p}"] = take(f"transformer.ln_f.{p}")
        out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
        return out


def _taker(hf_sd: StateDict) -> Callable[[str], torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise GptlabError(f"the weights lack {name}", "give a complete checkpoint (all of its model*.safetensors files)")
        return hf_sd[name].float().contiguous()

    return take


# --------------------------------------------------------------------------- choosing


FAMILIES: list[Family] = [Llama(), Arcee(), Mistral(), GPT2(), Mixtral()]
BY_ARCHITECTURE: dict[str, Family] = {f.architecture: f for f in FAMILIES}


def family_for(cfg: ModelConfig) -> Family:
    """The architecture that expresses cfg exactly, or a GptlabError naming the option that blocks them all."""
    blockers = {f: f.blockers(cfg) for f in FAMILIES}
    for family, found in blockers.items():
        if not found:
            return family
    # Name an option every family refuses if there is one (a block's foreign parts differ by family: the
    # first family's words), else the first obstacle of the closest family, one that has the block's layout
    # if any does (a MoE run: Mixtral).
    def key(blocker: str) -> str:
        return blocker.split("=")[0]

    shared = [b for b in blockers[FAMILIES[0]] if all(key(b) in map(key, found) for found in blockers.values())]
    names = [f.name for f in FAMILIES]
    if shared:
        problem = f"{shared[0]} cannot be expressed by {', '.join(names[:-1])} or {names[-1]}"
    else:
        closest = min(FAMILIES, key=lambda f: (key(blockers[f][0]) == "model.block", len(blockers[f])))
        problem = f"{blockers[closest][0]} cannot be expressed by {closest.name}, the closest of {', '.join(names[:-1])} and {names[-1]}"
    raise GptlabError(
        problem,
        "export runs shaped like Llama (rmsnorm, pre-norm, rope, swiglu/geglu), Arcee (the same with a "
        "relu/gelu/silu/relu2 MLP), Mistral (Llama's shape with model.mask=window), GPT-2 (layernorm, pre-norm, "
        "learned positions, gelu, one K/V head per query head) or Mixtral (Llama's shape with MoE for MLP: block \"Norm->Attn->+->Norm->MoE->+\", no shared experts, no bias)",
    )


def family_of_hf(hf: dict, folder: str) -> Family:
    architectures = hf.get("architectures") or []
    for name in architectures:
        if name in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[name]
    by_type = {f.model_type: f for f in FAMILIES}.get(hf.get("model_type"))
    if by_type is not None and not architectures:
        return by_type
    shown = ", ".join(architectures) or hf.get("model_type") or "none given"
    raise GptlabError(
        f"{folder} holds a {shown} model, which gptlab cannot import",
        f"gptlab imports {', '.join(f.architecture for f in FAMILIES[:-1])} and {FAMILIES[-1].architecture} checkpoints",
    )
