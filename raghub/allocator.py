"""glibc's malloc told to keep freed memory for reuse instead of handing it back to the system.

By default glibc serves a large allocation from fresh pages (mmap, above a threshold that
only grows as such blocks are freed) and returns free memory at the top of its heap once it
exceeds twice that threshold. A model's forward pass on a CPU allocates and frees tensors of
many megabytes, so every pass faults its activations in again, page by page: 260,000 to
540,000 minor page faults per bf16 pass of SmolLM2 over 4 × 1,040 tokens on the machine this
was measured on, where keeping freed memory made the pass about 1.1 × faster. Results do not
change. Only glibc is tuned; other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import platform

#: mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: the largest mmap threshold glibc accepts on 64-bit systems: bigger blocks still come from mmap
MMAP_THRESHOLD = 32 * 2**20
#: free memory kept at the top of the heap before any is returned (mallopt takes an int)
TRIM_THRESHOLD = 2**31 - 1
KEPT = "glibc, freed memory kept (blocks up to 32 MiB)"

_in_effect = "default"


def keep_freed_memory() -> str:
    """Set glibc's thresholds (once per process; elsewhere, nothing) and say what is in effect."""
    global _in_effect
    if _in_effect == "default" and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
            _in_effect = KEPT
    return _in_effect


def in_effect() -> str:
    """What the allocator runs with, for the record: `KEPT` or "default"."""
    return _in_effect
