"""`gptlab export RUN --gguf FILE`: one GGUF file for llama.cpp / Ollama, through the `gguf` package.

Runs of RMSNorm, pre-norm and RoPE without biases, with an MLP one of llama.cpp's architectures
computes around them: SwiGLU (`llama`) or relu2 (`arcee`, llama.cpp's src/models/arcee.cpp: up ->
relu(x)^2 -> down); a Mixtral-shaped run (MoE of SwiGLU experts) is `llama` with expert tensors
(ffn_gate_inp, ffn_{gate,up,down}_exps, expert_count, expert_used_count), as llama.cpp runs Mixtral. A GELU or other MLP has no such llama.cpp architecture (its GELU models, gpt2,
starcoder2, phi2, gptneox, all use LayerNorm), so it is refused with the setting to train with.
The tensors are the Hugging Face Llama/Arcee ones renamed by gguf's own name map (token_embd,
blk.N.attn_q, ..., output_norm, output) and, as llama.cpp's
convert_hf_to_gguf.py does, q and k permuted from the rotate-halves layout back to the
interleaved pairs llama.cpp's RoPE rotates. The tokenizer goes in as a byte-level BPE
("gpt2" model, "gpt-2" pre-tokenizer): tokens, token types (gptlab's special tokens,
the chat tokens among them, as CONTROL: never produced from text, not printed), merges,
start/end ids. A chat run's file also carries the chat template (tokenizer.chat_template)
and <|end|> as the end-of-turn token (tokenizer.ggml.eot_token_id), which llama.cpp stops
generating at. llama.cpp renders that template exactly only with --jinja: without it, its
built-in guess takes a template holding <|assistant|> and <|end|> for Phi-3's, which adds a
newline after each role token and <|end|> -- not what the model was trained on.
Weights stay float32 (quantize afterwards with llama.cpp's llama-quantize).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.export.families import Llama, Mixtral, family_for
from gptlab.export.hf import hf_state_dict, load_for_export
from gptlab.export.hf_tokenizer import chat_end_id, special_token_ids
from gptlab.generate import start_id
from gptlab.tokenizer.chat import CHAT_TEMPLATE


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptlabError("GGUF export needs the gguf package", "pip install 'gptlab[export]'") from None
    return gguf


def permute_for_llamacpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's two halves -> interleaved pairs (rows; works for biases too)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# gptlab's model.mlp -> the llama.cpp architecture (gguf.MODEL_ARCH) that computes it between RMSNorm and RoPE attention
ARCHITECTURES = {"swiglu": "LLAMA", "relu2": "ARCEE"}
OR_HF = "or export this run with --to hf"


def check_gguf_exportable(cfg, tokenizer) -> str:
    """The llama.cpp architecture (a gguf.MODEL_ARCH name) that runs cfg, or a GptlabError naming the setting to train with."""
    family = family_for(cfg)  # refuses what no Hugging Face family can express
    if not isinstance(family, Llama):
        raise GptlabError(f"GGUF export writes llama.cpp's llama or arcee architecture; this run is {family.name}-shaped "
                          f"(model.norm={cfg.norm}, model.position={cfg.position})",
                          f"train with --model.norm=rmsnorm --model.position=rope --model.mlp=swiglu for GGUF, {OR_HF}")
    if cfg.mask != "causal":  # a Mistral-shaped run: llama.cpp's llama architecture has no sliding window
        raise GptlabError(f"model.mask={cfg.mask} cannot be expressed by llama.cpp's llama or arcee architecture "
                          "(every layer sees the whole context)", f"train with --model.mask=causal for GGUF, {OR_HF}")
    if cfg.bias:
        raise GptlabError("model.bias=true cannot be expressed by llama.cpp's llama or arcee architecture",
                          f"train with --model.bias=false for GGUF, {OR_HF}")
    if cfg.mlp not in ARCHITECTURES:
        mlps = " or ".join(f"--model.mlp={mlp}" for mlp in ARCHITECTURES)
        raise GptlabError(f"model.mlp={cfg.mlp} cannot be expressed by llama.cpp: its RMSNorm + RoPE architectures have a "
                          f"{' or '.join(f'{mlp} ({arch.lower()})' for mlp, arch in ARCHITECTURES.items())} MLP",
                          f"train with {mlps} for GGUF, {OR_HF}")
    if tokenizer.kind not in ("bpe", "gpt2"):
        raise GptlabError(f"a {tokenizer.kind} tokenizer cannot be written into GGUF by gptlab",
                          f"train the tokenizer with --tokenizer.kind=bpe (byte-level BPE) for GGUF, {OR_HF}")
    return ARCHITECTURES[cfg.mlp]


def stack_experts(hf_tensors: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """Mixtral's experts.E.w1/w2/w3 of each layer as one [experts, out, in] tensor each, under the merged names
    gguf maps to ffn_gate_exps / ffn_down_exps / ffn_up_exps (what convert_hf_to_gguf.py does)."""
    out = {name: t for name, t in hf_tensors.items() if ".experts." not in name}
    for i in range(m.n_layer):
        for w in ("w1", "w2", "w3"):
            out[f"model.layers.{i}.block_sparse_moe.experts.{w}.weight"] = torch.stack(
                [hf_tensors[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(m.moe_experts)])
    return out


def _vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(token strings by id, their GGUF token types, merges "a b") of a byte-level BPE tokenizer."""
    gguf = _gguf()
    d = tokenizer.to_file_dict()
    specials = {t["id"]: t["content"] for t in d.get("added_tokens", [])}
    by_id = {i: t for t, i in d["model"]["vocab"].items()} | specials
    tokens = [by_id[i] for i in range(tokenizer.vocab_size)]
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(tokenizer.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return tokens, types, merges


def export_gguf(run: str | Path, path: str | Path, *, which: str = "best", force: bool = False) -> dict:
    """Write RUN's best (or last) checkpoint as a float32 GGUF file for llama.cpp."""
    gguf = _gguf()
    path = Path(path)
    if path.exists() and not force:
        raise GptlabError(f"{path} already exists", "choose another --gguf file, or pass --force to replace it")
    model, tokenizer, cfg, checkpoint, info = load_for_export(run, which)
    m = cfg.model
    arch = getattr(gguf.MODEL_ARCH, check_gguf_exportable(m, tokenizer))

    names = gguf.get_tensor_name_map(arch, m.n_layer)
    tensors = {}
    family = family_for(m)
    hf_tensors = hf_state_dict(model, family)
    if isinstance(family, Mixtral):
        hf_tensors = stack_experts(hf_tensors, m)
    for hf_name, tensor in hf_tensors.items():
        if ".q_proj." in hf_name:
            tensor = permute_for_llamacpp(tensor, m.n_head)
        elif ".k_proj." in hf_name:
            tensor = permute_for_llamacpp(tensor, m.kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # a gptlab bug, not a user error: every Llama/Arcee tensor has a llama.cpp name
            raise RuntimeError(f"no GGUF name for {hf_name}")
        tensors[name] = tensor.float().numpy()

    tokens, types, merges = _vocabulary(tokenizer)
    start = start_id(tokenizer, cfg.data)
    ids = special_token_ids(tokenizer, start)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(path.stem)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_vocab_size(m.vocab_size)
        writer.add_context_length(m.context_length)
        writer.add_embedding_length(m.d_model)
        writer.add_block_count(m.n_layer)
        if isinstance(family, Mixtral):  # llama.cpp's llama architecture with expert tensors (as its converter writes Mixtral)
            writer.add_feed_forward_length(m.moe_d_ff or m.ff_dim)
            writer.add_expert_count(m.moe_experts)
            writer.add_expert_used_count(m.moe_topk)
        else:
            writer.add_feed_forward_length(m.ff_dim)
        writer.add_head_count(m.n_head)
        writer.add_head_count_kv(m.kv_heads)
        writer.add_rope_dimension_count(m.head_dim)
        writer.add_rope_freq_base(m.rope_theta)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        if m.head_dim * m.n_head != m.d_model:  # llama.cpp assumes d_model / n_head otherwise
            writer.add_key_length(m.head_dim)
            writer.add_value_length(m.head_dim)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
            if ids[role] is not None:
                add(ids[role])
        writer.add_add_bos_token(start is not None)  # llama.cpp puts bos_token_id (the start token) before a prompt
        writer.add_add_eos_token(False)
        end = chat_end_id(tokenizer)
        if end is not None:  # a chat run: its template, and the end of a reply as the end of a turn
            writer.add_chat_template(CHAT_TEMPLATE)
            writer.add_eot_token_id(end)
            if ids["eos"] is None:  # nothing else would stop generation
                writer.add_eos_token_id(end)
        for name, array in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(array))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(path), "checkpoint": str(checkpoint), "tensors": len(tensors), "bytes": path.stat().st_size,
            "tokens": info.get("tokens")}
