"""A corpus far larger than the working set streams through `gptlab data prepare` in bounded memory."""

import subprocess
import sys
import time

import pytest
from helpers import TINY_STORIES

CORPUS_BYTES = 200_000_000
RSS_LIMIT = 1_000_000_000


def peak_tree_rss(proc: subprocess.Popen) -> int:
    """Peak of the summed RSS of a process and all its children (shared pages count once per process)."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.02)
    return peak


@pytest.mark.slow
def test_200mb_corpus_prepares_in_bounded_memory(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "big.txt"
    block = "".join(f"Story {i}. {TINY_STORIES[i % 6]} {TINY_STORIES[(i * 5 + 1) % 6]}\n<|endoftext|>\n" for i in range(20_000))
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(CORPUS_BYTES // len(block) + 1):
            f.write(block)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gptlab", "data", "prepare", "--data", str(corpus), "--tokenizer", str(tiny_tokenizer),
           "--out", str(out), "--quiet", "--data.shard_size=20000000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = peak_tree_rss(proc)
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    from gptlab.data import load_meta

    meta = load_meta(out)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] > corpus.stat().st_size * 0.85  # minus the separator lines
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert peak < RSS_LIMIT, f"peak RSS of the process tree {peak / 1e6:.0f} MB"
    print(f"peak RSS {peak / 1e6:.0f} MB")
