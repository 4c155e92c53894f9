"""The build manifest: what was built, from what, with which tools, and how it checked out.

Written last and atomically, so a directory with a manifest is a finished build.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ArtifactRecord:
    name: str        # e.g. "onnx/model.onnx"; unique within a build
    kind: str        # one of targets.ARTIFACT_KINDS, or "reference" / "timing-cache" / ...
    path: str        # relative to the manifest
    format: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_path(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_artifact(root: Path, relative: str, kind: str, fmt: str) -> ArtifactRecord:
    path = root / relative
    return ArtifactRecord(name=relative, kind=kind, path=relative, format=fmt,
                          bytes=path.stat().st_size, sha256=sha256_path(path))


def tool_versions() -> dict:
    """Versions of everything that shaped the artifacts; absent tools are None."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("infc", "mxnet", "gluoncv", "numpy", "onnx", "onnxruntime", "onnxconverter-common", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_manifest(build_dir: Path) -> dict:
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST_NAME if build_dir.is_dir() else build_dir
    if not path.exists():
        raise UserError(f"{build_dir} has no {MANIFEST_NAME}: not a finished infc build",
                        "pass a directory written by `infc compile`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})", "rebuild with `infc compile`") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has manifest schema {version!r}; this infc reads schema {SCHEMA_VERSION}",
                        "rebuild with this infc version")
    return data


def check_artifact_hashes(build_dir: Path, manifest: dict) -> list[str]:
    """Problems with the files the manifest lists: missing, resized, or altered."""
    problems = []
    root = Path(build_dir).resolve()
    for artifact in manifest.get("artifacts", []):
        path = (root / artifact["path"]).resolve()
        if root not in path.parents:
            problems.append(f"{artifact['path']}: path leaves the build directory")
        elif not path.is_file():
            problems.append(f"{artifact['path']}: missing")
        elif path.stat().st_size != artifact["bytes"]:
            problems.append(f"{artifact['path']}: {path.stat().st_size} bytes, manifest says {artifact['bytes']}")
        elif sha256_path(path) != artifact["sha256"]:
            problems.append(f"{artifact['path']}: sha256 differs from the manifest (file altered or corrupt)")
    return problems
