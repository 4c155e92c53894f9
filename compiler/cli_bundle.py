"""`infc package`, `infc unpack` and `infc cache ls|prune`.

Imported by `cli` to register the commands; heavy modules load inside the commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .cli import JsonOption, _echo_json, app
from .errors import UserError

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, option: str) -> int:
    """'4G', '512M', '100K' or plain bytes (binary units)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text or "", re.IGNORECASE)
    if not match:
        raise UserError(f"bad {option} {text!r}", "pass a size like 4G, 512M or a number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


# --- bundles --------------------------------------------------------------------------------

@app.command("package")
def drive_package(
    build_dir: Path = typer.Argument(..., help="A build directory written by `infc compile`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Bundle file (.tar.gz); default: BUILD_DIR.tar.gz beside it."),
    as_json: bool = JsonOption,
):
    """Pack a verified build into a deterministic .tar.gz for a device (run.py, README, checksums)."""
    from .bundle import package_build

    started = time.perf_counter()
    result = package_build(build_dir, output)
    if as_json:
        _echo_json(result.to_dict())
        return
    typer.echo(f"packaged {build_dir} -> {result.path} ({result.files} files, "
               f"{result.payload_bytes / 1e6:.1f} MB -> {result.bytes / 1e6:.1f} MB, "
               f"{time.perf_counter() - started:.1f} s)")
    typer.echo(f"  sha256 {result.sha256}")
    typer.echo(f"  on the device: tar -xzf {result.path.name} && cd {result.root} && python3 run.py")


@app.command("unpack")
def drive_unpack(
    bundle: Path = typer.Argument(..., help="A bundle written by `infc package`."),
    dest: Path = typer.Argument(..., help="Directory to create; it becomes the build directory."),
    force: bool = typer.Option(False, "--force", help="Replace DEST if it exists and is not empty."),
    max_member_size: str = typer.Option("4G", "--max-member-size", help="Refuse members larger than this."),
    max_total_size: str = typer.Option("16G", "--max-total-size", help="Refuse bundles larger than this in total."),
    as_json: bool = JsonOption,
):
    """Extract a bundle safely and check every file's hash before reporting success."""
    from .bundle import ExtractLimits, unpack_bundle

    limits = ExtractLimits(max_member_bytes=parse_size(max_member_size, "--max-member-size"),
                           max_total_bytes=parse_size(max_total_size, "--max-total-size"))
    result = unpack_bundle(bundle, dest, force=force, limits=limits)
    if as_json:
        _echo_json(result.to_dict())
        return
    typer.echo(f"unpacked {bundle} -> {result.path}: {result.files} files, {result.bytes / 1e6:.1f} MB; "
               f"hashes verified ({'; '.join(result.checked)})")


# --- cache ----------------------------------------------------------------------------------

cache_app = typer.Typer(no_args_is_help=True,
                        help="The stage-output cache (default ~/.cache/infc, or $INFC_CACHE_DIR).")
app.add_typer(cache_app, name="cache")

CacheDirOption = typer.Option(None, "--cache-dir", help="Cache root (default: $INFC_CACHE_DIR or ~/.cache/infc).")


@cache_app.command("ls")
def drive_cache_ls(cache_dir: Optional[Path] = CacheDirOption, as_json: bool = JsonOption):
    """List cached stage outputs, most recently used first."""
    from .cache import StageCache, human_age, human_bytes

    cache = StageCache(cache_dir)
    entries = cache.ls()
    if as_json:
        _echo_json({"root": str(cache.root), "entries": [e.to_dict() for e in entries],
                    "bytes": sum(e.bytes for e in entries)})
        return
    now = time.time()
    typer.echo(f"{'key':<16}  {'stage':<20} {'model':<28} {'size':>10}  last used")
    for entry in entries:
        meta = entry.meta if isinstance(entry.meta, dict) else {}
        typer.echo(f"{entry.key[:16]}  {str(entry.stage or '?'):<20} {str(meta.get('model', '')):<28} "
                   f"{human_bytes(entry.bytes):>10}  {human_age(now - entry.last_used)}")
    typer.echo(f"{len(entries)} entries, {human_bytes(sum(e.bytes for e in entries))} in {cache.root}")


@cache_app.command("prune")
def drive_cache_prune(
    older_than: Optional[str] = typer.Option(None, "--older-than",
                                             help="Only entries unused for this long: 7d, 12h, 30m, 90s. "
                                                  "Default: everything."),
    cache_dir: Optional[Path] = CacheDirOption,
    as_json: bool = JsonOption,
):
    """Remove cached stage outputs (all, or those unused for --older-than)."""
    from .cache import StageCache, human_bytes, parse_duration

    seconds = None
    if older_than is not None:
        try:
            seconds = parse_duration(older_than)
        except ValueError:
            raise UserError(f"bad --older-than {older_than!r}", "pass a duration like 7d, 12h, 30m or 90s") from None
    cache = StageCache(cache_dir)
    count, removed = cache.prune(seconds)
    if as_json:
        _echo_json({"root": str(cache.root), "removed": count, "bytes": removed})
        return
    scope = f" unused for {older_than}" if older_than else ""
    typer.echo(f"removed {count} entries{scope} ({human_bytes(removed)}) from {cache.root}")
