"""Edge bundles: a finished build as one deterministic .tar.gz, and its safe extraction.

A bundle holds everything under one top-level directory `<model>-<target>/`:
the build's manifest and every file it lists, at the manifest's paths (so the
manifest's hashes verify after unpacking), plus bundle-only files:

    run.py        runs the model on the device (TensorRT engine, else ONNX Runtime)
    README.txt    what to do on the device
    bundle.json   what the bundle holds and how to use it
    SHA256SUMS    sha256 of every other file (`sha256sum -c SHA256SUMS` on the device)

Packaging the same build twice gives the same bytes: entries are sorted and
carry fixed owners, modes and mtimes (the build's creation time), and the
gzip header has no name and mtime 0. Files with identical content (a Jetson
build kit repeats the ONNX graphs) are stored once and hard-linked.

Extraction trusts nothing in the archive: every member is checked before
anything is written (no absolute paths, no `..`, no links leaving the
directory, no paths through links, only regular files, directories and
links, size limits), the files are written into a temporary directory next
to the destination, every file's hash is checked against the manifest and
SHA256SUMS, and only then is the directory renamed into place.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import UserError, VerificationFailed
from .manifest import MANIFEST_NAME, check_artifact_hashes, load_manifest, sha256_path

BUNDLE_SCHEMA = 1
BUNDLE_SUFFIXES = (".tar.gz", ".tgz")
SUMS_NAME = "SHA256SUMS"
BUNDLE_JSON_NAME = "bundle.json"
README_NAME = "README.txt"
RUN_SCRIPT_NAME = "run.py"
BUNDLE_ONLY_FILES = (RUN_SCRIPT_NAME, README_NAME, BUNDLE_JSON_NAME, SUMS_NAME)

DEVICE_DIR = Path(__file__).resolve().parent / "device"
RUN_SCRIPT = DEVICE_DIR / "run.py"
README_TEMPLATE = DEVICE_DIR / "bundle_README.txt"

GIB = 1 << 30
DEFAULT_MAX_MEMBER_BYTES = 4 * GIB
DEFAULT_MAX_TOTAL_BYTES = 16 * GIB
DEFAULT_MAX_MEMBERS = 10_000
# Used when a manifest's creation time cannot be read; any fixed time keeps the bytes stable.
FALLBACK_MTIME = 946684800  # 2000-01-01T00:00:00Z
GZIP_LEVEL = 6


def is_bundle_path(path) -> bool:
    return str(path).endswith(BUNDLE_SUFFIXES)


def default_bundle_path(build_dir: Path) -> Path:
    build_dir = Path(build_dir).resolve()
    return build_dir.parent / f"{build_dir.name}.tar.gz"


# --- packaging ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackageResult:
    path: Path
    root: str
    sha256: str
    bytes: int
    files: int
    payload_bytes: int

    def to_dict(self) -> dict:
        return {"bundle": str(self.path), "root": self.root, "sha256": self.sha256, "bytes": self.bytes,
                "files": self.files, "payload_bytes": self.payload_bytes}


@dataclass
class _Member:
    path: str                 # relative to the bundle root
    sha256: str
    size: int
    role: str                 # manifest, artifact, bundle
    source: Path | None = None
    data: bytes | None = None


def _fixed_mtime(manifest: dict) -> int:
    try:
        return calendar.timegm(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ"))
    except (KeyError, TypeError, ValueError):
        return FALLBACK_MTIME


def _file_mode(path: str) -> int:
    return 0o755 if path.endswith(".py") else 0o644


def _engine_script(manifest: dict) -> str | None:
    for artifact in manifest["artifacts"]:
        if artifact["path"].endswith("/build_engine.py"):
            return artifact["path"]
    return None


def _engine_steps(manifest: dict, root: str) -> str:
    target = manifest["target"]
    script = _engine_script(manifest)
    kind = target["device"]["kind"]
    if script is None:
        return ("This target has no TensorRT engine: run.py runs the ONNX graph on ONNX Runtime\n"
                "(pip3 install numpy onnxruntime pillow).\n")
    engine = (manifest.get("engine") or {})
    trt = (target.get("tensorrt") or {}).get("version") or "(the installed version)"
    lines = []
    if kind == "jetson":
        lines.append(f"TensorRT engines are built on the device itself (JetPack {target['device']['jetpack']}, "
                     f"TensorRT {trt}):\n")
    elif engine.get("status") == "built here":
        lines.append("The engine was built on the packaging machine; rebuild it if this GPU or TensorRT differs:\n")
    else:
        lines.append(f"Build the TensorRT engine on the GPU machine (TensorRT {trt}):\n")
    commands = (f"python3 {script}", f"python3 {script} --help")
    width = max(map(len, commands)) + 2
    lines.append(f"    {commands[0]:<{width}}# builds, deserializes and checks the engine")
    lines.append(f"    {commands[1]:<{width}}# --allow-version-mismatch, --force, --verbose")
    lines.append("")
    lines.append("It needs TensorRT's Python bindings (JetPack's python3-libnvinfer on a Jetson) and one of")
    lines.append("cuda-python, pycuda or libcudart.so for buffers; without them it exits 3 naming what to install.")
    lines.append("Then run.py finds the engine and uses TensorRT; without an engine it uses ONNX Runtime.")
    return "\n".join(lines) + "\n"


def _readme(manifest: dict, root: str) -> bytes:
    model, target, weights = manifest["model"], manifest["target"], manifest["weights"]
    inputs = ", ".join(f"{name} {'x'.join(map(str, spec['shape']))} {spec['dtype']}"
                       for name, spec in model["inputs"].items())
    outputs = ", ".join(f"{name} {'x'.join(map(str, spec['shape']))}" for name, spec in model["outputs"].items())
    if weights.get("source") == "random-init":
        weights_note = ("WARNING: built with random weights (--random-init): a structure-only build.\n"
                        "Predictions are meaningless; do not deploy it.")
    else:
        weights_note = f"Weights: {weights.get('source')} (sha256 {str(weights.get('sha256', ''))[:16]}...)."
    text = README_TEMPLATE.read_text().format(
        model=model["name"], family=model["family"], target=target["name"],
        description=target.get("description", ""), root=root, inputs=inputs, outputs=outputs,
        weights_note=weights_note, engine_steps=_engine_steps(manifest, root),
        infc_version=manifest.get("infc_version", "?"), created=manifest.get("created", "?"))
    return text.encode()


def _bundle_json(manifest: dict, root: str, members: list[_Member]) -> bytes:
    target = manifest["target"]
    data = {
        "schema": BUNDLE_SCHEMA,
        "kind": "infc-bundle",
        "root": root,
        "model": manifest["model"]["name"],
        "family": manifest["model"]["family"],
        "target": target["name"],
        "device": target["device"],
        "tensorrt": (target.get("tensorrt") or {}).get("version"),
        "precision": target.get("precision"),
        "weights": manifest["weights"].get("source"),
        "built": manifest.get("created"),
        "built_by": f"infc {manifest.get('infc_version', '?')}",
        "packaged_by": f"infc {__version__}",
        "entrypoints": {"run": RUN_SCRIPT_NAME, "build_engine": _engine_script(manifest),
                        "check": f"sha256sum -c {SUMS_NAME}"},
        "engine": manifest.get("engine"),
        "files": [{"path": m.path, "bytes": m.size, "sha256": m.sha256, "role": m.role}
                  for m in sorted(members, key=lambda m: m.path)],
    }
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _sums(members: list[_Member]) -> bytes:
    return "".join(f"{m.sha256}  {m.path}\n" for m in sorted(members, key=lambda m: m.path)).encode()


def _generated(path: str, data: bytes) -> _Member:
    return _Member(path, hashlib.sha256(data).hexdigest(), len(data), "bundle", data=data)


def _collect_members(build_dir: Path, manifest: dict) -> list[_Member]:
    manifest_path = build_dir / MANIFEST_NAME
    members = {MANIFEST_NAME: _Member(MANIFEST_NAME, sha256_path(manifest_path), manifest_path.stat().st_size,
                                      "manifest", source=manifest_path)}
    for artifact in manifest["artifacts"]:
        relative = posixpath.normpath(artifact["path"])
        if relative in BUNDLE_ONLY_FILES or relative == MANIFEST_NAME:
            raise UserError(f"{build_dir}: artifact path {relative} collides with a file the bundle adds",
                            "rename the artifact in the build")
        members[relative] = _Member(relative, artifact["sha256"], artifact["bytes"], "artifact",
                                    source=build_dir / relative)
    listed = list(members.values())
    listed.append(_generated(RUN_SCRIPT_NAME, RUN_SCRIPT.read_bytes()))
    listed.append(_generated(README_NAME, _readme(manifest, _root_name(manifest))))
    listed.append(_generated(BUNDLE_JSON_NAME, _bundle_json(manifest, _root_name(manifest), listed)))
    listed.append(_generated(SUMS_NAME, _sums(listed)))
    return sorted(listed, key=lambda m: m.path)


def _root_name(manifest: dict) -> str:
    return f"{manifest['model']['name']}-{manifest['target']['name']}"


class _HashingReader(io.RawIOBase):
    """Reads a file while hashing it, so what goes into the tar is what was checked."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def readable(self):
        return True

    def read(self, size=-1):
        block = self.handle.read(size)
        self.digest.update(block)
        return block


def _tar_info(path: str, kind: bytes, mtime: int, size: int = 0, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.linkname = link
    return info


def _write_tar(handle, root: str, members: list[_Member], mtime: int, build_dir: Path) -> None:
    directories = sorted({posixpath.dirname(m.path) for m in members} - {""})
    for directory in list(directories):  # every ancestor gets an entry of its own
        parent = posixpath.dirname(directory)
        while parent:
            directories.append(parent)
            parent = posixpath.dirname(parent)
    entries = [(root, None)] + [(f"{root}/{d}", None) for d in sorted(set(directories))] \
        + [(f"{root}/{m.path}", m) for m in members]
    entries.sort(key=lambda entry: entry[0])
    first_with_content: dict[str, str] = {}
    with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=GZIP_LEVEL) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, member in entries:
            if member is None:
                tar.addfile(_tar_info(name, tarfile.DIRTYPE, mtime, mode=0o755))
                continue
            same = first_with_content.get(member.sha256)
            if same is not None:
                tar.addfile(_tar_info(name, tarfile.LNKTYPE, mtime, mode=_file_mode(member.path), link=same))
                continue
            first_with_content[member.sha256] = name
            info = _tar_info(name, tarfile.REGTYPE, mtime, size=member.size, mode=_file_mode(member.path))
            if member.data is not None:
                tar.addfile(info, io.BytesIO(member.data))
                continue
            with open(member.source, "rb") as source:
                reader = _HashingReader(source)
                try:
                    tar.addfile(info, reader)
                except OSError:  # tarfile: "unexpected end of data", the file shrank
                    reader.digest.update(b"shrank")
                if reader.digest.hexdigest() != member.sha256 or source.read(1):
                    raise UserError(f"{build_dir / member.path} changed while it was being packaged",
                                    "wait for whatever writes to the build to finish, then package again")


def package_build(build_dir, output=None) -> PackageResult:
    """Write a deterministic bundle of a finished, verified build; returns what was written."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise UserError(f"{build_dir} is not a directory", "pass a build directory written by `infc compile`")
    manifest = load_manifest(build_dir)
    if manifest.get("status") != "ok":
        raise UserError(f"{build_dir} is a build with status {manifest.get('status')!r}, not 'ok'",
                        "fix the failure and rebuild with `infc compile`")
    problems = check_artifact_hashes(build_dir, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{build_dir} does not match its manifest: {problems[0]}{more}",
                        "rebuild it with `infc compile`")
    output = Path(output) if output is not None else default_bundle_path(build_dir)
    if not is_bundle_path(output):
        raise UserError(f"bundle name {output} does not end in .tar.gz or .tgz", "pass -o NAME.tar.gz")
    if output.is_dir():
        raise UserError(f"{output} is a directory", "pass a file name with -o NAME.tar.gz")
    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: directory {output.parent} does not exist",
                        "create it or pass another -o")
    root = _root_name(manifest)
    members = _collect_members(build_dir, manifest)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_tar(handle, root, members, _fixed_mtime(manifest), build_dir)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PackageResult(path=output, root=root, sha256=sha256_path(output), bytes=output.stat().st_size,
                         files=len(members), payload_bytes=sum(m.size for m in members))


# --- safe extraction ------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractLimits:
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS


@dataclass(frozen=True)
class _Planned:
    member: tarfile.TarInfo
    path: str             # normalized, relative, '/'-separated
    kind: str             # file, dir, symlink, hardlink
    link: str = ""        # symlink: the link text; hardlink: normalized path of the member it repeats


@dataclass
class UnpackResult:
    path: Path
    manifest: dict
    members: int
    files: int
    bytes: int
    checked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "model": self.manifest["model"]["name"],
                "target": self.manifest["target"]["name"], "members": self.members, "files": self.files,
                "bytes": self.bytes, "checked": self.checked}


def _unsafe(bundle: Path, problem: str) -> UserError:
    return UserError(f"refusing {bundle}: {problem}; nothing was extracted",
                     "only unpack bundles written by `infc package`")


def _normalize_member_name(bundle: Path, name: str) -> str:
    if not name or "\0" in name:
        raise _unsafe(bundle, f"member with an empty or NUL-containing name {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("\\"):
        raise _unsafe(bundle, f"member {name!r} has an absolute path")
    if "\\" in name:
        raise _unsafe(bundle, f"member {name!r} contains a backslash")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _unsafe(bundle, f"member {name!r} contains '..'")
    return "/".join(parts)


def _plan_extraction(bundle: Path, tar: tarfile.TarFile, limits: ExtractLimits) -> list[_Planned]:
    """Check every member before anything is written; the tarfile data filter's rules, stated here."""
    planned: list[_Planned] = []
    seen: dict[str, str] = {}
    sizes: dict[str, int] = {}
    total = 0
    for member in tar:
        if len(planned) >= limits.max_members:
            raise _unsafe(bundle, f"more than {limits.max_members} members")
        path = _normalize_member_name(bundle, member.name)
        if not path:
            if member.isdir():
                continue  # the archive's own "./"
            raise _unsafe(bundle, f"member {member.name!r} has no name")
        if path in seen:
            raise _unsafe(bundle, f"member {path!r} appears twice")
        ancestors = path.split("/")[:-1]
        for depth in range(1, len(ancestors) + 1):
            ancestor = "/".join(ancestors[:depth])
            if seen.get(ancestor) in ("symlink", "file", "hardlink"):
                raise _unsafe(bundle, f"member {path!r} lies under {ancestor!r}, which is a "
                                      f"{seen[ancestor]}, not a directory")
        if member.isdir():
            planned.append(_Planned(member, path, "dir"))
        elif member.issym():
            link = member.linkname
            if not link or link.startswith("/") or "\0" in link or "\\" in link:
                raise _unsafe(bundle, f"symlink {path!r} -> {link!r} is absolute or malformed")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
            if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
                raise _unsafe(bundle, f"symlink {path!r} -> {link!r} points outside the bundle")
            planned.append(_Planned(member, path, "symlink", link))
        elif member.islnk():
            target = _normalize_member_name(bundle, member.linkname)
            if seen.get(target) != "file":
                raise _unsafe(bundle, f"hard link {path!r} -> {member.linkname!r} does not repeat an "
                                      "earlier regular file of the bundle")
            planned.append(_Planned(member, path, "hardlink", target))
            total += sizes[target]  # extraction repeats the content, so it counts again
        elif member.isreg() and not member.issparse() and member.type != tarfile.CONTTYPE:
            if member.size > limits.max_member_bytes:
                raise _unsafe(bundle, f"member {path!r} is {member.size} bytes, over the "
                                      f"{limits.max_member_bytes}-byte limit per member (raise --max-member-size "
                                      "if you trust it)")
            total += member.size
            sizes[path] = member.size
            planned.append(_Planned(member, path, "file"))
        else:
            what = ("character device" if member.ischr() else "block device" if member.isblk()
                    else "FIFO" if member.isfifo() else f"member of type {member.type!r}")
            raise _unsafe(bundle, f"{path!r} is a {what}")
        if total > limits.max_total_bytes:
            raise _unsafe(bundle, f"members add up to more than the {limits.max_total_bytes}-byte total limit "
                                  "(raise --max-total-size if you trust it)")
        seen[path] = planned[-1].kind
    return planned


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _extract(bundle: Path, tar: tarfile.TarFile, planned: list[_Planned], into: Path) -> int:
    """Write the checked members below `into`; returns the bytes written."""
    written = 0
    for item in planned:
        target = into / item.path
        if not _inside(into, target.parent):
            raise _unsafe(bundle, f"member {item.path!r} would be written outside the directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.kind == "dir":
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise _unsafe(bundle, f"directory {item.path!r} collides with another member")
            target.mkdir(exist_ok=True)
            os.chmod(target, 0o755)
            continue
        if item.kind == "symlink":
            os.symlink(item.link, target)
            if not _inside(into, target):
                raise _unsafe(bundle, f"symlink {item.path!r} -> {item.link!r} points outside the bundle")
            continue
        mode = 0o755 if item.member.mode & 0o100 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        if item.kind == "hardlink":
            # Repeat the content instead of linking: nothing extracted shares an inode with anything else.
            source = open(into / item.link, "rb")
            expected = (into / item.link).stat().st_size
        else:
            source = tar.extractfile(item.member)
            expected = item.member.size
        with source, os.fdopen(os.open(target, flags, mode), "wb") as out:
            copied = 0
            for block in iter(lambda: source.read(1 << 20), b""):
                copied += len(block)
                if copied > expected:
                    break
                out.write(block)
        if copied != expected:
            raise _unsafe(bundle, f"member {item.path!r} holds {copied} bytes, its header says {expected}")
        os.chmod(target, mode)
        os.utime(target, (item.member.mtime, item.member.mtime))
        written += copied
    return written


def _bundle_root(bundle: Path, planned: list[_Planned]) -> str:
    """'' when the manifest is at the top, else the single top-level directory holding it."""
    files = {p.path for p in planned if p.kind in ("file", "hardlink")}
    if MANIFEST_NAME in files:
        return ""
    tops = {p.path.split("/")[0] for p in planned}
    if len(tops) == 1:
        (top,) = tops
        if f"{top}/{MANIFEST_NAME}" in files:
            return top
    raise UserError(f"{bundle} is not an infc bundle: no {MANIFEST_NAME} at its top or in a single top-level "
                    "directory", "pass a bundle written by `infc package`")


def _read_sums(root: Path) -> dict[str, str]:
    sums = {}
    for number, line in enumerate((root / SUMS_NAME).read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise VerificationFailed(f"{SUMS_NAME} line {number} is not '<sha256>  <path>'",
                                     "re-package the build with `infc package`")
        sums[name.lstrip("*")] = digest
    return sums


def check_unpacked(root: Path, manifest: dict) -> list[str]:
    """Every file's hash against SHA256SUMS and the manifest; returns what was checked, raises on a mismatch."""
    problems = check_artifact_hashes(root, manifest)
    listed = {posixpath.normpath(a["path"]): a["sha256"] for a in manifest["artifacts"]}
    checked = [f"{len(listed)} manifest artifacts"]
    if (root / SUMS_NAME).is_file():
        sums = _read_sums(root)
        for name, digest in sorted(sums.items()):
            path = root / name
            if not _inside(root, path) or ".." in name.split("/"):
                problems.append(f"{SUMS_NAME} names {name!r}, outside the bundle")
            elif not path.is_file():
                problems.append(f"{name}: listed in {SUMS_NAME} but missing")
            elif sha256_path(path) != digest:
                problems.append(f"{name}: sha256 differs from {SUMS_NAME}")
            elif name in listed and listed[name] != digest:
                problems.append(f"{name}: {SUMS_NAME} and the manifest disagree")
        listed.update(sums)
        checked.append(f"{len(sums)} files in {SUMS_NAME}")
    listed[SUMS_NAME] = "itself"
    listed.setdefault(MANIFEST_NAME, "read")
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_dir() and relative not in listed:
            problems.append(f"{relative}: in the bundle but in neither the manifest nor {SUMS_NAME}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationFailed(f"bundle content does not match its checksums: {problems[0]}{more}",
                                 "the bundle is corrupt or was altered; package the build again with `infc package`")
    return checked


def _open_tar(bundle: Path) -> tarfile.TarFile:
    if not bundle.is_file():
        raise UserError(f"bundle {bundle} does not exist or is not a file", "pass the .tar.gz from `infc package`")
    try:
        return tarfile.open(bundle, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{bundle} is not a readable tar archive ({type(exc).__name__}: {exc})",
                        "pass the .tar.gz from `infc package`; it may be truncated") from None


def _extract_checked(bundle: Path, workdir: Path, limits: ExtractLimits) -> tuple[Path, dict, UnpackResult]:
    with _open_tar(bundle) as tar:
        try:
            planned = _plan_extraction(bundle, tar, limits)
            top = _bundle_root(bundle, planned)
            written = _extract(bundle, tar, planned, workdir)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UserError(f"{bundle} is damaged ({type(exc).__name__}: {exc})",
                            "copy the bundle again; it may be truncated") from None
        except OSError as exc:
            raise UserError(f"cannot extract {bundle} into {workdir.parent}: {exc.strerror or exc}",
                            "check free space and permissions") from None
    root = workdir / top if top else workdir
    manifest = load_manifest(root)
    checked = check_unpacked(root, manifest)
    files = sum(1 for p in planned if p.kind in ("file", "hardlink"))
    return root, manifest, UnpackResult(root, manifest, len(planned), files, written, checked)


def unpack_bundle(bundle, dest, force: bool = False, limits: ExtractLimits = ExtractLimits()) -> UnpackResult:
    """Safely extract a bundle into `dest` (which becomes the build directory) after checking every hash."""
    bundle, dest = Path(bundle), Path(dest)
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink():
            raise UserError(f"{dest} exists and is not a directory", "pass a new directory")
        if any(dest.iterdir()) and not force:
            raise UserError(f"{dest} already exists and is not empty", "pass a new directory, or --force to replace it")
    parent = dest.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=parent))
    except OSError as exc:
        raise UserError(f"cannot write into {parent}: {exc.strerror or exc}", "pass a writable directory") from None
    try:
        root, manifest, result = _extract_checked(bundle, workdir, limits)
        old = None
        if dest.exists():
            old = parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
        os.replace(root, dest)
        os.chmod(dest, 0o755)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        result.path = dest
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def verify_bundle(bundle, limits: ExtractLimits = ExtractLimits()):
    """`infc verify BUNDLE`: extract safely to a temporary directory, check every hash, re-run the build's checks.

    Returns a `verify.BuildVerification` whose first checks are the bundle's own.
    Unsafe members raise UserError; hash mismatches are a failed check.
    """
    from .verify import FAILED, PASSED, BuildVerification, Check, verify_build

    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="infc-verify-") as scratch:
        started = time.perf_counter()
        try:
            root, manifest, result = _extract_checked(bundle, Path(scratch), limits)
        except VerificationFailed as exc:
            return BuildVerification(str(bundle), [Check("bundle-sha256", "bundle", FAILED, exc.problem,
                                                         seconds=time.perf_counter() - started)])
        own = [Check("safe-extract", "bundle", PASSED,
                     f"{result.members} members: no absolute paths, '..', escaping links or device files"),
               Check("bundle-sha256", "bundle", PASSED, "; ".join(result.checked) + " match",
                     seconds=time.perf_counter() - started)]
        verification = verify_build(root)
        return BuildVerification(str(bundle), own + verification.checks)
