"""Tests for compiler/device/build_engine.py (the on-device engine builder).

Without a GPU and TensorRT, the policy (plan_build), the builder
configuration per TensorRT version (through ``TensorRTDouble``, which records
calls and builds nothing), settings handling and the exit paths of main()
are tested.  The real build/deserialize/compare test runs only where
TensorRT and a CUDA device exist.
"""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "compiler", "device", "build_engine.py")


def _load_script():
    # Load by path: the file ships standalone in build kits.
    spec = importlib.util.spec_from_file_location("infc_device_build_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


be = _load_script()

WORKSPACE = 1 << 30


def make_settings(**overrides):
    settings = {
        "schema": 1,
        "target": "jetson-orin",
        "expected_tensorrt": "10.3",
        "jetpack": "6.1",
        "precision": "fp16",
        "onnx": "model.onnx",
        "onnx_fp16": "model.fp16.onnx",
        "engine": "model.engine",
        "timing_cache": "timing.cache",
        "workspace_bytes": WORKSPACE,
        "builder_optimization_level": 3,
        "dla_core": None,
        "gpu_fallback": True,
        "inputs": {"data": [1, 3, 8, 8]},
        "outputs": {"out0": [1, 4, 8, 8]},
        "reference": None,
        "tolerance": {"rtol": 0.01, "atol": 0.001},
    }
    settings.update(overrides)
    return settings


def make_kit(tmp_path, settings, files=("model.onnx", "model.fp16.onnx"), copy_script=False):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "builder_settings.json").write_text(json.dumps(settings))
    for name in files:
        (kit / name).write_bytes(b"placeholder onnx bytes: parsed only by a real TensorRT")
    if copy_script:
        shutil.copy(SCRIPT, str(kit / "build_engine.py"))
    return kit


# ---------------------------------------------------------------------------
# plan_build: pure policy

PLAN_CASES = [
    # version, precision, onnx, network flags, builder flags, workspace api, opt level, io, execute
    ((8, 2, 1), "fp32", "model.onnx", ["EXPLICIT_BATCH"], [], "max_workspace_size", None,
     "bindings", "execute_v2"),
    ((8, 2, 1), "fp16", "model.onnx", ["EXPLICIT_BATCH"], ["FP16"], "max_workspace_size", None,
     "bindings", "execute_v2"),
    ((8, 2, 1), "int8", "model.onnx", ["EXPLICIT_BATCH"], ["INT8"], "max_workspace_size", None,
     "bindings", "execute_v2"),
    ((8, 5, 2), "fp16", "model.onnx", ["EXPLICIT_BATCH"], ["FP16"], "set_memory_pool_limit", None,
     "tensors", "execute_v2"),
    ((8, 5, 2), "int8", "model.onnx", ["EXPLICIT_BATCH"], ["INT8"], "set_memory_pool_limit", None,
     "tensors", "execute_v2"),
    ((8, 6, 1), "fp32", "model.onnx", ["EXPLICIT_BATCH"], [], "set_memory_pool_limit", 3,
     "tensors", "execute_v2"),
    ((10, 3, 0), "fp32", "model.onnx", [], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 3, 0), "fp16", "model.onnx", [], ["FP16"], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 3, 0), "int8", "model.onnx", [], ["INT8"], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 11, 0), "fp16", "model.onnx", [], ["FP16"], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 12, 0), "fp16", "model.fp16.onnx", ["STRONGLY_TYPED"], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 13, 0), "fp16", "model.fp16.onnx", ["STRONGLY_TYPED"], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 13, 0), "int8", "model.onnx", [], ["INT8"], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((10, 13, 0), "fp32", "model.onnx", [], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((11, 4, 1), "fp16", "model.fp16.onnx", ["STRONGLY_TYPED"], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((11, 4, 1), "int8", "model.onnx", ["STRONGLY_TYPED"], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
    ((11, 4, 1), "fp32", "model.onnx", [], [], "set_memory_pool_limit", 3,
     "tensors", "execute_async_v3"),
]


@pytest.mark.parametrize("version,precision,onnx,net_flags,flags,workspace_api,level,io_api,execute",
                         PLAN_CASES)
def test_plan_build_per_version(version, precision, onnx, net_flags, flags, workspace_api, level,
                                io_api, execute):
    plan = be.plan_build(make_settings(precision=precision), version)
    assert plan["onnx"] == onnx
    assert plan["network_flags"] == net_flags
    assert plan["builder_flags"] == flags
    assert plan["strongly_typed"] == ("STRONGLY_TYPED" in net_flags)
    assert plan["workspace_api"] == workspace_api
    assert plan["workspace_bytes"] == WORKSPACE
    assert plan["builder_optimization_level"] == level
    assert plan["io_api"] == io_api
    assert plan["execute_api"] == execute
    assert plan["device_type"] == "GPU" and plan["dla_core"] is None
    json.dumps(plan)  # goes into build_report.json


def test_plan_notes_ignored_optimization_level_before_8_6():
    plan = be.plan_build(make_settings(), (8, 5, 2))
    assert plan["builder_optimization_level"] is None
    assert any("builder_optimization_level" in note for note in plan["notes"])
    assert be.plan_build(make_settings(builder_optimization_level=None), (10, 3, 0))[
        "builder_optimization_level"] is None


def test_plan_without_workspace_sets_none():
    assert be.plan_build(make_settings(workspace_bytes=None), (10, 3, 0))["workspace_api"] is None


@pytest.mark.parametrize("version", [(10, 12, 0), (10, 13, 0), (11, 4, 1)])
def test_plan_fp16_needs_typed_onnx_from_10_12(version):
    with pytest.raises(be.BuildError) as info:
        be.plan_build(make_settings(onnx_fp16=None), version)
    assert info.value.code == 2
    assert "onnx_fp16" in info.value.message


def test_plan_fp16_without_typed_onnx_is_fine_before_10_12():
    plan = be.plan_build(make_settings(onnx_fp16=None), (10, 3, 0))
    assert plan["onnx"] == "model.onnx" and plan["builder_flags"] == ["FP16"]


@pytest.mark.parametrize("version", [(8, 2, 1), (8, 5, 2), (10, 3, 0), (10, 13, 0), (11, 4, 1)])
@pytest.mark.parametrize("fallback", [True, False])
def test_plan_dla(version, fallback):
    plan = be.plan_build(make_settings(dla_core=1, gpu_fallback=fallback, precision="int8"), version)
    assert plan["device_type"] == "DLA" and plan["dla_core"] == 1
    assert ("GPU_FALLBACK" in plan["builder_flags"]) == fallback


def test_plan_dla_fp32_needs_gpu_fallback():
    with pytest.raises(be.BuildError) as info:
        be.plan_build(make_settings(precision="fp32", dla_core=0, gpu_fallback=False), (8, 5, 2))
    assert info.value.code == 2
    plan = be.plan_build(make_settings(precision="fp32", dla_core=0), (8, 5, 2))
    assert plan["builder_flags"] == ["GPU_FALLBACK"] and plan["notes"]


def test_plan_rejects_unknown_precision():
    with pytest.raises(be.BuildError) as info:
        be.plan_build(make_settings(precision="bf16"), (10, 3, 0))
    assert info.value.code == 2


# ---------------------------------------------------------------------------
# TensorRTDouble: configuration only

class _Member(object):
    def __init__(self, name, value):
        self.name = name
        self.value = value

    def __int__(self):
        return self.value

    def __repr__(self):
        return self.name


class _Enum(object):
    def __init__(self, **members):
        for name, value in members.items():
            setattr(self, name, _Member(name, value))


class _Tensor(object):
    def __init__(self, name, shape):
        self.name = name
        self.shape = shape


class _Network(object):
    def __init__(self, double):
        self.inputs = [_Tensor(n, s) for n, s in double.network_inputs.items()]
        self.num_outputs = 1

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


class _Parser(object):
    def __init__(self, double):
        self.double = double

    def parse_from_file(self, path):
        self.double.calls.append(("parse_from_file", os.path.basename(path)))
        return not self.double.parse_errors

    @property
    def num_errors(self):
        return len(self.double.parse_errors)

    def get_error(self, index):
        return self.double.parse_errors[index]


class _TimingCache(object):
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return b"TensorRTDouble timing cache (not a real cache)"


class _Profile(object):
    def __init__(self, double):
        self.double = double

    def set_shape(self, name, low, opt, high):
        self.double.calls.append(("profile.set_shape", name, low, opt, high))


class _Config(object):
    def __init__(self, double):
        object.__setattr__(self, "_double", double)
        props = {"default_device_type": None, "DLA_core": -1}
        if double.version < (10, 0):
            props["max_workspace_size"] = 0
        if double.version >= (8, 6):
            props["builder_optimization_level"] = 3
        object.__setattr__(self, "_props", props)
        if double.version >= (8, 4):
            object.__setattr__(self, "set_memory_pool_limit", self._set_memory_pool_limit)

    def __getattr__(self, name):
        props = object.__getattribute__(self, "_props")
        if name in props:
            return props[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name not in self._props:  # like a pybind11 object: no new attributes
            raise AttributeError("TensorRT %s IBuilderConfig has no %s" % (self._double.__version__, name))
        self._props[name] = value
        self._double.calls.append(("config." + name, value))

    def _set_memory_pool_limit(self, pool, size):
        self._double.calls.append(("set_memory_pool_limit", pool.name, size))

    def set_flag(self, flag):
        self._double.calls.append(("set_flag", flag.name))

    def create_timing_cache(self, data):
        self._double.calls.append(("create_timing_cache", bytes(data)))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self._double.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
        return not (cache.data and self._double.reject_timing_cache)

    def get_timing_cache(self):
        self._double.calls.append(("get_timing_cache",))
        return _TimingCache(b"")

    def add_optimization_profile(self, profile):
        self._double.calls.append(("add_optimization_profile",))


class _Builder(object):
    num_DLA_cores = 2

    def __init__(self, double):
        self.double = double

    def create_network(self, flags):
        self.double.calls.append(("create_network", flags))
        return _Network(self.double)

    def create_builder_config(self):
        return _Config(self.double)

    def create_optimization_profile(self):
        return _Profile(self.double)

    def build_serialized_network(self, network, config):
        self.double.calls.append(("build_serialized_network",))
        return self.double.build_result


class TensorRTDouble(object):
    """Test double for the ``tensorrt`` module: records configuration calls; it builds nothing.

    It exposes the API surface of one TensorRT version (which BuilderFlag and
    NetworkDefinitionCreationFlag members exist, max_workspace_size vs
    set_memory_pool_limit, builder_optimization_level) so tests can check how
    build_engine configures the builder per version.  build_serialized_network
    returns ``build_result``: None by default (a failed build); a test may set
    marker bytes that are plainly not an engine to follow the write path.
    """

    def __init__(self, version, build_result=None):
        self.__version__ = version
        self.version = tuple(int(p) for p in version.split(".")[:2])
        self.calls = []
        self.build_result = build_result
        self.parse_errors = []
        self.reject_timing_cache = False
        self.network_inputs = {"data": [1, 3, 8, 8]}
        flags = {"GPU_FALLBACK": 3, "REFIT": 4}
        if self.version < (11, 0):
            flags.update(FP16=0, INT8=1)
        self.BuilderFlag = _Enum(**flags)
        if self.version < (10, 0):
            self.NetworkDefinitionCreationFlag = _Enum(EXPLICIT_BATCH=0, EXPLICIT_PRECISION=1)
        elif self.version < (11, 0):
            self.NetworkDefinitionCreationFlag = _Enum(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        else:
            self.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=0)
        self.MemoryPoolType = _Enum(WORKSPACE=0)
        self.DeviceType = _Enum(GPU=0, DLA=1)
        double = self

        class Logger(object):
            WARNING, INFO, VERBOSE = 2, 3, 4

            def __init__(self, severity):
                double.calls.append(("Logger", severity))

        self.Logger = Logger

    def Builder(self, logger):
        self.calls.append(("Builder",))
        return _Builder(self)

    def OnnxParser(self, network, logger):
        return _Parser(self)

    def names(self):
        return [call[0] for call in self.calls]

    def find(self, name):
        return [call for call in self.calls if call[0] == name]


def configure_with_double(tmp_path, version, **overrides):
    settings = make_settings(**overrides)
    kit = make_kit(tmp_path, settings)
    double = TensorRTDouble(version)
    with pytest.raises(be.BuildError) as info:  # the double builds nothing
        be.build_engine(str(kit), settings, trt_module=double)
    assert info.value.code == 6 and "build_serialized_network returned None" in info.value.message
    return double, kit


def test_double_8_2_fp16_uses_explicit_batch_and_max_workspace_size(tmp_path):
    double, kit = configure_with_double(tmp_path, "8.2.1.8")
    assert double.find("create_network") == [("create_network", 1 << 0)]
    assert double.find("parse_from_file") == [("parse_from_file", "model.onnx")]
    assert double.find("set_flag") == [("set_flag", "FP16")]
    assert double.find("config.max_workspace_size") == [("config.max_workspace_size", WORKSPACE)]
    assert not double.find("set_memory_pool_limit")
    assert not double.find("config.builder_optimization_level")  # no such API before 8.6
    # a failed build writes neither engine nor timing cache
    assert not os.path.exists(str(kit / "model.engine"))
    assert not os.path.exists(str(kit / "timing.cache"))
    assert not double.find("get_timing_cache")


def test_double_8_5_fp16_uses_memory_pool_limit(tmp_path):
    double, _ = configure_with_double(tmp_path, "8.5.2.2")
    assert double.find("create_network") == [("create_network", 1)]
    assert double.find("set_flag") == [("set_flag", "FP16")]
    assert double.find("set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", WORKSPACE)]
    assert not double.find("config.max_workspace_size")


def test_double_10_3_fp16_weakly_typed_with_optimization_level(tmp_path):
    double, _ = configure_with_double(tmp_path, "10.3.0.30")
    assert double.find("create_network") == [("create_network", 0)]
    assert double.find("parse_from_file") == [("parse_from_file", "model.onnx")]
    assert double.find("set_flag") == [("set_flag", "FP16")]
    assert double.find("set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", WORKSPACE)]
    assert double.find("config.builder_optimization_level") == [("config.builder_optimization_level", 3)]


@pytest.mark.parametrize("version,bit", [("10.13.0.35", 1), ("11.4.1", 0)])
def test_double_fp16_strongly_typed_from_10_12(tmp_path, version, bit):
    double, _ = configure_with_double(tmp_path, version)
    assert double.find("create_network") == [("create_network", 1 << bit)]
    assert double.find("parse_from_file") == [("parse_from_file", "model.fp16.onnx")]
    assert not double.find("set_flag")


@pytest.mark.parametrize("version,flags,network", [
    ("8.2.1.8", [("set_flag", "INT8")], 1),
    ("10.3.0.30", [("set_flag", "INT8")], 0),
    ("10.13.0.35", [("set_flag", "INT8")], 0),
    ("11.4.1", [], 1),
])
def test_double_int8_qdq(tmp_path, version, flags, network):
    double, _ = configure_with_double(tmp_path, version, precision="int8")
    assert double.find("set_flag") == flags
    assert double.find("create_network") == [("create_network", network)]
    assert double.find("parse_from_file") == [("parse_from_file", "model.onnx")]


def test_double_refuses_a_flag_the_version_lacks(tmp_path):
    # A 10.3 plan (FP16 flag) applied to TensorRT 11, where the flag is gone.
    settings = make_settings()
    kit = make_kit(tmp_path, settings)
    double = TensorRTDouble("11.4.1")
    with pytest.raises(be.BuildError) as info:
        be.build_engine(str(kit), settings, double, plan=be.plan_build(settings, (10, 3, 0)))
    assert info.value.code == 6 and "BuilderFlag.FP16" in info.value.message
    assert "build_serialized_network" not in double.names()


def test_double_dla_configuration(tmp_path):
    double, _ = configure_with_double(tmp_path, "10.3.0.30", dla_core=1)
    assert double.find("config.default_device_type")[0][1].name == "DLA"
    assert double.find("config.DLA_core") == [("config.DLA_core", 1)]
    assert ("set_flag", "GPU_FALLBACK") in double.find("set_flag")


def test_double_dla_core_out_of_range(tmp_path):
    settings = make_settings(dla_core=2)
    kit = make_kit(tmp_path, settings)
    double = TensorRTDouble("10.3.0.30")
    with pytest.raises(be.BuildError) as info:
        be.build_engine(str(kit), settings, double)
    assert info.value.code == 6 and "DLA core 2" in info.value.message
    assert "build_serialized_network" not in double.names()


def test_double_timing_cache_loaded_and_saved_engine_written_atomically(tmp_path):
    settings = make_settings()
    kit = make_kit(tmp_path, settings)
    (kit / "timing.cache").write_bytes(b"previous cache")
    marker = b"TensorRTDouble output: not an engine"
    double = TensorRTDouble("10.3.0.30", build_result=marker)
    info = be.build_engine(str(kit), settings, double)
    assert double.find("create_timing_cache") == [("create_timing_cache", b"previous cache")]
    assert double.find("set_timing_cache") == [("set_timing_cache", b"previous cache", False)]
    assert info["timing_cache"] == {"path": "timing.cache", "loaded": True, "saved": True}
    assert (kit / "timing.cache").read_bytes() == _TimingCache(b"").serialize()
    assert (kit / "model.engine").read_bytes() == marker
    assert info["serialized"] == marker and info["engine_size_bytes"] == len(marker)
    assert sorted(os.listdir(str(kit))) == sorted(
        ["builder_settings.json", "model.onnx", "model.fp16.onnx", "model.engine", "timing.cache"])
    # the cache was set before the build, saved after it
    names = double.names()
    assert names.index("set_timing_cache") < names.index("build_serialized_network") < names.index(
        "get_timing_cache")


def test_double_rejected_timing_cache_starts_fresh(tmp_path):
    settings = make_settings()
    kit = make_kit(tmp_path, settings)
    (kit / "timing.cache").write_bytes(b"cache from another device")
    double = TensorRTDouble("10.3.0.30", build_result=b"not an engine")
    double.reject_timing_cache = True
    info = be.build_engine(str(kit), settings, double)
    assert [c[1] for c in double.find("create_timing_cache")] == [b"cache from another device", b""]
    assert info["timing_cache"]["loaded"] is False


def test_double_no_timing_cache_file_creates_empty(tmp_path):
    double, _ = configure_with_double(tmp_path, "8.2.1.8")
    assert double.find("create_timing_cache") == [("create_timing_cache", b"")]


def test_double_parse_errors_reported_in_one_line(tmp_path):
    settings = make_settings()
    kit = make_kit(tmp_path, settings)
    double = TensorRTDouble("10.3.0.30")
    double.parse_errors = ["In node 3 (Resize): UNSUPPORTED_NODE\nmode 'cubic'", "second error"]
    with pytest.raises(be.BuildError) as info:
        be.build_engine(str(kit), settings, double)
    assert info.value.code == 6
    assert "\n" not in info.value.message
    assert "UNSUPPORTED_NODE mode 'cubic' | second error" in info.value.message
    assert "build_serialized_network" not in double.names()


def test_double_dynamic_input_gets_fixed_profile(tmp_path):
    settings = make_settings()
    kit = make_kit(tmp_path, settings)
    double = TensorRTDouble("10.3.0.30")
    double.network_inputs = {"data": [-1, 3, 8, 8]}
    with pytest.raises(be.BuildError):
        be.build_engine(str(kit), settings, double)
    assert double.find("profile.set_shape") == [
        ("profile.set_shape", "data", (1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))]
    assert double.find("add_optimization_profile")


# ---------------------------------------------------------------------------
# Checks that need no TensorRT

def test_check_io_reports_every_problem():
    tensors = [
        {"name": "data", "input": True, "shape": [1, 3, 8, 8]},
        {"name": "out0", "input": False, "shape": [1, 4, 4, 4]},
        {"name": "extra", "input": False, "shape": [1]},
    ]
    settings = make_settings(outputs={"out0": [1, 4, 8, 8], "out1": [1, 2]})
    problems = be.check_io(tensors, settings)
    assert len(problems) == 3
    assert any("out0" in p and "[1, 4, 4, 4]" in p for p in problems)
    assert any("missing output 'out1'" in p for p in problems)
    assert any("unexpected output 'extra'" in p for p in problems)
    assert be.check_io(tensors[:1] + [{"name": "out0", "input": False, "shape": [1, 4, 8, 8]}],
                       make_settings()) == []


def test_compare_outputs_threshold_and_numbers():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    rtol, atol = 0.01, 0.001
    allowed = atol + rtol * 4.0
    close = ref + np.float32(allowed * 0.9)
    far = ref.copy()
    far[1, 0] += np.float32(allowed * 1.5)
    ok = be.compare_outputs(close, ref, rtol, atol)
    assert ok["ok"] and ok["max_abs"] == pytest.approx(allowed * 0.9, rel=1e-4)
    assert ok["rel"] == pytest.approx(allowed * 0.9 / 4.0, rel=1e-4)
    bad = be.compare_outputs(far, ref, rtol, atol)
    assert not bad["ok"] and bad["allowed"] == pytest.approx(allowed)
    assert bad["ref_max_abs"] == pytest.approx(4.0)


def test_compare_outputs_shape_and_nan():
    ref = np.zeros((2, 2), np.float32)
    assert not be.compare_outputs(np.zeros((4,), np.float32), ref, 0.1, 0.1)["ok"]
    nan = np.zeros((2, 2), np.float32)
    nan[0, 0] = np.nan
    result = be.compare_outputs(nan, ref, 0.1, 0.1)
    assert not result["ok"]
    json.dumps(result, allow_nan=False)  # report stays strict JSON
    assert be.compare_outputs(ref, ref, 0.0, 0.0)["ok"]


class TensorApiEngineStub(object):
    """Answers I/O queries like a TensorRT 8.5+/10/11 engine; it runs nothing."""
    num_io_tensors = 2

    def get_tensor_name(self, index):
        return ["data", "out0"][index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "data" else "OUTPUT"

    def get_tensor_shape(self, name):
        return (1, 3, 8, 8) if name == "data" else (1, 4, 8, 8)

    def get_tensor_dtype(self, name):
        return "FLOAT"


class BindingApiEngineStub(object):
    """Answers I/O queries like a TensorRT 8.2 engine (binding API only); it runs nothing."""
    num_bindings = 2

    def get_binding_name(self, index):
        return ["data", "out0"][index]

    def binding_is_input(self, index):
        return index == 0

    def get_binding_shape(self, index):
        return [(1, 3, 8, 8), (1, 4, 8, 8)][index]

    def get_binding_dtype(self, index):
        return "FLOAT"


@pytest.mark.parametrize("engine", [TensorApiEngineStub(), BindingApiEngineStub()])
def test_engine_io_uses_the_api_the_version_has(engine):
    class Trt(object):
        class TensorIOMode(object):
            INPUT = "INPUT"
    tensors = be.engine_io(engine, Trt)
    assert [(t["name"], t["input"], t["shape"]) for t in tensors] == [
        ("data", True, [1, 3, 8, 8]), ("out0", False, [1, 4, 8, 8])]
    assert be.check_io(tensors, make_settings()) == []


def test_cuda_device_available_first_present_probe_decides():
    order = []

    def absent():
        order.append("absent")
        return None

    def broken():
        order.append("broken")
        raise RuntimeError("library half installed")

    def no_device():
        order.append("no_device")
        return (False, "cuInit returned CUresult 100")

    def never():
        order.append("never")
        return (True, "should not be asked")

    assert be.cuda_device_available([absent, broken, no_device, never]) == (
        False, "cuInit returned CUresult 100")
    assert order == ["absent", "broken", "no_device"]
    ok, reason = be.cuda_device_available([absent])
    assert ok is False and "no CUDA library found" in reason


def test_libcuda_probe_reads_device_count():
    class FakeLibcuda(object):
        def __init__(self, init_rc, count):
            self.init_rc, self.count = init_rc, count

        def cuInit(self, flags):
            return self.init_rc

        def cuDeviceGetCount(self, ref):
            ref._obj.value = self.count
            return 0

    assert be.probe_libcuda(FakeLibcuda(0, 1)) == (True, "1 CUDA device(s) (libcuda)")
    assert be.probe_libcuda(FakeLibcuda(100, 0))[0] is False
    assert be.probe_libcuda(FakeLibcuda(0, 0))[0] is False


def test_parse_version():
    assert be.parse_version("8.2.1.8") == (8, 2, 1)
    assert be.parse_version("10.3") == (10, 3, 0)
    assert be.tensorrt_version(TensorRTDouble("11.4.1")) == (11, 4, 1)
    with pytest.raises(ValueError):
        be.parse_version("unknown")


def test_check_version():
    settings = make_settings(expected_tensorrt="10.3")
    assert be.check_version((10, 3, 0), settings) is True
    assert be.check_version((10, 13, 0), settings, allow_mismatch=True) is False
    with pytest.raises(be.BuildError) as info:
        be.check_version((10, 13, 0), settings)
    assert info.value.code == 2
    assert "10.13.0" in info.value.message and "10.3" in info.value.message
    assert "--allow-version-mismatch" in info.value.message


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.engine"
    target.write_bytes(b"old")
    be.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(str(tmp_path)) == ["model.engine"]


def test_previous_build_reused_only_for_same_onnx_plan_and_tensorrt(tmp_path):
    settings = make_settings()
    kit = make_kit(tmp_path, settings)
    plan = be.plan_build(settings, (10, 3, 0))
    fingerprint = be.build_fingerprint(str(kit), plan, settings, (10, 3, 0))
    engine = kit / "model.engine"
    engine.write_bytes(b"12345")
    report = {"status": "failed", "build": {"fingerprint": fingerprint, "engine_size_bytes": 5}}
    (kit / "build_report.json").write_text(json.dumps(report))
    assert be.previous_build(str(kit), fingerprint, str(engine))["engine_size_bytes"] == 5
    assert be.build_fingerprint(str(kit), plan, settings, (10, 3, 1)) != fingerprint
    fp32_plan = be.plan_build(make_settings(precision="fp32"), (10, 3, 0))
    assert be.build_fingerprint(str(kit), fp32_plan, settings, (10, 3, 0)) != fingerprint
    (kit / "model.onnx").write_bytes(b"another graph")
    assert be.build_fingerprint(str(kit), plan, settings, (10, 3, 0)) != fingerprint
    engine.write_bytes(b"123")  # engine on disk is not the one the report describes
    assert be.previous_build(str(kit), fingerprint, str(engine)) is None


def test_settings_unknown_keys_ignored_and_required_keys_named(tmp_path):
    kit = make_kit(tmp_path, dict(make_settings(), future_key={"anything": 1}))
    assert be.load_settings(str(kit))["future_key"] == {"anything": 1}
    bad = make_settings()
    del bad["engine"], bad["inputs"]
    (kit / "builder_settings.json").write_text(json.dumps(bad))
    with pytest.raises(be.BuildError) as info:
        be.load_settings(str(kit))
    assert info.value.code == 2 and "engine, inputs" in info.value.message


@pytest.mark.parametrize("overrides,needle", [
    ({"schema": 2}, "schema 2 is newer"),
    ({"precision": "fp8"}, "precision"),
    ({"inputs": {"data": [1, "3"]}}, "inputs['data']"),
    ({"dla_core": -1}, "dla_core"),
    ({"builder_optimization_level": 9}, "builder_optimization_level"),
    ({"reference": {"inputs": "a.npz"}}, "reference"),
])
def test_settings_bad_values(tmp_path, overrides, needle):
    kit = make_kit(tmp_path, make_settings(**overrides))
    with pytest.raises(be.BuildError) as info:
        be.load_settings(str(kit))
    assert info.value.code == 2 and needle in info.value.message


def test_script_imports_only_stdlib_numpy_tensorrt_cuda():
    tree = ast.parse(open(SCRIPT).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    allowed_stdlib = {"argparse", "collections", "ctypes", "hashlib", "json", "os", "re", "sys",
                      "time", "traceback"}
    assert roots - allowed_stdlib == {"numpy", "tensorrt", "cuda", "pycuda"}


# ---------------------------------------------------------------------------
# main(): exit paths

def run_main(capsys, argv, **kwargs):
    code = be.main(argv, **kwargs)
    out, err = capsys.readouterr()
    return code, out, err


def test_main_bad_json_exits_2(tmp_path, capsys):
    kit = make_kit(tmp_path, make_settings())
    (kit / "builder_settings.json").write_text('{"schema": 1,')
    code, _, err = run_main(capsys, ["--kit", str(kit)])
    assert code == 2
    assert err.count("\n") == 1 and "not valid JSON" in err


def test_main_missing_kit_exits_2(tmp_path, capsys):
    code, _, err = run_main(capsys, ["--kit", str(tmp_path / "nowhere")])
    assert code == 2 and "builder_settings.json not found" in err


def test_main_version_mismatch_exits_2_before_probing(tmp_path, capsys):
    kit = make_kit(tmp_path, make_settings(expected_tensorrt="10.3"))
    probed = []
    double = TensorRTDouble("8.5.2.2")
    code, _, err = run_main(capsys, ["--kit", str(kit)], trt_module=double,
                            device_probe=lambda: probed.append(1) or (True, "x"))
    assert code == 2
    assert err.count("\n") == 1
    assert "8.5.2" in err and "10.3" in err and "--allow-version-mismatch" in err
    assert probed == [] and "Builder" not in double.names()
    report = json.loads((kit / "build_report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == 2


def test_main_no_device_exits_4_before_any_builder_call(tmp_path, capsys):
    kit = make_kit(tmp_path, make_settings(expected_tensorrt="10.3"))
    double = TensorRTDouble("8.5.2.2")
    code, out, err = run_main(capsys, ["--kit", str(kit), "--allow-version-mismatch"],
                              trt_module=double, device_probe=lambda: (False, "cuInit returned 100"))
    assert code == 4
    assert err.strip() == "build_engine: error: no CUDA device: cuInit returned 100"
    assert "MISMATCH allowed" in out
    assert "Builder" not in double.names() and "Logger" not in double.names()


def test_main_kit_missing_typed_onnx_exits_2(tmp_path, capsys):
    kit = make_kit(tmp_path, make_settings(expected_tensorrt="10.13"), files=("model.onnx",))
    code, _, err = run_main(capsys, ["--kit", str(kit)], trt_module=TensorRTDouble("10.13.0.35"),
                            device_probe=lambda: (True, "test"))
    assert code == 2 and "model.fp16.onnx" in err


def test_main_build_failure_exits_6_with_report(tmp_path, capsys):
    kit = make_kit(tmp_path, make_settings())
    double = TensorRTDouble("10.3.0.30")  # builds nothing: build_serialized_network -> None
    code, _, err = run_main(capsys, ["--kit", str(kit)], trt_module=double,
                            device_probe=lambda: (True, "test probe"))
    assert code == 6 and err.count("\n") == 1 and "TensorRT build failed" in err
    report = json.loads((kit / "build_report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == 6
    assert report["plan"]["builder_flags"] == ["FP16"] and "build" not in report


def _run_script(python, kit):
    return subprocess.run([python, str(kit / "build_engine.py")], cwd=str(kit.parent),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_script_without_tensorrt_exits_3(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    kit = make_kit(tmp_path, make_settings(), copy_script=True)  # default --kit: script's dir
    proc = _run_script(sys.executable, kit)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == "build_engine: error: %s\n" % be.TRT_NOT_FOUND


def _python36():
    for candidate in (shutil.which("python3.6"), "/root/.pyenv/versions/3.6.15/bin/python"):
        if not candidate or not os.path.exists(candidate):
            continue
        try:  # pyenv shims exist even when the version is not selected
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   universal_newlines=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 6)":
            return candidate
    return None


def test_script_runs_under_python_3_6(tmp_path):
    python = _python36()
    if python is None:
        pytest.skip("no Python 3.6 interpreter here (JetPack 4.6 ships 3.6)")
    kit = make_kit(tmp_path, make_settings(), copy_script=True)
    proc = _run_script(python, kit)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().endswith(be.TRT_NOT_FOUND)
    (kit / "builder_settings.json").write_text("[]")
    assert _run_script(python, kit).returncode == 2


# ---------------------------------------------------------------------------
# Real TensorRT: build, deserialize, compare with onnxruntime

def tiny_models():
    """Conv(3->4, 3x3, pad 1) + Relu, fp32 (opset 13, IR 7), and its fp16 twin with fp32 I/O."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.RandomState(0)
    weight = (rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(4) * 0.1).astype(np.float32)
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out0", TensorProto.FLOAT, [1, 4, 8, 8])

    def model(nodes, inits, name):
        graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="infc-test")
        m.ir_version = 7
        onnx.checker.check_model(m)
        return m

    fp32 = model([helper.make_node("Conv", ["data", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["conv"], ["out0"])],
                 [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")], "tiny")
    fp16 = model([helper.make_node("Cast", ["data"], ["data16"], to=TensorProto.FLOAT16),
                  helper.make_node("Conv", ["data16", "W16", "B16"], ["conv16"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["conv16"], ["relu16"]),
                  helper.make_node("Cast", ["relu16"], ["out0"], to=TensorProto.FLOAT)],
                 [numpy_helper.from_array(weight.astype(np.float16), "W16"),
                  numpy_helper.from_array(bias.astype(np.float16), "B16")], "tiny_fp16")
    return fp32, fp16


def onnxruntime_outputs(model, feed):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out0"], feed)[0]


def test_tiny_models_agree_under_onnxruntime():
    fp32, fp16 = tiny_models()
    feed = {"data": np.random.RandomState(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref = onnxruntime_outputs(fp32, feed)
    half = onnxruntime_outputs(fp16, feed)
    assert ref.shape == (1, 4, 8, 8) and ref.max() > 0 and ref.min() == 0  # Relu did something
    assert be.compare_outputs(half, ref, 1e-2, 1e-2)["ok"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_tensorrt_build_and_compare(tmp_path, capsys, precision):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed here")
    available, reason = be.cuda_device_available()
    if not available:
        pytest.skip("no CUDA device: %s" % reason)
    trt = be.import_tensorrt()
    major, minor, _ = be.tensorrt_version(trt)
    fp32, fp16 = tiny_models()
    feed = {"data": np.random.RandomState(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref = onnxruntime_outputs(fp32, feed)
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "model.onnx").write_bytes(fp32.SerializeToString())
    (kit / "model.fp16.onnx").write_bytes(fp16.SerializeToString())
    np.savez(str(kit / "reference_inputs.npz"), **feed)
    np.savez(str(kit / "reference_outputs.npz"), out0=ref)
    settings = make_settings(
        expected_tensorrt="%d.%d" % (major, minor), precision=precision, workspace_bytes=1 << 28,
        reference={"inputs": "reference_inputs.npz", "outputs": "reference_outputs.npz"},
        tolerance={"rtol": 1e-2, "atol": 1e-2 if precision == "fp16" else 1e-4})
    (kit / "builder_settings.json").write_text(json.dumps(settings))
    code, out, err = run_main(capsys, ["--kit", str(kit)])
    assert code == 0, err
    report = json.loads((kit / "build_report.json").read_text())
    assert report["status"] == "ok" and report["comparison"]["out0"]["ok"]
    engine_bytes = (kit / "model.engine").read_bytes()
    assert report["build"]["engine_size_bytes"] == len(engine_bytes)
    assert (kit / "timing.cache").stat().st_size > 0
    # deserializes again on its own, and a rerun reuses it
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    assert engine is not None and engine.num_io_tensors == 2
    code, out, _ = run_main(capsys, ["--kit", str(kit)])
    assert code == 0 and "up to date" in out
