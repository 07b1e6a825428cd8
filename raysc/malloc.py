"""glibc malloc settings for processes that handle large arrays in a loop.

With glibc's defaults every thread that allocates gets an arena of its own, and every block over
the (dynamic) mmap threshold is mapped fresh and returned at once: each large tensor or waveform
then costs page faults on every use. One arena, and large blocks kept in the heap, halved a
Ray-trained CPU epoch (benchmarks/train_overhead.py) and took a third off a clip's decoding,
resampling and int16 conversion (docs/guides/train.md, "Memory allocator"). The price is memory: a process
keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# Read by glibc when a process starts: raysc gives them to the Ray workers it starts work in.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
# mallopt's parameter numbers (glibc's malloc.h) for the same settings.
_MALLOPT = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}


def tune_malloc() -> bool:
    """Apply ``MALLOC_ENV`` to this running process (glibc's ``mallopt``), leaving any of these
    variables that the environment sets to glibc, which read them at start. Call it before the
    process starts threads. Returns False where there is no glibc (nothing changed) or glibc
    refused a setting."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = True
    for key, value in MALLOC_ENV.items():
        if key not in os.environ:
            ok &= bool(mallopt(_MALLOPT[key], int(value)))
    if not ok:
        log.debug("glibc refused a malloc setting; this process keeps its default")
    return ok
