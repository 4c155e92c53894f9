"""`compile_model`: model + target spec -> a directory of verified artifacts.

Stages run in a private staging directory next to the final one; only a build
whose manifest has been written is moved into place, so an interrupted or
failed build never disturbs the previous good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from . import __version__
from .errors import MissingDependency, UserError, VerificationFailed
from .manifest import (MANIFEST_NAME, SCHEMA_VERSION, ArtifactRecord, record_artifact, tool_versions,
                       write_json_atomic)
from .memory import release_unused_memory
from .models import LoadedModel, ModelInfo, WeightsRequest, load_model, reference_input, resolve_model
from .precision import PrecisionRequest
from .targets import REDUCED_KINDS, TargetSpec
from .verify import FAILED, NOT_RUN, PASSED, Check, compare_outputs


@dataclass(frozen=True)
class CompileSpec:
    """Everything a build depends on besides the code."""
    model: str
    target: TargetSpec
    out_dir: Path = Path("artifacts")
    input_shape: tuple[int, ...] | None = None
    batch: int | None = None
    weights: WeightsRequest = WeightsRequest()
    # Fail instead of deferring when the target's TensorRT engine cannot be built here.
    require_engine: bool = False
    # --precision and its calibration/validation images and accuracy budget.
    precision: PrecisionRequest = PrecisionRequest()


class Reporter(Protocol):
    def stage_started(self, name: str, index: int, total: int) -> None: ...
    def stage_finished(self, name: str, seconds: float, note: str) -> None: ...


class SilentReporter:
    def stage_started(self, name, index, total):
        pass

    def stage_finished(self, name, seconds, note):
        pass


@dataclass
class BuildContext:
    spec: CompileSpec
    info: ModelInfo
    input_shape: tuple[int, ...]
    staging: Path
    model: LoadedModel | None = None
    input_names: list[str] = field(default_factory=lambda: ["data"])
    output_names: list[str] = field(default_factory=list)
    reference_inputs: list[np.ndarray] = field(default_factory=list)
    reference_outputs: list[np.ndarray] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    # In-memory data stages hand each other (images, reference outputs); not recorded.
    work: dict = field(default_factory=dict)
    # The weights record (source, sha256, ...), known even when the load stage came from the cache.
    weights: dict | None = None

    def ensure_model(self) -> LoadedModel:
        """The network in memory; loaded again when the load stage was restored from the cache."""
        if self.model is None:
            self.model = load_model(self.info, self.spec.weights, self.input_shape)
            if self.weights and self.model.weights["sha256"] != self.weights["sha256"]:
                raise VerificationFailed(
                    f"the weights of {self.info.name} no longer match the cached build "
                    f"({self.model.weights['sha256'][:12]} vs {self.weights['sha256'][:12]})",
                    "run `infc cache prune` and compile again")
        return self.model

    @property
    def target(self) -> TargetSpec:
        return self.spec.target

    def add_artifact(self, relative: str, kind: str, fmt: str) -> ArtifactRecord:
        record = record_artifact(self.staging, relative, kind, fmt)
        self.artifacts = [a for a in self.artifacts if a.path != relative] + [record]
        return record

    def add_check(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def save_references(self, inputs_relative: str, outputs_relative: str) -> None:
        """The seeded input and the MXNet FP32 outputs, as npz keyed by tensor name."""
        np.savez(self.path(inputs_relative), **dict(zip(self.input_names, self.reference_inputs)))
        np.savez(self.path(outputs_relative), **dict(zip(self.output_names, self.reference_outputs)))

    def path(self, relative: str) -> Path:
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


@dataclass(frozen=True)
class Stage:
    """One pass: its name, the stage whose output it consumes, and what of the spec shapes it."""
    name: str
    parent: str | None
    run: Callable[[BuildContext], str]
    applies: Callable[[TargetSpec], bool] = lambda target: True
    config: Callable[[BuildContext], dict] = lambda ctx: {}


# --- stages ----------------------------------------------------------------------

def _stage_load(ctx: BuildContext) -> str:
    from .incremental import save_model_outputs
    from .mxnet_env import mxnet
    from .runner import as_output_list

    mx = mxnet()
    ctx.ensure_model()
    ctx.weights = ctx.model.weights
    ctx.reference_inputs = [reference_input(ctx.input_shape, ctx.target.verify.seed)]
    outputs = as_output_list(ctx.model.net(mx.nd.array(ctx.reference_inputs[0])))
    ctx.reference_outputs = [o.asnumpy() for o in outputs]
    ctx.output_names = [f"output{i}" for i in range(len(outputs))]
    save_model_outputs(ctx)
    source = ctx.weights["source"]
    return f"{source} weights, {len(outputs)} output(s) {', '.join('x'.join(map(str, o.shape)) for o in outputs)}"


def _compare_mxnet(ctx: BuildContext, name: str, symbol: str, params: str) -> Check:
    from .runner import load_mxnet, run_mxnet

    started = time.perf_counter()
    block = load_mxnet(ctx.staging / symbol, ctx.staging / params, ctx.input_names)
    outputs = run_mxnet(block, ctx.reference_inputs)
    verify = ctx.target.verify
    comparison = compare_outputs(outputs, ctx.reference_outputs, ctx.output_names, verify.rtol, verify.atol)
    check = Check.from_comparison("reload-parity", name, comparison)
    check.seconds = time.perf_counter() - started
    return ctx.add_check(check)


def _export_mxnet(ctx: BuildContext, prefix: str, **hybridize) -> tuple[str, str]:
    from .mxnet_env import mxnet

    mx = mxnet()
    net = ctx.ensure_model().net
    net.hybridize(active=True, **hybridize)
    net(mx.nd.array(ctx.reference_inputs[0]))
    ctx.path(prefix)
    net.export(str(ctx.staging / prefix))
    # static_alloc keeps every activation buffer of the graph alive (~1 GB for
    # deeplab at 480x480); the exported files are all later stages need.
    net._clear_cached_op()
    release_unused_memory()  # before the reload-parity check allocates a second copy
    return f"{prefix}-symbol.json", f"{prefix}-0000.params"


def _symbol_output_names(symbol_path: Path) -> list[str]:
    """Output names as the ONNX exporter will spell them (it drops MXNet's '_output' suffix)."""
    graph = json.loads(symbol_path.read_text())
    names = [graph["nodes"][head[0]]["name"] for head in graph["heads"]]
    return names if len(set(names)) == len(names) else [f"{n}_{i}" for i, n in enumerate(names)]


def _stage_mxnet_portable(ctx: BuildContext) -> str:
    mxspec = ctx.target.mxnet
    symbol, params = _export_mxnet(ctx, "mxnet/portable", static_alloc=mxspec.static_alloc,
                                   static_shape=mxspec.static_shape)
    ctx.add_artifact(symbol, "mxnet-portable", "mxnet-symbol-json")
    ctx.add_artifact(params, "mxnet-portable", "mxnet-params")
    ctx.output_names = _symbol_output_names(ctx.staging / symbol)
    return _compare_mxnet(ctx, "mxnet-portable", symbol, params).detail


def _stage_mxnet_mkldnn(ctx: BuildContext) -> str:
    import collections

    mxspec = ctx.target.mxnet
    symbol, params = _export_mxnet(ctx, "mxnet/mkldnn", backend="MKLDNN", static_alloc=mxspec.static_alloc,
                                   static_shape=mxspec.static_shape)
    ops = collections.Counter(n["op"] for n in json.loads((ctx.staging / symbol).read_text())["nodes"])
    fused = sum(count for op, count in ops.items() if op.startswith("_sg_mkldnn"))
    ctx.extra["mkldnn_fused_ops"] = fused
    ctx.add_artifact(symbol, "mxnet-mkldnn", "mxnet-symbol-json")
    ctx.add_artifact(params, "mxnet-mkldnn", "mxnet-params")
    check = _compare_mxnet(ctx, "mxnet-mkldnn", symbol, params)
    return f"{fused} fused subgraph ops; {check.detail}"


def _onnx_parity(ctx: BuildContext, artifact: str, relative: str, rtol: float, atol: float) -> Check:
    from .onnx_export import check_onnx
    from .runner import ort_session, run_onnx

    started = time.perf_counter()
    try:
        check_onnx(ctx.staging / relative)
        ctx.add_check(Check("onnx-checker", artifact, PASSED, "onnx.checker full_check",
                            seconds=time.perf_counter() - started))
    except Exception as exc:  # noqa: BLE001 - any checker complaint is a failed check
        ctx.add_check(Check("onnx-checker", artifact, FAILED, " ".join(str(exc).split())[:300],
                            seconds=time.perf_counter() - started))
    release_unused_memory()  # the exporter's proto and tensors, before ONNX Runtime's arena
    started = time.perf_counter()
    outputs = run_onnx(ort_session(ctx.staging / relative), ctx.reference_inputs)
    comparison = compare_outputs(outputs, ctx.reference_outputs, ctx.output_names, rtol, atol)
    check = Check.from_comparison("onnxruntime-parity", artifact, comparison)
    check.seconds = time.perf_counter() - started
    return ctx.add_check(check)


def _stage_onnx(ctx: BuildContext) -> str:
    from .onnx_export import export_onnx, io_signature

    onnx_spec = ctx.target.onnx
    relative = "onnx/model.onnx"
    shape = ctx.input_shape
    info = export_onnx(ctx.staging / "mxnet/portable-symbol.json", ctx.staging / "mxnet/portable-0000.params",
                       [shape], ctx.path(relative), onnx_spec.opset, onnx_spec.ir_version)
    signature = io_signature(ctx.staging / relative)
    ctx.input_names = list(signature["inputs"])
    ctx.output_names = list(signature["outputs"])
    ctx.extra["onnx_export"] = info
    ctx.add_artifact(relative, "onnx", "onnx")
    check = _onnx_parity(ctx, "onnx", relative, ctx.target.verify.rtol, ctx.target.verify.atol)
    return f"opset {info['opset']}, IR {info['ir_version']}, {info['nodes']} nodes; {check.detail}"


def _stage_onnx_fp16(ctx: BuildContext) -> str:
    from .onnx_export import convert_to_fp16

    relative = "onnx/model.fp16.onnx"
    convert_to_fp16(ctx.staging / "onnx/model.onnx", ctx.path(relative))
    ctx.add_artifact(relative, "onnx-fp16", "onnx")
    verify = ctx.target.verify
    return _onnx_parity(ctx, "onnx-fp16", relative, verify.fp16_rtol, verify.fp16_atol).detail


def _stage_tensorrt_engine(ctx: BuildContext) -> str:
    from . import tensorrt

    settings = tensorrt.builder_settings(ctx, kit_relative_onnx="../onnx")
    status = tensorrt.availability()
    if not status.available:
        if ctx.spec.require_engine:
            raise MissingDependency(f"cannot build the TensorRT engine here: {status.reason}", status.fix)
        ctx.add_check(Check("engine-build", "tensorrt-engine", NOT_RUN, f"not run: {status.reason}"))
        ctx.notes.append(f"TensorRT engine not built: {status.reason}; on a GPU machine run "
                         "`python tensorrt/build_engine.py` in this build directory")
        tensorrt.write_build_kit(ctx, "tensorrt", copy_onnx=False)
        ctx.extra["engine"] = {"status": "deferred", "reason": status.reason, "kit": "tensorrt/"}
        return f"deferred: {status.reason}; kit in tensorrt/"
    ctx.extra["engine"] = {"status": "built here", "tensorrt": status.version}
    return tensorrt.build_here(ctx, "tensorrt", settings)


def _stage_build_kit(ctx: BuildContext) -> str:
    from . import tensorrt

    summary = tensorrt.write_build_kit(ctx, "build_kit")
    status = tensorrt.availability()
    if status.available and tensorrt.on_jetson():
        ctx.extra["engine"] = {"status": "built here", "tensorrt": status.version}
        return summary + "; " + tensorrt.build_here(ctx, "build_kit", tensorrt.read_settings(ctx, "build_kit"))
    if ctx.spec.require_engine:
        raise MissingDependency(f"cannot build the {ctx.target.name} engine here: "
                                f"{'not a Jetson' if not tensorrt.on_jetson() else status.reason}",
                                "run build_kit/build_engine.py on the device")
    ctx.extra["engine"] = {"status": "deferred to the device", "kit": "build_kit/",
                           "tensorrt": ctx.target.tensorrt.version, "jetpack": ctx.target.device.jetpack}
    ctx.add_check(Check("engine-build", "tensorrt-build-kit", NOT_RUN,
                        "deferred to the device: run build_kit/build_engine.py there "
                        f"(Jetson engines cannot be built on {'this machine' if not tensorrt.on_jetson() else 'it: ' + status.reason})"))
    return summary + "; engine deferred to the device"


def _stage_reference(ctx: BuildContext) -> str:
    ctx.save_references("reference/inputs.npz", "reference/outputs.npz")
    ctx.add_artifact("reference/inputs.npz", "reference", "npz")
    ctx.add_artifact("reference/outputs.npz", "reference", "npz")
    return f"seeded input (seed {ctx.target.verify.seed}) and MXNet FP32 outputs"


def _stage_reduced_reference(ctx: BuildContext) -> str:
    """What each reduced-precision artifact computes on the reference input, so
    `infc verify` can re-run it and notice if it no longer does."""
    from .runner import run_artifact

    recorded = []
    artifacts = [a.to_dict() for a in ctx.artifacts]
    for kind in REDUCED_KINDS:
        outputs = run_artifact(ctx.staging, artifacts, kind, ctx.reference_inputs, ctx.input_names)
        if outputs is None:
            continue
        relative = f"reference/{kind}-outputs.npz"
        np.savez(ctx.path(relative), **dict(zip(ctx.output_names, outputs)))
        ctx.add_artifact(relative, "reference", "npz")
        recorded.append(kind)
    return f"outputs of {', '.join(recorded)} on the reference input" if recorded else "no CPU-runnable artifact"


def _precision_stage(name: str):
    """Reduced-precision stages live in precision.py, imported only by builds that ask for them."""
    def run(ctx: BuildContext) -> str:
        from . import precision

        if name in precision.AMP_DTYPES:
            return precision.stage_mxnet_amp(ctx, name)
        return getattr(precision, "stage_" + name.replace("-", "_"))(ctx)
    return run


def _precision_config(ctx: BuildContext) -> dict:
    from .precision import eval_config

    return {**eval_config(ctx), "quantize": dataclasses.asdict(ctx.target.quantize),
            "accuracy": dataclasses.asdict(ctx.target.accuracy)}


def _reduced(target: TargetSpec) -> bool:
    return any(target.emits(k) for k in REDUCED_KINDS)


STAGES: tuple[Stage, ...] = (
    Stage("load", None, _stage_load),
    Stage("mxnet-portable", "load", _stage_mxnet_portable,
          config=lambda ctx: dataclasses.asdict(ctx.target.mxnet)),
    Stage("mxnet-mkldnn", "load", _stage_mxnet_mkldnn, applies=lambda t: t.emits("mxnet-mkldnn"),
          config=lambda ctx: {**dataclasses.asdict(ctx.target.mxnet), "backend": "MKLDNN"}),
    # After the FP32 graphs: their parity checks must not depend on what else this build runs.
    Stage("eval-images", "mxnet-portable", _precision_stage("eval-images"), applies=_reduced,
          config=_precision_config),
    Stage("mxnet-int8", "mxnet-portable", _precision_stage("mxnet-int8"), applies=lambda t: t.emits("mxnet-int8"),
          config=_precision_config),
    Stage("mxnet-bf16", "mxnet-portable", _precision_stage("mxnet-bf16"), applies=lambda t: t.emits("mxnet-bf16"),
          config=_precision_config),
    Stage("mxnet-fp16", "mxnet-portable", _precision_stage("mxnet-fp16"), applies=lambda t: t.emits("mxnet-fp16"),
          config=_precision_config),
    Stage("onnx", "mxnet-portable", _stage_onnx, applies=lambda t: t.emits("onnx"),
          config=lambda ctx: dataclasses.asdict(ctx.target.onnx)),
    Stage("onnx-fp16", "onnx", _stage_onnx_fp16, applies=lambda t: t.emits("onnx-fp16")),
    Stage("onnx-int8", "onnx", _precision_stage("onnx-int8"), applies=lambda t: t.emits("onnx-int8"),
          config=_precision_config),
    Stage("accuracy-report", "eval-images", _precision_stage("accuracy-report"), applies=_reduced,
          config=_precision_config),
    Stage("tensorrt-engine", "onnx", _stage_tensorrt_engine, applies=lambda t: t.emits("tensorrt-engine"),
          config=lambda ctx: dataclasses.asdict(ctx.target.tensorrt)),
    Stage("tensorrt-build-kit", "onnx", _stage_build_kit, applies=lambda t: t.emits("tensorrt-build-kit"),
          config=lambda ctx: dataclasses.asdict(ctx.target.tensorrt)),
    Stage("reduced-reference", "load", _stage_reduced_reference, applies=_reduced),
    Stage("reference", "load", _stage_reference),
)


# --- output directory handling -------------------------------------------------------

def build_dir_for(spec: CompileSpec, info: ModelInfo) -> Path:
    return Path(spec.out_dir) / info.name / spec.target.name


LOCK_TIMEOUT_ENV = "INFC_LOCK_TIMEOUT"


def _lock_wait_message(text: str) -> None:
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def output_lock(final: Path, timeout: float | None = None, on_wait: Callable[[str], None] | None = None):
    """One writer per build directory. A second writer (make -j, another shell) waits for the
    first, saying so once; $INFC_LOCK_TIMEOUT (seconds; 0 = do not wait) bounds the wait,
    after which it fails with OutputLocked. The holder's pid is kept in the lock file for the message."""
    import fcntl

    from .errors import OutputLocked

    if timeout is None and os.environ.get(LOCK_TIMEOUT_ENV, "").strip():
        raw = os.environ[LOCK_TIMEOUT_ENV]
        try:
            timeout = float(raw)
        except ValueError:
            raise UserError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds",
                            "unset it, or set it to e.g. 600 (0 fails at once)") from None
    lock_path = final.parent / f".{final.name}.lock"
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            if holder == str(os.getpid()):
                raise OutputLocked(f"an earlier build in this same process{pid} is still writing {final}; "
                                   "waiting for it would never end", "use another --out") from None
            if timeout is not None and timeout <= 0:
                raise OutputLocked(f"another infc process is building {final}{pid}",
                                   "wait for it to finish, or use another --out") from None
            (on_wait or _lock_wait_message)(
                f"infc: another infc process is building {final}{pid}; waiting for it to finish ...")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                time.sleep(0.2)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise OutputLocked(f"another infc process is still building {final}{pid} "
                                           f"after {timeout:g} s",
                                           f"wait for it to finish, raise {LOCK_TIMEOUT_ENV}, "
                                           "or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def prepare_out_dir(out_dir: Path, model: str) -> Path:
    parent = Path(out_dir) / model
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir}: {exc.strerror or exc}",
                        "pass a writable directory with --out") from None
    return parent


def _publish(staging: Path, final: Path) -> None:
    """Swap the finished staging directory into place, keeping the old one until the swap is done."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- the library entry point ------------------------------------------------------------

@dataclass
class BuildResult:
    build_dir: Path
    manifest: dict
    # True when nothing changed and the existing build was kept as it is.
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.manifest["status"] == "ok"

    @property
    def failed_checks(self) -> list[dict]:
        return [c for c in self.manifest["verifications"] if c["status"] == FAILED]


def resolve_input_shape(spec: CompileSpec, info: ModelInfo) -> tuple[int, ...]:
    shape = tuple(spec.input_shape or info.default_input_shape)
    if spec.batch is not None:
        if spec.batch <= 0:
            raise UserError(f"bad --batch {spec.batch}", "pass a positive batch size")
        shape = (spec.batch,) + shape[1:]
    expected_rank = len(info.default_input_shape)
    if len(shape) != expected_rank:
        raise UserError(f"--input-shape {'x'.join(map(str, shape))} has {len(shape)} dimensions; "
                        f"{info.name} takes {expected_rank} "
                        f"(e.g. {'x'.join(map(str, info.default_input_shape))})", "fix --input-shape")
    return shape


def _require_engine_here(target: TargetSpec) -> None:
    """Fail before any work when --require-engine cannot be honoured on this machine."""
    from . import tensorrt

    if not (target.emits("tensorrt-engine") or target.emits("tensorrt-build-kit")):
        raise UserError(f"--require-engine: target {target.name} emits no TensorRT engine",
                        "drop --require-engine or pick a TensorRT target")
    if target.emits("tensorrt-build-kit") and not tensorrt.on_jetson():
        raise MissingDependency(f"cannot build the {target.name} engine here: Jetson engines are built on the device",
                                "drop --require-engine and run build_kit/build_engine.py on the device")
    status = tensorrt.availability()
    if not status.available:
        raise MissingDependency(f"cannot build the TensorRT engine here: {status.reason}", status.fix)


CACHE_DISABLE_ENV = "INFC_NO_CACHE"


def _stage_cache(spec: CompileSpec, root: str | None):
    """The stage cache, unless the build cannot be keyed up front or opts out.

    Reduced-precision stages hand each other in-memory state (images,
    calibration tables), so those builds are not replayed stage by stage.
    """
    from .cache import StageCache

    if root is None or _reduced(spec.target) or os.environ.get(CACHE_DISABLE_ENV):
        return None
    return StageCache()


def _engine_here() -> dict:
    from . import tensorrt

    status = tensorrt.availability()
    return {"available": status.available, "tensorrt": status.version, "jetson": tensorrt.on_jetson()}


def _stage_settings(ctx: BuildContext, stage: Stage) -> dict:
    """What of the spec, and of this machine, a stage's output depends on."""
    config = stage.config(ctx)
    if stage.name in ("tensorrt-engine", "tensorrt-build-kit"):
        config = {**config, "target": ctx.target.name, "device": dataclasses.asdict(ctx.target.device),
                  "precision": ctx.target.precision, "here": _engine_here()}
    return config


def _build_key(root: str | None, spec: CompileSpec, stages: list[Stage]) -> str | None:
    """Everything a whole build depends on; equal keys mean an identical build."""
    if root is None:
        return None
    engine = any(s.name in ("tensorrt-engine", "tensorrt-build-kit") for s in stages)
    blob = json.dumps({"root": root, "target": spec.target.content_hash(), "stages": [s.name for s in stages],
                       "precision": spec.precision.to_dict(), "require_engine": spec.require_engine,
                       "here": _engine_here() if engine else None}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date_build(spec: CompileSpec) -> BuildResult | None:
    """The existing build when nothing it depends on changed: a no-op that needs no MXNet import."""
    from . import incremental
    from .models import default_input_shape, family_of

    if os.environ.get(CACHE_DISABLE_ENV) or _reduced(spec.target):
        # A reduced-precision build depends on image directories' contents,
        # which only its own (calibration-caching) stages read.
        return None
    family = family_of(spec.model)
    provisional = ModelInfo(spec.model, family, "", default_input_shape(spec.model, family))
    final = build_dir_for(spec, provisional)
    try:
        manifest = json.loads((final / MANIFEST_NAME).read_text())
        input_shape = resolve_input_shape(spec, provisional)
    except (OSError, ValueError, UserError):
        return None
    if manifest.get("status") != "ok" or not manifest.get("build_key"):
        return None
    stages = [s for s in STAGES if s.applies(spec.target)]
    if manifest["build_key"] != _build_key(incremental.root_key(spec, provisional, input_shape), spec, stages):
        return None
    for artifact in manifest.get("artifacts", []):
        path = final / artifact["path"]
        if not path.is_file() or path.stat().st_size != artifact["bytes"]:
            return None
    return BuildResult(final, manifest, cached=True)


# Stages that need the network in memory (ctx.ensure_model()).
_STAGES_USING_THE_NETWORK = ("load", "mxnet-portable", "mxnet-mkldnn")


def _run_stages(ctx: BuildContext, stages: list[Stage], reporter: Reporter, root: str | None, cache) -> None:
    """Run each stage, or replay it from the cache when its key is already there."""
    from . import incremental

    verify = dataclasses.asdict(ctx.target.verify)
    for index, stage in enumerate(stages, 1):
        if ctx.model is not None and not _reduced(ctx.target) and not any(
                s.name in _STAGES_USING_THE_NETWORK for s in stages[index - 1:]):
            # The network and its weights (1 GB for deeplab) are not needed by
            # the ONNX and TensorRT stages: free them for the exporter's peak.
            ctx.model = None
        release_unused_memory()
        reporter.stage_started(stage.name, index, len(stages))
        started = time.perf_counter()
        parent_key = ctx.keys[stage.parent] if stage.parent else root
        key = (incremental.stage_cache_key(parent_key, stage.name, _stage_settings(ctx, stage), verify)
               if parent_key else None)
        hit = cache.get(key) if cache is not None and key else None
        if hit is not None:
            incremental.replay(ctx, hit)
            if stage.parent is None:
                incremental.restore_model_outputs(ctx)
                ctx.weights = hit.meta["weights"]
            note = "cached; " + hit.meta.get("summary", "")
        else:
            before = incremental.snapshot(ctx) if cache is not None else None
            note = stage.run(ctx)
            if key is None:  # weights known only now (a model-store download)
                key = incremental.stage_cache_key(ctx.weights["sha256"], stage.name, _stage_settings(ctx, stage),
                                                  verify)
            if cache is not None:
                files, meta = incremental.capture(ctx, before)
                cache.put(key, files, {**meta, "stage": stage.name, "summary": note, "weights": ctx.weights})
        seconds = time.perf_counter() - started
        ctx.keys[stage.name] = key
        ctx.stages.append({"name": stage.name, "seconds": round(seconds, 3), "key": key,
                           "parent": stage.parent, "summary": note, "cached": hit is not None})
        reporter.stage_finished(stage.name, seconds, note)


def compile_model(spec: CompileSpec, reporter: Reporter | None = None) -> BuildResult:
    """Build, verify and record every artifact the target asks for.

    Raises VerificationFailed after writing the failed build (with its
    manifest) to `<build dir>.failed`; the previous good build stays.
    """
    from . import incremental
    from .precision import apply_request

    reporter = reporter or SilentReporter()
    spec = dataclasses.replace(spec, target=apply_request(spec.target, spec.precision))
    up_to_date = _up_to_date_build(spec)
    if up_to_date is not None:
        return up_to_date
    info = resolve_model(spec.model)
    input_shape = resolve_input_shape(spec, info)
    if spec.weights.kind == "file" and not Path(spec.weights.path).is_file():
        raise UserError(f"weights file {spec.weights.path} does not exist", "check the --weights path")
    if spec.require_engine:
        _require_engine_here(spec.target)
    parent = prepare_out_dir(spec.out_dir, info.name)
    final = build_dir_for(spec, info)
    stages = [s for s in STAGES if s.applies(spec.target)]
    root = incremental.root_key(spec, info, input_shape)
    build_key = _build_key(root, spec, stages)
    cache = _stage_cache(spec, root)
    with output_lock(final):
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=parent))
        try:
            ctx = BuildContext(spec=spec, info=info, input_shape=input_shape, staging=staging)
            _run_stages(ctx, stages, reporter, root, cache)
            (staging / incremental.MODEL_OUTPUTS_FILE).unlink(missing_ok=True)
            ctx.extra["build_key"] = build_key
            manifest = _manifest(ctx, input_shape)
            if manifest["status"] == "ok":
                write_json_atomic(staging / MANIFEST_NAME, manifest)
                _publish(staging, final)
                return BuildResult(final, manifest)
            failed_dir = final.parent / f"{final.name}.failed"
            write_json_atomic(staging / MANIFEST_NAME, manifest)
            _publish(staging, failed_dir)
            worst = [c for c in manifest["verifications"] if c["status"] == FAILED][0]
            if worst["name"] == "accuracy-budget":
                from .errors import AccuracyBudgetMissed
                from .precision import budget_table

                raise AccuracyBudgetMissed(
                    f"{worst['artifact']}: {worst['detail']}",
                    f"failed build kept in {failed_dir}; raise --max-accuracy-drop, use more or better "
                    f"--calib-data, or raise quantize.max_fp32_layers", table=budget_table(manifest))
            raise VerificationFailed(
                f"{worst['artifact']} failed {worst['name']}: {worst['detail']}",
                f"failed build kept in {failed_dir}; the previous build in {final} is untouched")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _manifest(ctx: BuildContext, input_shape: tuple[int, ...]) -> dict:
    failed = [c for c in ctx.checks if c.failed]
    return {
        "schema_version": SCHEMA_VERSION,
        "infc_version": __version__,
        "status": "failed" if failed else "ok",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": ctx.info.name, "family": ctx.info.family, "zoo": ctx.info.source,
                  "inputs": {name: {"shape": list(input_shape), "dtype": "float32", "layout": "NCHW"}
                             for name in ctx.input_names},
                  "outputs": {name: {"shape": list(out.shape), "dtype": str(out.dtype)}
                              for name, out in zip(ctx.output_names, ctx.reference_outputs)}},
        "weights": ctx.weights,
        "build_key": ctx.extra.pop("build_key", None),
        "target": ctx.target.to_dict(),
        "target_hash": ctx.target.content_hash(),
        "tools": tool_versions(),
        "artifacts": [a.to_dict() for a in ctx.artifacts],
        "verifications": [c.to_dict() for c in ctx.checks],
        "stages": ctx.stages,
        "engine": ctx.extra.pop("engine", None),
        "notes": ctx.notes,
        "details": ctx.extra,
        "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz",
                      "seed": ctx.target.verify.seed},
    }
