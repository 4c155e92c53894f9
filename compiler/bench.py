"""`bench_build`: every runnable artifact of a build, measured side by side on this machine.

Each artifact runs in its own child process (compiler/bench_worker.py), one
after another, so each gets its own peak-RSS figure and none inherits another
runtime's memory pools or threads. The baseline is MXNet imperative FP32: the
model's Gluon code rebuilt from the build's own portable weights and checked
against the build's reference outputs, so every speed-up is against the same
model.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import UserError, VerificationFailed
from .manifest import check_artifact_hashes, load_manifest, write_json_atomic

BASELINE = "mxnet-imperative"
BENCH_SCHEMA = 1
DEFAULT_WARMUP = 2
DEFAULT_DURATION_S = 10.0
MIN_ITERATIONS = 5          # with --duration: never fewer samples than this
CEILING_GEMM_SIZES = (1024, 1536, 2048)   # GEMM throughput varies with size: take the best of a few
CEILING_BUDGET_S = 0.5                    # per library and size

ProgressFn = Callable[[dict], None]


@dataclass(frozen=True)
class BenchOptions:
    warmup: int = DEFAULT_WARMUP
    iterations: int | None = None       # exactly this many timed runs ...
    duration: float | None = None       # ... or run this many seconds (default when neither is given)
    batch: int | None = None            # default: the build's batch
    threads: int | None = None          # default: each runtime's own default
    artifacts: tuple[str, ...] = ()     # default: all; the baseline always runs
    roofline: bool = True
    output: Path | None = None          # default: <build>/bench/bench.json

    def validated(self) -> "BenchOptions":
        if self.warmup < 0:
            raise UserError(f"--warmup {self.warmup} is negative", "pass 0 or more")
        if self.iterations is not None and self.duration is not None:
            raise UserError("--iterations and --duration exclude each other", "pass only one")
        if self.iterations is not None and self.iterations < 1:
            raise UserError(f"--iterations {self.iterations} is less than 1", "pass 1 or more")
        if self.duration is not None and not self.duration > 0:
            raise UserError(f"--duration {self.duration} is not positive", "pass a number of seconds, e.g. 10")
        if self.batch is not None and self.batch < 1:
            raise UserError(f"--batch {self.batch} is less than 1", "pass 1 or more")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads} is less than 1", "pass 1 or more, or leave it out")
        return self

    @property
    def steady(self) -> dict:
        if self.iterations is not None:
            return {"iterations": self.iterations, "duration": None}
        return {"iterations": None, "duration": self.duration or DEFAULT_DURATION_S}


@dataclass(frozen=True)
class BenchArtifact:
    name: str
    kind: str
    runtime: str                 # mxnet-imperative | mxnet | onnxruntime | tensorrt
    precision: str               # fp32 | fp16 | bf16 | int8
    files: dict = field(default_factory=dict)   # role -> path relative to the build
    reason: str = ""             # why it cannot run here (empty: runnable)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchResult:
    path: Path
    data: dict

    @property
    def problems(self) -> list[str]:
        return list(self.data.get("problems", []))


# --- which artifacts a build has -----------------------------------------------------------

def precision_of(kind: str, default: str = "fp32") -> str:
    for precision in ("int8", "bf16", "fp16"):
        if precision in kind.split("-") or kind.endswith(precision):
            return precision
    return default


_PARAMS_SUFFIX = re.compile(r"-\d{4}\.params$")


def _unique(name: str, taken: set[str], path: str) -> str:
    return name if name not in taken else f"{name}@{path}"


def discover_artifacts(manifest: dict) -> tuple[list[BenchArtifact], list[dict]]:
    """Runnable artifacts in bench order (baseline first) and files skipped, with the reason.

    Generic over kinds: a symbol-json + params pair is an MXNet artifact, a format "onnx"
    file an ONNX Runtime artifact, a *.engine file a TensorRT engine.
    """
    artifacts: list[BenchArtifact] = []
    skipped: list[dict] = []
    taken: set[str] = set()
    records = manifest.get("artifacts", [])

    pairs: dict[tuple[str, str], dict] = {}
    for record in records:
        if record["format"] == "mxnet-symbol-json" and record["path"].endswith("-symbol.json"):
            pairs.setdefault((record["kind"], record["path"][:-len("-symbol.json")]), {})["symbol"] = record["path"]
        elif record["format"] == "mxnet-params" and _PARAMS_SUFFIX.search(record["path"]):
            pairs.setdefault((record["kind"], _PARAMS_SUFFIX.sub("", record["path"])), {})["params"] = record["path"]
    portable = [files for (kind, _), files in pairs.items() if kind == "mxnet-portable" and "params" in files]
    if portable:
        artifacts.append(BenchArtifact(BASELINE, BASELINE, "mxnet-imperative", "fp32",
                                       {"params": portable[0]["params"]}))
    else:
        artifacts.append(BenchArtifact(BASELINE, BASELINE, "mxnet-imperative", "fp32", {},
                                       reason="the build has no mxnet-portable params to rebuild the baseline from"))
    taken.add(BASELINE)
    for (kind, prefix), files in pairs.items():
        if "symbol" in files and "params" in files:
            name = _unique(kind, taken, prefix)
            taken.add(name)
            artifacts.append(BenchArtifact(name, kind, "mxnet", precision_of(kind), files))
        else:
            skipped.append({"path": next(iter(files.values())), "reason": "symbol or params file missing from the pair"})

    seen_onnx: dict[str, str] = {}
    for record in records:
        if record["format"] != "onnx":
            continue
        if record["sha256"] in seen_onnx:
            skipped.append({"path": record["path"], "reason": f"same file as {seen_onnx[record['sha256']]}"})
            continue
        seen_onnx[record["sha256"]] = record["path"]
        name = _unique(record["kind"], taken, record["path"])
        taken.add(name)
        artifacts.append(BenchArtifact(name, record["kind"], "onnxruntime", precision_of(record["kind"]),
                                       {"onnx": record["path"]}))

    engines = [r for r in records if r["path"].endswith(".engine")]
    target_precision = manifest.get("target", {}).get("precision", "fp32")
    for record in engines:
        name = _unique("tensorrt-engine", taken, record["path"])
        taken.add(name)
        artifacts.append(BenchArtifact(name, record["kind"], "tensorrt", target_precision, {"engine": record["path"]}))
    engine_info = manifest.get("engine")
    if not engines and engine_info:
        status = engine_info.get("status", "deferred")
        detail = engine_info.get("reason") or (f"run {engine_info['kit']}build_engine.py on the device"
                                               if engine_info.get("kit") else "no engine in the build")
        artifacts.append(BenchArtifact("tensorrt-engine", "tensorrt-engine", "tensorrt", target_precision, {},
                                       reason=f"engine {status}: {detail}"))
    return artifacts, skipped


# --- the child process ----------------------------------------------------------------------

class WorkerFailed(Exception):
    pass


def worker_env(threads: int | None, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[variable] = str(threads)
    env.update(extra or {})
    return env


def run_worker(request: dict, on_event: ProgressFn | None = None, env_extra: dict | None = None) -> dict:
    """Run one task in a fresh Python process; its result, or WorkerFailed with the reason."""
    with tempfile.TemporaryDirectory(prefix="infc-bench-") as tmp:
        request_path = Path(tmp) / "request.json"
        request_path.write_text(json.dumps(request))
        stderr_path = Path(tmp) / "stderr.txt"
        result = error = None
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "compiler.bench_worker", str(request_path)],
                                       stdout=subprocess.PIPE, stderr=stderr, text=True,
                                       env=worker_env(request.get("threads"), env_extra))
            try:
                for line in process.stdout:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event.get("event") == "result":
                        result = event["result"]
                    elif event.get("event") == "error":
                        error = event["message"]
                    elif on_event is not None:
                        on_event(event)
                code = process.wait()
            except BaseException:
                process.kill()
                process.wait()
                raise
        if result is not None and code == 0:
            return result
        if error:
            raise WorkerFailed(error)
        lines = [line for line in stderr_path.read_text(errors="replace").splitlines() if line.strip()]
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise WorkerFailed(f"worker {how}" + (f": {lines[-1].strip()[:300]}" if lines else ""))


# --- numbers --------------------------------------------------------------------------------

def latency_stats(seconds: list[float]) -> dict:
    """Percentiles (linear interpolation) of per-inference latencies, in milliseconds."""
    import numpy as np

    if not seconds:
        raise ValueError("no latency samples")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "min": float(ms.min()), "max": float(ms.max()),
            "mean": float(ms.mean()), "std": float(ms.std()), "n": int(ms.size)}


def model_flops(build_dir: Path, manifest: dict) -> dict | None:
    """FLOPs of one inference at the build's shape: from the FP32 ONNX graph, else the portable symbol."""
    from .roofline import count_mxnet_flops, count_onnx_flops

    records = manifest.get("artifacts", [])
    onnx = [r for r in records if r["format"] == "onnx" and r["kind"] == "onnx"]
    if onnx:
        return count_onnx_flops(build_dir / onnx[0]["path"]).to_dict()
    symbols = [r for r in records if r["kind"] == "mxnet-portable" and r["format"] == "mxnet-symbol-json"]
    if symbols:
        shapes = {name: spec["shape"] for name, spec in manifest["model"]["inputs"].items()}
        return count_mxnet_flops(build_dir / symbols[0]["path"], shapes).to_dict()
    return None


def machine_info() -> dict:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    try:
        import psutil

        memory_gb = psutil.virtual_memory().total / 2 ** 30
    except ImportError:
        memory_gb = None
    interesting = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"cpu": model, "logical_cpus": os.cpu_count(), "memory_gb": memory_gb,
            "isa": [flag for flag in interesting if flag in flags], "platform": platform.platform(),
            "python": platform.python_version()}


def _clean(value):
    """JSON without NaN/Infinity (not JSON): they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def tolerance_for(manifest: dict, artifact: BenchArtifact) -> tuple[float | None, float | None]:
    """The tolerance the build verified this artifact with; else the target's for its precision."""
    for check in manifest.get("verifications", []):
        tolerance = check.get("tolerance") or {}
        if check.get("artifact") == artifact.kind and tolerance.get("rtol") is not None:
            return tolerance["rtol"], tolerance.get("atol", 0.0)
    verify = manifest.get("target", {}).get("verify", {})
    if artifact.precision == "fp32":
        return verify.get("rtol"), verify.get("atol")
    return verify.get(f"{artifact.precision}_rtol"), verify.get(f"{artifact.precision}_atol")


def _runtime_versions() -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("mxnet", "onnxruntime", "numpy", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def compare_rows(rows: list[dict], ceilings: dict | None, flops_per_inference: float | None) -> list[str]:
    """Fill in each measured row's speed-up against the baseline and its roofline numbers.

    Returns warnings for numbers that cannot be right as measured (above the ceiling).
    """
    from .roofline import achieved, ceiling_for

    warnings = []
    baseline = next((r for r in rows if r["name"] == BASELINE and r["status"] == "ok"), None)
    usable = ceilings if ceilings and "error" not in ceilings else {}
    for row in rows:
        if row["status"] != "ok":
            continue
        row["speedup_vs_baseline"] = baseline["latency_ms"]["p50"] / row["latency_ms"]["p50"] if baseline else None
        key, note = ceiling_for(row["precision"])
        if row["runtime"] == "tensorrt":
            key, note = None, "the GPU's ceiling is not measured by this CPU bench"
        ceiling = usable.get(key) if key else None
        roof = {"ceiling": key if ceiling else None, "ceiling_gflops": ceiling["gflops"] if ceiling else None,
                "note": note if ceiling or not key else f"{note}: ceiling not measured"}
        if flops_per_inference:
            roof.update(achieved(flops_per_inference, row["latency_ms"]["p50"] / 1e3,
                                 ceiling["gflops"] if ceiling else None))
            # Only a ceiling of the artifact's own precision bounds it (bf16 units can outrun fp32 ones).
            if (roof.get("percent_of_ceiling") or 0) > 100 and key == row["precision"]:
                warnings.append(f"{row['name']} ran at {roof['achieved_gflops']:.0f} GFLOP/s, above the measured "
                                f"{key} GEMM ceiling of {ceiling['gflops']:.0f}: either no GEMM library measured "
                                "reaches this CPU's peak, the runtime skips work the FLOP count includes "
                                "(e.g. taps in the padding of dilated convolutions), or the machine was busier "
                                "while the ceiling was measured")
        row["roofline"] = roof
    return warnings


# --- the bench --------------------------------------------------------------------------------

def select_artifacts(artifacts: list[BenchArtifact], wanted: tuple[str, ...]) -> list[BenchArtifact]:
    if not wanted:
        return artifacts
    names = [a.name for a in artifacts]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise UserError(f"the build has no artifact named {', '.join(repr(u) for u in unknown)}",
                        f"pick from {', '.join(names)}")
    return [a for a in artifacts if a.name == BASELINE or a.name in wanted]


def bench_build(build_dir: Path, options: BenchOptions = BenchOptions(),
                progress: ProgressFn | None = None) -> BenchResult:
    """Measure every runnable artifact of a build; write the results JSON and return it."""
    options = options.validated()
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    altered = check_artifact_hashes(build_dir, manifest)
    if altered:
        raise VerificationFailed(f"the build's files do not match its manifest ({altered[0]})",
                                 "run `infc verify` and rebuild with `infc compile`")
    out = Path(options.output) if options.output else build_dir / "bench" / "bench.json"
    _check_writable(out)  # before minutes of measuring, not after
    emit = progress or (lambda event: None)
    started = time.time()
    artifacts, skipped = discover_artifacts(manifest)
    artifacts = select_artifacts(artifacts, options.artifacts)

    input_specs = manifest["model"]["inputs"]
    input_names = list(input_specs)
    build_shape = next(iter(input_specs.values()))["shape"]
    build_batch = build_shape[0]
    batch = options.batch or build_batch
    same_batch = batch == build_batch
    reference = manifest.get("reference", {})
    if same_batch:
        inputs = {"kind": "reference", "path": reference.get("inputs", "reference/inputs.npz")}
    else:
        inputs = {"kind": "seeded", "seed": reference.get("seed", 0),
                  "shapes": [[batch] + list(spec["shape"][1:]) for spec in input_specs.values()]}

    try:
        flops = model_flops(build_dir, manifest)
    except Exception as exc:  # noqa: BLE001 - a graph the counter cannot read costs the roofline, not the bench
        flops = None
        problems_counting = f"FLOPs not counted: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    else:
        problems_counting = None
    flops_per_inference = flops["total"] / flops["batch"] * batch if flops else None

    ceiling_runs: list[dict] = []

    def measure_ceilings(when: str) -> None:
        emit({"event": "phase", "phase": f"GEMM ceilings ({when})", "artifact": "ceilings", "index": 0,
              "total": len(artifacts)})
        try:
            run = run_worker({"task": "ceilings", "sizes": CEILING_GEMM_SIZES, "budget_s": CEILING_BUDGET_S,
                              "threads": options.threads})
            ceiling_runs.append({"when": when, "load_average": os.getloadavg()[0], **run})
        except WorkerFailed as exc:
            ceiling_runs.append({"when": when, "error": str(exc)})

    load_before = os.getloadavg()
    if options.roofline:
        measure_ceilings("before the artifacts")

    steady = options.steady
    rows: list[dict] = []
    problems: list[str] = []
    for index, artifact in enumerate(artifacts, 1):
        row = {**artifact.to_dict(), "status": "not run"}
        row.pop("reason")
        rows.append(row)
        reason = artifact.reason
        if not reason and not same_batch and artifact.runtime in ("onnxruntime", "tensorrt"):
            reason = f"built for batch {build_batch} (static shapes): recompile with --batch {batch}"
        if not reason and artifact.runtime == "tensorrt":
            from .tensorrt import availability

            status = availability()
            reason = "" if status.available else status.reason
        if reason:
            row["reason"] = f"not run: {reason}"
            emit({"event": "skipped", "artifact": artifact.name, "index": index, "total": len(artifacts),
                  "reason": reason})
            continue
        rtol, atol = tolerance_for(manifest, artifact)
        request = {
            "task": "bench", "build_dir": str(build_dir.resolve()), "artifact": artifact.to_dict(),
            "model": manifest["model"]["name"], "input_names": input_names, "inputs": inputs,
            "build_input_shape": build_shape,
            "mxnet_flags": manifest.get("target", {}).get("mxnet"), "threads": options.threads,
            "warmup": options.warmup, "iterations": steady["iterations"], "duration": steady["duration"],
            "min_iterations": MIN_ITERATIONS,
            "check": {"path": reference.get("outputs", "reference/outputs.npz"),
                      "output_names": list(manifest["model"]["outputs"]), "rtol": rtol, "atol": atol}
            if same_batch else None,
        }

        def forward(event, artifact=artifact, index=index):
            emit({**event, "artifact": artifact.name, "index": index, "total": len(artifacts)})

        forward({"event": "start", "precision": artifact.precision, "runtime": artifact.runtime})
        try:
            measured = run_worker(request, forward)
        except WorkerFailed as exc:
            row["status"] = "failed"
            row["reason"] = str(exc)
            problems.append(f"{artifact.name} failed to run: {exc}")
            forward({"event": "failed", "reason": str(exc)})
            continue
        latencies = measured.pop("latencies_s")
        row.update(status="ok", **measured)
        row["latency_ms"] = latency_stats(latencies)
        row["iterations"] = len(latencies)
        row["throughput_per_s"] = batch * len(latencies) / measured["phases"]["steady_s"]
        check = measured.get("output_check")
        if check and check["status"] == "failed":
            if artifact.name == BASELINE:
                problems.append(f"the MXNet imperative baseline does not reproduce the build's reference outputs "
                                f"({check['detail']}): its speed-ups would compare different models")
            else:
                problems.append(f"{artifact.name} output differs from the reference: {check['detail']}")
        forward({"event": "done", "latency_ms": row["latency_ms"], "peak_rss_mb": row["memory"]["peak_rss_mb"]})

    load_after = os.getloadavg()
    ceilings = None
    if options.roofline:
        # Once before and once after: a ceiling is the best this machine did in this run, and a
        # machine shared with other work rarely gives its best in one short window.
        measure_ceilings("after the artifacts")
        good = [run for run in ceiling_runs if "error" not in run]
        if good:
            ceilings = {key: max((run[key] for run in good), key=lambda c: c["gflops"]) for key in ("fp32", "int8")}
        else:
            ceilings = {"error": ceiling_runs[-1]["error"]}
        ceilings["runs"] = ceiling_runs

    warnings = compare_rows(rows, ceilings, flops_per_inference)
    if problems_counting:
        warnings.insert(0, problems_counting)
    if warnings:
        warnings.append(f"load average {load_before[0]:.1f} before the run, {load_after[0]:.1f} after: "
                        "other work on this machine disturbs the numbers")

    data = _clean({
        "schema": BENCH_SCHEMA,
        "infc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_dir": str(build_dir),
        "model": manifest["model"]["name"],
        "family": manifest["model"].get("family"),
        "target": manifest.get("target", {}).get("name"),
        "weights": manifest.get("weights", {}).get("source"),
        "build_status": manifest.get("status"),
        "input_shape": [batch] + list(build_shape[1:]),
        "build_batch": build_batch,
        "batch": batch,
        "options": {"warmup": options.warmup, **steady, "min_iterations": MIN_ITERATIONS if steady["duration"] else None,
                    "threads": options.threads or "runtime default", "artifacts": list(options.artifacts)},
        "machine": machine_info(),
        "runtimes": _runtime_versions(),
        "flops": {**flops, "per_inference": flops_per_inference} if flops else None,
        "ceilings": ceilings,
        "baseline": BASELINE,
        "artifacts": rows,
        "skipped_files": skipped,
        "problems": problems,
        "warnings": warnings,
        "load_average": {"before": load_before, "after": load_after},
        "seconds": time.time() - started,
    })
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, data)
    except OSError as exc:
        raise UserError(f"cannot write the bench results to {out}: {exc.strerror or exc}",
                        "pass a writable --output FILE") from None
    return BenchResult(out, data)


def _check_writable(path: Path) -> None:
    """Fail early on an output nobody can write, without creating anything yet."""
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the bench results to {path}: {existing} is not a writable directory",
                        "pass a writable --output FILE")


def load_bench(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", "run `infc bench BUILD_DIR` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})", "rerun `infc bench`") from None
    if not isinstance(data, dict) or data.get("schema") != BENCH_SCHEMA or "artifacts" not in data:
        raise UserError(f"{path} is not an infc bench result (schema {BENCH_SCHEMA})", "rerun `infc bench`")
    return data


# --- the terminal table -------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def bench_table(data: dict) -> str:
    machine = data["machine"]
    lines = [f"{data['model']} for {data['target']}: input {'x'.join(map(str, data['input_shape']))}, "
             f"batch {data['batch']}, threads {data['options']['threads']}; "
             f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, load average "
             f"{data['load_average']['before'][0]:.1f} before / {data['load_average']['after'][0]:.1f} after"]
    if data.get("build_status") not in (None, "ok"):
        lines.append(f"WARNING: the build's status is '{data['build_status']}': an artifact failed verification")
    ceilings, flops = data.get("ceilings") or {}, data.get("flops")
    if "error" in ceilings:
        lines.append(f"ceilings not measured: {ceilings['error']}")
    elif ceilings:
        lines.append(f"ceilings: FP32 {ceilings['fp32']['gflops']:.1f} GFLOP/s ({ceilings['fp32']['method']}); "
                     f"INT8 {ceilings['int8']['gflops']:.1f} GOP/s ({ceilings['int8']['method']})")
    if flops:
        lines.append(f"model: {flops['per_inference'] / 1e9:.2f} GFLOP per inference (counted from {Path(flops['source']).name})")
    header = (f"{'artifact':<18} {'prec':<5} {'load s':>7} {'1st s':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
              f"{'min ms':>9} {'n':>4} {'inf/s':>7} {'peak MB':>8} {'speedup':>7} {'GFLOP/s':>8} {'%roof':>6}  check")
    lines += [header, "-" * len(header)]
    for row in data["artifacts"]:
        if row["status"] != "ok":
            lines.append(f"{row['name']:<18} {row['precision']:<5} {row['status']}: "
                         f"{row.get('reason', '').removeprefix('not run: ')}"[:200])
            continue
        lat, phases, roof = row["latency_ms"], row["phases"], row.get("roofline") or {}
        check = row.get("output_check") or {}
        check_text = {"passed": "ok", "failed": "MISMATCH"}.get(check.get("status"), check.get("status", "-"))
        if check.get("rel_error") is not None and check.get("status") != "passed":
            check_text += f" (rel {check['rel_error']:.1e})"
        lines.append(
            f"{row['name']:<18} {row['precision']:<5} {phases['load_s']:>7.2f} {phases['first_inference_s']:>7.2f} "
            f"{lat['p50']:>9.2f} {lat['p90']:>9.2f} {lat['p99']:>9.2f} {lat['min']:>9.2f} {lat['n']:>4} "
            f"{row['throughput_per_s']:>7.2f} {row['memory']['peak_rss_mb']:>8.0f} "
            f"{_fmt(row.get('speedup_vs_baseline'), '.2f'):>6}x {_fmt(roof.get('achieved_gflops'), '.1f'):>8} "
            f"{_fmt(roof.get('percent_of_ceiling'), '.1f'):>6}  {check_text}")
    for warning in data.get("warnings", []):
        lines.append(f"warning: {warning}")
    for problem in data.get("problems", []):
        lines.append(f"problem: {problem}")
    return "\n".join(lines)
