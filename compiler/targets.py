"""Target specs: TOML files parsed into frozen, validated dataclasses.

Built-in specs live in the repository's `targets/` directory; a user can pass
the path of their own file anywhere a target name is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# The exporter has translations for these opsets only (see notes/mxnet-onnx.md).
EXPORTER_OPSETS = (12, 13)
# Opset 13 needs IR >= 7.
MIN_IR_FOR_OPSET = {12: 7, 13: 7}

ARTIFACT_KINDS = (
    "mxnet-portable",      # hybridized symbol/params, any MXNet build
    "mxnet-mkldnn",        # graph fused by the MKL-DNN/oneDNN subgraph backend
    "onnx",                # FP32 ONNX at the target's opset/IR
    "onnx-fp16",           # FP16 graph with FP32 inputs/outputs
    "tensorrt-engine",     # serialized engine, built here when TensorRT and a GPU exist
    "tensorrt-build-kit",  # everything needed to build the engine on the device
    # Added by --precision (see precision.reduced_kinds), or listed by a target:
    "mxnet-int8",          # MKL-DNN INT8 symbol/params (x86)
    "mxnet-bf16",          # MXNet AMP bfloat16 (x86 with avx512_bf16)
    "mxnet-fp16",          # MXNet AMP float16 (CUDA)
    "onnx-int8",           # explicit symmetric Q/DQ ONNX (TensorRT 8.5+, ONNX Runtime)
)
# The kinds --precision adds: reduced-precision artifacts.
REDUCED_KINDS = ("mxnet-int8", "mxnet-bf16", "mxnet-fp16", "onnx-int8")
DEVICE_KINDS = ("x86", "cuda", "jetson")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
CALIB_MODES = ("naive", "entropy")


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    jetpack: str | None = None
    gpu_arch: str | None = None
    dla_cores: int = 0


@dataclass(frozen=True)
class OnnxSpec:
    opset: int = 13
    ir_version: int = 7
    # What the target's runtime parser is known to accept.
    runtime: str = "onnxruntime"
    runtime_min_opset: int = 7
    runtime_max_opset: int = 13
    runtime_max_ir: int = 7


@dataclass(frozen=True)
class TensorRTSpec:
    # major.minor the device ships; None means "whatever is installed".
    version: str | None = None
    workspace_mib: int = 1024
    builder_optimization_level: int = 3
    dla_core: int | None = None
    gpu_fallback: bool = True
    timing_cache: bool = True
    # From this version on, precision comes from the ONNX (strongly typed).
    strongly_typed_from: str = "10.12"


@dataclass(frozen=True)
class MXNetSpec:
    static_alloc: bool = True
    static_shape: bool = True


@dataclass(frozen=True)
class VerifySpec:
    # Pass iff max|a-b| <= atol + rtol * max|ref| for every output.
    rtol: float = 1e-4
    atol: float = 1e-5
    fp16_rtol: float = 5e-2
    fp16_atol: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class QuantizeSpec:
    # naive: min/max of the calibration activations; entropy: KL-divergence thresholds (slower).
    calib_mode: str = "naive"
    # Accuracy fallback: at most this many of the most sensitive layers go back to FP32.
    max_fp32_layers: int = 16


@dataclass(frozen=True)
class AccuracySpec:
    # Largest drop, in percentage points, of the headline agreement with the FP32
    # reference (top-1 for classifiers, pixel agreement for segmentation).
    max_drop: float = 1.0


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    device: DeviceSpec
    emit: tuple[str, ...]
    precision: str = "fp32"
    aliases: tuple[str, ...] = ()
    onnx: OnnxSpec = field(default_factory=OnnxSpec)
    tensorrt: TensorRTSpec | None = None
    mxnet: MXNetSpec = field(default_factory=MXNetSpec)
    verify: VerifySpec = field(default_factory=VerifySpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    accuracy: AccuracySpec = field(default_factory=AccuracySpec)
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """Hash of what the spec says, not where it was read from."""
        data = self.to_dict()
        data.pop("source")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def emits(self, kind: str) -> bool:
        return kind in self.emit


def builtin_targets_dir() -> Path:
    override = os.environ.get("INFC_TARGETS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "targets"


# --- parsing -----------------------------------------------------------------

def _type_name(annotation) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _type_name(args[0]) + " (or omitted)"
    if origin is tuple:
        return "a list of " + _type_name(typing.get_args(annotation)[0]).removeprefix("a ").removeprefix("an ") + "s"
    if dataclasses.is_dataclass(annotation):
        return "a table"
    return names.get(annotation, str(annotation))


def _coerce(value, annotation, key: str, path: Path):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, args[0], key, path)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _type_error(path, key, annotation, value)
        return _build(annotation, value, path, prefix=key + ".")
    if origin is tuple:
        (item_type,) = typing.get_args(annotation)[:1]
        if not isinstance(value, list):
            raise _type_error(path, key, annotation, value)
        return tuple(_coerce(v, item_type, f"{key}[{i}]", path) for i, v in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _type_error(path, key, annotation, value)
    if not isinstance(value, annotation):
        raise _type_error(path, key, annotation, value)
    return value


def _type_error(path: Path, key: str, annotation, value) -> UserError:
    return UserError(
        f"target file {path}: key '{key}' must be {_type_name(annotation)}, "
        f"got {type(value).__name__} {value!r}",
        "fix the value in the TOML file",
    )


def _build(cls, table: dict, path: Path, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in table if k not in fields or k == "source"]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(f for f in fields if f != 'source')}"
        raise UserError(f"target file {path}: unknown key '{prefix}{key}'", hint)
    kwargs = {}
    for name, f in fields.items():
        if name == "source":
            continue
        if name in table:
            kwargs[name] = _coerce(table[name], hints[name], prefix + name, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"target file {path}: missing required key '{prefix}{name}'",
                            "add it to the TOML file")
    return cls(**kwargs)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _validate(spec: TargetSpec, path: Path) -> None:
    def bad(problem: str, fix: str) -> UserError:
        return UserError(f"target file {path}: {problem}", fix)

    if spec.device.kind not in DEVICE_KINDS:
        raise bad(f"device.kind '{spec.device.kind}' is not one of {', '.join(DEVICE_KINDS)}",
                  "use one of those")
    for kind in spec.emit:
        if kind not in ARTIFACT_KINDS:
            close = difflib.get_close_matches(kind, ARTIFACT_KINDS, n=1)
            raise bad(f"emit lists unknown artifact '{kind}'",
                      f"did you mean '{close[0]}'?" if close else f"known: {', '.join(ARTIFACT_KINDS)}")
    if not spec.emit:
        raise bad("emit is empty", f"list at least one of {', '.join(ARTIFACT_KINDS)}")
    if spec.precision not in PRECISIONS:
        raise bad(f"precision '{spec.precision}' is not one of {', '.join(PRECISIONS)}", "use one of those")
    onnx = spec.onnx
    if onnx.opset not in EXPORTER_OPSETS:
        raise bad(f"onnx.opset {onnx.opset} has no MXNet exporter translations",
                  f"use one of {', '.join(map(str, EXPORTER_OPSETS))}")
    if not onnx.runtime_min_opset <= onnx.opset <= onnx.runtime_max_opset:
        raise bad(f"onnx.opset {onnx.opset} is outside what {onnx.runtime} accepts "
                  f"({onnx.runtime_min_opset}-{onnx.runtime_max_opset})", "lower or raise onnx.opset")
    if not MIN_IR_FOR_OPSET[onnx.opset] <= onnx.ir_version <= onnx.runtime_max_ir:
        raise bad(f"onnx.ir_version {onnx.ir_version} must be between {MIN_IR_FOR_OPSET[onnx.opset]} "
                  f"(opset {onnx.opset}) and {onnx.runtime_max_ir} ({onnx.runtime})", "change onnx.ir_version")
    needs_trt = spec.emits("tensorrt-engine") or spec.emits("tensorrt-build-kit")
    if needs_trt and spec.tensorrt is None:
        raise bad("emits a TensorRT artifact but has no [tensorrt] table", "add a [tensorrt] table")
    if spec.emits("tensorrt-build-kit") and not spec.emits("onnx"):
        raise bad("a TensorRT build kit needs the 'onnx' artifact", "add 'onnx' to emit")
    if spec.emits("onnx-fp16") and not spec.emits("onnx"):
        raise bad("'onnx-fp16' is converted from the 'onnx' artifact", "add 'onnx' to emit")
    if spec.emits("mxnet-mkldnn") and spec.device.kind != "x86":
        raise bad("'mxnet-mkldnn' runs only on x86 CPUs", "remove it or set device.kind = \"x86\"")
    for kind in ("mxnet-int8", "mxnet-bf16"):
        if spec.emits(kind) and spec.device.kind != "x86":
            raise bad(f"'{kind}' runs only on x86 CPUs", "remove it or set device.kind = \"x86\"")
    if spec.emits("mxnet-fp16") and spec.device.kind == "x86":
        raise bad("'mxnet-fp16' needs a GPU (MXNet has no CPU FP16 GEMM)", "use 'mxnet-bf16' on x86")
    if spec.emits("onnx-int8") and not spec.emits("onnx"):
        raise bad("'onnx-int8' is quantized from the 'onnx' artifact", "add 'onnx' to emit")
    if spec.quantize.calib_mode not in CALIB_MODES:
        raise bad(f"quantize.calib_mode '{spec.quantize.calib_mode}' is not one of {', '.join(CALIB_MODES)}",
                  "use one of those")
    if spec.quantize.max_fp32_layers < 0:
        raise bad("quantize.max_fp32_layers is negative", "use 0 to disable the accuracy fallback")
    if not 0 <= spec.accuracy.max_drop <= 100:
        raise bad(f"accuracy.max_drop {spec.accuracy.max_drop} is not between 0 and 100", "give percentage points")
    trt = spec.tensorrt
    if trt is not None:
        for label, text in (("tensorrt.version", trt.version), ("tensorrt.strongly_typed_from", trt.strongly_typed_from)):
            if text is not None:
                try:
                    _version_tuple(text)
                except ValueError:
                    raise bad(f"{label} '{text}' is not a version like 10.3", "write major.minor") from None
        if trt.workspace_mib <= 0:
            raise bad("tensorrt.workspace_mib must be positive", "set a size in MiB")
        if not 0 <= trt.builder_optimization_level <= 5:
            raise bad("tensorrt.builder_optimization_level must be 0-5", "TensorRT's default is 3")
        if trt.dla_core is not None and not 0 <= trt.dla_core < spec.device.dla_cores:
            raise bad(f"tensorrt.dla_core {trt.dla_core} but the device has {spec.device.dla_cores} DLA cores",
                      "remove dla_core or fix device.dla_cores")
    for label, value in (("verify.rtol", spec.verify.rtol), ("verify.atol", spec.verify.atol),
                         ("verify.fp16_rtol", spec.verify.fp16_rtol), ("verify.fp16_atol", spec.verify.fp16_atol)):
        if value < 0:
            raise bad(f"{label} is negative", "tolerances are >= 0")


def load_target_file(path: Path) -> TargetSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"target file {path} does not exist", "check the path, or run `infc targets`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"target file {path} cannot be read: {exc}", "check the file") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"target file {path} is not valid TOML: {exc}", "fix the syntax") from None
    spec = _build(TargetSpec, table, path)
    spec = dataclasses.replace(spec, source=str(path))
    _validate(spec, path)
    return spec


def _builtin_files() -> dict[str, Path]:
    """Map every built-in name and alias to its file without parsing all of them fully."""
    names: dict[str, Path] = {}
    directory = builtin_targets_dir()
    for path in sorted(directory.glob("*.toml")):
        names[path.stem] = path
        try:
            aliases = tomllib.loads(path.read_text()).get("aliases", [])
        except (tomllib.TOMLDecodeError, OSError):
            aliases = []
        for alias in aliases if isinstance(aliases, list) else []:
            names.setdefault(str(alias), path)
    return names


def list_targets() -> list[TargetSpec]:
    return [load_target_file(p) for p in sorted(builtin_targets_dir().glob("*.toml"))]


def resolve_target(name_or_path: str) -> TargetSpec:
    """A built-in name or alias, or the path of a TOML file."""
    looks_like_path = name_or_path.endswith(".toml") or os.sep in name_or_path
    if looks_like_path:
        return load_target_file(Path(name_or_path))
    files = _builtin_files()
    if name_or_path in files:
        return load_target_file(files[name_or_path])
    close = difflib.get_close_matches(name_or_path, list(files), n=3, cutoff=0.5)
    fix = f"did you mean {', '.join(close)}?" if close else "run `infc targets` for the list, or pass a .toml path"
    raise UserError(f"unknown target '{name_or_path}'", fix)


def version_at_least(version: str, minimum: str) -> bool:
    return _version_tuple(version)[:2] >= _version_tuple(minimum)[:2]
