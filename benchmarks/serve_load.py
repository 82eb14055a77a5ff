"""`gptlab serve` under load: 64 concurrent streaming clients, continuous batching against one request at a time.

    python benchmarks/serve_load.py                  # 400 requests x 64 tokens, 64 clients, slots 64 vs slots 1
    python benchmarks/serve_load.py --quick          # 64 requests x 32 tokens, 32 clients: a check that it works
    python benchmarks/serve_load.py --threads 2 --requests 200 --max-seconds 300

The model: the tiny-4m shape (4 layers x 256, 4 heads, context 256) at the vocabulary of a 4,096-token
byte-level BPE trained on TinyStories (../shared/data; a built-in text where that is absent), random
weights (only speed is measured), written as a run. The tokenizer has no EOS token, so nothing stops a
request early: every request generates exactly --max-tokens tokens, whichever mode serves it.

Each mode starts its own `gptlab serve RUN` process (127.0.0.1, a free port): --slots 64 (continuous
batching: every request joins the running batch at the next pass) and --slots 1 (one request at a time,
the others queued). The clients (asyncio + httpx, in this process) send --requests streamed
/v1/completions requests, --clients at a time, each with its own prompt and seed, temperature 1, and time
the first text (time to first token, TTFT) and the end (latency) of each. Throughput is completion tokens
(from the usage the server reports) per second of wall time from the first request to the last answer.
The server's /metrics gives the mean batch size of its decode passes.

Targets (issue 14): every request answered, no errors; batching >= 3x the throughput of one at a time;
p95 TTFT < 1 s with batching. The last line is
`RESULT throughput_ratio=... batched_tok_s=... single_tok_s=... p95_ttft_s=... p95_latency_s=... errors=... cpu=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinystories" / "TinyStories-train_head.txt"
PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named Lily", "Tom and his mom went to",
           "There was a big tree", "The sun was shining and", "A small bird sat on", "Ben wanted to play with"]


def make_run(folder: Path) -> Path:
    """A tiny-4m run with random weights and a 4,096-token BPE without EOS."""
    from gptlab.config import MODEL_PRESETS, Config, ModelConfig, TokenizerConfig, TrainConfig, config_to_dict, save_config
    from gptlab.model import build_model
    from gptlab.tokenizer import train_tokenizer
    from gptlab.train.checkpoint import save_checkpoint

    if TEXT.is_file():
        docs = TEXT.read_text(encoding="utf-8").split("\n\n")
    else:  # no shared data: a made-up text, enough for a (smaller) vocabulary
        words = " ".join(PROMPTS).split()
        docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" {i}." for i in range(3000)]
    tokenizer = train_tokenizer(docs, TokenizerConfig(kind="bpe", vocab_size=4096, eos_token=None))
    cfg = ModelConfig(**{**MODEL_PRESETS["tiny-4m"], "vocab_size": tokenizer.vocab_size})
    run = folder / "tiny-4m"
    run.mkdir()
    torch.manual_seed(0)
    model = build_model(cfg)
    save_config(Config(model=cfg, train=TrainConfig(run_dir=str(run), data_dir=str(folder))), run / "config.toml")
    tokenizer.save(run / "tokenizer.json")
    info = {"step": 1, "tokens": 0, "model": config_to_dict(cfg), "tokenizer_checksum": tokenizer.checksum}
    save_checkpoint(run, 1, model, {}, info)
    print(f"run {run.name}: {model.num_params():,} parameters (random weights), vocab {tokenizer.vocab_size:,}, no EOS")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, slots: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("GPTLAB_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run), "--port", str(port), "--slots",
                             str(slots), "--queue", "4096", "--queue-timeout", "3600", "--threads", str(threads), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server did not start: {proc.stderr.read()}")
        try:
            httpx.get(url + "/health", timeout=2)
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                sys.exit("the server did not start within 120 s")
            time.sleep(0.2)


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                    ttft = time.perf_counter() - start
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens, "error": error}


async def load(url: str, requests: int, clients: int, max_tokens: int, max_seconds: float) -> dict:
    """`requests` requests, `clients` at a time; those not started by max_seconds are not sent (counted)."""
    results, next_index = [], iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            for i in next_index:
                if time.perf_counter() - start > max_seconds:
                    return
                results.append(await one_request(client, url, i, max_tokens))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return {"results": results, "seconds": time.perf_counter() - start}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def mean_batch(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name in ("gptlab_batch_size_sum", "gptlab_batch_size_count"):
                found[sample.name] = sample.value
    return found.get("gptlab_batch_size_sum", 0) / max(1, found.get("gptlab_batch_size_count", 0))


def run_mode(run: Path, slots: int, args) -> dict:
    proc, url = start_server(run, slots, args.threads)
    try:
        asyncio.run(load(url, min(4, slots), min(4, slots), 4, 60))  # warm-up: first passes, allocations
        out = asyncio.run(load(url, args.requests, args.clients, args.max_tokens, args.max_seconds))
        out["mean_batch"] = mean_batch(url)  # the warm-up's few passes included
    finally:
        proc.terminate()
        proc.wait(30)
    results = out["results"]
    ok = [r for r in results if r.get("error") is None]
    tokens = sum(r["tokens"] for r in ok)
    return {"slots": slots, "sent": len(results), "unsent": args.requests - len(results),
            "errors": len(results) - len(ok), "tokens": tokens, "seconds": out["seconds"],
            "tok_s": tokens / out["seconds"], "req_s": len(ok) / out["seconds"],
            "ttft50": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
            "ttft95": pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.95),
            "lat50": pct([r["latency"] for r in ok], 0.5), "lat95": pct([r["latency"] for r in ok], 0.95),
            "mean_batch": out["mean_batch"],
            "first_error": next((r["error"] for r in results if r.get("error")), None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per mode (default 400)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--slots", type=int, default=64, help="slots of the batching server (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads (default: all cores)")
    parser.add_argument("--max-seconds", type=float, default=600, help="per mode: no new request after this (default 600)")
    parser.add_argument("--quick", action="store_true", help="64 requests x 32 tokens, 32 clients, 120 s per mode")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients, args.max_tokens, args.max_seconds = 64, 32, 32, 120

    from gptlab.device import peak_flops

    capability = torch.backends.cpu.get_cpu_capability()
    peak = peak_flops(torch.device("cpu"), torch.float32)
    print(f"cpu capability {capability}, {os.cpu_count()} cores, server threads {args.threads or 'all'}, torch "
          f"{torch.__version__}; fp32 peak (gptlab bench peak, cached) {peak / 1e9:,.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        print(f"{args.requests} requests x {args.max_tokens} tokens, {args.clients} clients, streamed")
        rows = [run_mode(run, args.slots, args), run_mode(run, 1, args)]
    head = (f"{'mode':21} {'answered':>8} {'errors':>6} {'tokens/s':>9} {'req/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
            f"{'lat p50':>8} {'lat p95':>8} {'batch':>6}")
    print(head)
    for r in rows:
        name = f"slots {r['slots']}" + (" batching" if r["slots"] > 1 else " one at a time")
        print(f"{name:21} {r['sent'] - r['errors']:8d} {r['errors']:6d} {r['tok_s']:9.0f} {r['req_s']:7.2f} "
              f"{r['ttft50']:9.3f} {r['ttft95']:9.3f} {r['lat50']:8.2f} {r['lat95']:8.2f} {r['mean_batch']:6.1f}")
        if r["unsent"]:
            print(f"  {r['unsent']} requests not sent: --max-seconds {args.max_seconds:g} reached")
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    batched, single = rows
    ratio = batched["tok_s"] / max(single["tok_s"], 1e-9)
    errors = batched["errors"] + single["errors"]
    print(f"targets: no errors ({'met' if errors == 0 else 'MISSED'}), throughput >= 3x one at a time "
          f"({ratio:.2f}x: {'met' if ratio >= 3 else 'MISSED'}), p95 TTFT < 1 s ({batched['ttft95']:.3f} s: "
          f"{'met' if batched['ttft95'] < 1 else 'MISSED'})")
    print(f"RESULT throughput_ratio={ratio:.2f} batched_tok_s={batched['tok_s']:.0f} single_tok_s={single['tok_s']:.0f} "
          f"batched_req_s={batched['req_s']:.2f} p50_ttft_s={batched['ttft50']:.3f} p95_ttft_s={batched['ttft95']:.3f} "
          f"p95_latency_s={batched['lat95']:.2f} mean_batch={batched['mean_batch']:.1f} errors={errors} "
          f"answered={batched['sent'] - batched['errors']}+{single['sent'] - single['errors']} cpu={capability}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
