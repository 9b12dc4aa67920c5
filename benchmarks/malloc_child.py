"""The child process every CPU timing benchmark runs its timings in, with glibc's allocator fixed.

glibc hands blocks above its mmap threshold back to the kernel when they are freed and gets them back
zeroed, so a batch-64 ResNet forward pass can take 20-35k page faults, and its time depends on what
the process did before. A benchmark re-runs itself (``rerun_in_child``) in a child whose environment
fixes ``MALLOC_MMAP_THRESHOLD_`` (32 MiB, glibc's largest accepted value on 64-bit: every activation
then comes from the heap) and ``MALLOC_TRIM_THRESHOLD_`` (1 TiB: the heap is never trimmed), or
clears both (``mode="default"``: glibc's own behaviour, to show the difference), and sets the
thread counts before torch starts. ``CHILD_ENV`` in the child's environment holds the mode."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import NoReturn

__all__ = ["CHILD_ENV", "MALLOC_KEYS", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "malloc_env", "in_child",
           "rerun_in_child"]

CHILD_ENV = "PRUNETUNE_BENCH_CHILD"
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1 << 40
MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def malloc_env(mode: str) -> dict[str, str]:
    """The allocator variables of ``mode`` (``fixed``), or none (``default``)."""
    if mode == "fixed":
        return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    return {}


def in_child() -> bool:
    return os.environ.get(CHILD_ENV) is not None


def rerun_in_child(mode: str = "fixed", threads: int = 1) -> NoReturn:
    """Run this script again, same arguments, in a child with the allocator ``mode`` and ``threads``
    OpenMP/MKL threads; exit with its status."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
    env.update(malloc_env(mode))
    env.update({CHILD_ENV: mode, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    print(f"timing in a child process: allocator {mode} {malloc_env(mode) or '(glibc defaults)'}, "
          f"{threads} thread(s)", flush=True)
    sys.exit(subprocess.call([sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]], env=env))
