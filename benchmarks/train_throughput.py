"""Training throughput (tokens/s) and MFU of gptlab against nanoGPT's CPU recipe and Hugging Face Llama, in one run.

Every row times the same training step on random tokens -- forward, backward,
AdamW step -- after warm-up steps that are not timed (torch.compile compiles
during warm-up; its cost is reported separately as "warm-up s"). gptlab's rows
use the trainer's own TrainStep, so they time exactly what `gptlab train` runs.

Shapes (layers x width, context, batch, vocabulary):
    nano   4 x 128, ctx 64,  batch 12, vocab 65      nanoGPT's CPU recipe (shakespeare_char)
    4m     4 x 256, ctx 256, batch 16, vocab 4096    the tiny-4m preset
    16m    8 x 384, ctx 256, batch 16, vocab 4096    the tiny-16m preset

Rows:
    gptlab default       what `gptlab train` picks here for a long run (precision=auto, compile=auto)
    nanogpt cpu recipe   nanoGPT's model.py rebuilt here (LayerNorm, learned positions, GELU MLP 4x, tied
                         head, bias=False as in its train.py) with its CPU recipe's training step: fp32,
                         no compile, AdamW(lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices, the
                         default (unfused) CPU implementation), grad clip 1.0, loss.item() every step
    nanogpt fp32 compile / bf16 autocast / bf16 autocast compile
                         the same model and loop under train.py's --compile=True and --dtype=bfloat16
                         (autocast, as its ctx): nanoGPT's other settings; the fastest of them that runs on
                         this machine is the peer (bf16 rows only where the CPU has native bf16)
    gptlab fp32 eager    precision=fp32, compile=false (nanoGPT's CPU recipe)
    gptlab fp32 compile  / gptlab bf16 eager: the two levers apart, to see which one pays on this machine
    hf llama bf16        transformers.LlamaForCausalLM of the same shape (SwiGLU sized to the same
                         parameter count, tied embeddings, SDPA attention) under bf16 autocast
    hf llama fp32        the same in fp32

    python benchmarks/train_throughput.py                      # all shapes, all rows
    python benchmarks/train_throughput.py --shapes 4m --steps 5 --rounds 2
    python benchmarks/train_throughput.py --rows default,nanogpt_cpu,hf_llama_fp32
    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_throughput.py   # see the note on busy machines below

gptlab's rows run in this process under the allocator setting `gptlab train` makes (device.keep_freed_memory:
glibc keeps freed memory, so a step's tensors do not fault fresh pages in); the nanoGPT and Llama rows run in
a child process of their own with the C library's default malloc, as they run on their own
(--peer-allocator=kept gives them gptlab's setting). The rows still take turns, round by round.

MFU = model FLOPs per token (6 per weight of every matmul, the output head included, + 12 * layers *
width * context for attention) x tokens/s / the peak of the row's dtype that `gptlab bench peak`
measured on this machine (cached per device, dtype and thread count; measured now if not cached).

On a machine where other processes are busy, OpenMP's default of spinning at every barrier can make
2 threads several times slower than 1 (a waiting thread spins away the time slice its descheduled
partner needs): the first line prints OMP_WAIT_POLICY; PASSIVE makes waiting threads sleep.

The last line is `RESULT shape=4m cpu=<capability> gptlab_tok_s=... nanogpt_best_tok_s=... nanogpt_best=<row>
vs_nanogpt_best=... vs_nanogpt_best_paired=... nanogpt_cpu_tok_s=... fp32_eager_tok_s=... hf_llama_bf16_tok_s=...
vs_nanogpt_cpu=... vs_fp32_eager=... vs_hf_llama=... mfu=... peak_fp32_gflops=... peak_bf16_gflops=...` (the first
shape measured if 4m is not among them; vs_hf_llama against the faster of the two Llama rows measured).
vs_nanogpt_best compares each row's best round; vs_nanogpt_best_paired is the median over rounds of the two rows'
ratio within a round, steadier where the machine's speed drifts from minute to minute (more --rounds, steadier
still: `--rows default,nanogpt_bf16_compile --rounds 10`).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import tempfile
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import ModelConfig, TrainConfig
from gptlab.device import (
    DTYPES,
    autocast,
    can_compile,
    cpu_has_fast_bf16,
    keep_freed_memory,
    peak_flops,
    pick_device,
    pick_precision,
    set_threads,
)
from gptlab.model import build_model
from gptlab.train.optim import build_optimizer
from gptlab.train.step import TrainStep

SHAPES = {
    "nano": dict(n_layer=4, d_model=128, n_head=4, context_length=64, batch=12, vocab=65),
    "4m": dict(n_layer=4, d_model=256, n_head=4, context_length=256, batch=16, vocab=4096),
    "16m": dict(n_layer=8, d_model=384, n_head=6, context_length=256, batch=16, vocab=4096),
}
ROWS = ["default", "nanogpt_cpu", "nanogpt_fp32_compile", "nanogpt_bf16", "nanogpt_bf16_compile", "fp32_eager", "fp32_compile",
        "bf16_eager", "bf16_compile", "hf_llama_bf16", "hf_llama_fp32"]
NANOGPT_ROWS = [row for row in ROWS if row.startswith("nanogpt")]


def gptlab_step(shape: dict, device: torch.device, precision: str, compile: bool):
    cfg = ModelConfig(n_layer=shape["n_layer"], d_model=shape["d_model"], n_head=shape["n_head"],
                      context_length=shape["context_length"], vocab_size=shape["vocab"])
    model = build_model(cfg, device).train()
    train_cfg = TrainConfig(lr=1e-3)
    step = TrainStep(model, build_optimizer(model, train_cfg, device), device, precision, grad_clip=1.0, compile=compile)
    params = model.num_params()
    return (lambda batch: step(lambda: batch, 1, 1e-3)), params, model


# --------------------------------------------------------------------------- nanoGPT, as its model.py has it


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, d, n_head, bias):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias), n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, d, n_head, bias):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = NanoLayerNorm(d, bias), NanoAttention(d, n_head, bias), NanoLayerNorm(d, bias)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=bias), nn.GELU(), nn.Linear(4 * d, d, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab, context, n_layer, d, n_head, bias=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.h = nn.ModuleList(NanoBlock(d, n_head, bias) for _ in range(n_layer))
        self.ln_f = NanoLayerNorm(d, bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():  # _init_weights + the scaled residual projections
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("attn.c_proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_step(shape: dict, device: torch.device, precision: str = "fp32", compile: bool = False):
    """nanoGPT's train.py loop body: its CPU recipe (README: --device=cpu --compile=False; fp32) by default,
    else --dtype=bfloat16 (autocast; no GradScaler, which train.py enables for float16 only) and/or
    --compile=True (train.py compiles the model: `model = torch.compile(model)`)."""
    model = NanoGPT(shape["vocab"], shape["context_length"], shape["n_layer"], shape["d_model"], shape["n_head"]).to(device).train()
    forward = torch.compile(model) if compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))  # fused only on CUDA in configure_optimizers

    def step(batch):
        x, y = batch
        with autocast(device, precision):  # train.py's ctx
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # --log_interval=1: the recipe prints the loss every step
        return loss.detach(), None

    return step, sum(p.numel() for p in model.parameters()), model


def hf_llama_step(shape: dict, device: torch.device, precision: str, compile: bool = False):  # eager only
    from transformers import LlamaConfig, LlamaForCausalLM

    d = shape["d_model"]
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=d, intermediate_size=int(8 * d / 3),  # = a 4x GELU MLP's weights
                      num_hidden_layers=shape["n_layer"], num_attention_heads=shape["n_head"],
                      num_key_value_heads=shape["n_head"], max_position_embeddings=shape["context_length"],
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type in ("cuda", "cpu"))

    def step(batch):
        x, y = batch
        with autocast(device, precision):
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), None

    return step, sum(p.numel() for p in model.parameters()), model


def flops_per_token(model: nn.Module, shape: dict) -> float:
    """Training FLOPs per token of any of the rows' models, counted the same way (nanoGPT's estimate_mfu, PaLM):
    6 per weight of every nn.Linear (the output head included, tied or not) + 12 * layers * width * context."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6.0 * matmul_weights + 12.0 * shape["n_layer"] * shape["d_model"] * shape["context_length"]


def warm_up(step, batches, warmup: int, sync, budget: float) -> tuple[float, float]:
    """Untimed steps (torch.compile compiles in the first); returns (their total time, the last one's time).

    A row slower than the budget (bf16 on a CPU without native bf16 runs at a few GFLOP/s) stops warming
    up after its second step: the first may include one-off costs, the second shows the steady pace.
    """
    times = []
    for i in range(warmup):
        start = time.perf_counter()
        step(batches[i % len(batches)])[0].item()
        sync()
        times.append(time.perf_counter() - start)
        if i >= 1 and sum(times) > budget:
            break
    return sum(times), times[-1]


def time_steps(step, batches, steps: int, sync) -> float:
    start = time.perf_counter()
    for i in range(steps):
        loss, _ = step(batches[i % len(batches)])
    loss.item()  # one sync at the end: the trainer syncs only at log steps
    sync()
    return (time.perf_counter() - start) / steps


BUILDERS = {"gptlab": gptlab_step, "nanogpt": nanogpt_step, "hf": hf_llama_step}


class Rows:
    """Builds rows' training steps and times them in this process."""

    def __init__(self, device: torch.device):
        self.device, self.built = device, {}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def build(self, setting: tuple, shape: dict, batches: list, warmup: int, budget: float) -> tuple:
        """Builds and warms up a (model, precision, compile) row: (params, warm-up s, last warm-up step s, FLOPs a token)."""
        torch.manual_seed(0)
        model, precision, compile = setting
        step, params, net = BUILDERS[model](shape, self.device, precision, compile)
        warm, pace = warm_up(step, batches, warmup, self.sync, budget)
        self.built[setting] = (step, batches)
        return params, warm, pace, flops_per_token(net, shape)

    def time(self, setting: tuple, steps: int) -> float:
        step, batches = self.built[setting]
        return time_steps(step, batches, steps, self.sync)

    def reset(self) -> None:
        self.built.clear()
        torch._dynamo.reset()


class PeerProcess:
    """The peers' rows (nanoGPT, HF Llama) run in a child process, as they would run on their own.

    gptlab's rows run here under the allocator setting `gptlab train` makes (device.keep_freed_memory), which
    holds for the whole process; the peers keep glibc's default malloc (or gptlab's with --peer-allocator=kept).
    The child waits on its pipe while a row runs here, so the rows still take turns round by round.
    """

    def __init__(self, device: torch.device, threads: int, allocator: str):
        context = multiprocessing.get_context("spawn")  # a fork of a process with OpenMP threads can hang
        self.pipe, child_end = context.Pipe()
        self.process = context.Process(target=_serve_peer_rows, args=(child_end, device.type, threads, allocator),
                                       daemon=True)
        self.process.start()

    def _call(self, method: str, *args):
        self.pipe.send((method, args))
        ok, value = self.pipe.recv()
        if not ok:
            raise RuntimeError(f"the peer process failed in {method}:\n{value}")
        return value

    def build(self, *args) -> tuple:
        return self._call("build", *args)

    def time(self, *args) -> float:
        return self._call("time", *args)

    def reset(self) -> None:
        self._call("reset")

    def close(self) -> None:
        self.pipe.send(None)
        self.process.join(timeout=30)


def _serve_peer_rows(pipe, device_type: str, threads: int, allocator: str) -> None:
    set_threads(threads)
    if allocator == "kept":
        keep_freed_memory(device_type)
    rows = Rows(torch.device(device_type))
    while (request := pipe.recv()) is not None:
        method, args = request
        try:
            pipe.send((True, getattr(rows, method)(*args)))
        except Exception:  # handed to the parent, which stops the benchmark with it
            pipe.send((False, traceback.format_exc()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="nano,4m,16m", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ",".join(ROWS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows; each row keeps its best (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--row-seconds", type=float, default=60,
                        help="time budget per row and shape: slow rows time fewer steps (default 60)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = every core)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peer-allocator", choices=("default", "kept"), default="default",
                        help="the peers' malloc: the C library's default (as they run) or kept as gptlab's is")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse torch.compile's on-disk cache (default: a fresh one, so warm-up is a first run's)")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptlab-bench-inductor-")

    device = pick_device(args.device)
    threads = set_threads(args.threads)
    kept = keep_freed_memory(device)  # as `gptlab train` does
    default = (pick_precision("auto", device), can_compile(device))  # what train.precision/compile=auto pick for a long run
    print(f"device {device.type}, {threads} threads, torch {torch.__version__}; native bf16 on this CPU: "
          f"{cpu_has_fast_bf16()}; gptlab default = precision {default[0]}, compile {'on' if default[1] else 'off'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"gptlab rows: {'freed memory kept for the next step' if kept else 'the C library default malloc'} (as gptlab "
          f"train does); nanoGPT and Llama rows: a process of their own, {args.peer_allocator} malloc")
    peaks = {name: peak_flops(device, DTYPES[name]) for name in ("fp32", "bf16")}
    print("MFU peak (gptlab bench peak, cached): " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"each row: {args.warmup} warm-up steps, then {args.rounds} rounds of up to {args.steps} timed steps "
          f"(fewer for rows slower than {args.row_seconds:.0f} s), rows interleaved; the best round counts "
          "(other work on the machine only ever slows a round down)")
    settings = {  # row -> (model, precision, compile)
        "default": ("gptlab", *default), "nanogpt_cpu": ("nanogpt", "fp32", False),
        "nanogpt_fp32_compile": ("nanogpt", "fp32", True), "nanogpt_bf16": ("nanogpt", "bf16", False),
        "nanogpt_bf16_compile": ("nanogpt", "bf16", True), "fp32_eager": ("gptlab", "fp32", False),
        "fp32_compile": ("gptlab", "fp32", True), "bf16_eager": ("gptlab", "bf16", False), "bf16_compile": ("gptlab", "bf16", True),
        "hf_llama_bf16": ("hf", "bf16", False), "hf_llama_fp32": ("hf", "fp32", False),
    }
    labels = {"default": f"gptlab default ({default[0]}{', compile' if default[1] else ''})",
              "nanogpt_cpu": "nanogpt cpu recipe (fp32 eager)", "nanogpt_fp32_compile": "nanogpt fp32 compile",
              "nanogpt_bf16": "nanogpt bf16 autocast", "nanogpt_bf16_compile": "nanogpt bf16 autocast compile",
              "fp32_eager": "gptlab fp32 eager", "fp32_compile": "gptlab fp32 compile", "bf16_eager": "gptlab bf16 eager",
              "bf16_compile": "gptlab bf16 compile",
              "hf_llama_bf16": "hf llama bf16 autocast", "hf_llama_fp32": "hf llama fp32"}
    wanted = [r for r in args.rows.split(",") if r]
    if not default[1]:  # no compiler here
        wanted = [row for row in wanted if not row.endswith("compile")]
    if device.type == "cpu" and not cpu_has_fast_bf16():  # bf16 is emulated: nanoGPT's settings here are the fp32 ones
        wanted = [row for row in wanted if not row.startswith("nanogpt_bf16")]
    header = (f"{'shape':6} {'row':31} {'params':>8} {'tokens/s':>10} {'ms/step':>9} {'steps':>5} {'warm-up s':>9} "
              f"{'MFU':>6} {'vs nanogpt':>10} {'vs fp32 eager':>13}")
    print(header)
    print("-" * len(header))
    here = Rows(device)
    peers = PeerProcess(device, threads, args.peer_allocator) if any(settings[k][0] != "gptlab" for k in wanted) else None
    results: dict[str, dict[str, dict]] = {}
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        B, T, V = shape["batch"], shape["context_length"], shape["vocab"]
        batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous())
                   for t in (torch.randint(0, V, (B, T + 1), device=device) for _ in range(4))]
        steps, built = {}, {}  # rows with the same settings share one model and one timing (default = fp32_compile)
        for key in wanted:
            setting = settings[key]
            if setting not in built:
                runner = here if setting[0] == "gptlab" else peers
                params, warm, pace, flops = runner.build(setting, shape, batches, args.warmup, args.row_seconds / 2)
                n = max(1, min(args.steps, int(args.row_seconds / 2 / args.rounds / pace)))
                built[setting] = (runner, params, warm, n, flops / peaks[setting[1]])
            steps[key] = built[setting]
        rounds = {setting: [] for setting in built}  # a step's seconds, round by round
        for _ in range(args.rounds):
            for setting, (runner, _, _, n, _) in built.items():
                rounds[setting].append(runner.time(setting, n))
        best = {setting: min(seconds) for setting, seconds in rounds.items()}
        results[shape_name] = {key: {"tok_s": B * T / best[settings[key]], "ms_step": 1000 * best[settings[key]],
                                     "warmup_s": steps[key][2], "params": steps[key][1], "steps": steps[key][3],
                                     "mfu": B * T / best[settings[key]] * steps[key][4], "rounds": rounds[settings[key]]}
                               for key in steps}
        for key, r in results[shape_name].items():
            ratios = [f"{r['tok_s'] / base['tok_s']:.2f}x" if base else ""
                      for base in (results[shape_name].get("nanogpt_cpu"), results[shape_name].get("fp32_eager"))]
            print(f"{shape_name:6} {labels[key]:31} {r['params'] / 1e6:7.2f}M {r['tok_s']:10,.0f} {r['ms_step']:9.1f} "
                  f"{r['steps']:5} {r['warmup_s']:9.1f} {100 * r['mfu']:5.1f}% {ratios[0]:>10} {ratios[1]:>13}", flush=True)
        _compile_note(results[shape_name])
        for runner in filter(None, (here, peers)):
            runner.reset()

    if peers:
        peers.close()
    name = "4m" if "4m" in results else next(iter(results))
    r = results[name]
    get = lambda key: r[key]["tok_s"] if key in r else float("nan")  # noqa: E731  (nan for a row not run, or None)
    llama = max((get(k) for k in ("hf_llama_bf16", "hf_llama_fp32") if k in r), default=float("nan"))
    nano_best = max((k for k in NANOGPT_ROWS if k in r), key=get, default=None)  # the fastest nanoGPT setting run here
    mfu = r["default"]["mfu"] if "default" in r else float("nan")
    # The same comparison paired round by round (each round's default against that round's nanoGPT row): a
    # machine whose speed drifts over minutes moves both halves of a pair, where best-of-rounds can pick each
    # row's best from a different minute.
    paired = (sorted(nano / ours for ours, nano in zip(r["default"]["rounds"], r[nano_best]["rounds"]))
              if nano_best and "default" in r else [float("nan")])
    if nano_best:
        print(f"fastest nanoGPT setting here: {labels[nano_best]} ({get(nano_best):,.0f} tokens/s); gptlab default "
              f"{get('default') / get(nano_best):.2f}x it (best rounds); round by round: median "
              f"{statistics.median(paired):.2f}x, range {paired[0]:.2f}-{paired[-1]:.2f}x over {len(paired)} rounds")
    print(f"RESULT shape={name} cpu={torch.backends.cpu.get_cpu_capability()} gptlab_tok_s={get('default'):.0f} "
          f"nanogpt_best_tok_s={get(nano_best):.0f} nanogpt_best={nano_best} "
          f"vs_nanogpt_best={get('default') / get(nano_best):.2f} vs_nanogpt_best_paired={statistics.median(paired):.2f} "
          f"nanogpt_cpu_tok_s={get('nanogpt_cpu'):.0f} fp32_eager_tok_s={get('fp32_eager'):.0f} "
          f"hf_llama_bf16_tok_s={get('hf_llama_bf16'):.0f} vs_nanogpt_cpu={get('default') / get('nanogpt_cpu'):.2f} "
          f"vs_fp32_eager={get('default') / get('fp32_eager'):.2f} vs_hf_llama={get('default') / llama:.2f} mfu={mfu:.3f} "
          f"peak_fp32_gflops={peaks['fp32'] / 1e9:.1f} peak_bf16_gflops={peaks['bf16'] / 1e9:.1f}")


def _compile_note(rows: dict) -> None:
    """When does compiling pay? It costs (warm-up time - eager warm-up) once and saves a share of every step."""
    eager, compiled = rows.get("fp32_eager"), rows.get("fp32_compile")
    if not (eager and compiled) or compiled["ms_step"] >= eager["ms_step"]:
        return
    extra = compiled["warmup_s"] - eager["warmup_s"]
    saved_per_step = (eager["ms_step"] - compiled["ms_step"]) / 1000
    steps = math.ceil(extra / saved_per_step)
    print(f"       compile costs {extra:.0f} s once and saves {1000 * saved_per_step:.1f} ms a step: "
          f"it pays after {steps:,} steps (~{steps * eager['ms_step'] / 1000:.0f} s of eager training)")


if __name__ == "__main__":
    main()
