"""Incremental builds: stage outputs reused from the content-addressed cache.

A stage's key hashes its parent's key, its name, the settings it reads and
the versions of the tools that shape its output, so an unchanged stage is
restored from `compiler.cache.StageCache` instead of run. What a stage leaves
behind -- files in the staging directory and its records in the build
context -- is captured generically after it runs and replayed on a hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .manifest import ArtifactRecord, sha256_path, tool_versions
from .verify import Check

# Tools whose version changes what a stage writes.
_SHAPING_TOOLS = ("mxnet", "gluoncv", "numpy", "onnx", "onnxruntime", "onnxconverter-common")
MODEL_OUTPUTS_FILE = "reference/mxnet-outputs.npz"


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weights_identity(spec, info) -> str | None:
    """What determines the weights, known before MXNet loads anything; None when unknowable."""
    weights = spec.weights
    if weights.kind == "random":
        return f"random-init:{weights.seed}"
    if weights.kind == "file":
        return "sha256:" + sha256_path(Path(weights.path))
    from .models import model_store_root

    stored = sorted(model_store_root().glob(f"{info.name}-*.params"))
    return "sha256:" + sha256_path(stored[-1]) if stored else None


def root_key(spec, info, input_shape) -> str | None:
    identity = weights_identity(spec, info)
    if identity is None:
        return None
    versions = tool_versions()
    return _digest({"model": info.name, "weights": identity, "input_shape": list(input_shape),
                    "seed": spec.target.verify.seed, "infc": __version__,
                    "tools": {name: versions.get(name) for name in _SHAPING_TOOLS}})


def stage_cache_key(parent_key: str, stage_name: str, config: dict, verify: dict) -> str:
    """Checks are part of a stage's output, so the tolerances they used are part of its key."""
    return _digest({"parent": parent_key, "stage": stage_name, "config": config, "verify": verify,
                    "infc": __version__})


@dataclass
class Snapshot:
    files: dict[str, tuple[int, int]]
    artifacts: list[ArtifactRecord]
    checks: int
    notes: int
    extra: dict
    input_names: list[str]
    output_names: list[str]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def snapshot(ctx) -> Snapshot:
    return Snapshot(files=_files(ctx.staging), artifacts=list(ctx.artifacts), checks=len(ctx.checks),
                    notes=len(ctx.notes), extra=json.loads(json.dumps(ctx.extra, default=str)),
                    input_names=list(ctx.input_names), output_names=list(ctx.output_names))


def capture(ctx, before: Snapshot) -> tuple[dict[str, Path], dict]:
    """The files a stage wrote and the records it added, as cache files and meta."""
    after = _files(ctx.staging)
    written = {name: ctx.staging / name for name, state in after.items() if before.files.get(name) != state}
    extra = json.loads(json.dumps(ctx.extra, default=str))
    meta = {
        "artifacts": [a.to_dict() for a in ctx.artifacts if a not in before.artifacts],
        "checks": [c.to_dict() for c in ctx.checks[before.checks:]],
        "notes": ctx.notes[before.notes:],
        "extra": {k: v for k, v in extra.items() if before.extra.get(k) != v},
        "input_names": ctx.input_names,
        "output_names": ctx.output_names,
    }
    return written, meta


def replay(ctx, cached) -> None:
    """Put a cached stage's files and records into this build."""
    cached.materialize(ctx.staging)
    meta = cached.meta
    paths = {a["path"] for a in meta["artifacts"]}
    ctx.artifacts = [a for a in ctx.artifacts if a.path not in paths] + [
        ArtifactRecord(**a) for a in meta["artifacts"]]
    ctx.checks.extend(Check(**c) for c in meta["checks"])
    ctx.notes.extend(meta["notes"])
    ctx.extra.update(meta["extra"])
    ctx.input_names = list(meta["input_names"])
    ctx.output_names = list(meta["output_names"])


def save_model_outputs(ctx) -> None:
    """The load stage's result, as a file the cache can keep."""
    path = ctx.path(MODEL_OUTPUTS_FILE)
    arrays = {f"input{i}": x for i, x in enumerate(ctx.reference_inputs)}
    arrays.update({f"output{i}": out for i, out in enumerate(ctx.reference_outputs)})
    np.savez(path, **arrays)


def restore_model_outputs(ctx) -> None:
    with np.load(ctx.staging / MODEL_OUTPUTS_FILE) as data:
        def series(prefix):
            count = sum(1 for name in data.files if name.startswith(prefix))
            return [data[f"{prefix}{i}"] for i in range(count)]

        ctx.reference_inputs = series("input")
        ctx.reference_outputs = series("output")
