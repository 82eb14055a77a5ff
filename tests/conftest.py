"""Shared fixtures: a tiny corpus, tokenizer, shards and model, built in seconds.

Most tests need neither ../shared nor torch.compile. Tests that read the real
corpora in ../shared/data use the `shared_data` fixture, which skips with a
reason where that folder is absent (a user's clone).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_DATA, TINY_STORIES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real corpora in {SHARED_DATA} (../shared/data beside the checkout); absent here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_corpus_text() -> str:
    """Stories separated by <|endoftext|> lines, as TinyStories' raw text is; repeated for volume."""
    return "".join(f"{s}\n<|endoftext|>\n" for s in TINY_STORIES * 20)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, tiny_corpus_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text(tiny_corpus_text, encoding="utf-8")
    return path


# --- tokenizer fixtures (tokenizer stage) ---


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_corpus_text) -> Path:
    """Path of a byte-level BPE tokenizer (400 tokens, EOS <|endoftext|> = 0) trained on tiny_corpus_text.

    Load it with `gptlab.tokenizer.load_tokenizer(tiny_tokenizer)`.
    """
    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    documents = [d.strip("\n") for d in tiny_corpus_text.split("<|endoftext|>") if d.strip()]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(documents, TokenizerConfig(kind="bpe", vocab_size=400)).save(path)
    return path


@pytest.fixture(scope="session")
def fake_gpt2_dir(tmp_path_factory, tiny_corpus_text) -> Path:
    """A folder laid out like GPT-2's (encoder.json + vocab.bpe, <|endoftext|> last) with a small vocabulary.

    Lets the gpt2 kind's file handling be tested where ../shared/data/gpt2_tokenizer is absent.
    """
    import json

    from gptlab.config import TokenizerConfig
    from gptlab.tokenizer import train_tokenizer

    bpe = json.loads(train_tokenizer([tiny_corpus_text], TokenizerConfig(vocab_size=350, eos_token=None)).to_json())
    encoder = dict(bpe["model"]["vocab"])
    encoder["<|endoftext|>"] = len(encoder)
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in bpe["model"]["merges"])
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder


# --- data fixtures (data stage) ---


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_corpus, tiny_tokenizer) -> Path:
    """A prepared data folder (shards, meta.json, tokenizer.json, config.toml) from tiny_corpus and tiny_tokenizer.

    About 4k train tokens in shards of 1,024 (so windows cross shard boundaries) and one story's 20 copies
    (~500 tokens) as the val split: the split is drawn per distinct document, so duplicates stay together.
    """
    from gptlab.config import load_config
    from gptlab.data import prepare_data

    out = tmp_path_factory.mktemp("shards") / "data"
    cfg = load_config(
        None,
        [
            f"--data.sources=[{{path = {str(tiny_corpus)!r}}}]",
            f"--data.out_dir={str(out)!r}",
            "--data.val_fraction=0.25",
            "--data.shard_size=1024",
            "--data.workers=1",
        ],
    )
    prepare_data(cfg, tiny_tokenizer)
    return out

# --- model fixtures (model stage) ---


@pytest.fixture
def tiny_model_config():
    """2 layers x 32, 2 heads, context 32, vocab 64: builds and runs in milliseconds."""
    from gptlab.config import ModelConfig

    return ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, context_length=32)


@pytest.fixture
def single_thread():
    """torch on one thread for the test: tiny tensors gain nothing from more, and on a busy machine
    OpenMP threads waiting for each other make millisecond tests take seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model(tiny_model_config):
    """A GPT of tiny_model_config with fixed random weights, in eval mode."""
    import torch

    from gptlab.model import GPT

    torch.manual_seed(0)
    return GPT(tiny_model_config).eval()


# --- evaluate fixtures (evaluate stage) ---


@pytest.fixture(scope="session")
def eval_runs(tmp_path_factory, tiny_shards) -> list[Path]:
    """Two tiny trained runs on tiny_shards (1 and 2 layers; 8 steps, validated every 2): for eval/compare/plot."""
    import torch

    from gptlab.config import load_config
    from gptlab.train import train

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("eval_runs")
    runs = []
    for layers in (1, 2):
        run = root / f"run-{layers}-layer"
        cfg = load_config(None, [
            f"--train.data_dir={str(tiny_shards)!r}", f"--train.run_dir={str(run)!r}", "--train.max_steps=8",
            "--train.eval_every=2", "--train.batch_size=4", "--train.lr=3e-3", "--train.warmup_steps=2",
            "--train.compile=false", "--train.device='cpu'", "--train.precision='fp32'", "--train.threads=1",
            "--model.d_model=32", "--model.n_head=2", "--model.context_length=32", f"--model.n_layer={layers}",
        ])
        train(cfg, verbose=False)
        runs.append(run)
    torch.set_num_threads(threads)
    return runs


# --- export fixtures (export stage) ---


@pytest.fixture(scope="session")
def make_export_run(tmp_path_factory, tiny_tokenizer, tiny_shards):
    """make_export_run(name, tokenizer=None, **model) -> a run directory with one checkpoint (step 10, 1,234 tokens).

    No training: random weights made far from the identity (init_std 0.2, norm gains and biases
    perturbed), so that a swapped or mis-shaped tensor changes the logits; the tokenizer defaults to
    tiny_tokenizer and the data folder to tiny_shards. Runs are cached by name for the session.
    """
    import torch

    from gptlab.config import (
        Config,
        ModelConfig,
        TrainConfig,
        config_to_dict,
        save_config,
    )
    from gptlab.model import build_model
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train.checkpoint import save_checkpoint

    root, made = tmp_path_factory.mktemp("export_runs"), {}

    def make(name: str, tokenizer=None, **model) -> Path:
        if name in made:
            return made[name]
        tok = tokenizer or load_tokenizer(tiny_tokenizer)
        model_cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "n_layer": 2, "d_model": 32, "n_head": 4,
                                   "context_length": 64, "init_std": 0.2, **model})
        run = root / name
        torch.manual_seed(0)
        gpt = build_model(model_cfg)
        with torch.no_grad():
            for p in gpt.parameters():
                if p.dim() == 1:  # norm gains around 1, biases around 0
                    p.add_(0.1 * torch.randn_like(p))
        run.mkdir()
        save_config(Config(model=model_cfg, train=TrainConfig(run_dir=str(run), data_dir=str(tiny_shards))), run / "config.toml")
        tok.save(run / "tokenizer.json")
        info = {"step": 10, "tokens": 1234, "val_loss": 3.25, "model": config_to_dict(model_cfg), "tokenizer_checksum": tok.checksum}
        save_checkpoint(run, 10, gpt, {}, info)
        made[name] = run
        return run

    return make


# --- chat fixtures (chat stage) ---


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """30 tiny conversations (helpers.chat_records) as JSON lines."""
    from helpers import chat_records, write_jsonl

    return Path(write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_records()))


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory, tiny_tokenizer) -> Path:
    """tiny_tokenizer with the chat tokens added (ids after its last one)."""
    from gptlab.tokenizer import load_tokenizer
    from gptlab.tokenizer.chat import with_chat_tokens

    path = tmp_path_factory.mktemp("chat_tokenizer") / "tokenizer.json"
    with_chat_tokens(load_tokenizer(tiny_tokenizer)).save(path)
    return path


@pytest.fixture(scope="session")
def chat_shards(tmp_path_factory, chat_file, chat_tokenizer) -> Path:
    """chat_file prepared with chat_tokenizer: 27 training and 3 validation conversations with their loss masks."""
    from gptlab.config import load_config
    from gptlab.data import prepare_data

    out = tmp_path_factory.mktemp("chat_shards")
    cfg = load_config(None, [f"--data.out_dir={str(out)!r}", ("data.sources", [{"path": str(chat_file)}]), "--data.workers=1"])
    prepare_data(cfg, chat_tokenizer)
    return out
