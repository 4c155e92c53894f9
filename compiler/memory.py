"""Memory: handing what the compiler has freed back to the operating system, and a process's own peak.

A compile's stages each allocate and drop about a gigabyte (weights, the
hybridized graph's buffers, the ONNX proto, ONNX Runtime's arena). glibc
returns freed heap memory to the OS only from the top of each arena, so most
of it stays resident and each stage's peak lands on top of the previous
stage's garbage: deeplab_resnet101 at 480x480 peaked at 3.06 GiB resident,
2.08 GiB with a trim between and inside the stages."""

from __future__ import annotations

import ctypes
import functools
import gc
import resource


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): its allocator returns pages its own way


def release_unused_memory() -> None:
    """Collect Python garbage, then return free heap pages to the OS (glibc's malloc_trim)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def own_peak_resident_bytes() -> int:
    """This process's own peak resident set (VmHWM).

    Not ru_maxrss: Linux carries it across fork and exec, so a process started
    by a 1.3 GB parent reports at least 1.3 GB however little it uses.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; no /proc
