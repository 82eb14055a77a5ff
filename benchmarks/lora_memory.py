"""What LoRA saves in memory when fine-tuning: full fine-tuning vs LoRA (train.lora_rank) at a few model sizes.

For each shape and mode a fresh process builds the model, the AdamW optimizer gptlab trains with, and runs
--steps of gptlab's TrainStep on random tokens (batch --batch x --context, fp32, CPU). It reports

    trainable   parameters that get a gradient
    state MB    gradient + AdamW moments, counted from the tensors themselves (4 bytes each, 3 a parameter)
    peak MB     the process's peak resident memory (ru_maxrss), weights and activations included
    ms/step     the best step

Modes: full (every weight), lora (gptlab's: rank --rank adapters on the blocks' linear maps, the token
embedding and an untied head trained in full, since the chat tokens' rows are new), and adapters (the
embedding frozen too, for reference: what LoRA saves where no embedding row must be learnt).

    python benchmarks/lora_memory.py
    python benchmarks/lora_memory.py --shapes tiny-4m,tiny-16m --rank 16 --batch 8

The last line is `RESULT <shape>_<mode>_peak_mb=... <shape>_<mode>_state_mb=... ... cpu=<torch's CPU capability>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {  # preset, vocabulary (tiny presets at 4,096 as their sizes are quoted; GPT-2's own)
    "tiny-4m": ("tiny-4m", 4096),
    "tiny-16m": ("tiny-16m", 4096),
    "gpt2-124m": ("gpt2-124m", 50257),
}
MODES = ("full", "lora", "adapters")


def child(shape: str, mode: str, rank: int, batch: int, context: int, steps: int, threads: int) -> dict:
    import torch

    from gptlab.config import MODEL_PRESETS, ModelConfig, TrainConfig
    from gptlab.model import build_model
    from gptlab.model.lora import add_adapters
    from gptlab.train.optim import build_optimizer
    from gptlab.train.step import TrainStep

    torch.set_num_threads(threads)
    preset, vocab = SHAPES[shape]
    cfg = ModelConfig(**{**MODEL_PRESETS[preset], "vocab_size": vocab, "context_length": context})
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg, device).train()
    if mode != "full":
        add_adapters(model, rank, alpha=2 * rank)
    if mode == "adapters":
        model.tok_emb.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4), device)
    step = TrainStep(model, optimizer, device, "fp32")
    tokens = torch.randint(0, vocab, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step(lambda: (x, y), 1, 1e-4)[0].item()
        best = min(best, time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    return {"parameters": sum(p.numel() for p in model.parameters()), "trainable": trainable,
            "state_mb": (trainable * 4 + moments) / 2**20, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ms_per_step": best * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rank, args.batch, args.context, args.steps, args.threads)))
        return

    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"cpu {capability}, {args.threads} threads, torch {torch.__version__}; batch {args.batch} x {args.context}, "
          f"fp32, AdamW, LoRA rank {args.rank}; each row a fresh process")
    print(f"{'shape':<10} {'mode':<9} {'parameters':>11} {'trainable':>11} {'state MB':>9} {'peak MB':>8} {'ms/step':>8}")
    result = {}
    for shape in args.shapes.split(","):
        rows = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", shape, mode, "--rank", str(args.rank),
                                  "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            r = rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{shape:<10} {mode:<9} {r['parameters']:>11,} {r['trainable']:>11,} {r['state_mb']:>9.1f} "
                  f"{r['peak_mb']:>8.0f} {r['ms_per_step']:>8.0f}", flush=True)
            result[f"{shape}_{mode}_peak_mb"] = round(r["peak_mb"])
            result[f"{shape}_{mode}_state_mb"] = round(r["state_mb"], 1)
        full, lora = rows["full"], rows["lora"]
        print(f"{'':<10} lora saves {full['state_mb'] - lora['state_mb']:.1f} MB of state "
              f"({1 - lora['state_mb'] / full['state_mb']:.0%}), {full['peak_mb'] - lora['peak_mb']:.0f} MB of peak "
              f"({1 - lora['peak_mb'] / full['peak_mb']:.0%})")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()) + f" cpu={capability}")


if __name__ == "__main__":
    main()
