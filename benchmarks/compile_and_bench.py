#!/usr/bin/env python3
"""Compile and bench: the table the README quotes.

For each (model, input shape, target[, precision]) in the plan this script
1. compiles it in a child process with a cold stage cache, timing the wall
   clock and reading the child's own peak RSS (its VmHWM at exit);
2. benches every artifact of the build with `compiler.bench.bench_build`
   (each artifact in its own process, FP32 and INT8 GEMM ceilings measured in
   the same run);
then prints one table and writes everything to benchmarks/results/<name>.json.

    .venv/bin/python benchmarks/compile_and_bench.py                 # deeplab + resnet18_v1
    .venv/bin/python benchmarks/compile_and_bench.py --quick         # small models only (minutes)
    .venv/bin/python benchmarks/compile_and_bench.py --precision bf16 --precision "int8 --calib-data DIR"

Goals checked (and reported either way, never tuned): ONNX FP32 on ONNX Runtime
>= 1.0x MXNet FP32; every CPU-side artifact of deeplab_resnet101_coco compiled in
<= 60 s with <= 3.5 GB peak RSS on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.bench import BASELINE, BenchOptions, bench_build, machine_info, precision_of  # noqa: E402
from compiler.manifest import write_json_atomic  # noqa: E402

GOAL_COMPILE_S = 60.0
GOAL_PEAK_RSS_GB = 3.5
GOAL_ONNX_SPEEDUP = 1.0
BIG_MODEL = "deeplab_resnet101_coco"
VERIFICATION_FAILED = 4  # infc's exit code when an artifact misses its tolerance


@dataclass
class Job:
    model: str
    shape: str
    target: str
    flags: list[str] = field(default_factory=list)
    # Artifacts to bench (empty: all); the baseline always runs.
    bench_only: tuple[str, ...] = ()
    label: str = ""


def default_plan(quick: bool, precisions: list[str]) -> list[Job]:
    small = Job("resnet18_v1", "1x3x224x224", "x86-mkldnn")
    if quick:
        return [small, Job("resnet18_v1", "1x3x224x224", "jetson-orin", bench_only=("onnx-fp16",))]
    jobs = [
        Job(BIG_MODEL, "1x3x480x480", "x86-mkldnn"),
        # The Jetson build's CPU-side extra is its FP16 ONNX; its other artifacts equal the x86 ones.
        Job(BIG_MODEL, "1x3x480x480", "jetson-orin", bench_only=("onnx-fp16",)),
        small,
    ]
    for precision in precisions:
        words = shlex.split(precision)
        jobs.append(Job(BIG_MODEL, "1x3x480x480", "x86-mkldnn", ["--precision", *words], label=words[0]))
    return jobs


# `infc compile` that writes its own peak RSS (VmHWM, in bytes) on exit. wait4's
# ru_maxrss would not do: Linux carries it across fork and exec, so it also
# counts the pages of this script (1.3 GB after a bench) at the fork.
_COMPILE_REPORTING_PEAK = """
import atexit, os, sys
from compiler.memory import own_peak_resident_bytes

def _write_peak():
    with open(os.environ["INFC_BENCH_PEAK_FILE"], "w") as out:
        out.write(str(own_peak_resident_bytes()))

atexit.register(_write_peak)
sys.argv[0] = "infc"
from compiler.cli import entry_point
entry_point()
"""


def compile_in_child(job: Job, out_root: Path, cache_dir: Path) -> dict:
    """`infc compile` in a fresh process: wall seconds and the child's own peak RSS."""
    out = out_root / (job.label or "fp32")
    command = [sys.executable, "-c", _COMPILE_REPORTING_PEAK, "compile", job.model, "--target", job.target,
               "--random-init", "--input-shape", job.shape, "--out", str(out), "--json", *job.flags]
    log = out_root / f"compile-{job.model}-{job.target}-{job.label or 'fp32'}.log"
    peak_file = log.with_suffix(".peak-bytes")
    env = dict(os.environ, INFC_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO), INFC_BENCH_PEAK_FILE=str(peak_file))
    started = time.perf_counter()
    with open(log, "w") as stderr, tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        stdout.seek(0)
        text = stdout.read()
    # No file when the child was killed: then only the upper bound is known.
    peak_source = "VmHWM" if peak_file.is_file() else "ru_maxrss (upper bound: includes this script at fork)"
    peak_bytes = int(peak_file.read_text()) if peak_file.is_file() else usage.ru_maxrss * 1024  # KiB
    record = {"model": job.model, "input_shape": job.shape, "target": job.target, "flags": job.flags,
              "seconds": seconds, "peak_rss_gb": peak_bytes / 1e9, "peak_rss_source": peak_source,
              "exit_code": process.returncode, "log": str(log)}
    failed_build = out / job.model / f"{job.target}.failed"
    if process.returncode == VERIFICATION_FAILED and (failed_build / "manifest.json").exists():
        # Built, but an artifact missed its tolerance: still timed and benched, and flagged.
        manifest = {"build_dir": str(failed_build), **json.loads((failed_build / "manifest.json").read_text())}
        record["verification_failed"] = json.loads(text).get("error") if text.strip() else "see the log"
    elif process.returncode != 0:
        record["error"] = failure_line(log.read_text(errors="replace"), process.returncode)
        return record
    else:
        manifest = json.loads(text)
    record["build_dir"] = manifest["build_dir"]
    record["stages"] = {s["name"]: s["seconds"] for s in manifest["stages"]}
    record["artifacts"] = sorted({a["kind"] for a in manifest["artifacts"] if a["kind"] != "reference"})
    return record


def failure_line(log: str, code: int) -> str:
    """The line that says what went wrong: infc's own one-line error, or the exception under a traceback."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("infc:") and "internal error" not in line]
    if own:
        return own[-1]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    if raised:
        return f"internal error: {raised[-1]}"
    return lines[-1] if lines else f"exit code {code}"


def speedup_vs(rows: dict, name: str, reference: str) -> float | None:
    if rows.get(name, {}).get("status") != "ok" or rows.get(reference, {}).get("status") != "ok":
        return None
    return rows[reference]["latency_ms"]["p50"] / rows[name]["latency_ms"]["p50"]


def evaluate_goals(compiles: list[dict], benches: list[dict]) -> list[dict]:
    goals = []
    # Every default-precision deeplab build: x86-mkldnn's MXNet and ONNX FP32
    # artifacts, and the Jetson build's FP16 ONNX (the kit itself runs on the device).
    for big in (c for c in compiles if c["model"] == BIG_MODEL and not c["flags"] and "error" not in c):
        goals.append({"goal": f"{BIG_MODEL} CPU-side artifacts ({big['target']}: {', '.join(big['artifacts'])}) "
                              f"compiled in <= {GOAL_COMPILE_S:.0f} s",
                      "measured": f"{big['seconds']:.1f} s", "met": big["seconds"] <= GOAL_COMPILE_S})
        goals.append({"goal": f"... with peak RSS <= {GOAL_PEAK_RSS_GB} GB (10^9 bytes)",
                      "measured": f"{big['peak_rss_gb']:.2f} GB", "met": big["peak_rss_gb"] <= GOAL_PEAK_RSS_GB})
    for bench in benches:
        rows = {r["name"]: r for r in bench["artifacts"]}
        if "onnx" not in rows:
            continue
        versus_baseline = speedup_vs(rows, "onnx", BASELINE)
        versus_mkldnn = speedup_vs(rows, "onnx", "mxnet-mkldnn")
        versus_portable = speedup_vs(rows, "onnx", "mxnet-portable")
        if versus_baseline is None:
            continue
        goals.append({"goal": f"{bench['model']}: ONNX FP32 on ONNX Runtime >= {GOAL_ONNX_SPEEDUP:.1f}x MXNet FP32 "
                              "(imperative)",
                      "measured": f"{versus_baseline:.2f}x (vs hybridized portable "
                                  f"{versus_portable:.2f}x, vs MKL-DNN fused {versus_mkldnn:.2f}x)"
                      if versus_mkldnn and versus_portable else f"{versus_baseline:.2f}x",
                      "met": versus_baseline >= GOAL_ONNX_SPEEDUP})
    return goals


def table(result: dict) -> str:
    machine = result["machine"]
    lines = [f"infc compile + bench, {result['date']} on {machine['cpu']} ({machine['logical_cpus']} logical CPUs, "
             f"{machine['memory_gb']:.0f} GiB; {', '.join(machine['isa'])}); "
             f"mxnet {result['runtimes'].get('mxnet')}, onnxruntime {result['runtimes'].get('onnxruntime')}; "
             f"load average {result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after"]
    ceilings = [b["ceilings"] for b in result["benches"] if b.get("ceilings") and "error" not in b["ceilings"]]
    if ceilings:
        lines.append("GEMM ceilings (per bench run): FP32 " + ", ".join(f"{c['fp32']['gflops']:.0f}" for c in ceilings)
                     + " GFLOP/s; INT8 " + ", ".join(f"{c['int8']['gflops']:.0f}" for c in ceilings) + " GOP/s")
    header = (f"{'model':<24} {'input':<12} {'target':<12} {'compile s':>9} {'peak RSS GB':>11}  {'artifact':<17} "
              f"{'prec':<5} {'load s':>7} {'p50 ms':>9} {'p90 ms':>9} {'min ms':>9} {'peak MB':>8} {'vs MXNet FP32':>13} "
              f"{'%roof':>6}")
    lines += [header, "-" * len(header)]
    benches = {(b["model"], b["target"], b.get("label", "")): b for b in result["benches"]}
    for record in result["compiles"]:
        head = (f"{record['model']:<24} {record['input_shape']:<12} "
                f"{record['target'] + ('+' + record['label'] if record.get('label') else ''):<12} "
                f"{record['seconds']:>9.1f} {record['peak_rss_gb']:>11.2f}  ")
        if "error" in record:
            lines.append(head + f"compile failed: {record['error'][:120]}")
            continue
        if record.get("verification_failed"):
            lines.append(head + f"BUILD FAILED VERIFICATION (benched anyway): {record['verification_failed'][:110]}")
            head = " " * len(head)
        bench = benches.get((record["model"], record["target"], record.get("label", "")))
        if bench is None:
            lines.append(head + "not benched")
            continue
        for number, row in enumerate(bench["artifacts"]):
            prefix = head if number == 0 else " " * len(head)
            if row["status"] != "ok":
                lines.append(f"{prefix}{row['name']:<17} {row['precision']:<5} {row['status']}: "
                             f"{row.get('reason', '').removeprefix('not run: ')[:80]}")
                continue
            lat, roof = row["latency_ms"], row.get("roofline") or {}
            percent = roof.get("percent_of_ceiling")
            lines.append(f"{prefix}{row['name']:<17} {row['precision']:<5} {row['phases']['load_s']:>7.2f} "
                         f"{lat['p50']:>9.1f} {lat['p90']:>9.1f} {lat['min']:>9.1f} {row['memory']['peak_rss_mb']:>8.0f} "
                         f"{row['speedup_vs_baseline']:>12.2f}x {'-' if percent is None else f'{percent:.1f}':>6}")
    lines.append("")
    for goal in result["goals"]:
        lines.append(f"goal: {goal['goal']}: {goal['measured']}  {'MET' if goal['met'] else 'NOT MET'}")
    return "\n".join(lines)


def wait_for_idle(limit_s: float, threshold: float) -> float:
    """Numbers taken while other work runs are that work's numbers too: wait for quiet, within a limit."""
    started = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - started < limit_s:
        time.sleep(10)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=None, help="results/<name>.json (default: compile_and_bench-<date>)")
    parser.add_argument("--quick", action="store_true", help="small models only")
    parser.add_argument("--precision", action="append", default=[],
                        help="also build deeplab on x86 at this precision (e.g. bf16, or 'int8 --calib-data DIR')")
    steady = parser.add_mutually_exclusive_group()
    steady.add_argument("--iterations", type=int, default=None, help="timed runs per artifact")
    steady.add_argument("--duration", type=float, default=None, help="seconds of timed runs per artifact (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-root", type=Path, default=None, help="where the builds go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the builds (default: removed at the end)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the 1-minute load average to drop below --idle-load")
    parser.add_argument("--idle-load", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.wait_idle > 0:
        waited = wait_for_idle(args.wait_idle, args.idle_load)
        print(f"waited {waited:.0f} s; load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)

    date = time.strftime("%Y-%m-%d")
    name = args.name or f"compile_and_bench-{time.strftime('%Y%m%d-%H%M%S')}"
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    out_root = args.out_root or Path(tempfile.mkdtemp(prefix="infc-bench-builds-"))
    out_root.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="infc-cold-cache-"))
    result = {"date": date, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
              "load_average_before": os.getloadavg(), "compiles": [], "benches": []}
    try:
        for job in default_plan(args.quick, args.precision):
            print(f"compiling {job.model} {job.shape} for {job.target} {' '.join(job.flags)} ...", file=sys.stderr,
                  flush=True)
            shutil.rmtree(cache_dir, ignore_errors=True)  # cold cache: every compile does all its work
            cache_dir.mkdir()
            record = compile_in_child(job, out_root, cache_dir)
            record["label"] = job.label
            result["compiles"].append(record)
            if "error" in record:
                print(f"  compile failed: {record['error']}", file=sys.stderr)
                continue
            print(f"  {record['seconds']:.1f} s, peak RSS {record['peak_rss_gb']:.2f} GB; benching ...",
                  file=sys.stderr, flush=True)
            only = job.bench_only
            if job.label:  # a reduced-precision build: its other artifacts were benched with the FP32 build
                only = tuple(kind for kind in record["artifacts"] if precision_of(kind) == job.label)
            options = BenchOptions(warmup=args.warmup, iterations=args.iterations, duration=args.duration,
                                   artifacts=only, output=out_root / f"bench-{len(result['benches'])}.json")
            bench = bench_build(Path(record["build_dir"]), options, progress=_progress)
            data = dict(bench.data, label=job.label)
            result["benches"].append(data)
        result["load_average_after"] = os.getloadavg()
        from compiler.bench import _runtime_versions

        result["runtimes"] = _runtime_versions()
        result["goals"] = evaluate_goals(result["compiles"], result["benches"])
        text = table(result)
        result["table"] = text
        write_json_atomic(results_dir / f"{name}.json", result)
        print(text)
        print(f"\nresults: {results_dir / (name + '.json')}")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        if not args.keep and args.out_root is None:
            shutil.rmtree(out_root, ignore_errors=True)
    return 0


def _progress(event: dict) -> None:
    if event.get("event") == "done" and "latency_ms" in event:
        print(f"  [{event['index']}/{event['total']}] {event['artifact']:<18} p50 {event['latency_ms']['p50']:.1f} ms",
              file=sys.stderr, flush=True)
    elif event.get("event") in ("skipped", "failed"):
        print(f"  [{event['index']}/{event['total']}] {event['artifact']:<18} {event['event']}: {event['reason']}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
