"""Importing MXNet 1.9.1 on a modern stack.

Imported lazily so that `infc --help` and `infc targets` never load MXNet.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os

from .errors import MissingDependency


@functools.lru_cache(maxsize=1)
def mxnet():
    """Return the mxnet module, with the numpy alias it needs in place."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise MissingDependency(
            f"MXNet 1.9.1 needs numpy < 2, but numpy {numpy.__version__} is installed",
            "pip install 'numpy==1.26.4' (or run `make install`)",
        )
    # MXNet 1.9.1 still uses the alias numpy removed in 1.24.
    if "bool" not in vars(numpy):  # hasattr() would trip numpy's FutureWarning
        numpy.bool = bool
    # The subgraph backend prints a line per fused graph otherwise.
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    os.environ.setdefault("MXNET_STORAGE_FALLBACK_LOG_VERBOSE", "0")
    try:
        import mxnet as mx
    except ImportError as exc:
        raise MissingDependency(f"MXNet cannot be imported: {exc}",
                                "pip install 'mxnet==1.9.1' (or run `make install`)") from None
    return mx


@functools.lru_cache(maxsize=1)
def gluoncv():
    mxnet()
    try:
        # gluoncv prints advice about optional packages on import.
        with contextlib.redirect_stdout(io.StringIO()):
            import gluoncv as gcv
    except ImportError as exc:
        raise MissingDependency(f"gluoncv cannot be imported: {exc}",
                                "pip install 'gluoncv==0.10.5.post0' (or run `make install`)") from None
    return gcv


def cpu_supports(flag: str) -> bool:
    """Whether /proc/cpuinfo lists a CPU feature flag (e.g. avx512_bf16)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return False
