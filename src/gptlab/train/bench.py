"""`gptlab bench peak`: what this machine's matmuls can do, the ceiling that MFU is measured against.

The numbers are measured through PyTorch -- the same kernels a training step
calls -- not read from a datasheet: on a CPU the gap between the two is large
and depends on the instruction sets (an AVX2 CPU emulates bf16 and runs it
~50x slower than fp32; AVX-512-BF16 or AMX make it 2-3x faster).
"""

from __future__ import annotations

import torch

from gptlab.train.device import (
    DTYPES, cache_dir, cpu_features, datasheet_flops, device_name, measure_matmul, set_threads, store_peak,
)


def peak(device: torch.device, seconds: float = 6.0, threads: int = 0) -> dict:
    """Measure fp32, bf16 and fp16 matmuls on `device` (`seconds` in all) and cache each dtype's best.

    The cache keeps the best measurement ever made for the device, dtype and
    thread count; it is what the trainer's MFU uses (mfu_peak_flops here).
    """
    threads = set_threads(threads) if device.type == "cpu" else 0
    rows, best, cached = [], {}, {}
    for name, dtype in DTYPES.items():
        try:
            sizes = measure_matmul(device, dtype, seconds / len(DTYPES))
        except RuntimeError:  # a dtype this device has no matmul for
            continue
        for n, flops in sizes.items():
            rows.append({"dtype": name, "size": n, "flops": flops})
        best[name] = max(sizes.values())
        cached[name] = store_peak(device, dtype, best[name], sizes)
    mfu_peak = {name: datasheet_flops(device, DTYPES[name]) or cached[name] for name in best}
    return {
        "device": device.type, "device_name": device_name(device), "threads": threads, "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": cpu_features(),
        "matmul": rows, "peak_flops": best, "mfu_peak_flops": mfu_peak, "cache": str(cache_dir() / "peak.json"),
    }


def format_peak(result: dict) -> str:
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["cpu_features"].items())
    lines = [f"device {result['device_name']}, {result['threads'] or '-'} threads, torch {result['torch']}",
             f"cpu capability {result['cpu_capability']} ({features})", "",
             f"{'dtype':6} {'size':>6} {'GFLOP/s':>10} {'TFLOP/s':>8}"]
    for row in result["matmul"]:
        best = row["flops"] == result["peak_flops"][row["dtype"]]
        lines.append(f"{row['dtype']:6} {row['size']:6} {row['flops'] / 1e9:10.1f} {row['flops'] / 1e12:8.3f}"
                     + ("  <- peak" if best else ""))
    lines.append("")
    for name, flops in result["mfu_peak_flops"].items():
        measured = result["peak_flops"][name]
        source = ("measured now" if flops == measured else "datasheet" if result["device"] == "cuda"
                  else f"the best measured so far; {measured / 1e9:,.2f} this time")
        lines.append(f"MFU peak {name}: {flops / 1e9:,.1f} GFLOP/s ({source})")
    lines.append(f"cached in {result['cache']} (train runs on this device use it for MFU)")
    return "\n".join(lines)
