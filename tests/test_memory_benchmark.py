"""benchmarks/memory.py: `gptlab model info`'s CPU training peak against the resident memory a real training
run reaches (benchmarks/MEMORY.md), on the two small rows whose measurement is steadiest from run to run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or not sys.platform.startswith("linux"),
                                reason="measures the resident set through Linux's /proc")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predicted_peak_is_within_15_percent_of_the_measured(precision):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--child", "tiny-4m-b2", precision,
                          "--steps", "2", "--threads", "2"], capture_output=True, text=True, check=True, cwd=REPO)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.85 < (row["predicted"]["total"] - row["predicted"]["process"]) / row["peak"] < 1.15, row
