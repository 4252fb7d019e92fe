"""router.observe.malloc: glibc's dynamic mmap threshold is switched off, so
big blocks freed and allocated again (CPython's rebuilds of large churned
dicts) do not ratchet the brk heap up. Each case runs in a fresh process:
the allocator's state is per process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/smaps"),
    reason="glibc's allocator on Linux only; elsewhere tune() leaves malloc alone",
)

PROBE = textwrap.dedent(
    """
    import re, sys
    from router.observe import malloc

    print(malloc.tune() if sys.argv[1] == "tune" else "untuned")

    def heap_kb():
        with open("/proc/self/smaps") as f:
            m = re.search(r"\\[heap\\]\\n(?:.*\\n)*?Rss:\\s+(\\d+) kB", f.read())
        return int(m.group(1)) if m else 0

    # Freeing an mmap'ed 16 MiB block raises glibc's dynamic threshold to it ...
    big = bytearray(16 << 20)
    del big
    before = heap_kb()
    # ... so 4 MiB blocks now come from the brk heap, unless the threshold is fixed.
    keep = [bytearray(4 << 20) for _ in range(8)]
    print(heap_kb() - before)
    """
)


def probe(mode: str, **env: str) -> tuple[str, int]:
    e = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    e.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env=e,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0], int(out[1])


def test_untuned_glibc_puts_big_blocks_on_the_heap() -> None:
    """The failure the tuning prevents, shown on this machine's glibc."""
    what, grown_kb = probe("untuned")
    assert grown_kb >= 24 * 1024, grown_kb


def test_tuned_big_blocks_stay_off_the_heap() -> None:
    what, grown_kb = probe("tune")
    assert what == "mmap_threshold=131072"
    assert grown_kb < 4 * 1024, grown_kb


def test_the_operators_own_setting_wins() -> None:
    what, grown_kb = probe("tune", MALLOC_MMAP_THRESHOLD_="131072")
    assert what == "environment"
    assert grown_kb < 4 * 1024, grown_kb  # glibc took it from the environment
