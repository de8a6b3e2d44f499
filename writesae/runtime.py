"""Process settings for long CPU work: glibc keeps freed memory for reuse.

By default glibc's malloc serves a large block (from 128 KiB, rising as blocks are freed) straight from the
kernel and returns it on ``free``, so a tensor of a few MiB allocated afresh every step (a training step's
intermediates, Adam's temporaries, an edited run's logits) is faulted in page by page each time: a FlatSAE
training step at the book's size took ~3,000 page faults (about a quarter of the step). :func:`keep_freed_memory`
raises both thresholds so freed blocks stay in the process and are reused: the same results (allocation does
not touch values), 5-15 page faults a step. The price is a resident size that stays at its peak until the
process ends, which suits a notebook kernel or a command; the notebooks' ``setup`` and the ``writesae``
command call it. Elsewhere than glibc (macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to their largest values; True where they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(opt, _LARGEST) == 1 for opt in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
