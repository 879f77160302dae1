"""The allocator setting keeps freed memory in the process (checked in a fresh process each)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
from modecotd.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [bytearray(100_000) for _ in range(100)]  # 10 MB on the heap, then freed
del blocks
start = faults()
for _ in range(20):
    blocks = [bytearray(100_000) for _ in range(100)]
    del blocks
print(applied, faults() - start)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    _, default_faults = _faults("default")
    applied, kept_faults = _faults("keep")
    assert applied == "True"
    # glibc's default trims the freed 10 MB each round, so every round faults its ~2,500 pages again
    assert default_faults > 20_000
    assert kept_faults < 1_000
