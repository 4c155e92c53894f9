"""`infc bench`, `infc profile` and `infc report`: thin drivers over compiler/bench.py,
compiler/profiling.py and compiler/report.py (imported inside the commands so `infc --help` stays fast)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli import JsonOption, _echo_json, app
from .errors import VerificationFailed


class ProgressLine:
    """One line per artifact on stderr; on a terminal the line shows the running phase in place."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.current = ""

    def _prefix(self, event: dict) -> str:
        return f"[{event.get('index', 0)}/{event.get('total', 0)}] {event.get('artifact', ''):<18}"

    def _show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + text[:150] + "\033[K")
            sys.stderr.flush()

    def _finish(self, text: str) -> None:
        sys.stderr.write(("\r" + text + "\033[K\n") if self.tty else text + "\n")
        sys.stderr.flush()

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        kind = event.get("event")
        prefix = self._prefix(event)
        if kind == "phase":
            total = f" ({event['total']})" if event.get("total") else ""
            self._show(f"{prefix} {event['phase']}{total} ...")
        elif kind == "progress":
            if event.get("total"):
                self._show(f"{prefix} steady state {event['done']}/{event['total']}")
            else:
                self._show(f"{prefix} steady state {event['done']} runs, {event['elapsed']:.0f}/{event['duration']:.0f} s")
        elif kind == "skipped":
            self._finish(f"{prefix} not run: {event['reason']}")
        elif kind == "failed":
            self._finish(f"{prefix} FAILED: {event['reason']}")
        elif kind == "done" and "latency_ms" in event:
            latency = event["latency_ms"]
            self._finish(f"{prefix} p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms ({latency['n']} runs), "
                         f"peak RSS {event['peak_rss_mb']:.0f} MB")
        elif kind == "done":
            self._finish(f"{prefix} {event['ms']:.2f} ms of ops per inference"
                         + (f"; {event['graph_note']}" if event.get("graph_note") else ""))


def _fail(error: VerificationFailed, as_json: bool) -> None:
    """With --json the results already went to stdout (problems included): keep stdout one JSON document."""
    if not as_json:
        raise error
    typer.echo(f"infc: {error.label}: {error.one_line()}", err=True)
    raise typer.Exit(error.exit_code)


@app.command("bench")
def drive_bench(
    build_dir: Path = typer.Argument(..., help="A build directory (contains manifest.json)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed runs after the first inference."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n", help="Timed runs per artifact."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds of timed runs per artifact "
                                             "(default 10, at least 5 runs)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (default: the build's)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads per runtime (default: its own)."),
    artifact: Optional[List[str]] = typer.Option(None, "--artifact", "-a",
                                                 help="Only this artifact (repeatable); the baseline always runs."),
    roofline: bool = typer.Option(True, "--roofline/--no-roofline", help="Measure the FP32/INT8 GEMM ceilings."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Results JSON (default BUILD/bench/bench.json)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = JsonOption,
):
    """Run every artifact of a build side by side: phases, latency percentiles, memory, speed-up, roofline."""
    from .bench import BenchOptions, bench_build, bench_table

    options = BenchOptions(warmup=warmup, iterations=iterations, duration=duration, batch=batch, threads=threads,
                           artifacts=tuple(artifact or ()), roofline=roofline, output=output)
    result = bench_build(build_dir, options, ProgressLine(quiet or as_json))
    if as_json:
        _echo_json(result.data)
    else:
        typer.echo(bench_table(result.data))
        typer.echo(f"results: {result.path}")
    if result.problems:
        _fail(VerificationFailed(result.problems[0], f"details in {result.path}"), as_json)


@app.command("profile")
def drive_profile(
    build_dir: Path = typer.Argument(..., help="A build directory (contains manifest.json)."),
    artifact: Optional[List[str]] = typer.Option(None, "--artifact", "-a",
                                                 help="Only this artifact (repeatable; default: all that run here)."),
    iterations: int = typer.Option(3, "--iterations", "-n", help="Profiled inferences per artifact."),
    warmup: int = typer.Option(1, "--warmup", help="Unprofiled runs first."),
    graph: bool = typer.Option(True, "--graph/--no-graph", help="Draw the network with Graphviz (SVG and PNG)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Output root (default BUILD/profile)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = JsonOption,
):
    """Profile artifacts: chrome://tracing trace, per-op-type table, fusion report, graph picture."""
    from .profiling import ProfileOptions, profile_build, profile_summary

    options = ProfileOptions(artifacts=tuple(artifact or ()), warmup=warmup, iterations=iterations, graph=graph,
                             out_dir=out_dir)
    result = profile_build(build_dir, options, ProgressLine(quiet or as_json))
    if as_json:
        _echo_json({"out_dir": str(result.out_dir), **result.data})
    else:
        typer.echo(profile_summary(result.data))
        typer.echo(f"profile: {result.out_dir}")
    if result.problems:
        _fail(VerificationFailed(result.problems[0], f"details in {result.out_dir / 'profile.json'}"), as_json)


@app.command("report")
def drive_report(
    build_dir: Path = typer.Argument(..., help="A build directory (contains manifest.json)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default BUILD/report.html)."),
    bench: Optional[Path] = typer.Option(None, "--bench", help="Bench results JSON (default BUILD/bench/bench.json)."),
    profile_dir: Optional[Path] = typer.Option(None, "--profile-dir", help="Profile root (default BUILD/profile)."),
    as_json: bool = JsonOption,
):
    """Write one self-contained HTML page: build, checks, latency and roofline charts, op tables, graph."""
    from .report import ReportOptions, render_report

    path = render_report(build_dir, ReportOptions(output=output, bench_json=bench, profile_dir=profile_dir))
    if as_json:
        _echo_json({"report": str(path)})
    else:
        typer.echo(f"report: {path}")
