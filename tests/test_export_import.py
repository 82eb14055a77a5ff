"""`gptlab import hf DIR --run RUN`: transformers folders built here (the Hub is unreachable) become gptlab runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gptlab.cli import main
from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.export import export_hf, import_hf
from gptlab.generate import generate
from gptlab.runs import load_run
from gptlab.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would mix into the CLI's stderr

TEXT = "Once upon a time there was a little cat named Tom. One day, Lily found a red ball!"


@pytest.fixture(scope="module")
def gpt2_tokenizer_files(fake_gpt2_dir, tmp_path_factory):
    """GPT-2's original tokenizer layout (vocab.json + merges.txt), small vocabulary, <|endoftext|> last."""
    folder = tmp_path_factory.mktemp("gpt2_files")
    shutil.copy(fake_gpt2_dir / "encoder.json", folder / "vocab.json")
    shutil.copy(fake_gpt2_dir / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(gpt2_tokenizer_files):
    return transformers.GPT2Tokenizer(vocab=str(gpt2_tokenizer_files / "vocab.json"),
                                      merges=str(gpt2_tokenizer_files / "merges.txt"))


def _spread(model):
    """transformers initialises norms to the identity; move them so a mixed-up norm shows in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _gpt2(hf_tokenizer, vocab_size=None, **config):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{
        "vocab_size": vocab_size or len(hf_tokenizer), "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "activation_function": "gelu", "initializer_range": 0.2, "bos_token_id": hf_tokenizer.eos_token_id,
        "eos_token_id": hf_tokenizer.eos_token_id, **config})
    return _spread(transformers.GPT2LMHeadModel(cfg))


def _llama(hf_tokenizer, kind="llama", **config):
    torch.manual_seed(0)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "arcee": (transformers.ArceeConfig, transformers.ArceeForCausalLM)}[kind]
    cfg = config_class(vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
                       initializer_range=0.2, bos_token_id=None, eos_token_id=hf_tokenizer.eos_token_id, **config)
    return _spread(model_class(cfg))


def _assert_same_logits(run, hf_model, ids):
    model, _, _ = load_run(run)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf_model(x).logits
    assert ours.std() > 0.5
    torch.testing.assert_close(ours, theirs[..., : ours.size(-1)], atol=1e-4, rtol=0)
    return model


MODELS = {
    "gpt2": lambda tok: _gpt2(tok),
    "gpt2-untied": lambda tok: _gpt2(tok, tie_word_embeddings=False),
    "llama-gqa-untied": lambda tok: _llama(tok, tie_word_embeddings=False),
    "llama-tied-bias": lambda tok: _llama(tok, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "arcee-relu2": lambda tok: _llama(tok, "arcee", hidden_act="relu2"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_matches_transformers(name, hf_tokenizer, tmp_path, single_thread):
    hf_model = MODELS[name](hf_tokenizer)
    folder = _save(hf_model, hf_tokenizer, tmp_path / "hf")
    result = import_hf(folder, tmp_path / "run")
    assert result["architecture"] == type(hf_model).__name__ and result["notes"] == []

    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    ids = tokenizer.encode(TEXT)
    assert ids == hf_tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.eos_id == hf_tokenizer.eos_token_id and tokenizer.bos_id is None  # GPT-2's BOS is its EOS
    model = _assert_same_logits(tmp_path / "run", hf_model, [tokenizer.eos_id, *ids])
    assert model.num_params() == sum(p.numel() for p in hf_model.parameters())

    # it samples like any run
    text = generate(model, tokenizer, ["Once upon a time"], SampleConfig(temperature=0, max_new_tokens=8, stop_at_eos=False))[0]
    assert len(tokenizer.encode(text)) >= 1


def test_original_gpt2_layout_without_tokenizer_json(hf_tokenizer, gpt2_tokenizer_files, tmp_path):
    """GPT-2's own folder: vocab.json + merges.txt, and <|endoftext|> named only by config.json's ids."""
    hf_model = _gpt2(hf_tokenizer)
    folder = _save(hf_model, None, tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_files / name, folder / name)
    import_hf(folder, tmp_path / "run")
    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert tokenizer.eos_id == hf_tokenizer.eos_token_id
    _assert_same_logits(tmp_path / "run", hf_model, [tokenizer.eos_id, *tokenizer.encode(TEXT)])


def test_sharded_and_pytorch_bin_weights(hf_tokenizer, tmp_path):
    hf_model = _llama(hf_tokenizer, tie_word_embeddings=False)
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    hf_tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    import_hf(sharded, tmp_path / "run-sharded")
    _assert_same_logits(tmp_path / "run-sharded", hf_model, hf_tokenizer.encode(TEXT))

    legacy = tmp_path / "legacy"
    shutil.copytree(sharded, legacy)
    for shard in legacy.glob("model*.safetensors*"):
        shard.unlink()
    torch.save(hf_model.state_dict(), legacy / "pytorch_model.bin")
    import_hf(legacy, tmp_path / "run-legacy")
    _assert_same_logits(tmp_path / "run-legacy", hf_model, hf_tokenizer.encode(TEXT))


def test_gelu_new_is_imported_with_a_note(hf_tokenizer, tmp_path, capsys):
    hf_model = _gpt2(hf_tokenizer, activation_function="gelu_new")  # GPT-2's own tanh approximation
    folder = _save(hf_model, hf_tokenizer, tmp_path / "hf")
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 0
    assert "tanh-approximate GELU" in capsys.readouterr().err
    model, tokenizer, _ = load_run(tmp_path / "run")
    x = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(TEXT)]])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf_model(x).logits, atol=5e-2, rtol=0)


def test_padded_embedding_is_cut_to_the_tokenizer(hf_tokenizer, tmp_path):
    hf_model = _gpt2(hf_tokenizer, vocab_size=len(hf_tokenizer) + 7, tie_word_embeddings=False)
    result = import_hf(_save(hf_model, hf_tokenizer, tmp_path / "hf"), tmp_path / "run")
    assert any("dropped 7 padding rows" in n for n in result["notes"])
    _, tokenizer, cfg = load_run(tmp_path / "run")
    assert cfg.model.vocab_size == tokenizer.vocab_size == len(hf_tokenizer)
    _assert_same_logits(tmp_path / "run", hf_model, [tokenizer.eos_id, *tokenizer.encode(TEXT)])


def test_context_length_can_be_shortened(hf_tokenizer, tmp_path):
    for name, hf_model in (("llama", _llama(hf_tokenizer)), ("gpt2", _gpt2(hf_tokenizer))):
        import_hf(_save(hf_model, hf_tokenizer, tmp_path / f"hf-{name}"), tmp_path / name, context_length=16)
        _, tokenizer, cfg = load_run(tmp_path / name)
        assert cfg.model.context_length == 16
        _assert_same_logits(tmp_path / name, hf_model, tokenizer.encode(TEXT)[:16])
    with pytest.raises(GptlabError, match="longer than the 64 positions"):
        import_hf(tmp_path / "hf-gpt2", tmp_path / "too-long", context_length=128)


def test_export_import_round_trip_then_train_further(make_export_run, tiny_shards, tmp_path):
    """A gptlab export imports back exactly (same tokenizer checksum, same weights) and trains on with init_from."""
    from gptlab.config import load_config
    from gptlab.train import train

    run = make_export_run("llama-gqa-untied", norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, tie_embeddings=False)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported")
    original, original_tok, _ = load_run(run)
    imported, imported_tok, cfg = load_run(tmp_path / "imported")
    assert imported_tok.checksum == original_tok.checksum
    for (name, a), (_, b) in zip(original.state_dict().items(), imported.state_dict().items()):
        assert torch.equal(a, b), name

    threads = torch.get_num_threads()
    try:
        summary = train(load_config(None, [
            f"--train.data_dir={str(tiny_shards)!r}", f"--train.run_dir={str(tmp_path / 'continued')!r}",
            f"--train.init_from={str(tmp_path / 'imported')!r}", "--train.max_steps=2", "--train.eval_every=2",
            "--train.batch_size=2", "--train.compile=false", "--train.device='cpu'", "--train.precision='fp32'",
            "--train.threads=1", "--train.warmup_steps=0",
        ]), verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 2
    continued, _, continued_cfg = load_run(tmp_path / "continued")
    assert continued_cfg.model == cfg.model


# --------------------------------------------------------------------------- bad input


def _leftovers(tmp_path, keep):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


def test_unsupported_architecture_is_refused(hf_tokenizer, tmp_path, capsys):
    folder = _save(_gpt2(hf_tokenizer), hf_tokenizer, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "BertForMaskedLM" in err and "cannot import" in err and len(err.strip().splitlines()) == 1
    assert _leftovers(tmp_path, {"hf"}) == []


def test_missing_weights_are_refused(hf_tokenizer, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _save(_llama(hf_tokenizer), hf_tokenizer, tmp_path / "hf")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 2
    assert "lack model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err

    (folder / "model.safetensors").unlink()
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 2
    assert "has no weights" in capsys.readouterr().err
    assert _leftovers(tmp_path, {"hf"}) == []


def test_inexpressible_tokenizer_and_configs_are_refused(hf_tokenizer, tmp_path, capsys):
    folder = _save(_llama(hf_tokenizer), hf_tokenizer, tmp_path / "hf")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "pre_tokenizer": {
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}}))
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 2
    assert "Metaspace pre-tokenizer" in capsys.readouterr().err

    shutil.rmtree(folder)
    folder = _save(_llama(hf_tokenizer, rope_scaling={"rope_type": "linear", "factor": 2.0}), hf_tokenizer, tmp_path / "hf")
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 2
    assert "RoPE scaling 'linear'" in capsys.readouterr().err

    assert main(["import", "hf", str(tmp_path / "nowhere"), "--run", str(tmp_path / "run")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert _leftovers(tmp_path, {"hf"}) == []


def test_existing_run_is_not_overwritten(hf_tokenizer, tmp_path, capsys):
    folder = _save(_gpt2(hf_tokenizer), hf_tokenizer, tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import", "hf", str(folder), "--run", str(tmp_path / "run"), "--force"]) == 0
    assert (tmp_path / "run" / "config.toml").is_file() and not (tmp_path / "run" / "notes.txt").exists()


def test_real_gpt2_tokenizer_both_ways(shared_data, make_export_run, tmp_path):
    """GPT-2's real 50,257-token files: imported from GPT-2's folder layout, and exported from a gpt2-kind run,
    they encode like transformers' GPT-2 tokenizer and like gptlab's own gpt2 kind."""
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    # (without its <|endoftext|> lines: transformers reads special-token strings in text as the tokens, gptlab as text)
    text = (shared_data / "tinystories" / "TinyStories-train_head.txt").read_text(encoding="utf-8")[:4000].replace("<|endoftext|>", "")
    gpt2 = train_tokenizer([], TokenizerConfig(kind="gpt2", gpt2_dir=str(shared_data / "gpt2_tokenizer")))
    expected = gpt2.encode(text)

    folder = tmp_path / "hf-gpt2"
    folder.mkdir()
    shutil.copy(shared_data / "gpt2_tokenizer" / "encoder.json", folder / "vocab.json")
    shutil.copy(shared_data / "gpt2_tokenizer" / "vocab.bpe", folder / "merges.txt")
    reference = transformers.GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    assert reference.encode(text) == expected
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    import_hf(folder, tmp_path / "run")
    imported = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert imported.encode(text) == expected and imported.eos_id == 50256 and imported.vocab_size == 50257

    run = make_export_run("gpt2-real-vocab", tokenizer=gpt2, norm="layernorm", position="learned", mlp="gelu", d_model=16)
    export_hf(run, tmp_path / "exported")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "exported").encode(text, add_special_tokens=False) == expected


@pytest.mark.parametrize("bos", ["<s>", None])
@pytest.mark.parametrize("data", [{}, {"add_bos": True}, {"add_eos": False}], ids=["after-eos", "after-bos", "after-nothing"])
def test_export_import_keeps_the_start_token(make_export_run, tmp_path, tiny_corpus_text, data, bos):
    """An exported run imported back starts a prompt after the same token (gptlab.generate.start_id)."""
    from helpers import run_copy_with

    from gptlab.config import TokenizerConfig
    from gptlab.generate import prompt_ids
    from gptlab.tokenizer import train_tokenizer

    tok = train_tokenizer([tiny_corpus_text], TokenizerConfig(kind="bpe", vocab_size=300, bos_token=bos))
    run = run_copy_with(make_export_run(f"import-start-{bos}", tokenizer=tok, norm="rmsnorm", position="rope", mlp="swiglu"),
                        tmp_path / "run", **data)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    (_, tokenizer, cfg), (_, back_tokenizer, back_cfg) = load_run(run), load_run(tmp_path / "back")
    assert prompt_ids(back_tokenizer, TEXT, back_cfg.data) == prompt_ids(tokenizer, TEXT, cfg.data)
