"""The exported GGUF runs in llama.cpp itself (llama-cpp-python): same prompt tokens, same logits, same greedy
continuation as gptlab; a chat run's file chats through llama-cpp-python's handler built from its template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptlab.config import SampleConfig
from gptlab.export import export_gguf
from gptlab.generate import chat_prompt, chat_reply, prompt_ids, sample_tokens
from gptlab.runs import load_run
from gptlab.tokenizer import load_tokenizer

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed (it compiles llama.cpp: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python)",
)
pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
TEXT = "Once upon a time"


def load_gguf(path, n_ctx: int):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx, logits_all=True, verbose=False, seed=0)


@pytest.mark.parametrize("name,model", [
    ("llamacpp-swiglu", LLAMA),  # llama.cpp's llama architecture
    ("llamacpp-relu2-gqa", dict(norm="rmsnorm", position="rope", mlp="relu2", n_kv_head=2)),  # its arcee
])
def test_llamacpp_continues_a_prompt_as_gptlab_does(make_export_run, tmp_path, name, model):
    run = make_export_run(name, **model)
    export_gguf(run, tmp_path / "model.gguf")
    gpt, tokenizer, cfg = load_run(run)
    llm = load_gguf(tmp_path / "model.gguf", cfg.model.context_length)

    ids = prompt_ids(tokenizer, TEXT, cfg.data)  # the start token (EOS here), then the text
    assert llm.tokenize(TEXT.encode(), add_bos=True) == ids

    llm.eval(ids)
    with torch.no_grad():
        ours = gpt(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - ours).max() < 1e-2  # float32 both; summation order differs

    new, _ = sample_tokens(gpt, [ids], 24, temperature=0)
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        theirs.append(token)
        if len(theirs) == 24:
            break
    assert theirs == new[0]


def test_llamacpp_chats_with_the_template_the_gguf_carries(make_export_run, chat_tokenizer, tmp_path):
    run = make_export_run("chat-llama", tokenizer=load_tokenizer(chat_tokenizer), context_length=256, **LLAMA)
    export_gguf(run, tmp_path / "chat.gguf")
    gpt, tokenizer, cfg = load_run(run)
    llm = load_gguf(tmp_path / "chat.gguf", 256)
    assert llm.chat_format == "chat_template.default"  # the handler built from tokenizer.chat_template

    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Write a story about a cat."}]
    prompt = chat_prompt(tokenizer, messages, 256, 20)
    # the handler's formatter (built as llama-cpp-python builds it from the file) renders gptlab's prompt ids
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    rendered = formatter(messages=messages).prompt
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt.ids
    end = tokenizer.token_to_id("<|end|>")
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end)  # a reply ends at <|end|>, as gptlab's does

    reply = llm.create_chat_completion(messages, max_tokens=20, temperature=0, top_k=1)["choices"][0]["message"]["content"]
    ours = chat_reply(gpt, tokenizer, messages, SampleConfig(temperature=0, max_new_tokens=20))
    # random weights make bytes that are not UTF-8: llama-cpp-python drops them, gptlab shows U+FFFD
    assert reply == ours.replace("\ufffd", "")
