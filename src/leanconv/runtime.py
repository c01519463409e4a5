"""Process-level CPU settings that decide whether slim convolutions are fast in practice.

glibc's ``malloc`` serves every allocation above ``M_MMAP_THRESHOLD`` (128 KiB, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``. A
network's activations are exactly such allocations, re-made at every call, so each forward pays
a page fault (and a kernel zero-fill) per 4 KiB page it writes. A slim module writes more,
smaller maps than the vanilla convolution it replaces (branch outputs, gates, fusions), so it
pays more of this tax: measured on the 2-core machine of ``docs/performance.md``, CIFAR
ResNet-56 at batch 128 (channels_last, eval) went from 156 to 127 ms for vanilla and from 377 to
224 ms for SPConv when the heap keeps freed memory.

:func:`tune_allocator` makes glibc keep it (``mallopt(M_MMAP_THRESHOLD)`` and
``mallopt(M_TRIM_THRESHOLD)`` at 1 GiB): the same effect as starting Python with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824``
or preloading jemalloc/tcmalloc, without restarting the process. The cost is memory: the peak
heap is kept instead of being returned to the system. ``leanconv bench``, the benchmark
scripts and ``leanconv train`` call it (``--no-tune-allocator`` to measure the defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["allocator_setup", "tune_allocator"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_TUNED: dict[str, int] = {}


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError on musl, macOS, ...
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Keep freed memory in the heap (glibc only); return whether the settings were applied.

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``threshold`` bytes (default 1 GiB):
    allocations below it come from the heap, and the heap is not trimmed until that much is
    free at its top. A no-op returning ``False`` where the C library is not glibc or an
    ``LD_PRELOAD``-ed allocator is in charge.
    """
    if not isinstance(threshold, int) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc / tcmalloc already in charge
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1 and ok
    if ok:
        _TUNED["threshold"] = threshold
    return ok


def allocator_setup() -> str:
    """One line describing the allocator, for benchmark headers."""
    parts = []
    if "threshold" in _TUNED:
        parts.append(f"glibc malloc tuned (mmap/trim threshold {_TUNED['threshold'] >> 20} MiB)")
    if os.environ.get("GLIBC_TUNABLES"):
        parts.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
    if os.environ.get("LD_PRELOAD"):
        parts.append(f"LD_PRELOAD={os.environ['LD_PRELOAD']}")
    return ", ".join(parts) or "glibc malloc defaults"
