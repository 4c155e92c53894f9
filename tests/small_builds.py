"""Small real builds shared by the bundle and run.py tests, compiled once per test session.

mobilenet0.25 at 1x3x64x64 with random weights compiles in a few seconds; for
FP16 targets mobilenetv3_small, whose random-init FP16 graph stays within the
FP16 tolerance (mobilenet0.25's does not). Every test that needs a build gets
the same directory (and must not modify it: copy it first).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

MODEL = "mobilenet0.25"
FP16_MODEL = "mobilenetv3_small"
SHAPE = "1x3x64x64"

_builds: dict[tuple[str, str, str], Path] = {}


def build_once(tmp_path_factory, target: str, model: str = MODEL, shape: str = SHAPE) -> Path:
    """The build directory of MODEL for TARGET, compiled through the CLI on first use."""
    from compiler.cli import main

    key = (model, target, shape)
    if key not in _builds:
        out = tmp_path_factory.mktemp(f"build-{target}")
        log = io.StringIO()
        with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            code = main(["compile", model, "--target", target, "--random-init", "--input-shape", shape,
                         "--out", str(out), "--quiet"])
        assert code == 0, log.getvalue()
        (build_dir,) = [p for p in (out / model).iterdir() if p.is_dir() and not p.name.startswith(".")]
        _builds[key] = build_dir
    return _builds[key]
