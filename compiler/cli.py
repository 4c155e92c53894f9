"""The `infc` command line: a thin driver over the library functions.

Each command is a `drive_*` function that parses options into a spec, calls
the library, and prints. User errors print one line and exit with their code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, InfcError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ahead-of-time compiler for Apache MXNet / GluonCV models: verified MXNet, ONNX and TensorRT "
         "artifacts with a manifest.\n\nExit codes: "
         + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()),
)

JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def _echo_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _err(text: str) -> None:
    typer.echo(text, err=True)


class TerminalReporter:
    """Per-stage progress on stderr: a line per stage, completed in place on a terminal."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def stage_started(self, name: str, index: int, total: int) -> None:
        self.prefix = f"[{index}/{total}] {name:<20}"
        if not self.quiet and self.tty:
            sys.stderr.write(self.prefix + " ...")
            sys.stderr.flush()

    def stage_finished(self, name: str, seconds: float, note: str) -> None:
        if self.quiet:
            return
        line = f"{self.prefix} {seconds:6.1f} s  {note}"
        if self.tty:
            width = 160
            sys.stderr.write("\r" + line[:width] + "\033[K\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# --- compile ------------------------------------------------------------------------------

@app.command("compile")
def drive_compile(
    model: str = typer.Argument(..., help="A GluonCV or MXNet model-zoo name (see `infc models`)."),
    target: str = typer.Option(..., "--target", "-t", help="Target name (see `infc targets`) or a .toml path."),
    out: Path = typer.Option(Path("artifacts"), "--out", "-o", help="Output root; the build goes to OUT/MODEL/TARGET."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1x3x480x480 (default: per family)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (first input dimension)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A Gluon .params file (save_parameters format)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights: a structure-only build."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random-init weights."),
    require_engine: bool = typer.Option(False, "--require-engine",
                                        help="Fail (exit 3) if the TensorRT engine cannot be built here."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="fp32, fp16 (CUDA/Jetson), bf16 (x86) or int8 (needs --calib-data); "
                                  "default: the target's own."),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data",
                                              help="Directory of JPEG/PNG images for INT8 calibration."),
    calib_count: Optional[int] = typer.Option(None, "--calib-count", help="Use the first N images (sorted by name)."),
    calib_mode: Optional[str] = typer.Option(None, "--calib-mode",
                                             help="naive (min/max) or entropy (KL); default: the target's."),
    val_data: Optional[Path] = typer.Option(None, "--val-data",
                                            help="Images to measure accuracy on (default: the calibration images)."),
    max_accuracy_drop: Optional[float] = typer.Option(
        None, "--max-accuracy-drop", help="Budget in percentage points of top-1 / pixel agreement with FP32 "
                                          "(default: the target's accuracy.max_drop); missing it exits 7."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = JsonOption,
):
    """Compile MODEL for a target into verified artifacts and a manifest."""
    from .models import WeightsRequest, parse_input_shape
    from .pipeline import CompileSpec, compile_model
    from .precision import PrecisionRequest
    from .targets import resolve_target

    if weights is not None and random_init:
        raise UserError("--weights and --random-init exclude each other", "pass only one")
    if weights is not None:
        weights_request = WeightsRequest("file", weights)
    elif random_init:
        weights_request = WeightsRequest("random", seed=seed)
    else:
        weights_request = WeightsRequest("pretrained")
    spec = CompileSpec(
        model=model,
        target=resolve_target(target),
        out_dir=out,
        input_shape=parse_input_shape(input_shape) if input_shape else None,
        batch=batch,
        weights=weights_request,
        require_engine=require_engine,
        precision=PrecisionRequest(precision, calib_data, calib_count, calib_mode, val_data, max_accuracy_drop),
    )
    started = time.perf_counter()
    result = compile_model(spec, TerminalReporter(quiet or as_json))
    if as_json:
        _echo_json({"build_dir": str(result.build_dir), "cached": result.cached, **result.manifest})
        return
    if quiet:
        return
    if result.cached:
        typer.echo(f"cached: {result.build_dir} is up to date (same weights, input shape, target spec, "
                   f"options and tools; built {result.manifest['created']})")
        return
    typer.echo(_compile_summary(result.build_dir, result.manifest, time.perf_counter() - started))


def _compile_summary(build_dir: Path, manifest: dict, seconds: float) -> str:
    lines = [f"built {manifest['model']['name']} for {manifest['target']['name']} in {seconds:.1f} s -> {build_dir}"]
    weights = manifest["weights"]
    if weights["source"] == "random-init":
        lines.append(f"  WARNING: random-init weights (seed {weights['seed']}): structure-only build, "
                     "not for deployment")
    else:
        lines.append(f"  weights: {weights['source']} {weights.get('path', '')} sha256 {weights['sha256'][:12]}")
    lines.append(_checks_table(manifest["verifications"]))
    lines.extend(manifest.get("details", {}).get("accuracy", {}).get("table", []))
    lines.extend(f"  note: {note}" for note in manifest.get("notes", []))
    return "\n".join(lines)


def _checks_table(checks: list[dict]) -> str:
    rows = [f"  {'artifact':<22} {'check':<20} {'result':<8} detail"]
    for check in checks:
        rows.append(f"  {check['artifact']:<22} {check['name']:<20} {check['status']:<8} {check['detail'][:110]}")
    return "\n".join(rows)


# --- verify / inspect ---------------------------------------------------------------------

@app.command("verify")
def drive_verify(
    build_dir: Path = typer.Argument(..., help="A build directory (contains manifest.json), or a bundle (.tar.gz)."),
    as_json: bool = JsonOption,
):
    """Re-check every artifact's hash and re-run its checks; exit 4 if any fails."""
    from .errors import VerificationFailed
    from .verify import verify_build

    if not build_dir.is_dir() and build_dir.name.endswith((".tar.gz", ".tgz")):
        from .bundle import verify_bundle

        result = verify_bundle(build_dir)
    else:
        result = verify_build(build_dir)
    if as_json:
        _echo_json(result.to_dict())
    else:
        typer.echo(f"verify {build_dir}")
        typer.echo(_checks_table([c.to_dict() for c in result.checks]))
    if not result:
        failed = [c for c in result.checks if c.failed][0]
        raise VerificationFailed(f"{failed.artifact} failed {failed.name}: {failed.detail}",
                                 "rebuild with `infc compile`")


@app.command("inspect")
def drive_inspect(
    build_dir: Path = typer.Argument(..., help="A build directory (contains manifest.json)."),
    as_json: bool = JsonOption,
):
    """Summarize a build: model, weights, target, artifacts, checks, timings."""
    from .manifest import load_manifest

    manifest = load_manifest(build_dir)
    if as_json:
        _echo_json(manifest)
        return
    model, target, weights = manifest["model"], manifest["target"], manifest["weights"]
    lines = [
        f"{model['name']} ({model['family']}) for {target['name']}: {target['description']}",
        f"status: {manifest['status']}   built {manifest['created']} by infc {manifest['infc_version']}",
        "inputs: " + ", ".join(f"{n} {'x'.join(map(str, i['shape']))} {i['dtype']}" for n, i in model["inputs"].items()),
        "outputs: " + ", ".join(f"{n} {'x'.join(map(str, o['shape']))}" for n, o in model["outputs"].items()),
        f"weights: {weights['source']} sha256 {weights['sha256'][:16]}"
        + ("  (random init: structure only)" if weights["source"] == "random-init" else ""),
        "tools: " + ", ".join(f"{k} {v}" for k, v in manifest["tools"].items() if v and k != "platform"),
        "artifacts:",
    ]
    for artifact in manifest["artifacts"]:
        lines.append(f"  {artifact['path']:<40} {artifact['kind']:<20} {artifact['bytes'] / 1e6:9.2f} MB  "
                     f"{artifact['sha256'][:12]}")
    lines.append("checks:")
    lines.append(_checks_table(manifest["verifications"]))
    lines.append("stages: " + ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in manifest["stages"]))
    lines.extend(f"note: {note}" for note in manifest.get("notes", []))
    typer.echo("\n".join(lines))


# --- listings -------------------------------------------------------------------------------

@app.command("models")
def drive_models(
    family: Optional[str] = typer.Option(None, "--family", "-f",
                                         help="classification, segmentation, detection, pose, action, depth, tracking"),
    as_json: bool = JsonOption,
):
    """List model-zoo names infc can compile, with family and default input shape."""
    from .models import list_models

    models = list_models(family)
    if as_json:
        _echo_json([{"name": m.name, "family": m.family, "zoo": m.source,
                     "default_input_shape": list(m.default_input_shape)} for m in models])
        return
    for m in models:
        typer.echo(f"{m.name:<48} {m.family:<15} {'x'.join(map(str, m.default_input_shape))}")


@app.command("targets")
def drive_targets(as_json: bool = JsonOption):
    """List the built-in targets (pass --target path/to/spec.toml for your own)."""
    from .targets import list_targets

    targets = list_targets()
    if as_json:
        _echo_json([t.to_dict() for t in targets])
        return
    for t in targets:
        alias = f" (alias: {', '.join(t.aliases)})" if t.aliases else ""
        typer.echo(f"{t.name:<15} {t.description}{alias}")


# --- commands from other modules --------------------------------------------------------------

# Modules that add commands to `app` when imported. They must stay cheap to
# import (no MXNet/ONNX/TensorRT at module level) so `infc --help` stays fast.
COMMAND_MODULES = ("compiler.cli_bench", "compiler.cli_bundle")


def _register_command_modules() -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


_register_command_modules()


# --- entry point ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script's entry point)."""
    from typer._click.exceptions import ClickException  # typer vendors click

    import warnings

    interrupted = "infc: interrupted; nothing was published, the previous build (if any) is intact"
    if not sys.warnoptions:
        # Library deprecation chatter (MXNet, onnxconverter-common) is not for users.
        warnings.simplefilter("ignore")
    try:
        code = app(args=argv, prog_name="infc", standalone_mode=False)
    except InfcError as exc:
        _err(f"infc: {exc.label}: {exc.one_line()}")
        if getattr(exc, "table", ""):
            _err(exc.table)
        if "--json" in (argv if argv is not None else sys.argv):
            typer.echo(json.dumps({"error": exc.one_line(), "kind": type(exc).__name__, "exit_code": exc.exit_code}))
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _err(interrupted)
        return EXIT_INTERRUPTED
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    except Exception:  # noqa: BLE001 - a bug: show everything
        import traceback

        traceback.print_exc()
        _err("infc: internal error (a bug in infc); please report it with the traceback above")
        return EXIT_INTERNAL
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130)
        _err(interrupted)
    return code if isinstance(code, int) else 0


def entry_point() -> None:
    sys.exit(main())
