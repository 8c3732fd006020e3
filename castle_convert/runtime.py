"""Machine facts and process settings: the memory free for new tensors, and glibc malloc keeping large freed
blocks (the command line applies it before it runs a model).

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves allocations above its mmap threshold
(128 KB to 32 MB) with fresh ``mmap`` pages and returns them on ``free``, so every call that makes multi-megabyte
temporaries pays page faults on each of them again. Softmax attention through SDPA makes few temporaries; the
converted attentions make several (local-global softmax: the window blocks, the logits; measured on DINOv2-S at
518 px: 12.4 → 8.8 ms per layer for the attention, SDPA 19.5 → 18.9 ms). PyTorch's CPU tuning guide recommends
the same effect through jemalloc / tcmalloc or ``MALLOC_*`` environment variables; the CLI sets it with
``mallopt`` (process-wide, glibc only: elsewhere nothing happens). In your own process call
:func:`tune_malloc` once, or start Python with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648
MALLOC_TOP_PAD_=536870912``. ``CASTLE_MALLOC=default`` leaves malloc alone (to measure without it).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3     # glibc's mallopt parameters (malloc.h)
_applied: list[bool] = []


def tune_malloc() -> bool:
    """Keep freed blocks up to 1 GiB in the heap (no mmap, no trimming below 2 GiB, 512 MiB top padding).

    Returns True when the settings took effect (glibc on Linux), False otherwise or with
    ``CASTLE_MALLOC=default``. Peak memory is unchanged; memory freed by PyTorch is kept for reuse instead of
    being returned to the operating system."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("CASTLE_MALLOC", "").lower() != "default" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = all(libc.mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 31),
                                                         (M_TOP_PAD, 1 << 29)))
        except (OSError, AttributeError):               # not glibc (musl, macOS): nothing to tune
            ok = False
    _applied.append(ok)
    return ok


def malloc_note() -> str:
    """One line for benchmark output: how malloc was set."""
    if not _applied:
        return "malloc: default"
    return "malloc: tuned (castle_convert.runtime; CASTLE_MALLOC=default to measure without)" if _applied[0] \
        else "malloc: default"


def available_memory(device: str = "cpu") -> Optional[int]:
    """Bytes of memory free for new tensors on ``device``: CUDA's free memory, else Linux's MemAvailable
    (``/proc/meminfo``), else the free physical pages (``os.sysconf``); None when unknown."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
