#!/usr/bin/env python3
"""Build a TensorRT engine from an infc build kit, on the target device.

Usage (on the device, from anywhere):

    python3 build_engine.py [--kit DIR] [--allow-version-mismatch] [--force] [--verbose]

The kit directory (default: the directory holding this script) contains
``builder_settings.json`` written by infc, the ONNX graph(s) and optionally
reference inputs/outputs.  The script parses the ONNX with TensorRT's parser,
builds a serialized engine for *this* device and TensorRT version, checks the
engine's I/O tensors, runs it on the reference inputs and compares with the
reference outputs, then writes ``build_report.json`` next to the engine.

This file is copied verbatim into build kits, so it depends only on the
standard library, numpy, tensorrt and (for the reference check) one of
cuda-python, pycuda or a loadable libcudart.so.  It must stay Python 3.6
compatible (JetPack 4.6).  infc also imports it as a module on machines with
a GPU; all logic lives in functions.

Exit codes: 0 ok, 1 unexpected error (traceback shown), 2 usage / bad
settings / version mismatch, 3 TensorRT (or CUDA buffer library) missing,
4 no CUDA device, 5 verification failed, 6 parse/build failed.
"""

import argparse
import collections
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import sys
import time
import traceback

SCRIPT_NAME = "build_engine"
SETTINGS_FILE = "builder_settings.json"
REPORT_FILE = "build_report.json"
SCHEMA_VERSION = 1

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_MISSING_LIBRARY = 3
EXIT_NO_GPU = 4
EXIT_VERIFY_FAILED = 5
EXIT_BUILD_FAILED = 6

TRT_NOT_FOUND = ("TensorRT not found: install JetPack's python3-libnvinfer "
                 "(or `pip install tensorrt` on x86 with a GPU)")

# Version thresholds (major, minor) of the TensorRT features the plan uses.
MEMORY_POOL_API_SINCE = (8, 4)      # IBuilderConfig.set_memory_pool_limit
OPTIMIZATION_LEVEL_SINCE = (8, 6)   # IBuilderConfig.builder_optimization_level
TENSOR_IO_API_SINCE = (8, 5)        # ICudaEngine.num_io_tensors / get_tensor_*
ENQUEUE_V3_FROM = (10, 0)           # use set_tensor_address + execute_async_v3
NO_EXPLICIT_BATCH_SINCE = (10, 0)   # EXPLICIT_BATCH deprecated/ignored, then gone
STRONG_FP16_SINCE = (10, 12)        # weak typing deprecated: fp16 via a typed ONNX
NO_PRECISION_FLAGS_SINCE = (11, 0)  # BuilderFlag.FP16 / INT8 removed

PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED_KEYS = ("schema", "expected_tensorrt", "precision", "onnx", "engine",
                 "inputs", "outputs")
DEFAULT_TOLERANCE = {"rtol": 1e-2, "atol": 1e-3}


class BuildError(Exception):
    """A handled failure: ``code`` is the exit code, ``message`` one line."""

    def __init__(self, code, message, details=None):
        Exception.__init__(self, message)
        self.code = code
        self.message = one_line(message)
        self.details = details


def one_line(text):
    """Collapse ``text`` to a single line (stderr failures are one line)."""
    return " ".join(str(text).split())


def say(message):
    """Print one short progress line for a stage."""
    print("%s: %s" % (SCRIPT_NAME, one_line(message)))
    sys.stdout.flush()


# --------------------------------------------------------------------------
# Versions

def parse_version(text):
    """'10.3.0.30' -> (10, 3, 0); '10.3' -> (10, 3, 0); raises ValueError."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise ValueError("not a version: %r" % (text,))
    return (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


def import_tensorrt():
    """Import and return the tensorrt module, or raise BuildError(3)."""
    try:
        import tensorrt  # noqa: F401  (libnvinfer missing raises OSError)
    except (ImportError, OSError):
        raise BuildError(EXIT_MISSING_LIBRARY, TRT_NOT_FOUND)
    return tensorrt


def tensorrt_version(trt_module=None):
    """Installed TensorRT version as (major, minor, patch)."""
    trt = trt_module if trt_module is not None else import_tensorrt()
    text = getattr(trt, "__version__", None)
    try:
        return parse_version(text)
    except ValueError:
        raise BuildError(EXIT_MISSING_LIBRARY,
                         "cannot read the TensorRT version (tensorrt.__version__ = %r)" % (text,))


def version_str(version):
    return ".".join(str(part) for part in version)


def check_version(installed, settings, allow_mismatch=False):
    """Compare installed (major, minor) with the kit's expected_tensorrt.

    Returns True when they match; on mismatch raises BuildError(2) unless
    ``allow_mismatch`` (then returns False).
    """
    if settings["expected_tensorrt"] is None:
        return True  # a discrete-GPU kit builds with whatever TensorRT is installed
    expected = parse_version(settings["expected_tensorrt"])
    if tuple(installed[:2]) == expected[:2]:
        return True
    if allow_mismatch:
        return False
    target = settings.get("target") or "the target"
    jetpack = settings.get("jetpack")
    where = "%s, JetPack %s" % (target, jetpack) if jetpack else target
    raise BuildError(
        EXIT_USAGE,
        "TensorRT %s is installed but this kit was made for TensorRT %d.%d (%s); "
        "engines are tied to the exact TensorRT version: install the matching "
        "TensorRT/JetPack, or rerun with --allow-version-mismatch to build anyway"
        % (version_str(installed), expected[0], expected[1], where))


# --------------------------------------------------------------------------
# CUDA device probe (must run before any TensorRT builder/runtime call)

def _import_cuda_runtime():
    """cuda-python's runtime module (new path first), or None."""
    try:
        from cuda.bindings import runtime
        return runtime
    except Exception:
        pass
    try:
        from cuda import cudart
        return cudart
    except Exception:
        return None


def _cuda_error_name(err):
    return getattr(err, "name", None) or str(err)


def probe_cuda_python():
    """Device count via cuda-python; None when cuda-python is not installed."""
    rt = _import_cuda_runtime()
    if rt is None:
        return None
    try:
        result = rt.cudaGetDeviceCount()
    except Exception as exc:  # broken install: let the next probe decide
        return _fallthrough("cuda-python", exc)
    err, count = result[0], result[1]
    if err != rt.cudaError_t.cudaSuccess:
        return (False, "cudaGetDeviceCount returned %s (cuda-python)" % _cuda_error_name(err))
    if count < 1:
        return (False, "cudaGetDeviceCount found 0 devices (cuda-python)")
    return (True, "%d CUDA device(s) (cuda-python)" % count)


def _fallthrough(library, exc):
    # A probe that cannot run says nothing about the device: try the next one.
    say("device probe: %s unusable (%s); trying the next probe" % (library, exc))
    return None


def probe_pycuda():
    """Device count via pycuda; None when pycuda is not installed."""
    try:
        import pycuda.driver as driver
    except Exception:
        return None
    try:
        driver.init()
        count = driver.Device.count()
    except Exception as exc:
        return (False, "pycuda: %s" % one_line(exc))
    if count < 1:
        return (False, "pycuda found 0 devices")
    return (True, "%d CUDA device(s) (pycuda)" % count)


DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so")
CUDART_LIBRARIES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12",
                    "libcudart.so.11.0", "libcudart.so.10.2",
                    "/usr/local/cuda/lib64/libcudart.so")


def _load_first(names, find_name=None):
    candidates = list(names)
    if find_name:
        found = ctypes.util.find_library(find_name)
        if found:
            candidates.insert(0, found)
    for name in candidates:
        try:
            return ctypes.CDLL(name), name
        except OSError:
            continue
    return None, None


def probe_libcuda(lib):
    """cuInit(0) + cuDeviceGetCount on a loaded libcuda handle."""
    rc = lib.cuInit(0)
    if rc != 0:
        return (False, "cuInit returned CUresult %d (libcuda)" % rc)
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return (False, "cuDeviceGetCount returned CUresult %d (libcuda)" % rc)
    if count.value < 1:
        return (False, "cuDeviceGetCount found 0 devices (libcuda)")
    return (True, "%d CUDA device(s) (libcuda)" % count.value)


def probe_libcudart(lib):
    """cudaGetDeviceCount on a loaded libcudart handle."""
    count = ctypes.c_int(0)
    rc = lib.cudaGetDeviceCount(ctypes.byref(count))
    if rc != 0:
        return (False, "cudaGetDeviceCount returned cudaError %d (libcudart)" % rc)
    if count.value < 1:
        return (False, "cudaGetDeviceCount found 0 devices (libcudart)")
    return (True, "%d CUDA device(s) (libcudart)" % count.value)


def probe_ctypes():
    """Driver (libcuda) first, then the runtime (libcudart), through ctypes."""
    lib, _ = _load_first(DRIVER_LIBRARIES, "cuda")
    if lib is not None:
        return probe_libcuda(lib)
    lib, _ = _load_first(CUDART_LIBRARIES, "cudart")
    if lib is not None:
        return probe_libcudart(lib)
    return None


DEFAULT_PROBES = (probe_cuda_python, probe_pycuda, probe_ctypes)


def cuda_device_available(probes=None):
    """(available, reason).  Tries cuda-python, pycuda, then ctypes.

    The first probe whose library is present decides; a probe returns None
    when its library is absent.
    """
    for probe in (probes if probes is not None else DEFAULT_PROBES):
        try:
            answer = probe()
        except Exception as exc:
            answer = _fallthrough(getattr(probe, "__name__", "probe"), exc)
        if answer is not None:
            return (bool(answer[0]), str(answer[1]))
    return (False, "no CUDA library found (cuda-python, pycuda, libcuda.so.1, libcudart.so); "
                   "is the NVIDIA driver / JetPack installed?")


# --------------------------------------------------------------------------
# Settings

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_shapes(settings, key, problems):
    shapes = settings.get(key)
    if not isinstance(shapes, dict) or not shapes:
        problems.append("%r must be a non-empty object of tensor name -> shape" % key)
        return
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            problems.append("%s[%r] must be a list of non-negative ints, got %r" % (key, name, shape))


def validate_settings(settings):
    """Raise BuildError(2) naming every problem; unknown keys are ignored."""
    if not isinstance(settings, dict):
        raise BuildError(EXIT_USAGE, "%s: top level must be an object" % SETTINGS_FILE)
    missing = [key for key in REQUIRED_KEYS if key not in settings]
    if missing:
        raise BuildError(EXIT_USAGE, "%s: missing required key(s): %s"
                         % (SETTINGS_FILE, ", ".join(missing)))
    problems = []
    schema = settings["schema"]
    if not _is_int(schema) or schema < 1:
        problems.append("schema must be a positive int, got %r" % (schema,))
    elif schema > SCHEMA_VERSION:
        problems.append("schema %d is newer than this script understands (%d): use the "
                        "build_engine.py shipped in the same kit" % (schema, SCHEMA_VERSION))
    try:
        if settings["expected_tensorrt"] is not None:
            parse_version(settings["expected_tensorrt"])
        if settings.get("strongly_typed_from") is not None:
            parse_version(settings["strongly_typed_from"])
    except ValueError:
        problems.append("expected_tensorrt must look like '10.3', got %r"
                        % (settings["expected_tensorrt"],))
    if settings["precision"] not in PRECISIONS:
        problems.append("precision must be one of %s, got %r"
                        % ("/".join(PRECISIONS), settings["precision"]))
    for key in ("onnx", "engine"):
        if not isinstance(settings[key], str) or not settings[key]:
            problems.append("%s must be a file name" % key)
    for key in ("onnx_fp16", "timing_cache"):
        value = settings.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            problems.append("%s must be a file name or null" % key)
    _check_shapes(settings, "inputs", problems)
    _check_shapes(settings, "outputs", problems)
    workspace = settings.get("workspace_bytes")
    if workspace is not None and (not _is_int(workspace) or workspace <= 0):
        problems.append("workspace_bytes must be a positive int or null")
    level = settings.get("builder_optimization_level")
    if level is not None and (not _is_int(level) or not 0 <= level <= 5):
        problems.append("builder_optimization_level must be 0..5 or null")
    dla = settings.get("dla_core")
    if dla is not None and (not _is_int(dla) or dla < 0):
        problems.append("dla_core must be a non-negative int or null")
    if not isinstance(settings.get("gpu_fallback", True), bool):
        problems.append("gpu_fallback must be true or false")
    reference = settings.get("reference")
    if reference is not None:
        if (not isinstance(reference, dict)
                or not isinstance(reference.get("inputs"), str)
                or not isinstance(reference.get("outputs"), str)):
            problems.append("reference must be null or {\"inputs\": file, \"outputs\": file}")
    tolerance = settings.get("tolerance")
    if tolerance is not None:
        if not isinstance(tolerance, dict) or not all(
                _is_number(tolerance.get(k, 0)) and tolerance.get(k, 0) >= 0
                for k in ("rtol", "atol")):
            problems.append("tolerance must be {\"rtol\": number >= 0, \"atol\": number >= 0}")
    if problems:
        raise BuildError(EXIT_USAGE, "%s: %s" % (SETTINGS_FILE, "; ".join(problems)))
    return settings


def load_settings(kit_dir):
    """Read and validate builder_settings.json from ``kit_dir``."""
    path = os.path.join(kit_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise BuildError(EXIT_USAGE, "%s not found in %s (use --kit DIR)" % (SETTINGS_FILE, kit_dir))
    try:
        with open(path, "r") as handle:
            settings = json.load(handle, object_pairs_hook=collections.OrderedDict)
    except ValueError as exc:
        raise BuildError(EXIT_USAGE, "%s is not valid JSON: %s" % (path, exc))
    return validate_settings(settings)


def tolerance_of(settings):
    tolerance = dict(DEFAULT_TOLERANCE)
    tolerance.update(settings.get("tolerance") or {})
    return float(tolerance["rtol"]), float(tolerance["atol"])


# --------------------------------------------------------------------------
# Precision / API policy (pure)

def plan_build(settings, trt_version):
    """Decide how to build for ``trt_version`` (a (major, minor[, patch]) tuple).

    Pure function: no TensorRT needed.  Returns a JSON-serialisable dict:
    onnx (file to parse), strongly_typed, network_flags and builder_flags
    (member names), workspace_api, builder_optimization_level (None when
    unset or unsupported), device_type/dla_core, io_api, execute_api,
    timing_cache and notes.  Raises BuildError(2) for impossible requests.
    """
    version = tuple(trt_version[:2])
    precision = settings.get("precision")
    if precision not in PRECISIONS:
        raise BuildError(EXIT_USAGE, "precision must be one of %s, got %r"
                         % ("/".join(PRECISIONS), precision))
    onnx_file = settings["onnx"]
    strongly_typed = False
    builder_flags = []
    notes = []

    strong_fp16_since = STRONG_FP16_SINCE
    if settings.get("strongly_typed_from"):
        strong_fp16_since = parse_version(settings["strongly_typed_from"])[:2]
    if precision == "fp16":
        if version >= strong_fp16_since:
            if not settings.get("onnx_fp16"):
                raise BuildError(
                    EXIT_USAGE,
                    "precision fp16 on TensorRT %d.%d needs a strongly typed fp16 ONNX "
                    "(\"onnx_fp16\" is null in %s): recompile the kit for this TensorRT"
                    % (version[0], version[1], SETTINGS_FILE))
            onnx_file = settings["onnx_fp16"]
            strongly_typed = True
        else:
            builder_flags.append("FP16")
    elif precision == "int8":
        # The kit's ONNX carries explicit Q/DQ nodes: no calibrator needed.
        if version >= NO_PRECISION_FLAGS_SINCE:
            strongly_typed = True
        else:
            builder_flags.append("INT8")

    network_flags = []
    if version < NO_EXPLICIT_BATCH_SINCE:
        network_flags.append("EXPLICIT_BATCH")
    if strongly_typed:
        network_flags.append("STRONGLY_TYPED")

    dla_core = settings.get("dla_core")
    gpu_fallback = bool(settings.get("gpu_fallback", True))
    if dla_core is not None:
        if gpu_fallback:
            builder_flags.append("GPU_FALLBACK")
        if precision == "fp32":
            if not gpu_fallback:
                raise BuildError(EXIT_USAGE, "DLA runs only fp16/int8 layers: precision fp32 "
                                             "with dla_core set needs gpu_fallback true")
            notes.append("DLA runs only fp16/int8: fp32 layers fall back to the GPU")

    workspace = settings.get("workspace_bytes")
    if workspace is None:
        workspace_api = None
    elif version >= MEMORY_POOL_API_SINCE:
        workspace_api = "set_memory_pool_limit"
    else:
        workspace_api = "max_workspace_size"

    level = settings.get("builder_optimization_level")
    if level is not None and version < OPTIMIZATION_LEVEL_SINCE:
        notes.append("builder_optimization_level ignored: needs TensorRT >= 8.6")
        level = None

    return {
        "tensorrt": "%d.%d" % version,
        "precision": precision,
        "onnx": onnx_file,
        "strongly_typed": strongly_typed,
        "network_flags": network_flags,
        "builder_flags": builder_flags,
        "workspace_api": workspace_api,
        "workspace_bytes": workspace,
        "builder_optimization_level": level,
        "device_type": "DLA" if dla_core is not None else "GPU",
        "dla_core": dla_core,
        "io_api": "tensors" if version >= TENSOR_IO_API_SINCE else "bindings",
        "execute_api": "execute_async_v3" if version >= ENQUEUE_V3_FROM else "execute_v2",
        "timing_cache": settings.get("timing_cache"),
        "engine": settings["engine"],
        "notes": notes,
    }


def describe_plan(plan):
    parts = ["%s from %s" % (plan["precision"], plan["onnx"])]
    if plan["strongly_typed"]:
        parts.append("strongly typed")
    if plan["builder_flags"]:
        parts.append("flags " + "+".join(plan["builder_flags"]))
    if plan["device_type"] == "DLA":
        parts.append("DLA core %d" % plan["dla_core"])
    return ", ".join(parts)


def kit_files(kit_dir, plan, settings):
    """Paths the build needs; raises BuildError(2) listing missing ones."""
    needed = [plan["onnx"]]
    reference = settings.get("reference")
    if reference:
        needed += [reference["inputs"], reference["outputs"]]
    missing = [name for name in needed if not os.path.isfile(os.path.join(kit_dir, name))]
    if missing:
        raise BuildError(EXIT_USAGE, "kit incomplete: missing %s in %s" % (", ".join(missing), kit_dir))
    return [os.path.join(kit_dir, name) for name in needed]


# --------------------------------------------------------------------------
# Files

def write_atomic(path, data):
    """Write bytes via a temporary file in the same directory + os.replace."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def as_bytes(buffer):
    """bytes of an IHostMemory (buffer protocol) or bytes-like object."""
    if isinstance(buffer, bytes):
        return buffer
    return bytes(memoryview(buffer))


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_fingerprint(kit_dir, plan, settings, version):
    """Identifies what an engine was built from (ONNX bytes, plan, TensorRT)."""
    digest = hashlib.sha256()
    digest.update(sha256_file(os.path.join(kit_dir, plan["onnx"])).encode("ascii"))
    digest.update(json.dumps(plan, sort_keys=True).encode("utf-8"))
    digest.update(json.dumps({"inputs": settings["inputs"], "outputs": settings["outputs"]},
                             sort_keys=True).encode("utf-8"))
    digest.update(version_str(version).encode("ascii"))
    return digest.hexdigest()


def previous_build(kit_dir, fingerprint, engine_path):
    """The previous report's build section if it describes the engine on disk."""
    try:
        with open(os.path.join(kit_dir, REPORT_FILE), "r") as handle:
            build = json.load(handle).get("build") or {}
    except (IOError, OSError, ValueError, AttributeError):
        return None
    if (build.get("fingerprint") == fingerprint and os.path.isfile(engine_path)
            and os.path.getsize(engine_path) == build.get("engine_size_bytes")):
        return build
    return None


# --------------------------------------------------------------------------
# Build

def network_creation_flags(trt, plan):
    """Bit mask for builder.create_network from the plan's flag names."""
    value = 0
    enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    for name in plan["network_flags"]:
        member = getattr(enum, name, None)
        if member is None:
            raise BuildError(EXIT_BUILD_FAILED, "TensorRT %s has no NetworkDefinitionCreationFlag.%s"
                             % (trt.__version__, name))
        value |= 1 << int(member)
    return value


def configure_builder(trt, builder, network, config, plan, settings):
    """Apply the plan to ``config``; returns a list of what was applied."""
    applied = []
    for name in plan["builder_flags"]:
        member = getattr(trt.BuilderFlag, name, None)
        if member is None:
            raise BuildError(EXIT_BUILD_FAILED, "TensorRT %s has no BuilderFlag.%s"
                             % (trt.__version__, name))
        config.set_flag(member)
        applied.append("BuilderFlag.%s" % name)

    workspace = plan["workspace_bytes"]
    if workspace is not None:
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
            applied.append("set_memory_pool_limit(WORKSPACE, %d)" % workspace)
        else:
            config.max_workspace_size = int(workspace)
            applied.append("max_workspace_size=%d" % workspace)

    level = plan["builder_optimization_level"]
    if level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(level)
        applied.append("builder_optimization_level=%d" % level)

    if plan["dla_core"] is not None:
        core = int(plan["dla_core"])
        cores = getattr(builder, "num_DLA_cores", None)
        if cores is not None and core >= int(cores):
            raise BuildError(EXIT_BUILD_FAILED, "DLA core %d requested but this device has %d DLA core(s)"
                             % (core, int(cores)))
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = core
        applied.append("DLA core %d" % core)

    # Dynamic network inputs get a single profile at the kit's fixed shape.
    profile = None
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = [int(d) for d in tensor.shape]
        if all(d >= 0 for d in shape):
            continue
        wanted = settings["inputs"].get(tensor.name)
        if wanted is None:
            raise BuildError(EXIT_BUILD_FAILED, "input %r has dynamic shape %s and no shape in %s"
                             % (tensor.name, shape, SETTINGS_FILE))
        if profile is None:
            profile = builder.create_optimization_profile()
        profile.set_shape(tensor.name, tuple(wanted), tuple(wanted), tuple(wanted))
        applied.append("profile %s=%s" % (tensor.name, list(wanted)))
    if profile is not None:
        config.add_optimization_profile(profile)
    return applied


def load_timing_cache(config, path):
    """Create the builder's timing cache from ``path`` if it exists."""
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as handle:
            data = handle.read()
    cache = config.create_timing_cache(data)
    ok = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    if data and not ok:
        say("timing cache: %s does not match this device/TensorRT; starting a new one"
            % os.path.basename(path))
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        return False
    return bool(data)


def save_timing_cache(config, path):
    cache = config.get_timing_cache()
    if cache is None:
        return False
    write_atomic(path, as_bytes(cache.serialize()))
    return True


def parse_onnx(trt, parser, onnx_path):
    """Parse from file (keeps big models out of Python memory, finds external data)."""
    if hasattr(parser, "parse_from_file"):
        ok = parser.parse_from_file(onnx_path)
    else:
        with open(onnx_path, "rb") as handle:
            ok = parser.parse(handle.read())
    if not ok:
        errors = [one_line(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(EXIT_BUILD_FAILED, "ONNX parse failed for %s: %s"
                         % (os.path.basename(onnx_path), " | ".join(errors) or "no parser error recorded"))


def build_engine(kit_dir, settings, trt_module, plan=None, verbose=False):
    """Parse the kit's ONNX and build + write the engine.

    Returns a dict: serialized (engine bytes), engine path/size, timings,
    applied configuration and timing-cache state.  Raises BuildError.
    """
    trt = trt_module
    version = tensorrt_version(trt)
    if plan is None:
        plan = plan_build(settings, version)
    onnx_path = os.path.join(kit_dir, plan["onnx"])
    if not os.path.isfile(onnx_path):
        raise BuildError(EXIT_USAGE, "kit incomplete: missing %s" % onnx_path)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)

    started = time.time()
    parse_onnx(trt, parser, onnx_path)
    parse_seconds = time.time() - started
    say("parse: %s ok (%d inputs, %d outputs, %.1f s)"
        % (plan["onnx"], network.num_inputs, network.num_outputs, parse_seconds))

    config = builder.create_builder_config()
    applied = configure_builder(trt, builder, network, config, plan, settings)
    cache_path = os.path.join(kit_dir, plan["timing_cache"]) if plan["timing_cache"] else None
    cache_loaded = False
    if cache_path and hasattr(config, "create_timing_cache"):
        cache_loaded = load_timing_cache(config, cache_path)
        say("timing cache: %s" % ("loaded " + plan["timing_cache"] if cache_loaded else "new"))

    started = time.time()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.time() - started
    if serialized is None:
        raise BuildError(EXIT_BUILD_FAILED, "TensorRT build failed for %s after %.1f s "
                         "(build_serialized_network returned None; see the TensorRT errors above)"
                         % (plan["onnx"], build_seconds))
    data = as_bytes(serialized)

    cache_saved = False
    if cache_path and hasattr(config, "get_timing_cache"):
        cache_saved = save_timing_cache(config, cache_path)
    engine_path = os.path.join(kit_dir, plan["engine"])
    write_atomic(engine_path, data)
    say("build: %s (%.1f MB) in %.1f s" % (plan["engine"], len(data) / 1e6, build_seconds))
    return {
        "serialized": data,
        "engine": engine_path,
        "engine_size_bytes": len(data),
        "parse_seconds": round(parse_seconds, 3),
        "build_seconds": round(build_seconds, 3),
        "applied": applied,
        "timing_cache": {"path": plan["timing_cache"], "loaded": cache_loaded, "saved": cache_saved},
    }


# --------------------------------------------------------------------------
# Check: I/O, inference, comparison

def engine_io(engine, trt):
    """List of {name, input, shape, dtype, index} from a deserialized engine."""
    tensors = []
    if hasattr(engine, "num_io_tensors"):  # TensorRT 8.5+, 10, 11
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            tensors.append({
                "name": name,
                "input": engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                "shape": [int(d) for d in engine.get_tensor_shape(name)],
                "dtype": engine.get_tensor_dtype(name),
                "index": index,
            })
    else:  # TensorRT 8.2: binding API
        for index in range(engine.num_bindings):
            tensors.append({
                "name": engine.get_binding_name(index),
                "input": bool(engine.binding_is_input(index)),
                "shape": [int(d) for d in engine.get_binding_shape(index)],
                "dtype": engine.get_binding_dtype(index),
                "index": index,
            })
    return tensors


def check_io(tensors, settings):
    """Problems (list of str) between the engine's I/O and the settings."""
    problems = []
    for key, is_input in (("inputs", True), ("outputs", False)):
        kind = key[:-1]
        actual = collections.OrderedDict(
            (t["name"], list(t["shape"])) for t in tensors if t["input"] == is_input)
        for name, shape in settings[key].items():
            if name not in actual:
                problems.append("missing %s %r" % (kind, name))
            elif actual[name] != list(shape):
                problems.append("%s %r has shape %s, expected %s" % (kind, name, actual[name], list(shape)))
        for name in actual:
            if name not in settings[key]:
                problems.append("unexpected %s %r" % (kind, name))
    return problems


def _finite(value):
    value = float(value)
    return value if value == value and value not in (float("inf"), float("-inf")) else str(value)


def compare_outputs(actual, reference, rtol, atol):
    """max_abs = max|a-b|, rel = max_abs / max|ref|; ok iff max_abs <= atol + rtol*max|ref|."""
    import numpy as np
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        return {"ok": False, "error": "shape %s, reference %s" % (list(a.shape), list(r.shape)),
                "max_abs": None, "rel": None, "ref_max_abs": None, "allowed": None}
    if a.size == 0:
        return {"ok": True, "max_abs": 0.0, "rel": 0.0, "ref_max_abs": 0.0, "allowed": atol}
    max_abs = float(np.max(np.abs(a - r)))
    ref_max = float(np.max(np.abs(r)))
    if ref_max > 0:
        rel = max_abs / ref_max
    else:
        rel = 0.0 if max_abs == 0 else float("inf")
    allowed = atol + rtol * ref_max
    ok = bool(np.all(np.isfinite(a))) and max_abs <= allowed  # NaN compares False
    return {"ok": ok, "max_abs": _finite(max_abs), "rel": _finite(rel),
            "ref_max_abs": _finite(ref_max), "allowed": _finite(allowed)}


NUMPY_BY_TRT_NAME = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
                     "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def numpy_dtype(trt, trt_dtype):
    import numpy as np
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except Exception:
        name = str(getattr(trt_dtype, "name", trt_dtype)).split(".")[-1]
        if name in NUMPY_BY_TRT_NAME:
            return np.dtype(NUMPY_BY_TRT_NAME[name])
        raise BuildError(EXIT_VERIFY_FAILED, "no numpy type for TensorRT dtype %s" % name)


class CudaPythonBuffers(object):
    """Device buffers through cuda-python's runtime bindings."""
    name = "cuda-python"

    def __init__(self, rt):
        self.rt = rt
        self.stream = self._call("cudaStreamCreate", rt.cudaStreamCreate())

    def _call(self, what, result):
        err = result[0]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BuildError(EXIT_VERIFY_FAILED, "%s failed: %s" % (what, _cuda_error_name(err)))
        return result[1] if len(result) > 1 else None

    def alloc(self, nbytes):
        return int(self._call("cudaMalloc", self.rt.cudaMalloc(nbytes)))

    def htod(self, ptr, array):
        self._call("cudaMemcpy H2D", self.rt.cudaMemcpy(
            ptr, array.ctypes.data, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def dtoh(self, array, ptr):
        self._call("cudaMemcpy D2H", self.rt.cudaMemcpy(
            array.ctypes.data, ptr, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def free(self, ptr):
        self.rt.cudaFree(ptr)

    def stream_handle(self):
        return int(self.stream)

    def synchronize(self):
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(self.stream))

    def close(self):
        self.rt.cudaStreamDestroy(self.stream)


class PycudaBuffers(object):
    """Device buffers through pycuda, in the primary context TensorRT uses."""
    name = "pycuda"

    def __init__(self, driver):
        self.driver = driver
        driver.init()
        self.context = driver.Device(0).retain_primary_context()
        self.context.push()
        self.stream = driver.Stream()
        self.allocations = {}

    def alloc(self, nbytes):
        allocation = self.driver.mem_alloc(nbytes)
        self.allocations[int(allocation)] = allocation
        return int(allocation)

    def htod(self, ptr, array):
        self.driver.memcpy_htod(self.allocations[ptr], array)

    def dtoh(self, array, ptr):
        self.driver.memcpy_dtoh(array, self.allocations[ptr])

    def free(self, ptr):
        self.allocations.pop(ptr).free()

    def stream_handle(self):
        return self.stream.handle

    def synchronize(self):
        self.stream.synchronize()

    def close(self):
        self.context.pop()


class CtypesCudartBuffers(object):
    """Device buffers through libcudart via ctypes (no Python CUDA package needed)."""
    name = "libcudart (ctypes)"
    HOST_TO_DEVICE = 1
    DEVICE_TO_HOST = 2

    def __init__(self, lib):
        self.lib = lib
        vp = ctypes.c_void_p
        for fn, args in (("cudaMalloc", [ctypes.POINTER(vp), ctypes.c_size_t]),
                         ("cudaMemcpy", [vp, vp, ctypes.c_size_t, ctypes.c_int]),
                         ("cudaFree", [vp]),
                         ("cudaStreamCreate", [ctypes.POINTER(vp)]),
                         ("cudaStreamSynchronize", [vp]),
                         ("cudaStreamDestroy", [vp])):
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        self.stream = vp()
        self._check("cudaStreamCreate", lib.cudaStreamCreate(ctypes.byref(self.stream)))

    def _check(self, what, rc):
        if rc != 0:
            text = self.lib.cudaGetErrorString(rc)
            raise BuildError(EXIT_VERIFY_FAILED, "%s failed: %s" % (what, text.decode() if text else rc))

    def alloc(self, nbytes):
        ptr = ctypes.c_void_p()
        self._check("cudaMalloc", self.lib.cudaMalloc(ctypes.byref(ptr), nbytes))
        return int(ptr.value)

    def htod(self, ptr, array):
        self._check("cudaMemcpy H2D", self.lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                                          self.HOST_TO_DEVICE))

    def dtoh(self, array, ptr):
        self._check("cudaMemcpy D2H", self.lib.cudaMemcpy(array.ctypes.data, ptr, array.nbytes,
                                                          self.DEVICE_TO_HOST))

    def free(self, ptr):
        self.lib.cudaFree(ptr)

    def stream_handle(self):
        return int(self.stream.value or 0)

    def synchronize(self):
        self._check("cudaStreamSynchronize", self.lib.cudaStreamSynchronize(self.stream))

    def close(self):
        self.lib.cudaStreamDestroy(self.stream)


def load_buffer_backend():
    """cuda-python, else pycuda, else libcudart via ctypes; BuildError(3) if none."""
    rt = _import_cuda_runtime()
    if rt is not None:
        return CudaPythonBuffers(rt)
    try:
        import pycuda.driver as driver
    except Exception:
        driver = None
    if driver is not None:
        return PycudaBuffers(driver)
    lib, _ = _load_first(CUDART_LIBRARIES, "cudart")
    if lib is not None:
        return CtypesCudartBuffers(lib)
    raise BuildError(EXIT_MISSING_LIBRARY,
                     "no CUDA buffer library for the reference check: install cuda-python "
                     "(pip install cuda-python) or pycuda, or make libcudart.so loadable")


def run_engine(engine, tensors, feeds, backend, trt, use_enqueue_v3):
    """Run one inference; returns {output name: numpy array}."""
    import numpy as np
    context = engine.create_execution_context()
    if context is None:
        raise BuildError(EXIT_VERIFY_FAILED, "could not create an execution context (device memory?)")
    pointers = {}
    outputs = collections.OrderedDict()
    try:
        for tensor in tensors:
            name = tensor["name"]
            dtype = numpy_dtype(trt, tensor["dtype"])
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            pointers[name] = backend.alloc(max(1, count * dtype.itemsize))
            if tensor["input"]:
                if name not in feeds:
                    raise BuildError(EXIT_VERIFY_FAILED, "reference inputs have no %r" % name)
                array = np.ascontiguousarray(feeds[name], dtype=dtype)
                if list(array.shape) != tensor["shape"]:
                    raise BuildError(EXIT_VERIFY_FAILED, "reference input %r has shape %s, engine wants %s"
                                     % (name, list(array.shape), tensor["shape"]))
                backend.htod(pointers[name], array)
            else:
                outputs[name] = np.empty(tensor["shape"], dtype=dtype)
        if use_enqueue_v3:
            for tensor in tensors:
                if context.set_tensor_address(tensor["name"], pointers[tensor["name"]]) is False:
                    raise BuildError(EXIT_VERIFY_FAILED, "set_tensor_address failed for %r" % tensor["name"])
            ok = context.execute_async_v3(backend.stream_handle())
            backend.synchronize()
            api = "execute_async_v3"
        else:
            bindings = [0] * engine.num_bindings
            for tensor in tensors:
                bindings[engine.get_binding_index(tensor["name"])] = pointers[tensor["name"]]
            ok = context.execute_v2(bindings)
            api = "execute_v2"
        if not ok:
            raise BuildError(EXIT_VERIFY_FAILED, "inference failed (%s returned False)" % api)
        for name, array in outputs.items():
            backend.dtoh(array, pointers[name])
    finally:
        for ptr in pointers.values():
            backend.free(ptr)
    return outputs


def load_npz(path):
    import numpy as np
    with np.load(path, allow_pickle=False) as data:
        return dict((key, data[key]) for key in data.files)


def check_engine(engine_bytes, settings, trt_module, kit_dir=".", buffer_backend=None):
    """Deserialize, check I/O names/shapes, compare with the reference.

    Returns {"io": [...], "comparison": {...} or None, "buffer_library": ...};
    raises BuildError(5) on any mismatch (details carry the numbers).
    """
    trt = trt_module
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # keep logger and runtime alive while the engine is used
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildError(EXIT_VERIFY_FAILED, "the engine does not deserialize with TensorRT %s "
                         "(built by another TensorRT or device? rerun with --force)" % trt.__version__)
    tensors = engine_io(engine, trt)
    result = {
        "io": [{"name": t["name"], "input": t["input"], "shape": t["shape"],
                "dtype": str(getattr(t["dtype"], "name", t["dtype"]))} for t in tensors],
        "comparison": None,
        "buffer_library": None,
    }
    problems = check_io(tensors, settings)
    if problems:
        raise BuildError(EXIT_VERIFY_FAILED, "engine I/O does not match %s: %s"
                         % (SETTINGS_FILE, "; ".join(problems)), details=result)
    say("check: I/O matches (%d inputs, %d outputs)"
        % (len(settings["inputs"]), len(settings["outputs"])))

    reference = settings.get("reference")
    if not reference:
        say("compare: skipped (no reference in %s)" % SETTINGS_FILE)
        return result
    feeds = load_npz(os.path.join(kit_dir, reference["inputs"]))
    expected = load_npz(os.path.join(kit_dir, reference["outputs"]))
    backend = buffer_backend if buffer_backend is not None else load_buffer_backend()
    result["buffer_library"] = backend.name
    try:
        use_v3 = tensorrt_version(trt) >= ENQUEUE_V3_FROM
        actual = run_engine(engine, tensors, feeds, backend, trt, use_v3)
    finally:
        backend.close()

    rtol, atol = tolerance_of(settings)
    comparison = collections.OrderedDict()
    failures = []
    for name in settings["outputs"]:
        if name not in expected:
            raise BuildError(EXIT_VERIFY_FAILED, "reference outputs have no %r" % name, details=result)
        numbers = compare_outputs(actual[name], expected[name], rtol, atol)
        comparison[name] = numbers
        if numbers["ok"]:
            say("compare %s: max_abs=%s rel=%s ok" % (name, numbers["max_abs"], numbers["rel"]))
        elif "error" in numbers:
            failures.append("output %r: %s" % (name, numbers["error"]))
        else:
            failures.append("output %r differs from the reference: max_abs=%s rel=%s > allowed %s "
                            "(atol %g + rtol %g * max|ref| %s)"
                            % (name, numbers["max_abs"], numbers["rel"], numbers["allowed"],
                               atol, rtol, numbers["ref_max_abs"]))
    result["comparison"] = comparison
    if failures:
        raise BuildError(EXIT_VERIFY_FAILED, "; ".join(failures), details=result)
    return result


# --------------------------------------------------------------------------
# Main

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="build_engine.py",
        description="Build and verify a TensorRT engine from an infc build kit.")
    parser.add_argument("--kit", default=None,
                        help="kit directory (default: the directory of this script)")
    parser.add_argument("--allow-version-mismatch", action="store_true",
                        help="build even if TensorRT differs from the kit's expected_tensorrt")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the engine on disk matches this kit")
    parser.add_argument("--verbose", action="store_true", help="verbose TensorRT logging")
    return parser.parse_args(argv)


def write_report(kit_dir, report):
    text = json.dumps(report, indent=2)
    write_atomic(os.path.join(kit_dir, REPORT_FILE), (text + "\n").encode("utf-8"))


def main(argv=None, trt_module=None, device_probe=None, buffer_backend=None):
    """Command line entry point; returns the exit code.

    ``trt_module``, ``device_probe`` (a callable returning (ok, reason)) and
    ``buffer_backend`` can be injected by callers (infc itself, tests).
    """
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse already printed usage
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    kit = os.path.abspath(args.kit or os.path.dirname(os.path.abspath(__file__)))
    started = time.time()
    report = collections.OrderedDict([("status", "failed"), ("exit_code", None), ("error", None)])
    timings = collections.OrderedDict()
    report["timings"] = timings
    try:
        settings = load_settings(kit)
        report["target"] = settings.get("target")
        report["expected_tensorrt"] = settings["expected_tensorrt"]

        trt = trt_module if trt_module is not None else import_tensorrt()
        version = tensorrt_version(trt)
        report["tensorrt"] = version_str(version)
        matches = check_version(version, settings, args.allow_version_mismatch)
        say("tensorrt %s (kit made for %s)%s" % (version_str(version), settings["expected_tensorrt"],
                                                  "" if matches else ": MISMATCH allowed by flag"))
        report["version_mismatch_allowed"] = not matches

        plan = plan_build(settings, version)
        report["plan"] = plan
        say("plan: " + describe_plan(plan))
        for note in plan["notes"]:
            say("note: " + note)
        kit_files(kit, plan, settings)

        available, reason = (device_probe or cuda_device_available)()
        report["cuda"] = reason
        if not available:
            raise BuildError(EXIT_NO_GPU, "no CUDA device: %s" % reason)
        say("cuda: " + reason)

        engine_path = os.path.join(kit, plan["engine"])
        fingerprint = build_fingerprint(kit, plan, settings, version)
        previous = None if args.force else previous_build(kit, fingerprint, engine_path)
        if previous is not None:
            say("build: %s is up to date for this kit (use --force to rebuild)" % plan["engine"])
            with open(engine_path, "rb") as handle:
                engine_bytes = handle.read()
            report["build"] = dict(previous, reused=True)
        else:
            built = build_engine(kit, settings, trt, plan=plan, verbose=args.verbose)
            engine_bytes = built.pop("serialized")
            built["engine"] = plan["engine"]
            built["fingerprint"] = fingerprint
            built["reused"] = False
            report["build"] = built
            timings["parse_s"] = built["parse_seconds"]
            timings["build_s"] = built["build_seconds"]

        check_started = time.time()
        try:
            checked = check_engine(engine_bytes, settings, trt, kit_dir=kit, buffer_backend=buffer_backend)
        finally:
            timings["check_s"] = round(time.time() - check_started, 3)
        report["io"] = checked["io"]
        report["comparison"] = checked["comparison"]
        report["buffer_library"] = checked["buffer_library"]
        report["status"] = "ok"
        report["exit_code"] = EXIT_OK
        timings["total_s"] = round(time.time() - started, 3)
        write_report(kit, report)
        say("done: %s verified, report in %s" % (plan["engine"], REPORT_FILE))
        return EXIT_OK
    except BuildError as exc:
        print("%s: error: %s" % (SCRIPT_NAME, exc.message), file=sys.stderr)
        if exc.details:
            for key in ("io", "comparison", "buffer_library"):
                report[key] = exc.details.get(key)
        report["exit_code"] = exc.code
        report["error"] = exc.message
        _write_failure_report(kit, report, timings, started)
        return exc.code
    except Exception as exc:
        traceback.print_exc()
        report["exit_code"] = EXIT_UNEXPECTED
        report["error"] = one_line("%s: %s" % (type(exc).__name__, exc))
        _write_failure_report(kit, report, timings, started)
        return EXIT_UNEXPECTED


def _write_failure_report(kit, report, timings, started):
    if not os.path.isdir(kit):
        return
    timings["total_s"] = round(time.time() - started, 3)
    try:
        write_report(kit, report)
    except Exception as exc:  # the failure itself was already reported
        print("%s: warning: could not write %s: %s" % (SCRIPT_NAME, REPORT_FILE, one_line(exc)),
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
