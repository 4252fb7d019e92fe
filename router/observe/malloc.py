"""Keep the router's resident memory flat under a steady load (glibc).

The router keeps large dicts that are written and deleted all the time
(Engine.recent: the last 200,000 deliveries; the active set; correlation
maps). CPython rebuilds such a dict every few hundred thousand inserts,
allocating a fresh table of 10-20 MiB and freeing the old one. glibc serves
blocks that big with mmap, but after freeing one it raises its mmap
threshold to that size (the "dynamic threshold") and serves the next ones
from the brk heap. Small long-lived objects allocated meanwhile pin the
heap's top, so the freed tables cannot be given back and each rebuild moves
the heap up. Measured (benchmarks ``soak`` at 4,500 msg/s for 300 s, the
``[heap]`` mapping of the router in /proc/PID/smaps): the heap grew
28 -> 51 -> 66 MiB in steps every ~500k messages, RSS 175 -> 216 MiB and
still stepping. With the threshold fixed at 128 KiB, the heap stayed at
12.6 MiB and RSS flat at 171 MiB from the first minute to the end, with the
same CPU and latency.

``tune()`` fixes the threshold (setting it explicitly switches the dynamic
adjustment off). Blocks of 128 KiB and more are then mmap'ed and unmapped
on free; the router allocates few of them (COPY buffers, those tables), so
the extra system calls do not show in its CPU. An operator's own
``MALLOC_MMAP_THRESHOLD_`` in the environment wins; other C libraries
(musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc malloc.h
DEFAULT_THRESHOLD = 128 * 1024


def tune(threshold: int = DEFAULT_THRESHOLD) -> str:
    """Fix glibc's mmap threshold; what was done, for the start-up log."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return "environment"
    if platform.libc_ver()[0] != "glibc":
        return "not-glibc"
    name = ctypes.util.find_library("c")
    if name is None:
        return "no-libc"
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        return "no-mallopt"
    return f"mmap_threshold={threshold}" if ok == 1 else "refused"
