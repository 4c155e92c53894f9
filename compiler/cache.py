"""A content-addressed store of stage outputs.

A stage's output is stored under the stage key (a hash of everything that
shapes it, see `incremental.stage_cache_key`), so an unchanged rebuild can take every
file from here instead of recomputing it.

Layout under the root (`$INFC_CACHE_DIR`, else `$XDG_CACHE_HOME/infc`, else
`~/.cache/infc`):

    stages/<key[:2]>/<key>/meta.json   what the entry holds (files, sizes, hashes, caller's meta)
    stages/<key[:2]>/<key>/files/...   the stage's files under their relative names
    stages/<key[:2]>/<key>/last-used   its mtime is the last get/put
    tmp/                               entries being written, and entries being deleted

An entry appears in `stages/` only by a directory rename of a complete
entry, so readers never see half an entry, and two processes putting the
same key race harmlessly: the first rename wins, the second finds the entry
there and drops its own copy.

Files are hard-linked into the store when possible (no copy, no extra disk),
else copied. A hard link shares the file with the build it came from, so an
in-place edit of that build's file would alter the entry: `get` compares
every file's size and mtime with what `put` recorded and drops an entry that
no longer matches (`get(verify=True)` re-hashes the contents as well).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

CACHE_ENV = "INFC_CACHE_DIR"
ENTRY_SCHEMA = 1
META_NAME = "meta.json"
FILES_DIR = "files"
LAST_USED_NAME = "last-used"
# Stage keys are sha256 hex digests; anything else could name a path outside the store.
KEY_PATTERN = re.compile(r"^[0-9a-f]{8,128}$")
# A put that has been writing for this long belongs to a process that died.
STALE_TMP_SECONDS = 3600.0


def default_cache_root() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "infc"


@dataclass(frozen=True)
class CachedStage:
    """A stored stage output: `files` maps each relative name to its path in the store.

    The store's files must never be written in place (they may be hard links
    shared with builds): read them, or `materialize` them into a build.
    """
    key: str
    path: Path
    files: dict[str, Path]
    meta: dict

    def materialize(self, target_dir: Path) -> dict[str, Path]:
        """Put every file under `target_dir` at its relative name (hard link when possible, else copy),
        replacing what is there; returns relative name -> new path."""
        placed = {}
        for name, source in self.files.items():
            target = Path(target_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.from-cache-{os.getpid()}")
            try:
                _link_or_copy(source, tmp)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            placed[name] = target
        return placed


@dataclass(frozen=True)
class CacheEntry:
    """One line of `ls`."""
    key: str
    stage: str | None
    bytes: int
    file_count: int
    created: float
    last_used: float
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.bytes

    def to_dict(self) -> dict:
        return {"key": self.key, "stage": self.stage, "bytes": self.bytes, "files": self.file_count,
                "created": self.created, "last_used": self.last_used, "meta": self.meta}


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(f"cache key must be 8-128 lowercase hex characters, got {key!r}")
    return key


def _check_relative_name(name: str) -> str:
    """Relative POSIX names only: they become paths inside the entry."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ValueError(f"bad cached file name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("..", ".") for part in path.parts) or str(path) != name:
        raise ValueError(f"cached file name {name!r} must be a normalized relative path")
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(source, target)


class StageCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    # --- paths ----------------------------------------------------------------------

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def entry_path(self, key: str) -> Path:
        _check_key(key)
        return self.stages_dir / key[:2] / key

    # --- reading --------------------------------------------------------------------

    def _read_entry(self, entry: Path) -> dict | None:
        try:
            record = json.loads((entry / META_NAME).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("schema") != ENTRY_SCHEMA \
                or not isinstance(record.get("files"), dict):
            return None
        return record

    def _entry_intact(self, entry: Path, record: dict, verify: bool) -> bool:
        for name, recorded in record["files"].items():
            path = entry / FILES_DIR / name
            try:
                stat = path.stat()
            except OSError:
                return False
            if stat.st_size != recorded["bytes"] or stat.st_mtime_ns != recorded["mtime_ns"]:
                return False
            if verify and _sha256(path) != recorded["sha256"]:
                return False
        return True

    def get(self, key: str, verify: bool = False) -> CachedStage | None:
        """The stored output of `key`, or None. Marks the entry used.

        An entry whose files changed since `put` is dropped and reported as a miss.
        """
        entry = self.entry_path(key)
        record = self._read_entry(entry)
        if record is None:
            return None
        if not self._entry_intact(entry, record, verify):
            self._evict(entry)
            return None
        self._touch(entry)
        return CachedStage(key=key, path=entry,
                           files={name: entry / FILES_DIR / name for name in record["files"]},
                           meta=record.get("meta", {}))

    def __contains__(self, key: str) -> bool:
        return self._read_entry(self.entry_path(key)) is not None

    # --- writing --------------------------------------------------------------------

    def put(self, key: str, files: dict[str, Path], meta: dict) -> CachedStage:
        """Store `files` (relative name -> existing file) under `key`; returns the stored entry.

        If the key is already stored, the stored entry wins (same key, same content)
        and the new files are not used.
        """
        _check_key(key)
        sources = {}
        for name, source in files.items():
            _check_relative_name(name)
            source = Path(source)
            if not source.is_file():
                raise FileNotFoundError(f"cannot cache {name}: {source} is not a file")
            sources[name] = source
        meta_text = json.dumps(meta, sort_keys=True)  # fails early on what JSON cannot hold
        existing = self.get(key)
        if existing is not None:
            return existing

        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"put-{key[:16]}-", dir=self.tmp_dir))
        try:
            recorded = {}
            for name, source in sorted(sources.items()):
                target = staging / FILES_DIR / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(source, target)
                stat = target.stat()
                recorded[name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(target)}
            record = {"schema": ENTRY_SCHEMA, "key": key, "created": time.time(), "files": recorded,
                      "meta": json.loads(meta_text)}
            with open(staging / META_NAME, "w") as handle:
                json.dump(record, handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            (staging / LAST_USED_NAME).touch()
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the store may be shared
            return self._install(key, staging)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _install(self, key: str, staging: Path) -> CachedStage:
        entry = self.entry_path(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.rename(staging, entry)
            except FileNotFoundError:  # a concurrent prune removed the empty shard directory
                entry.parent.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Someone else stored this key first; theirs is as good as ours unless it is damaged.
                stored = self.get(key)
                if stored is not None:
                    return stored
                self._evict(entry)  # damaged (no readable meta.json, or files changed): replace it
                continue
            stored = self.get(key)
            if stored is None:
                raise RuntimeError(f"cache entry {entry} vanished right after it was written")
            return stored
        raise RuntimeError(f"could not install cache entry {entry}: it keeps reappearing damaged")

    def _touch(self, entry: Path) -> None:
        try:
            os.utime(entry / LAST_USED_NAME)
        except FileNotFoundError:
            try:
                (entry / LAST_USED_NAME).touch()
            except OSError:
                pass
        except OSError:  # a read-only store still serves hits
            pass

    def _evict(self, entry: Path) -> int:
        """Remove an entry; returns the bytes it held. Renamed away first so readers never see half of it."""
        record = self._read_entry(entry) or {"files": {}}
        size = sum(f.get("bytes", 0) for f in record["files"].values())
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix=f"del-{entry.name[:16]}-", dir=self.tmp_dir))
        try:
            os.rename(entry, trash / "entry")
        except FileNotFoundError:  # somebody else removed it
            size = 0
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return size

    # --- listing and pruning --------------------------------------------------------

    def _entries(self):
        if not self.stages_dir.is_dir():
            return
        for shard in sorted(self.stages_dir.iterdir()):
            if not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                if KEY_PATTERN.match(entry.name) and entry.is_dir():
                    yield entry

    def ls(self) -> list[CacheEntry]:
        """Every stored entry, most recently used first."""
        entries = []
        for entry in self._entries():
            record = self._read_entry(entry)
            if record is None:
                continue
            try:
                last_used = (entry / LAST_USED_NAME).stat().st_mtime
            except OSError:
                last_used = record.get("created", 0.0)
            meta = record.get("meta", {})
            entries.append(CacheEntry(
                key=entry.name, stage=meta.get("stage") if isinstance(meta, dict) else None,
                bytes=sum(f["bytes"] for f in record["files"].values()), file_count=len(record["files"]),
                created=record.get("created", 0.0), last_used=last_used, meta=meta))
        return sorted(entries, key=lambda e: (-e.last_used, e.key))

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.ls())

    def prune(self, older_than_seconds: float | None = None, now: float | None = None) -> tuple[int, int]:
        """Remove entries not used for `older_than_seconds` (all entries when None).

        Returns (entries removed, bytes they held). Leftovers of interrupted puts
        are removed too, once they are clearly abandoned.
        """
        if older_than_seconds is not None and older_than_seconds < 0:
            raise ValueError("older_than_seconds must be >= 0")
        now = time.time() if now is None else now
        count = removed = 0
        for entry in list(self._entries()):
            if older_than_seconds is not None:
                try:
                    last_used = (entry / LAST_USED_NAME).stat().st_mtime
                except OSError:
                    last_used = (self._read_entry(entry) or {}).get("created", 0.0)
                if now - last_used < older_than_seconds:
                    continue
            removed += self._evict(entry)
            count += 1
        for shard in (self.stages_dir.iterdir() if self.stages_dir.is_dir() else ()):
            try:
                shard.rmdir()  # only succeeds when empty
            except OSError:
                pass
        if self.tmp_dir.is_dir():
            for leftover in self.tmp_dir.iterdir():
                try:
                    abandoned = time.time() - leftover.stat().st_mtime > STALE_TMP_SECONDS
                except OSError:
                    continue
                if abandoned:
                    shutil.rmtree(leftover, ignore_errors=True)
        return count, removed


# --- command-line helpers ---------------------------------------------------------------

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' or plain seconds -> seconds; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"
