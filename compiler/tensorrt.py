"""TensorRT engines and on-device build kits.

All engine building goes through `compiler/device/build_engine.py`, the same
script a Jetson runs from its build kit, so the code that builds an engine
here and the code that builds it on the device are one.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingDependency, VerificationFailed
from .verify import FAILED, PASSED, Check

KIT_SCRIPT = Path(__file__).resolve().parent / "device" / "build_engine.py"
SETTINGS_NAME = "builder_settings.json"


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""
    fix: str = ""
    version: str | None = None


def _device_module():
    from .device import build_engine

    return build_engine


def on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists() or "tegra" in platform.release().lower()


def availability() -> Availability:
    """Whether an engine can be built on this machine; the GPU is checked first
    because TensorRT without a CUDA device can crash the process."""
    device = _device_module()
    has_gpu, reason = device.cuda_device_available()
    if not has_gpu:
        return Availability(False, f"no CUDA device ({reason})",
                            "build on a machine with an NVIDIA GPU, or use the build kit on the device")
    try:
        trt = device.import_tensorrt()
    except Exception as exc:  # noqa: BLE001 - stub wheels raise anything on import
        return Availability(False, f"TensorRT is not installed ({type(exc).__name__})",
                            "pip install 'infc[trt]' on a machine with an NVIDIA GPU")
    return Availability(True, version=getattr(trt, "__version__", None))


def builder_settings(ctx, kit_relative_onnx: str = ".") -> dict:
    """The exact builder settings, as the kit's JSON records them."""
    target = ctx.target
    trt = target.tensorrt
    prefix = "" if kit_relative_onnx in (".", "") else kit_relative_onnx.rstrip("/") + "/"
    has_fp16 = target.emits("onnx-fp16")
    verify = target.verify
    precision = ctx.extra.get("precision", target.precision)
    rtol, atol = (verify.fp16_rtol, verify.fp16_atol) if precision != "fp32" else (verify.rtol, verify.atol)
    return {
        "schema": 1,
        "target": target.name,
        "expected_tensorrt": trt.version,
        "jetpack": target.device.jetpack,
        "precision": precision,
        "onnx": prefix + ctx.extra.get("engine_onnx", "model.onnx"),
        "onnx_fp16": prefix + "model.fp16.onnx" if has_fp16 else None,
        "engine": "model.engine",
        "timing_cache": "timing.cache" if trt.timing_cache else None,
        "workspace_bytes": trt.workspace_mib * (1 << 20),
        "builder_optimization_level": trt.builder_optimization_level,
        "strongly_typed_from": trt.strongly_typed_from,
        "dla_core": trt.dla_core,
        "gpu_fallback": trt.gpu_fallback,
        "inputs": {name: list(ctx.input_shape) for name in ctx.input_names},
        "outputs": {name: list(out.shape) for name, out in zip(ctx.output_names, ctx.reference_outputs)},
        "reference": {"inputs": "reference_inputs.npz", "outputs": "reference_outputs.npz"},
        # INT8 sets its own (precision.stage_onnx_int8): the engine is held to what its ONNX achieves.
        "tolerance": ctx.extra.get("engine_tolerance", {"rtol": rtol, "atol": atol}),
    }


def write_settings(path: Path, settings: dict) -> None:
    path.write_text(json.dumps(settings, indent=2) + "\n")


def read_settings(ctx, kit: str) -> dict:
    return json.loads((ctx.staging / kit / SETTINGS_NAME).read_text())


def _write_references(ctx, kit: str) -> None:
    ctx.save_references(f"{kit}/reference_inputs.npz", f"{kit}/reference_outputs.npz")


KIT_README = """\
infc build kit: {model} for {target}
=====================================

Build the TensorRT engine on the device itself (engines are tied to the GPU
and the exact TensorRT version; they cannot be cross-built on x86):

    python3 build_engine.py            # builds, deserializes and checks model.engine
    python3 build_engine.py --help

Expected: JetPack {jetpack} with TensorRT {trt}. On another version the script
stops and names the --allow-version-mismatch flag.

Files
- model.onnx / model.fp16.onnx: the network (opset {opset}, IR {ir}); TensorRT
  before {strongly} builds FP16 from model.onnx with the FP16 builder flag, later
  versions build model.fp16.onnx strongly typed.
- builder_settings.json: workspace, optimization level, DLA, tolerances.
- reference_inputs.npz / reference_outputs.npz: the MXNet FP32 reference the
  engine's outputs are compared against.
- build_report.json: written by build_engine.py with the numbers.
"""


def write_build_kit(ctx, kit: str, copy_onnx: bool = True) -> str:
    """Everything a device needs to build and check its own engine.

    Without `copy_onnx` the kit points at the build's own onnx/ directory
    (a GPU machine building from the same build directory).
    """
    if copy_onnx:
        files = {f"{kit}/model.onnx": "onnx/model.onnx"}
        if ctx.target.emits("onnx-fp16"):
            files[f"{kit}/model.fp16.onnx"] = "onnx/model.fp16.onnx"
        if ctx.target.emits("onnx-int8"):
            files[f"{kit}/model.int8.onnx"] = "onnx/model.int8.onnx"
        for dst, src in files.items():
            shutil.copyfile(ctx.staging / src, ctx.path(dst))
    shutil.copyfile(KIT_SCRIPT, ctx.path(f"{kit}/build_engine.py"))
    _write_references(ctx, kit)
    write_settings(ctx.path(f"{kit}/{SETTINGS_NAME}"), builder_settings(ctx, "." if copy_onnx else "../onnx"))
    target = ctx.target
    ctx.path(f"{kit}/README.txt").write_text(KIT_README.format(
        model=ctx.info.name, target=target.name, jetpack=target.device.jetpack, trt=target.tensorrt.version,
        opset=target.onnx.opset, ir=target.onnx.ir_version, strongly=target.tensorrt.strongly_typed_from))
    names = sorted(p.name for p in (ctx.staging / kit).iterdir())
    formats = {".onnx": "onnx", ".py": "python", ".json": "json", ".npz": "npz", ".txt": "text"}
    for name in names:
        ctx.add_artifact(f"{kit}/{name}", "tensorrt-build-kit", formats.get(Path(name).suffix, "file"))
    return f"build kit ({len(names)} files) for TensorRT {target.tensorrt.version or '(installed)'}"


def build_here(ctx, kit: str, settings: dict) -> str:
    """Build and check the engine on this machine through the kit script."""
    device = _device_module()
    kit_dir = ctx.staging / kit
    kit_dir.mkdir(parents=True, exist_ok=True)
    if not (kit_dir / SETTINGS_NAME).exists():
        write_settings(kit_dir / SETTINGS_NAME, settings)
        _write_references(ctx, kit)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = device.main(["--kit", str(kit_dir)])
    report_path = kit_dir / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    last_line = (log.getvalue().strip().splitlines() or ["no output"])[-1]
    if code == 3:
        raise MissingDependency(f"TensorRT build failed: {last_line}", "install TensorRT for this GPU")
    if code not in (0, 5):
        raise VerificationFailed(f"TensorRT engine build failed: {last_line}",
                                 "see the build log; try a larger workspace in the target spec")
    for name in sorted(p.name for p in kit_dir.iterdir()):
        kind = {"model.engine": "tensorrt-engine", "timing.cache": "timing-cache"}.get(name)
        if kind or name.endswith(".json") or name.endswith(".npz"):
            ctx.add_artifact(f"{kit}/{name}", kind or "tensorrt-engine", Path(name).suffix.lstrip(".") or "file")
    ctx.add_check(Check("engine-deserialize", "tensorrt-engine", PASSED if code in (0, 5) else FAILED,
                        "engine deserialized; I/O names and shapes match the ONNX",
                        numbers=report.get("io", {})))
    comparison = report.get("comparison", {})
    ctx.add_check(Check("tensorrt-parity", "tensorrt-engine", PASSED if code == 0 else FAILED, last_line,
                        numbers=comparison, tolerance=settings["tolerance"]))
    return f"engine built with TensorRT {report.get('tensorrt', '?')}: {last_line}"


def recheck_engine(engine_path: Path) -> Check:
    """Deserialize a built engine and compare it with the kit's reference outputs."""
    device = _device_module()
    kit_dir = engine_path.parent
    try:
        settings = device.load_settings(str(kit_dir))
        trt = device.import_tensorrt()
        result = device.check_engine(engine_path.read_bytes(), settings, trt, kit_dir=str(kit_dir))
    except device.BuildError as exc:
        return Check("engine-parity", str(engine_path.name), FAILED, exc.message)
    return Check("engine-parity", str(engine_path.name), PASSED, "engine deserialized and matches the reference",
                 numbers={k: result.get(k) for k in ("io", "comparison")})
