"""recipes/*.toml: every recipe validates and builds its model; each one runs end to end here at reduced size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptlab.config import load_config
from gptlab.model import model_info
from gptlab.quickstart import run_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
GPU_SCALE = ["smollgpt.toml", "gpt2.5.toml", "fineweb-edu.toml"]
# The seed each recipe reproduces, and its model's size.
EXPECTED = {
    "aurelius.toml": (0.8e6, 0.9e6),
    "defaultgpt-0.5m-short-thick.toml": (0.45e6, 0.55e6),
    "defaultgpt-0.5m-5ft11.toml": (0.45e6, 0.55e6),
    "defaultgpt-0.5m-tall-skinny.toml": (0.45e6, 0.55e6),
    "smollgpt.toml": (125e6, 140e6),
    "gpt2.5.toml": (120e6, 130e6),
    "fineweb-edu.toml": (30e6, 50e6),
    "speedrun_cpu.toml": (0.5e6, 10e6),
    "speedrun_nanogpt_char.toml": (0.7e6, 1.4e6),  # 0.8M with its ~100 characters; counted here at 4,096
    "tinystories-chat.toml": (1.0e6, 1.5e6),  # the chat demonstration's base model (issue 13)
    "ablation-blocks.toml": (1.0e6, 1.5e6),  # the block ablation's baseline (issue 15)
}
# Shrinks any recipe to seconds on a CPU: a 1-layer, 32-wide model, two steps, fp32, eager.
SMALL = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.n_kv_head=1", "--model.head_size=16",
         "--model.d_ff=64", "--model.context_length=32", "--train.batch_size=2", "--train.grad_accum=1",
         "--train.max_steps=2", "--train.eval_every=2", "--train.eval_batches=2", "--train.sample_every=0",
         "--train.early_stop_patience=0", "--train.device=cpu", "--train.precision=fp32", "--train.compile=false",
         "--train.threads=1", "--train.peak_flops=1e11", "--data.workers=1", "--sample.max_new_tokens=4",
         "--sample.num_samples=1", '--sample.prompts=["The"]']


def test_every_seed_has_a_recipe():
    assert {p.name for p in RECIPES} == set(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_builds_its_model(recipe):
    cfg = load_config(recipe)
    assert cfg.data.sources and cfg.train.run_dir.startswith("runs/") and cfg.train.data_dir == cfg.data.out_dir
    assert any((cfg.train.max_steps, cfg.train.max_tokens, cfg.train.max_time))
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    params = model_info(cfg.model.model_copy(update={"vocab_size": vocab}), 1)["parameters"]
    low, high = EXPECTED[recipe.name]
    assert low <= params <= high
    for source in cfg.data.sources:  # local corpora live in ../shared/data, relative to the repository root
        assert source.path.startswith(("hf:", "../shared/data/"))


def _in_tmp(tmp_path) -> list[str]:
    return [f"--data.out_dir={str(tmp_path / 'data')!r}", f"--train.data_dir={str(tmp_path / 'data')!r}",
            f"--train.run_dir={str(tmp_path / 'run')!r}"]


@pytest.mark.parametrize("recipe", GPU_SCALE)
def test_gpu_scale_recipe_starts_and_trains_a_few_steps_here(recipe, tmp_path, tiny_corpus, fake_gpt2_dir):
    """The recipe as written, but on a small local corpus instead of hf:, at the reduced size above."""
    cfg = load_config(REPO / "recipes" / recipe)
    local = [f"--data.sources=[{{path = {str(tiny_corpus)!r}}}]", "--data.val_fraction=0.34", "--data.max_tokens=100000"]
    if cfg.tokenizer.kind == "gpt2":  # the real files may be absent (a user's clone): a GPT-2-shaped stand-in
        vocab = len(json.loads((fake_gpt2_dir / "encoder.json").read_text()))
        local += [f"--tokenizer.gpt2_dir={str(fake_gpt2_dir)!r}", f"--model.vocab_size={vocab}"]
    else:
        local += ["--tokenizer.vocab_size=300", "--tokenizer.train_max_bytes=1000000"]
    result = run_recipe(REPO / "recipes" / recipe, [*SMALL, *local, *_in_tmp(tmp_path)], progress=False)
    assert result["train"]["steps"] == 2 and result["train"]["val_loss"] is not None
    assert len(result["samples"]) == 1 and result["samples"][0].startswith("The")
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.train.lr == cfg.train.lr and saved.model.mlp == cfg.model.mlp  # the recipe's settings, shrunk


def test_aurelius_recipe_runs_on_meditations(shared_data, tmp_path, monkeypatch):
    """The local recipe on its real corpus: SentencePiece with <BEGIN>/<END>/<PAD>, an honest 80/20 paragraph split."""
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository root
    if not (REPO / "../shared/data/meditations.txt").is_file():
        pytest.skip("../shared/data is not beside this checkout")
    result = run_recipe("recipes/aurelius.toml", [*SMALL, *_in_tmp(tmp_path)], progress=False)
    assert result["train"]["steps"] == 2
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    splits = meta["splits"]
    assert 0.15 < splits["val"]["documents"] / (splits["val"]["documents"] + splits["train"]["documents"]) < 0.25
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert tok.vocab_size == 2000 and {"<BEGIN>", "<END>", "<PAD>"} <= set(tok.special_tokens)


def test_speedrun_recipe_lays_training_text_out_as_the_score_file_is():
    """Raw-txt (single newlines, <|endoftext|> lines) becomes paragraphs and stories separated by blank lines."""
    from gptlab.text import Normalizer

    cfg = load_config(REPO / "recipes" / "speedrun_cpu.toml")
    raw = "Tom ran.\nHe fell.\n<|endoftext|>\nSue sang.\n\nShe smiled.\n<|endoftext|>\n"
    assert Normalizer(cfg.text)(raw) == "Tom ran.\n\nHe fell.\n\nSue sang.\n\nShe smiled.\n\n"
    score = Path(cfg.eval.data[0])
    assert score.name == "TinyStories-valid_hf_head.txt"
    assert all(Path(s.path).name != score.name for s in cfg.data.sources)
