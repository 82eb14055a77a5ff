"""benchmarks/gpu_check.sh --dry-run: the GPU check's every stage on a CPU with a tiny model, so that the
script does not rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_goes_through_every_stage_and_reports(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = dict(re.findall(r"(\w+)=(\S+)", last))
    assert last.startswith("RESULT ") and result["gpu"] == "cpu" and result["tests"] == "passed", last
    for key in ("tokens_per_s", "mfu", "gen_tokens_per_s"):
        assert float(result[key]) > 0, last
    for name in ("env", "tests", "data", "train", "generate", "profile", "peak"):
        assert (out / f"{name}.log").stat().st_size > 0, name
    assert "skipped" in (out / "tests.log").read_text()  # the CUDA tests, collected and skipped on a CPU
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["device"], summary["compile"]) == (6, "cpu", False)
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 6
    assert "KV cache vs recompute" in (out / "generate.log").read_text()
    profile = (out / "profile.log").read_text()
    assert "matmul" in profile and "aten::mm" in profile, profile  # the model's matmuls, found and named
    shares = dict(re.findall(r"(\w+)=(\S+)", profile.strip().splitlines()[-1]))
    assert 0.2 < float(shares["matmul_share"]) < 1 and 0.5 < float(shares["busy_share"]) <= 1.05, shares
    assert "MFU peak fp32" in (out / "peak.log").read_text()
