"""A chat run exported: transformers' apply_chat_template gives gptlab's prompt ids, generate() stops at <|end|>, GGUF carries the template."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.config import SampleConfig
from gptlab.export import export_gguf, export_hf, import_hf
from gptlab.generate import chat_reply
from gptlab.runs import load_run
from gptlab.tokenizer import load_tokenizer
from gptlab.tokenizer.chat import CHAT_TEMPLATE, CHAT_TOKENS, ChatFormat

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
CONVERSATIONS = [
    [{"role": "user", "content": "Write a story about a cat."}],
    [{"role": "system", "content": "You tell short stories.\nKeep them kind."},
     {"role": "user", "content": "  Tell me about Lily  and her ball.\n\nMake it sad."},
     {"role": "assistant", "content": "Lily had a red ball. It rolled away!\nShe cried."},
     {"role": "user", "content": "Où est le chat? 🐈 naïve café — «bien sûr» 日本語"},
     {"role": "assistant", "content": ""},
     {"role": "user", "content": "\tOnce more, with <b>tags</b> and\r\nCRLF "}],
]


@pytest.fixture(scope="module")
def chat_run(make_export_run, chat_tokenizer):
    return make_export_run("chat-llama", tokenizer=load_tokenizer(chat_tokenizer), context_length=256, **LLAMA)


@pytest.fixture(scope="module")
def exported(chat_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_export") / "hf"
    export_hf(chat_run, out)
    return out


def test_apply_chat_template_gives_the_ids_gptlab_prompts_with(chat_run, exported):
    _, tokenizer, _ = load_run(chat_run)
    fmt = ChatFormat.of(tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    config = json.loads((exported / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and config["additional_special_tokens"] == list(CHAT_TOKENS)
    for messages in CONVERSATIONS:
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == fmt.prompt(messages)
        # without the generation prompt: the rendered conversation, as training saw it
        assert hf.apply_chat_template(messages, return_dict=True)["input_ids"] == fmt.render(messages)[0]
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"
        assert hf.decode(ids) == tokenizer.decode(ids) == text
    # the chat tokens are special: a decoded reply drops them
    assert hf.decode(fmt.prompt(CONVERSATIONS[0]), skip_special_tokens=True) == CONVERSATIONS[0][0]["content"]


def _end_at(lm_head: torch.nn.Module, end_id: int, call: int):
    """Make the model's `call`-th forward pass (the prefill is the first) pick <|end|>: a reply of call - 1 tokens."""
    calls = {"n": 0}

    def hook(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] == call:
            logits = logits.clone()
            logits[..., end_id] += 1e4
        return logits

    return lm_head.register_forward_hook(hook)


def test_transformers_generate_stops_at_end_as_gptlab_chat_does(chat_run, exported):
    ours, tokenizer, _ = load_run(chat_run)
    fmt = ChatFormat.of(tokenizer)
    generation = json.loads((exported / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == [tokenizer.eos_id, fmt.end_id]  # the document end, and the end of a reply

    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    messages = CONVERSATIONS[1]
    inputs = hf.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    handle = _end_at(theirs.lm_head, fmt.end_id, 7)
    try:
        out = theirs.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    finally:
        handle.remove()
    assert out[-1] == fmt.end_id and len(out) == 7  # stopped at <|end|>, not at max_new_tokens

    handle = _end_at(ours.lm_head, fmt.end_id, 7)
    try:
        reply = chat_reply(ours, tokenizer, messages, SampleConfig(temperature=0, max_new_tokens=20))
    finally:
        handle.remove()
    assert reply == hf.decode(out, skip_special_tokens=True) == tokenizer.decode(out[:-1])


def test_a_chat_export_imports_back_as_a_chat_run(chat_run, exported, tmp_path):
    result = import_hf(exported, tmp_path / "again")
    _, tokenizer, _ = load_run(chat_run)
    again = load_tokenizer(tmp_path / "again" / "tokenizer.json")
    assert again.checksum == tokenizer.checksum and result["vocab_size"] == tokenizer.vocab_size
    assert ChatFormat.of(again).prompt(CONVERSATIONS[1]) == ChatFormat.of(tokenizer).prompt(CONVERSATIONS[1])


def test_a_base_export_has_no_chat_template(make_export_run, tmp_path):
    export_hf(make_export_run("base-for-chat-export", **LLAMA), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" not in config and "additional_special_tokens" not in config
    assert isinstance(json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"], int)
    assert "## Chat" not in (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")


def test_the_model_card_shows_how_to_chat(exported):
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert "## Chat" in card and "apply_chat_template(messages, add_generation_prompt=True" in card and "--jinja" in card


def test_gguf_carries_the_chat_template_and_ends_a_turn_at_end(chat_run, make_export_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    _, tokenizer, _ = load_run(chat_run)
    fmt = ChatFormat.of(tokenizer)
    export_gguf(chat_run, tmp_path / "chat.gguf")
    meta = {name: field.contents() for name, field in gguf.GGUFReader(tmp_path / "chat.gguf").fields.items()}
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["tokenizer.ggml.eot_token_id"] == fmt.end_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id  # the document end stays the EOS
    types, tokens = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.tokens"]
    for token in CHAT_TOKENS:  # control tokens: never made from text, not printed
        assert types[tokenizer.token_to_id(token)] == int(gguf.TokenType.CONTROL) and tokens[tokenizer.token_to_id(token)] == token
    assert types[tokenizer.encode("cat")[0]] == int(gguf.TokenType.NORMAL)

    export_gguf(make_export_run("base-for-chat-export", **LLAMA), tmp_path / "base.gguf")
    base = gguf.GGUFReader(tmp_path / "base.gguf").fields
    assert "tokenizer.chat_template" not in base and "tokenizer.ggml.eot_token_id" not in base
