"""New tokens per second: gptlab's generation against transformers `generate()` and llama.cpp, same weights.

    python benchmarks/generate.py                      # batch 1 and 8, 256 new tokens, 2 threads
    python benchmarks/generate.py --batch 1 --new-tokens 64 --skip llamacpp

The model: the quickstart's shape (tiny-1m, 4 layers x 128, 4 heads, SwiGLU d_ff 344, a 2,048-token
byte-level BPE: 1.05M parameters) with random weights (init_std 0.2: peaked next-token distributions, so
greedy decoding does not hinge on rounding), written as a run without training, then exported the way a
user would: `gptlab export RUN --to hf` for transformers and `gptlab export RUN --gguf` for llama.cpp
(float32 both). The run's context is 512 (--context), not the quickstart's 256, so that an 8-token prompt
and 256 new tokens fit: no engine has to start again from a truncated context (RoPE has no weights, so the
shape is otherwise the quickstart's).

Each engine decodes greedily, batch 1 and batch 8 (8 different 8-token prompts of the same length: no
padding), --new-tokens tokens a row with no stop at EOS, on the CPU with --threads threads, one timed run:
  gptlab        gptlab.generate.sample_tokens, the loaded run (gptlab.runs.load_run), fp32; "compiled" with
                the decode step torch.compile'd (compile=True; the compile is a warm-up run, excluded and
                printed), "eager" without (compile=False), "default" as `gptlab sample` runs it (compile="auto")
  transformers  LlamaForCausalLM.from_pretrained(export).generate(do_sample=False), its default cache
  llama.cpp     llama-cpp-python's low-level API on the GGUF: one context with n_seq_max = batch (a float32 KV
                cache, as the others keep), each step one llama_batch of one token per sequence, llama_decode,
                the greedy sampler on each sequence's logits
Every engine gets one short warm-up generation first (printed, not counted; gptlab compiled's is a whole
generation, which compiles the step). The engines should agree on the tokens (same weights, greedy): the
share agreed, each row up to its first difference, is printed as a check that they ran the same model.
transformers agrees on every token; llama.cpp parts where gptlab's top two logits are within rounding
(e.g. 8.3064 against 8.3035 at the 59th token of batch 1's row), after which greedy rows go their own ways.

Only speed is compared; other processes on a shared machine slow a run down, so compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's gptlab, whatever is installed

from gptlab.quickstart import QUICKSTART_CONFIG  # noqa: E402


def make_run(folder: Path, context: int, seed: int = 0) -> Path:
    """A run of the quickstart's shape with random weights (no training), as tests/conftest.py make_export_run writes one."""
    from gptlab.config import Config, TokenizerConfig, TrainConfig, config_from_dict, config_to_dict, save_config
    from gptlab.model import build_model
    from gptlab.quickstart import demo_corpus
    from gptlab.text import iter_documents
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train.checkpoint import save_checkpoint

    documents = [d for _, d in islice(iter_documents([demo_corpus()]), 400)]  # ~400 chapters of the KJV
    tok = train_tokenizer(documents, TokenizerConfig(**QUICKSTART_CONFIG["tokenizer"]))
    model = {**QUICKSTART_CONFIG["model"], "vocab_size": tok.vocab_size, "context_length": context, "init_std": 0.2}
    cfg = config_from_dict({"model": model})
    run = folder / "run"
    torch.manual_seed(seed)
    gpt = build_model(cfg.model).eval()
    run.mkdir(parents=True)
    save_config(Config(model=cfg.model, train=TrainConfig(run_dir=str(run), data_dir=str(folder / "data"))), run / "config.toml")
    tok.save(run / "tokenizer.json")
    info = {"step": 1, "tokens": 0, "model": config_to_dict(cfg.model), "tokenizer_checksum": tok.checksum}
    save_checkpoint(run, 1, gpt, {}, info)
    return run


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- the engines
# Each engine: (prompts [B][P] ids, new tokens) -> ([B][N] generated ids, seconds). setup() loads it once.


class Gptlab:
    def __init__(self, run: Path, compile):
        from gptlab.runs import load_run

        self.model, _, _ = load_run(run)
        self.compile = compile
        self.compile_seconds = 0.0

    def generate(self, prompts, n):
        from gptlab.generate import sample_tokens

        stats = {}
        (new, _), seconds = timed(lambda: sample_tokens(self.model, prompts, n, temperature=0, compile=self.compile,
                                                        stats=stats))
        self.compile_seconds += stats.get("compile_seconds", 0.0)
        return new, seconds - stats.get("compile_seconds", 0.0)


class Transformers:
    def __init__(self, export: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # all rows generate every token asked for

    @torch.no_grad()
    def generate(self, prompts, n):
        ids = torch.tensor(prompts)
        out, seconds = timed(lambda: self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                         do_sample=False, pad_token_id=0))
        return out[:, ids.size(1):].tolist(), seconds


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: B sequences in one context, one token each a step."""

    def __init__(self, gguf: Path, threads: int, context: int, max_batch: int):
        import logging

        import llama_cpp as L

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own log lines, through the binding
        self.L = L
        L.llama_backend_init()
        params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), params)
        self.threads, self.context, self.max_batch = threads, context, max_batch
        self.vocab = L.llama_model_get_vocab(self.model)
        self.sampler = L.llama_sampler_init_greedy()

    def generate(self, prompts, n):
        L, B, P = self.L, len(prompts), len(prompts[0])
        params = L.llama_context_default_params()
        params.n_ctx = B * self.context  # each sequence gets a context's worth
        params.n_batch = params.n_ubatch = max(B * P, 512)
        params.n_seq_max = B
        params.n_threads = params.n_threads_batch = self.threads
        params.type_k = params.type_v = L.GGML_TYPE_F32  # float32 like the weights and the other engines (default: f16)
        ctx = L.llama_init_from_model(self.model, params)
        batch = L.llama_batch_init(B * P, 0, B)
        out = [[] for _ in range(B)]
        try:
            def fill(rows):  # rows: [(sequence, position, token, wants logits)]
                batch.n_tokens = len(rows)
                for i, (seq, pos, token, logits) in enumerate(rows):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, logits
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

            def decode():
                start = time.perf_counter()
                fill([(s, p, t, p == P - 1) for s in range(B) for p, t in enumerate(prompts[s])])
                last = [s * P + P - 1 for s in range(B)]  # the batch index of each sequence's logits
                for step in range(n):
                    tokens = [L.llama_sampler_sample(self.sampler, ctx, i) for i in last]
                    for s, t in enumerate(tokens):
                        out[s].append(t)
                    if step == n - 1:
                        break
                    fill([(s, P + step, t, True) for s, t in enumerate(tokens)])
                    last = list(range(B))
                return time.perf_counter() - start

            return out, decode()
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)


def agreement(a, b) -> float:
    """The share of tokens two engines agree on, each row up to its first difference (greedy: one diverging
    token changes the rest)."""
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / max(1, total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--new-tokens", type=int, default=256, metavar="N", help="tokens generated a row (default 256)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=8, metavar="P", help="prompt length (default 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed generations per engine and batch; the median counts (default 7)")
    parser.add_argument("--context", type=int, default=512, help="the run's context length (default 512)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llamacpp", "eager", "default"],
                        help="engines or gptlab modes to leave out")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse torch.compile's on-disk cache (default: a fresh one, so the compile time printed is a first run's)")
    args = parser.parse_args()
    if args.prompt_tokens + args.new_tokens > args.context:
        parser.error("--prompt-tokens + --new-tokens must fit --context")
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptlab-bench-inductor-")

    from gptlab.device import DTYPES, peak_flops, set_threads
    from gptlab.export import export_gguf, export_hf

    threads = set_threads(args.threads)
    cpu = torch.device("cpu")
    peaks = {name: peak_flops(cpu, DTYPES[name]) for name in ("fp32", "bf16")}
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {threads} threads, torch {torch.__version__}; "
          "peak (gptlab bench peak, cached): " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))

    work = Path(tempfile.mkdtemp(prefix="gptlab-bench-generate-"))
    run = make_run(work, args.context)
    export_hf(run, work / "hf")
    engines = {}
    modes = {"compiled": True, "eager": False, "default": "auto"}
    for mode, compile in modes.items():
        if mode not in args.skip:
            engines[f"gptlab {mode}"] = Gptlab(run, compile)
    if "transformers" not in args.skip:
        engines["transformers"] = Transformers(work / "hf")
    if "llamacpp" not in args.skip:
        try:
            export_gguf(run, work / "model.gguf")
            engines["llama.cpp"] = LlamaCpp(work / "model.gguf", threads, args.context, max(args.batch))
        except ImportError as e:
            print(f"llama.cpp skipped: {e} (CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python)")
    params = sum(p.numel() for p in Gptlab(run, False).model.parameters())
    print(f"model: the quickstart's shape (tiny-1m, SwiGLU d_ff 344, vocab 2,048), {params:,} parameters, fp32, random weights; "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens a row, greedy")

    generator = torch.Generator().manual_seed(1)
    speed, tokens = {}, {}
    for B in args.batch:
        prompts = torch.randint(3, 2048, (B, args.prompt_tokens), generator=generator).tolist()
        for name, engine in engines.items():
            (_, warm) = engine.generate(prompts, 8) if not isinstance(engine, Gptlab) or engine.compile is not True \
                else engine.generate(prompts, args.new_tokens)  # the compile happens here, at this batch size
            compiling = engine.compile_seconds if isinstance(engine, Gptlab) else 0.0
            warm_note = f"warm-up {warm + compiling:.1f} s" + (f", of which compiling {compiling:.1f} s" if compiling else "")
            if compiling:
                engine.compile_seconds = 0.0
            # one generation is a fraction of a second: the median of several, for every engine alike
            times = []
            for _ in range(args.repeats):
                new, seconds = engine.generate(prompts, args.new_tokens)
                assert all(len(row) == args.new_tokens for row in new), f"{name} stopped early"
                times.append(seconds)
            seconds = statistics.median(times)
            speed[name, B], tokens[name, B] = B * args.new_tokens / seconds, new
            print(f"  batch {B} {name:16} {speed[name, B]:8,.0f} tokens/s  (median of {args.repeats}: {seconds:.2f} s, "
                  f"fastest {min(times):.2f} s; {warm_note})", flush=True)

    print()
    names = list(engines)
    print(f"{'new tokens/s':18}" + "".join(f"{'batch ' + str(B):>12}" for B in args.batch))
    for name in names:
        print(f"{name:18}" + "".join(f"{speed[name, B]:12,.0f}" for B in args.batch))
    fast = "gptlab compiled" if "gptlab compiled" in engines else names[0]
    for peer in ("transformers", "llama.cpp"):
        if peer in engines:
            print(f"{fast + ' / ' + peer:18}"[:40].ljust(18) + "".join(f"{speed[fast, B] / speed[peer, B]:11.2f}x" for B in args.batch))
    for peer in ("transformers", "llama.cpp", "gptlab eager"):
        if peer in engines and peer != fast:
            agree = ", ".join(f"batch {B} {agreement(tokens[fast, B], tokens[peer, B]):.0%}" for B in args.batch)
            print(f"tokens agreeing with {peer}: {agree}")

    keys = {"gptlab compiled": "gptlab", "gptlab eager": "gptlab_eager", "gptlab default": "gptlab_default",
            "transformers": "transformers", "llama.cpp": "llamacpp"}
    result = [f"{keys[name]}_b{B}={speed[name, B]:.0f}" for B in args.batch for name in names]
    for peer, key in (("transformers", "transformers"), ("llama.cpp", "llamacpp")):
        if peer in engines:
            result += [f"vs_{key}_b{B}={speed[fast, B] / speed[peer, B]:.2f}" for B in args.batch]
    print("RESULT " + " ".join(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
