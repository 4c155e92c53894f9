"""Shared fixtures: small builds made once per session and reused."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests must never reach for a model store they cannot download from, nor
# share a stage cache with the user's builds or an earlier run.
os.environ.setdefault("MXNET_HOME", str(Path(__file__).resolve().parent / ".mxnet-home-unused"))
os.environ["INFC_CACHE_DIR"] = tempfile.mkdtemp(prefix="infc-test-cache-")

SMALL_MODEL = "cifar_resnet20_v1"
SMALL_SHAPE = "1x3x32x32"


def run_cli(args: list[str]) -> int:
    from compiler.cli import main

    return main([str(a) for a in args])


def compile_small(out: Path, target: str, *extra: str) -> Path:
    code = run_cli(["compile", SMALL_MODEL, "--target", target, "--random-init", "--input-shape", SMALL_SHAPE,
                    "--out", out, "--quiet", *extra])
    assert code == 0, f"compile for {target} exited {code}"
    return out / SMALL_MODEL / _target_dir_name(target)


def _target_dir_name(target: str) -> str:
    from compiler.targets import resolve_target

    return resolve_target(target).name


def read_manifest(build_dir: Path) -> dict:
    return json.loads((build_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def small_builds(tmp_path_factory) -> dict[str, Path]:
    """cifar_resnet20_v1 at 32x32 built once for every built-in target."""
    from compiler.targets import list_targets

    out = tmp_path_factory.mktemp("builds")
    return {t.name: compile_small(out, t.name) for t in list_targets()}
