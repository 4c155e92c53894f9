"""Handing memory the compiler has freed back to the operating system.

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

