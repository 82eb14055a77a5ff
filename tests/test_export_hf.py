"""`gptlab export RUN --to hf DIR`: parity with transformers, the tokenizer files, the card, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_copy_with

from gptlab.cli import main
from gptlab.config import SampleConfig, TokenizerConfig
from gptlab.errors import GptlabError
from gptlab.export import export_hf
from gptlab.generate import generate
from gptlab.runs import load_run
from gptlab.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "Once upon a time there was a little cat named Tom. One day, Lily found a red ball!"

# (name, [model] settings, the transformers class that must load it)
VARIANTS = [
    ("llama-gqa-untied", dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, tie_embeddings=False), "LlamaForCausalLM"),
    ("llama-mqa-geglu-bias-headsize", dict(norm="rmsnorm", position="rope", mlp="geglu", n_kv_head=1, bias=True, head_size=16,
                                           rope_theta=500.0, norm_eps=1e-6), "LlamaForCausalLM"),
    ("arcee-gelu", dict(norm="rmsnorm", position="rope", mlp="gelu"), "ArceeForCausalLM"),
    ("arcee-relu2-no-gain", dict(norm="rmsnorm", position="rope", mlp="relu2", norm_affine=False, tie_embeddings=False),
     "ArceeForCausalLM"),
    ("gpt2-bias-tied", dict(norm="layernorm", position="learned", mlp="gelu", bias=True), "GPT2LMHeadModel"),
    ("gpt2-nobias-untied", dict(norm="layernorm", position="learned", mlp="gelu", bias=False, tie_embeddings=False),
     "GPT2LMHeadModel"),
]


def _hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name,model,architecture", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_exported_model_matches_gptlab(make_export_run, tmp_path, name, model, architecture, single_thread):
    run = make_export_run(name, **model)
    out = tmp_path / "hf"
    result = export_hf(run, out)
    assert result["architecture"] == architecture
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]

    ours, tokenizer, cfg = load_run(run)
    theirs, hf_tokenizer = _hf(out)
    assert type(theirs).__name__ == architecture

    # the tokenizer: same ids for the same text
    ids = tokenizer.encode(TEXT)
    assert hf_tokenizer.encode(TEXT, add_special_tokens=False) == ids
    assert hf_tokenizer.decode(ids) == TEXT

    # logits on the same tokens (fp32)
    x = torch.tensor([[tokenizer.eos_id, *ids]])
    with torch.no_grad():
        ours_logits, theirs_logits = ours(x)[0], theirs(x).logits
    assert ours_logits.std() > 0.5  # far from uniform, so agreement means something
    torch.testing.assert_close(theirs_logits, ours_logits, atol=1e-4, rtol=0)

    # greedy generation, each side encoding the prompt string its own default way
    assert _greedy_gptlab(ours, tokenizer, cfg) == _greedy_transformers(theirs, hf_tokenizer)


PROMPT = "Once upon a time"


def _greedy_gptlab(model, tokenizer, cfg, prompt: str = PROMPT) -> str:
    """`gptlab sample`'s greedy continuation of `prompt`."""
    return generate(model, tokenizer, [prompt], SampleConfig(temperature=0, max_new_tokens=24), data=cfg.data)[0]


def _greedy_transformers(model, hf_tokenizer, prompt: str = PROMPT) -> str:
    """transformers' greedy continuation of `prompt`, as a user writes it (the exported tokenizer's encoding and
    generation_config.json's defaults)."""
    inputs = hf_tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=24)[0, inputs["input_ids"].size(1):]
    text = hf_tokenizer.decode(out, skip_special_tokens=True)
    assert text  # something was generated, so equality means something
    return text


def test_exported_folder_contents(make_export_run, tmp_path):
    run = make_export_run("gpt2-bias-tied", norm="layernorm", position="learned", mlp="gelu", bias=True)
    out = tmp_path / "hf"
    export_hf(run, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]
    _, tokenizer, cfg = load_run(run)
    eos = tokenizer.eos_id
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["activation_function"]) == (tokenizer.vocab_size, 64, "gelu")
    assert config["eos_token_id"] == config["bos_token_id"] == eos  # no BOS: EOS starts a text, as in GPT-2
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos and generation["temperature"] == cfg.sample.temperature

    # the tokenizer puts the start token first, as every training document started; gptlab metadata rides along
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(TEXT)["input_ids"] == [eos, *tokenizer.encode(TEXT)]
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id) == (eos, eos)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["gptlab"]["kind"] == "bpe"

    # safetensors holds a tied matrix once (transformers ties it on load)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_model_card_describes_the_run(make_export_run, tmp_path):
    run = make_export_run("arcee-gelu", norm="rmsnorm", position="rope", mlp="gelu")
    (run / "eval.json").write_text(json.dumps({
        "checkpoint": "step_0000010", "datasets": [{"name": "val", "loss": 2.5, "perplexity": 12.18, "bpb": 0.91}],
        "hellaswag": {"items": 20, "acc": 0.25, "acc_norm": 0.3},
    }))
    try:
        export_hf(run, tmp_path / "hf")
    finally:
        (run / "eval.json").unlink()
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "ArceeForCausalLM" in card
    assert "| layers x width | 2 x 32 |" in card and "| MLP | gelu, hidden 128 |" in card
    assert "1,234 tokens seen" in card and "3.2500" in card  # tokens seen, validation loss
    assert "stories.txt" in card  # the data folder's source, from its meta.json
    assert str(tmp_path.parent) not in card and str(run.parent) not in card  # a local source by its file name only
    assert "| val | 2.5000 | 12.18 | 0.9100 |" in card and "acc_norm 0.3000" in card


def test_generate_on_the_exported_folder_does_not_warn(make_export_run, tmp_path, capfd):
    """generation_config.json sets one length (max_new_tokens): a max_length beside it made transformers warn
    "Both max_new_tokens and max_length seem to have been set" on every generate(max_new_tokens=...) call."""
    import warnings

    export_hf(make_export_run("arcee-gelu", norm="rmsnorm", position="rope", mlp="gelu"), tmp_path / "hf")
    model, hf_tokenizer = _hf(tmp_path / "hf")
    capfd.readouterr()
    inputs = hf_tokenizer(PROMPT, return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**inputs, max_new_tokens=5)
        model.generate(**inputs, max_new_tokens=5, do_sample=False)
        model.generate(**inputs, max_length=12)
    said = capfd.readouterr()
    assert not [str(w.message) for w in caught if "length" in str(w.message)]
    assert "max_length" not in said.err + said.out


def test_model_card_names_the_optimizer(make_export_run, tmp_path):
    run = run_copy_with(make_export_run("arcee-gelu", norm="rmsnorm", position="rope", mlp="gelu"), tmp_path / "muon",
                     "train", optimizer="muon")
    export_hf(run, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Muon" in card and "AdamW lr" not in card
    export_hf(make_export_run("arcee-gelu"), tmp_path / "hf-adamw")
    assert "AdamW lr" in (tmp_path / "hf-adamw" / "README.md").read_text()


def test_bf16_export_loads_in_bf16(make_export_run, tmp_path):
    run = make_export_run("llama-gqa-untied", norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, tie_embeddings=False)
    export_hf(run, tmp_path / "hf", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert model.dtype == torch.bfloat16


def test_char_tokenizer_exports(make_export_run, tmp_path, tiny_corpus_text):
    tok = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="char", bos_token="<BOS>"))
    run = run_copy_with(make_export_run("char-llama", tokenizer=tok, norm="rmsnorm", position="rope", mlp="swiglu"),
                     tmp_path / "run", add_bos=True)
    export_hf(run, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert hf_tokenizer(TEXT)["input_ids"][0] == tok.bos_id  # documents prepared with BOS: texts start with BOS
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)


# (the tokenizer's BOS, how the data was prepared, the token every text should start after)
START_RULES = [
    ("no-bos", {}, "<|endoftext|>"),  # the defaults: each document follows the EOS that ended the one before
    ("no-bos", {"add_eos": False}, None),  # nothing between documents: nothing before a prompt
    ("bos", {"add_bos": True}, "<s>"),
    ("bos", {}, "<|endoftext|>"),  # a BOS the data never used is not put before prompts
    ("bos", {"add_eos": False}, None),
]


@pytest.mark.parametrize("bos,data,start", START_RULES, ids=[f"{b}-{d}" for b, d, _ in START_RULES])
def test_one_start_token_rule_from_sampling_to_transformers(make_export_run, tmp_path, tiny_corpus_text, single_thread, capsys,
                                                            bos, data, start):
    """The same prompt string gives the same greedy text in `gptlab sample` and in transformers (the exported
    tokenizer's default encoding), and scoring starts a text as sampling starts a prompt."""
    from gptlab.evaluate import evaluate_text
    from gptlab.evaluate.hellaswag import HellaSwagItem, encode_item
    from gptlab.generate import prompt_ids

    tok = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="bpe", vocab_size=300, bos_token="<s>" if bos == "bos" else None))
    run = run_copy_with(make_export_run(f"start-{bos}", tokenizer=tok, norm="rmsnorm", position="rope", mlp="swiglu"),
                     tmp_path / "run", **data)
    export_hf(run, tmp_path / "hf")
    ours, tokenizer, cfg = load_run(run)
    theirs, hf_tokenizer = _hf(tmp_path / "hf")

    ids = prompt_ids(tokenizer, PROMPT, cfg.data)
    assert ids == ([] if start is None else [tokenizer.token_to_id(start)]) + tokenizer.encode(PROMPT)
    assert hf_tokenizer(PROMPT)["input_ids"] == ids
    theirs_text = _greedy_transformers(theirs, hf_tokenizer)
    assert _greedy_gptlab(ours, tokenizer, cfg) == theirs_text
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == PROMPT + theirs_text + "\n"  # as a user types it, streamed

    # HellaSwag's context and a scored text start as the prompt does
    assert encode_item(tokenizer, HellaSwagItem(PROMPT, ("a", "b", "c", "d"), 0), 64, cfg.data)[0] == ids
    with torch.no_grad():
        logits = ours(torch.tensor([ids[:-1]]))[0][0].float()
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    scored = evaluate_text(ours, tokenizer, PROMPT, data=cfg.data, context_length=len(ids) - 1, topk=[1])
    assert scored["loss"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("model,blocker", [
    (dict(norm="layernorm", block="post", position="sinusoidal", mlp="relu", bias=True), "model.block=post"),
    (dict(norm="cosinenorm", position="rope", mlp="swiglu"), "model.norm=cosinenorm"),
    (dict(norm="rmsnorm", position="rope", mlp="swiglu", qk_norm=True), "model.qk_norm=true"),
    (dict(norm="layernorm", position="learned", mlp="gelu", n_kv_head=2), "model.n_kv_head=2"),
])
def test_inexpressible_config_is_refused_with_its_option(make_export_run, tmp_path, capsys, model, blocker):
    run = make_export_run("refused-" + blocker.split("=")[0].split(".")[1], **model)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert blocker in err and "cannot be expressed by" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_sentencepiece_tokenizer_is_refused(make_export_run, tmp_path, tiny_corpus_text):
    tok = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="sentencepiece", vocab_size=300))
    run = make_export_run("spm", tokenizer=tok, norm="rmsnorm", position="rope", mlp="swiglu")
    with pytest.raises(GptlabError, match="SentencePiece"):
        export_hf(run, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_run_without_checkpoint_is_refused(make_export_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(make_export_run("gpt2-bias-tied", norm="layernorm", position="learned", mlp="gelu", bias=True), run)
    shutil.rmtree(run / "checkpoints")
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_existing_folder_needs_force(make_export_run, tmp_path, capsys):
    run = make_export_run("arcee-gelu", norm="rmsnorm", position="rope", mlp="gelu")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--to", "hf", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", str(run), "--to", "hf", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_failure_while_writing_leaves_nothing(make_export_run, tmp_path, monkeypatch):
    import gptlab.export.hf as hf_module

    run = make_export_run("arcee-gelu", norm="rmsnorm", position="rope", mlp="gelu")

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "atomic_write_text", broken_card)  # the last file written
    with pytest.raises(OSError):
        export_hf(run, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_usage_errors(make_export_run, tmp_path, capsys):
    run = str(make_export_run("arcee-gelu", norm="rmsnorm", position="rope", mlp="gelu"))
    assert main(["export", run]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", run, "--to", "onnx", str(tmp_path / "x")]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err
    assert main(["export", run, "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "ArceeForCausalLM" in capsys.readouterr().out
