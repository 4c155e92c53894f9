"""Numeric comparisons and check records.

A `Comparison` is truthy when every output is within tolerance and keeps the
numbers either way, so a failed check can say by how much it missed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    # max|actual - reference| / max|reference|: scale-free, so one tolerance
    # fits logits, masks and heatmaps alike.
    rel_error: float
    reference_peak: float
    # Share of elements outside |a - b| <= atol + rtol * |b|, for context.
    elementwise_mismatch: float
    passed: bool
    # For outputs with a class axis: share of positions whose argmax agrees.
    argmax_agreement: float | None = None


@dataclass(frozen=True)
class Comparison:
    rtol: float
    atol: float
    outputs: tuple[OutputComparison, ...] = ()
    problem: str | None = None  # structural mismatch (count, shape, non-finite)

    def __bool__(self) -> bool:
        return self.problem is None and all(o.passed for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=float("nan"))

    @property
    def rel_error(self) -> float:
        return max((o.rel_error for o in self.outputs), default=float("nan"))

    def summary(self) -> str:
        if self.problem:
            return self.problem
        worst = max(self.outputs, key=lambda o: o.rel_error)
        return (f"rel error {worst.rel_error:.2e} (max abs {worst.max_abs_error:.2e}) on '{worst.name}', "
                f"tolerance atol {self.atol:g} + rtol {self.rtol:g} x peak {worst.reference_peak:.3g}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["max_abs_error"] = self.max_abs_error
        data["rel_error"] = self.rel_error
        return data


def compare_outputs(actual, reference, names, rtol: float, atol: float) -> Comparison:
    actual = [np.asarray(a) for a in actual]
    reference = [np.asarray(r) for r in reference]
    if len(actual) != len(reference):
        return Comparison(rtol, atol, problem=f"{len(actual)} outputs, reference has {len(reference)}")
    results = []
    for name, a, r in zip(names, actual, reference):
        if a.shape != r.shape:
            return Comparison(rtol, atol, tuple(results),
                              problem=f"output '{name}' has shape {a.shape}, reference {r.shape}")
        a64, r64 = a.astype(np.float64), r.astype(np.float64)
        if not np.all(np.isfinite(a64)):
            bad = int(np.size(a64) - np.count_nonzero(np.isfinite(a64)))
            return Comparison(rtol, atol, tuple(results),
                              problem=f"output '{name}' has {bad} non-finite values (overflow?)")
        diff = np.abs(a64 - r64)
        peak = float(np.max(np.abs(r64))) if r64.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        rel = max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else float("inf"))
        mismatch = float(np.mean(diff > atol + rtol * np.abs(r64))) if diff.size else 0.0
        agreement = None
        if a.ndim >= 2 and a.shape[1] > 1:
            agreement = float(np.mean(np.argmax(a64, axis=1) == np.argmax(r64, axis=1)))
        results.append(OutputComparison(
            name=name, shape=tuple(a.shape), max_abs_error=max_abs, rel_error=rel, reference_peak=peak,
            elementwise_mismatch=mismatch, passed=max_abs <= atol + rtol * peak, argmax_agreement=agreement))
    return Comparison(rtol, atol, tuple(results))


@dataclass
class Check:
    """One verification of one artifact, as the manifest records it."""
    name: str
    artifact: str
    status: str
    detail: str = ""
    numbers: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_comparison(cls, name: str, artifact: str, comparison: Comparison) -> "Check":
        return cls(name=name, artifact=artifact, status=PASSED if comparison else FAILED,
                   detail=comparison.summary(), numbers=comparison.to_dict(),
                   tolerance={"rtol": comparison.rtol, "atol": comparison.atol})


# --- re-checking a finished build ------------------------------------------------------

@dataclass
class BuildVerification:
    build_dir: str
    checks: list[Check]

    def __bool__(self) -> bool:
        return not any(c.failed for c in self.checks)

    def to_dict(self) -> dict:
        return {"build_dir": self.build_dir, "ok": bool(self),
                "checks": [c.to_dict() for c in self.checks]}


def verify_build(build_dir) -> BuildVerification:
    """Re-hash every artifact, then re-run every check that can run here."""
    import time
    from pathlib import Path

    from .manifest import check_artifact_hashes, load_manifest

    root = Path(build_dir)
    manifest = load_manifest(root)
    checks: list[Check] = []
    problems = check_artifact_hashes(root, manifest)
    checks.append(Check("sha256", "all artifacts", FAILED if problems else PASSED,
                        "; ".join(problems) if problems else
                        f"{len(manifest['artifacts'])} artifacts match the manifest"))
    if problems:
        return BuildVerification(str(root), checks)
    tolerances = manifest["target"]["verify"]
    references = np.load(root / manifest["reference"]["inputs"])
    expected = np.load(root / manifest["reference"]["outputs"])
    inputs = [references[name] for name in manifest["model"]["inputs"]]
    output_names = list(manifest["model"]["outputs"])
    reference_outputs = [expected[name] for name in output_names]
    by_kind: dict[str, list[dict]] = {}
    for artifact in manifest["artifacts"]:
        by_kind.setdefault(artifact["kind"], []).append(artifact)

    def timed(check_fn):
        started = time.perf_counter()
        check = check_fn()
        check.seconds = time.perf_counter() - started
        checks.append(check)

    from .runner import run_artifact
    from .targets import REDUCED_KINDS

    input_names = list(manifest["model"]["inputs"])
    for kind in ("mxnet-portable", "mxnet-mkldnn"):
        if kind in by_kind:
            def mxnet_check(kind=kind):
                outputs = run_artifact(root, manifest["artifacts"], kind, inputs, input_names)
                if outputs is None:
                    return Check("reload-parity", kind, FAILED, "the manifest lists no symbol/params pair for it")
                comparison = compare_outputs(outputs, reference_outputs, output_names,
                                             tolerances["rtol"], tolerances["atol"])
                return Check.from_comparison("reload-parity", kind, comparison)
            timed(mxnet_check)
    for kind, rtol, atol in (("onnx", tolerances["rtol"], tolerances["atol"]),
                             ("onnx-fp16", tolerances["fp16_rtol"], tolerances["fp16_atol"])):
        for artifact in by_kind.get(kind, []):
            path = root / artifact["path"]

            def checker(path=path, kind=kind):
                from .onnx_export import check_onnx

                try:
                    check_onnx(path)
                    return Check("onnx-checker", kind, PASSED, "onnx.checker full_check")
                except Exception as exc:  # noqa: BLE001
                    return Check("onnx-checker", kind, FAILED, " ".join(str(exc).split())[:300])

            def parity(path=path, kind=kind, rtol=rtol, atol=atol):
                from .runner import ort_session, run_onnx

                outputs = run_onnx(ort_session(path), inputs)
                return Check.from_comparison("onnxruntime-parity", kind,
                                             compare_outputs(outputs, reference_outputs, output_names, rtol, atol))
            timed(checker)
            timed(parity)
    for kind in REDUCED_KINDS:
        recorded = root / f"reference/{kind}-outputs.npz"
        if kind not in by_kind:
            continue
        if not recorded.is_file():
            checks.append(Check("rerun-consistency", kind, NOT_RUN, "not run: the build recorded no outputs for it"))
            continue

        def rerun(kind=kind, recorded=recorded):
            outputs = run_artifact(root, manifest["artifacts"], kind, inputs, input_names)
            if outputs is None:
                return Check("rerun-consistency", kind, NOT_RUN, "not run: no CPU runtime for it here")
            with np.load(recorded) as data:
                expected = [data[name] for name in output_names]
            # Same artifact, same input: only kernel differences between CPUs are allowed for.
            comparison = compare_outputs(outputs, expected, output_names, tolerances["fp16_rtol"],
                                         tolerances["fp16_atol"])
            return Check.from_comparison("rerun-consistency", kind, comparison)
        timed(rerun)
    engines = [a for a in manifest["artifacts"] if a["path"].endswith(".engine")]
    kits = sorted({str(Path(a["path"]).parent) for a in by_kind.get("tensorrt-build-kit", [])})
    if not (engines or kits):
        return BuildVerification(str(root), checks)
    from .tensorrt import availability, recheck_engine

    status = availability()
    if not engines:
        checks.append(Check("engine-deserialize", kits[0], NOT_RUN,
                            "not run: no engine in this build; build_engine.py builds it where TensorRT and a GPU exist"))
    for engine in engines:
        if not status.available:
            checks.append(Check("engine-deserialize", engine["path"], NOT_RUN, f"not run: {status.reason}"))
        else:
            timed(lambda engine=engine: recheck_engine(root / engine["path"]))
    return BuildVerification(str(root), checks)
