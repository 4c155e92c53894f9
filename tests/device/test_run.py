"""compiler/device/run.py, the bundle's on-device runner, run as a script from unpacked bundles.

Here it runs on ONNX Runtime for real; its TensorRT path must exit 3 naming
TensorRT (no TensorRT here), and runs for real only where TensorRT and a GPU exist.
"""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
from small_builds import FP16_MODEL, build_once  # noqa: E402

from compiler import bundle as bundle_mod  # noqa: E402
from compiler.device import build_engine  # noqa: E402

SCRIPT = TESTS.parent / "compiler" / "device" / "run.py"


def load_run_module():
    spec = importlib.util.spec_from_file_location("infc_device_run", str(SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_module = load_run_module()


def unpacked(tmp_path_factory, target, model=None):
    build = build_once(tmp_path_factory, target, **({"model": model} if model else {}))
    work = tmp_path_factory.mktemp(f"bundle-{target}")
    bundle = bundle_mod.package_build(build, work / "bundle.tar.gz").path
    return bundle_mod.unpack_bundle(bundle, work / "device").path


@pytest.fixture(scope="session")
def x86_dir(tmp_path_factory):
    return unpacked(tmp_path_factory, "x86-mkldnn")


@pytest.fixture(scope="session")
def jetson_dir(tmp_path_factory):
    return unpacked(tmp_path_factory, "jetson", FP16_MODEL)


def run_script(bundle_dir, *args, cwd=None, env=None, python=None):
    proc = subprocess.run([python or sys.executable, str(Path(bundle_dir) / "run.py"), *map(str, args)],
                          cwd=str(cwd or bundle_dir), env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def blocking_env(tmp_path, *modules):
    """PYTHONPATH stand-ins that make `import <module>` fail, as on a device without it."""
    blocked = tmp_path / "blocked"
    for module in modules:
        (blocked / module).mkdir(parents=True, exist_ok=True)
        (blocked / module / "__init__.py").write_text(f"raise ImportError('{module} blocked by the test')\n")
    return dict(os.environ, PYTHONPATH=str(blocked))


def ort_outputs(onnx_path, feeds):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --- standalone and Python 3.6 -----------------------------------------------------------------

def test_script_is_python36_syntax_and_imports_no_infc():
    tree = ast.parse(SCRIPT.read_text(), feature_version=(3, 6))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    stdlib = {"argparse", "collections", "importlib", "json", "os", "sys", "time", "traceback"}
    assert roots - stdlib == {"numpy", "onnxruntime", "PIL"}
    assert "__future__" not in SCRIPT.read_text()


def _python36():
    for candidate in (shutil.which("python3.6"), "/root/.pyenv/versions/3.6.15/bin/python"):
        if candidate and os.path.exists(candidate):
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and probe.stdout.strip() == "(3, 6)":
                return candidate
    return None


def test_script_runs_under_python_3_6(x86_dir):
    python = _python36()
    if python is None:
        pytest.skip("no Python 3.6 interpreter here (JetPack 4.6 ships 3.6)")
    has_numpy = subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0
    code, out, err = run_script(x86_dir, "--runs", "2", python=python)
    if has_numpy:
        assert code in (0, 3), err  # 3: no onnxruntime for this 3.6
    else:
        # Reaching the numpy import means 3.6 compiled the whole script.
        assert code == 3 and err == f"run: error: {run_module.NUMPY_NOT_FOUND}\n"


# --- classification on ONNX Runtime -------------------------------------------------------------

def test_reference_run_prints_top5_latency_and_passes_the_reference_check(x86_dir, tmp_path):
    code, out, err = run_script(x86_dir, cwd=tmp_path)
    assert code == 0, err
    assert "on onnxruntime" in out and "top-5 (item 0):" in out and "latency over 20 runs: p50" in out
    assert "reference mobilenet" in out and ": ok (max abs error" in out
    assert "random-init weights" in out

    code, out, _ = run_script(x86_dir, "--json", "--runs", "5", "--warmup", "1")
    report = json.loads(out)
    feeds = dict(np.load(x86_dir / "reference" / "inputs.npz"))
    (logits,) = ort_outputs(x86_dir / "onnx" / "model.onnx", feeds)[:1]
    expected = list(np.argsort(-logits[0], kind="stable")[:5])
    assert [entry["class"] for entry in report["top"][0]] == expected
    probabilities = [entry["probability"] for entry in report["top"][0]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    latency = report["latency_ms"]
    assert latency["runs"] == 5 and latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"]
    assert report["reference_check"]["ok"] and report["reference_check"]["rtol"] == 1e-4


def test_image_and_array_inputs(x86_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(90, 120, 3) * 255).astype(np.uint8)).save(image)
    code, out, err = run_script(x86_dir, image, "--runs", "2", "--top", "3")
    assert code == 0, err
    assert "input: " + str(image) in out and "top-3 (item 0):" in out and "reference" not in out

    chw = tmp_path / "chw.npy"
    np.save(chw, np.random.RandomState(1).standard_normal((3, 64, 64)).astype(np.float32))
    code, out, err = run_script(x86_dir, chw, "--runs", "1", "--json")
    assert code == 0, err
    assert len(json.loads(out)["top"][0]) == 5


@pytest.mark.parametrize("case,needle", [("wrong-shape", "takes 1x3x64x64"), ("missing", "does not exist"),
                                         ("suffix", "neither an image")])
def test_bad_inputs_exit_2_with_one_line(x86_dir, tmp_path, case, needle):
    path = {"wrong-shape": tmp_path / "bad.npy", "missing": tmp_path / "nope.npy",
            "suffix": tmp_path / "input.csv"}[case]
    if case == "wrong-shape":
        np.save(path, np.zeros((2, 5), np.float32))
    elif case == "suffix":
        path.write_text("1,2,3")
    code, _, err = run_script(x86_dir, path)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_reference_mismatch_exits_5(x86_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(x86_dir, copy)
    outputs = dict(np.load(copy / "reference" / "outputs.npz"))
    np.savez(copy / "reference" / "outputs.npz", **{k: v + 1.0 for k, v in outputs.items()})
    code, out, err = run_script(copy, "--runs", "1")
    assert code == 5
    assert "FAILED" in out and err.count("\n") == 1 and "differs from the reference" in err


def test_missing_manifest_exits_2(tmp_path):
    shutil.copy(SCRIPT, tmp_path / "run.py")
    code, _, err = run_script(tmp_path)
    assert code == 2 and "manifest.json not found" in err


def test_without_onnxruntime_exits_3_naming_it(x86_dir, tmp_path):
    code, _, err = run_script(x86_dir, env=blocking_env(tmp_path, "onnxruntime"))
    assert code == 3 and err == f"run: error: {run_module.ORT_NOT_FOUND}\n"


def test_image_without_pillow_exits_3_naming_it(x86_dir, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"not read anyway")
    code, _, err = run_script(x86_dir, image, env=blocking_env(tmp_path, "PIL"))
    assert code == 3 and "Pillow not found" in err


def test_image_preprocessing_is_imagenet_normalization():
    pixels = np.random.RandomState(2).randint(0, 256, (8, 6, 3)).astype(np.uint8)
    tensor = run_module.image_to_input(pixels, [2, 3, 8, 6], np)
    expected = ((pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
    assert tensor.shape == (2, 3, 8, 6) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[1], expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    resized = run_module.image_to_input(pixels, [1, 3, 4, 3], np)
    assert resized.shape == (1, 3, 4, 3)


# --- TensorRT path ------------------------------------------------------------------------------

def test_tensorrt_backend_without_tensorrt_exits_3_naming_it(jetson_dir):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    code, out, err = run_script(jetson_dir, "--backend", "tensorrt")
    assert code == 3 and out == ""
    assert err == f"run: error: {build_engine.TRT_NOT_FOUND}\n"


def test_a_tensorrt_kit_directory_beside_run_py_is_not_taken_for_tensorrt(jetson_dir, tmp_path):
    # cuda-fp16 bundles keep their kit in tensorrt/, next to run.py.
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    copy = tmp_path / "bundle"
    shutil.copytree(jetson_dir, copy)
    (copy / "tensorrt").mkdir()
    shutil.copy(copy / "build_kit" / "build_engine.py", copy / "tensorrt" / "build_engine.py")
    code, _, err = run_script(copy, "--backend", "tensorrt")
    assert code == 3 and err == f"run: error: {build_engine.TRT_NOT_FOUND}\n"


def test_auto_backend_on_a_jetson_bundle_falls_back_to_onnxruntime_and_says_why(jetson_dir):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: auto picks it when an engine exists")
    code, out, err = run_script(jetson_dir, "--runs", "2")
    assert code == 0, err
    assert "note: TensorRT not used: TensorRT not found" in out and "on onnxruntime" in out
    assert ": ok (max abs error" in out

    code, out, err = run_script(jetson_dir, "--runs", "2", "--fp16", "--json")
    report = json.loads(out)
    assert code == 0 and "model.fp16.onnx" in report["backend"]
    from compiler.targets import resolve_target

    assert report["reference_check"]["ok"]
    assert report["reference_check"]["rtol"] == resolve_target("jetson-orin").verify.fp16_rtol


def test_tensorrt_backend_on_a_bundle_without_kit_exits_2(x86_dir):
    code, _, err = run_script(x86_dir, "--backend", "tensorrt")
    assert code == 2 and "no TensorRT build kit" in err and "--backend onnxruntime" in err


def _gpu_available():
    if importlib.util.find_spec("tensorrt") is None:
        return False
    return build_engine.cuda_device_available()[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs TensorRT and a CUDA device (none here)")
def test_tensorrt_engine_built_by_the_kit_runs_and_matches_the_reference(jetson_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(jetson_dir, copy)
    kit = copy / "build_kit" / "build_engine.py"
    proc = subprocess.run([sys.executable, str(kit), "--allow-version-mismatch"], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr
    code, out, err = run_script(copy, "--backend", "tensorrt", "--json", "--runs", "5")
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"].startswith("tensorrt") and report["reference_check"]["ok"]


# --- TensorRTRunner against a double: which TensorRT API it drives per version --------------------

class HostBuffersDouble(object):
    """Stands in for build_engine's CUDA buffer backends with host memory, so pointers can be followed."""
    name = "host-buffers-double"

    def __init__(self):
        self.memory, self.allocations, self.closed = {}, 0, False

    def alloc(self, nbytes):
        self.allocations += 1
        pointer = 4096 * self.allocations
        self.memory[pointer] = bytearray(nbytes)
        return pointer

    def htod(self, pointer, array):
        self.memory[pointer][:array.nbytes] = array.tobytes()

    def dtoh(self, array, pointer):
        array[...] = np.frombuffer(bytes(self.memory[pointer][:array.nbytes]), dtype=array.dtype).reshape(array.shape)

    def free(self, pointer):
        del self.memory[pointer]

    def stream_handle(self):
        return 7

    def synchronize(self):
        pass

    def close(self):
        self.closed = True


class TensorRTDouble(object):
    """Stands in for the tensorrt module: records the calls run.py makes for a given version.

    Its 'engine' maps input 'data' to output 'out0' = 2 * data through the buffers double,
    only so the test can see which pointer went where; it says nothing about TensorRT's numerics.
    """

    class Logger(object):
        WARNING = "WARNING"

        def __init__(self, level):
            pass

    class TensorIOMode(object):
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    def __init__(self, version, buffers, dynamic=False, deserializes=True):
        self.__version__ = version
        self.calls = []
        double = self

        class Runtime(object):
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                double.calls.append("deserialize_cuda_engine")
                return EngineDouble(double, buffers, dynamic) if deserializes else None

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return {"FLOAT": np.float32}[dtype]


class EngineDouble(object):
    SHAPE = (1, 3, 4, 4)

    def __init__(self, trt, buffers, dynamic):
        self.trt, self.buffers, self.dynamic = trt, buffers, dynamic
        version = tuple(int(part) for part in trt.__version__.split(".")[:2])
        if version >= (8, 5):  # the tensor API arrived in 8.5; the binding API left in 10
            self.num_io_tensors = 2
        if version < (10, 0):
            self.num_bindings = 2

    def _shape(self, name):
        return (-1,) + self.SHAPE[1:] if self.dynamic and name == "data" else self.SHAPE

    # TensorRT 8.5+ tensor API
    def get_tensor_name(self, index):
        return ["data", "out0"][index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "data" else "OUTPUT"

    def get_tensor_shape(self, name):
        return self._shape(name)

    def get_tensor_dtype(self, name):
        return "FLOAT"

    # TensorRT 8.2 binding API
    def get_binding_name(self, index):
        return ["data", "out0"][index]

    def binding_is_input(self, index):
        return index == 0

    def get_binding_shape(self, index):
        return self._shape(["data", "out0"][index])

    def get_binding_dtype(self, index):
        return "FLOAT"

    def create_execution_context(self):
        return ContextDouble(self)


class ContextDouble(object):
    def __init__(self, engine):
        self.engine, self.addresses = engine, {}

    def _record(self, call):
        self.engine.trt.calls.append(call)

    def set_input_shape(self, name, shape):
        self._record("set_input_shape %s %s" % (name, list(shape)))
        return True

    def get_tensor_shape(self, name):
        return EngineDouble.SHAPE

    def set_tensor_address(self, name, pointer):
        self._record("set_tensor_address " + name)
        self.addresses[name] = pointer
        return True

    def _compute(self, source, target):
        memory = self.engine.buffers.memory
        data = np.frombuffer(bytes(memory[source]), dtype=np.float32)
        memory[target][:] = (2 * data).astype(np.float32).tobytes()
        return True

    def execute_async_v3(self, stream):
        self._record("execute_async_v3 stream %d" % stream)
        return self._compute(self.addresses["data"], self.addresses["out0"])

    def execute_v2(self, bindings):
        self._record("execute_v2")
        return self._compute(bindings[0], bindings[1])


@pytest.mark.parametrize("version,execute,sets_addresses", [
    ("8.2.1", "execute_v2", False), ("8.5.2", "execute_v2", False),
    ("10.3.0", "execute_async_v3 stream 7", True), ("11.4.1", "execute_async_v3 stream 7", True)])
def test_tensorrt_runner_drives_the_api_of_each_version(tmp_path, version, execute, sets_addresses):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine")
    buffers = HostBuffersDouble()
    trt = TensorRTDouble(version, buffers)
    runner = run_module.TensorRTRunner(str(engine), build_engine, trt, {"data": [1, 3, 4, 4]}, buffers=buffers)
    assert runner.name.startswith("tensorrt %s (host-buffers-double" % version)
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    np.testing.assert_array_equal(runner.run({"data": x})["out0"], 2 * x)
    np.testing.assert_array_equal(runner.run({"data": x + 1})["out0"], 2 * (x + 1))
    assert buffers.allocations == 2  # allocated once, reused by every run
    assert trt.calls.count(execute) == 2
    assert ("set_tensor_address data" in trt.calls) == sets_addresses
    with pytest.raises(run_module.RunError, match="takes"):
        runner.run({"data": np.zeros((1, 3, 2, 2), np.float32)})
    runner.close()
    assert buffers.memory == {} and buffers.closed


def test_tensorrt_runner_sets_dynamic_input_shapes(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine")
    buffers = HostBuffersDouble()
    trt = TensorRTDouble("10.3.0", buffers, dynamic=True)
    runner = run_module.TensorRTRunner(str(engine), build_engine, trt, {"data": [1, 3, 4, 4]}, buffers=buffers)
    assert "set_input_shape data [1, 3, 4, 4]" in trt.calls
    x = np.ones((1, 3, 4, 4), np.float32)
    np.testing.assert_array_equal(runner.run({"data": x})["out0"], 2 * x)
    runner.close()


def test_tensorrt_runner_reports_an_engine_that_does_not_deserialize(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"from another TensorRT")
    buffers = HostBuffersDouble()
    with pytest.raises(run_module.RunError) as info:
        run_module.TensorRTRunner(str(engine), build_engine, TensorRTDouble("10.3.0", buffers, deserializes=False),
                                  {"data": [1, 3, 4, 4]}, buffers=buffers)
    assert info.value.code == 6 and "--force" in info.value.message


# --- segmentation: a tiny real ONNX graph in a hand-made bundle ---------------------------------

def segmentation_bundle(root: Path) -> Path:
    """A bundle directory run.py accepts: manifest, a 3->4 channel conv as ONNX, references."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["data", "W"], ["scores"], pads=[1, 1, 1, 1])], "tiny_seg",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 16, 16])],
        initializer=[numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    (root / "onnx").mkdir(parents=True)
    (root / "reference").mkdir()
    onnx.save(model, str(root / "onnx" / "model.onnx"))
    feeds = {"data": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.savez(root / "reference" / "inputs.npz", **feeds)
    np.savez(root / "reference" / "outputs.npz", scores=ort_outputs(root / "onnx" / "model.onnx", feeds)[0])
    manifest = {
        "model": {"name": "tiny_seg", "family": "segmentation",
                  "inputs": {"data": {"shape": [1, 3, 16, 16], "dtype": "float32", "layout": "NCHW"}},
                  "outputs": {"scores": {"shape": [1, 4, 16, 16], "dtype": "float32"}}},
        "target": {"name": "x86-test", "precision": "fp32", "device": {"kind": "x86"},
                   "verify": {"rtol": 1e-4, "atol": 1e-5, "fp16_rtol": 1e-2, "fp16_atol": 1e-3}},
        "weights": {"source": "test"},
        "artifacts": [{"kind": "onnx", "path": "onnx/model.onnx"}],
        "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz", "seed": 0},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(SCRIPT, root / "run.py")
    return root


def test_segmentation_writes_the_argmax_mask_as_palette_png(tmp_path):
    from PIL import Image

    bundle = segmentation_bundle(tmp_path / "seg")
    array = np.random.RandomState(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "input.npy", array)
    code, out, err = run_script(bundle, tmp_path / "input.npy", "--out", tmp_path / "mask.png", "--runs", "2")
    assert code == 0, err
    assert f"mask: {tmp_path / 'mask.png'} (16x16, 4 classes)" in out
    with Image.open(tmp_path / "mask.png") as mask:
        assert mask.mode == "P" and mask.size == (16, 16)
        pixels = np.array(mask)
        assert mask.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    (scores,) = ort_outputs(bundle / "onnx" / "model.onnx", {"data": array})
    np.testing.assert_array_equal(pixels, np.argmax(scores[0], axis=0))


def test_segmentation_without_pillow_writes_npy(tmp_path):
    bundle = segmentation_bundle(tmp_path / "seg")
    code, out, err = run_script(bundle, "--runs", "1", cwd=tmp_path, env=blocking_env(tmp_path, "PIL"))
    assert code == 0, err
    mask = np.load(tmp_path / "reference_mask.npy")
    reference = np.load(bundle / "reference" / "outputs.npz")["scores"]
    np.testing.assert_array_equal(mask, np.argmax(reference[0], axis=0))
    assert "reference scores: ok" in out
