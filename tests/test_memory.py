"""release_unused_memory hands freed heap pages back to the OS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter: pytest's own heap would blur the numbers. 2,000 blocks
# of 100 kB sit in malloc's heap (under its mmap threshold); all but the last
# are freed, so the heap top stays pinned and glibc keeps the freed pages
# resident until something trims them.
_FRAGMENTED_HEAP = textwrap.dedent("""
    import os, sys
    from compiler.memory import release_unused_memory

    def resident_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    blocks = [bytes([i % 251]) * 100_000 for i in range(2_000)]
    last = blocks[-1]
    del blocks
    before = resident_mib()
    release_unused_memory()
    after = resident_mib()
    print(before, after)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim and /proc are Linux/glibc")
def test_freed_heap_pages_leave_the_resident_set():
    result = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    before, after = map(float, result.stdout.split())
    assert before - after > 150, f"resident {before:.0f} MiB before the release, {after:.0f} MiB after"
