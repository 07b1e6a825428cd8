from __future__ import annotations

import json
import os
import subprocess
import sys

from raysc.malloc import MALLOC_ENV

# In a fresh process (glibc reads the variables at start, and the malloc state is per process):
# whether an 8 MB block is served by its own mmap (glibc's default for blocks over 128 KB) or
# from the heap, read from mallinfo2's count of mapped blocks while it is held.
PROBE = """
import ctypes, json, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = None
if sys.argv[1] == "tune":
    from raysc.malloc import tune_malloc
    tuned = tune_malloc()
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"tuned": tuned, "mapped": mapped}))
"""


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=clean, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_malloc_keeps_large_blocks_in_the_heap():
    assert _probe("plain") == {"tuned": None, "mapped": 1}  # glibc's default: mapped fresh, unmapped at free
    assert _probe("tune") == {"tuned": True, "mapped": 0}


def test_a_users_own_malloc_variable_wins_over_tune_malloc():
    assert _probe("tune", MALLOC_MMAP_THRESHOLD_=str(64 << 10)) == {"tuned": True, "mapped": 1}
