"""device.py: the allocator setting a CPU training run makes."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A 16 MiB tensor made and freed again and again, as a training step does with its activations: the minor
# page faults it costs each time with malloc mapping and unmapping it (glibc's behaviour for large blocks until
# its dynamic threshold adapts, which it does only sometimes), then after keep_freed_memory().
FAULTS_PER_TENSOR = """
import ctypes, resource, torch
from gptlab.device import M_MMAP_THRESHOLD, keep_freed_memory

ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # glibc's starting threshold, held there

def faults_per_tensor():  # the median of 21: a kernel's own reclaiming of idle pages may add a few
    counts = []
    for _ in range(21):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(4 << 20).fill_(1.0)  # 4 Mi floats = 16 MiB, every page written
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts)[10]

print(faults_per_tensor(), keep_freed_memory(), faults_per_tensor())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_each_steps_tensors():
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_TENSOR], capture_output=True, text=True, check=True)
    default_faults, kept, kept_faults = out.stdout.split()
    assert kept == "True"
    assert int(kept_faults) < 50  # a 16 MiB tensor is 4,096 pages
    assert int(default_faults) > 4000  # every page of every tensor, as the unmapped memory comes back


def test_keep_freed_memory_leaves_malloc_alone_for_another_device():
    from gptlab.device import keep_freed_memory

    assert keep_freed_memory("cuda") is False  # a GPU run's tensors are not the C library's
