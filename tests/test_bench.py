"""`infc bench`: artifact discovery, the imperative baseline, percentiles, the CLI and its errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from compiler.bench import BASELINE, compare_rows, discover_artifacts, latency_stats, precision_of
from compiler.bench_worker import match_parameter_names
from compiler.errors import UserError, VerificationFailed
from compiler.manifest import load_manifest, sha256_path, write_json_atomic

from .conftest import run_cli


def linked_copy(build, destination):
    """A copy sharing the big files: replace a file (unlink first) rather than edit it in place."""
    shutil.copytree(build, destination, copy_function=os.link)
    return destination


def replace_listed_file(build, relative, data: bytes):
    path = build / relative
    path.unlink()
    path.write_bytes(data)
    manifest = load_manifest(build)
    for artifact in manifest["artifacts"]:
        if artifact["path"] == relative:
            artifact.update(bytes=len(data), sha256=sha256_path(path))
    write_json_atomic(build / "manifest.json", manifest)


def _record(path, kind, fmt, sha=None):
    return {"name": path, "path": path, "kind": kind, "format": fmt, "bytes": 1, "sha256": sha or path}


# --- discovery ---------------------------------------------------------------------------------

def test_discovery_is_generic_over_kinds_and_skips_duplicate_onnx_files():
    manifest = {"target": {"precision": "fp16"}, "engine": None, "artifacts": [
        _record("mxnet/portable-symbol.json", "mxnet-portable", "mxnet-symbol-json"),
        _record("mxnet/portable-0000.params", "mxnet-portable", "mxnet-params"),
        _record("mxnet/int8-symbol.json", "mxnet-int8", "mxnet-symbol-json"),
        _record("mxnet/int8-0000.params", "mxnet-int8", "mxnet-params"),
        _record("onnx/model.onnx", "onnx", "onnx", sha="a"),
        _record("onnx/model.int8.onnx", "onnx-int8", "onnx", sha="b"),
        _record("build_kit/model.onnx", "tensorrt-build-kit", "onnx", sha="a"),
        _record("tensorrt/model.engine", "tensorrt-engine", "engine"),
        _record("reference/inputs.npz", "reference", "npz"),
    ]}
    artifacts, skipped = discover_artifacts(manifest)
    assert [(a.name, a.runtime, a.precision) for a in artifacts] == [
        (BASELINE, "mxnet-imperative", "fp32"), ("mxnet-portable", "mxnet", "fp32"), ("mxnet-int8", "mxnet", "int8"),
        ("onnx", "onnxruntime", "fp32"), ("onnx-int8", "onnxruntime", "int8"), ("tensorrt-engine", "tensorrt", "fp16")]
    assert artifacts[0].files == {"params": "mxnet/portable-0000.params"}
    assert artifacts[2].files == {"symbol": "mxnet/int8-symbol.json", "params": "mxnet/int8-0000.params"}
    assert skipped == [{"path": "build_kit/model.onnx", "reason": "same file as onnx/model.onnx"}]
    assert all(not a.reason for a in artifacts)


def test_deferred_engine_and_missing_portable_weights_are_rows_with_reasons():
    manifest = {"target": {"precision": "fp16"}, "artifacts": [_record("onnx/model.onnx", "onnx", "onnx")],
                "engine": {"status": "deferred to the device", "kit": "build_kit/"}}
    artifacts, _ = discover_artifacts(manifest)
    by_name = {a.name: a for a in artifacts}
    assert "no mxnet-portable params" in by_name[BASELINE].reason
    assert by_name["tensorrt-engine"].reason == ("engine deferred to the device: "
                                                 "run build_kit/build_engine.py on the device")
    assert not by_name["onnx"].reason


def test_precision_comes_from_the_kind():
    assert [precision_of(k) for k in ("onnx", "onnx-fp16", "mxnet-bf16", "onnx-int8", "mxnet-mkldnn")] == \
        ["fp32", "fp16", "bf16", "int8", "fp32"]


# --- the baseline's weights ----------------------------------------------------------------------

def test_parameter_names_survive_a_different_top_level_counter():
    net = ["resnetv10_conv0_weight", "resnetv10_dense0_bias", "resnetv10_unused_weight"]
    saved = ["resnetv13_conv0_weight", "resnetv13_dense0_bias"]
    assert match_parameter_names(net, "resnetv10_", saved) == {
        "resnetv10_conv0_weight": "resnetv13_conv0_weight", "resnetv10_dense0_bias": "resnetv13_dense0_bias"}
    assert match_parameter_names(net, "resnetv10_", net[:2]) == {n: n for n in net[:2]}
    with pytest.raises(UserError, match="match nothing"):
        match_parameter_names(net, "resnetv10_", saved + ["resnetv13_extra_weight"])


# --- numbers --------------------------------------------------------------------------------------

def test_latency_percentiles_are_in_milliseconds():
    stats = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["n"] == 100 and stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(100.0)
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01) and stats["mean"] == pytest.approx(50.5)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is read from /proc")
def test_a_workers_peak_memory_is_its_own_not_its_parents():
    import subprocess
    import sys

    # Linux hands ru_maxrss down through fork and exec: measured that way, a
    # worker started by this (now 600 MB larger) process would report >= 600 MB.
    ballast = np.ones(150_000_000, dtype=np.float32)
    child = subprocess.run([sys.executable, "-c", "from compiler.bench_worker import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert ballast.sum() > 0
    assert 5 < float(child.stdout) < 300

# --- the CLI on a real build ------------------------------------------------------------------------

def test_bench_measures_every_artifact_side_by_side(capsys, small_builds, tmp_path):
    build = small_builds["x86-mkldnn"]
    out = tmp_path / "bench.json"
    assert run_cli(["bench", build, "--iterations", "4", "--warmup", "1", "--output", out, "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert json.loads(out.read_text()) == data
    rows = {row["name"]: row for row in data["artifacts"]}
    assert list(rows) == [BASELINE, "mxnet-portable", "mxnet-mkldnn", "onnx"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["iterations"] == 4 and row["latency_ms"]["n"] == 4
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert set(row["phases"]) >= {"load_s", "first_inference_s", "warmup_s", "steady_s"}
        assert row["memory"]["peak_rss_mb"] >= row["memory"]["rss_before_load_mb"] > 0
        assert row["throughput_per_s"] > 0
        assert row["output_check"]["status"] == "passed", row["output_check"]
        roof = row["roofline"]
        assert roof["ceiling"] == "fp32" and roof["percent_of_ceiling"] > 0
        assert roof["achieved_gflops"] == pytest.approx(data["flops"]["per_inference"] / (lat["p50"] / 1e3) / 1e9)
    assert rows[BASELINE]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert rows[BASELINE]["parameters"]["loaded"] > 0
    assert rows["onnx"]["speedup_vs_baseline"] == pytest.approx(
        rows[BASELINE]["latency_ms"]["p50"] / rows["onnx"]["latency_ms"]["p50"])
    assert data["ceilings"]["fp32"]["gflops"] > 0 and data["ceilings"]["int8"]["gflops"] > 0
    assert data["flops"]["per_inference"] > 0 and data["problems"] == []
    assert captured.err == ""  # --json: no progress lines

    assert run_cli(["bench", build, "-n", "2", "--warmup", "0", "--artifact", "onnx", "--no-roofline",
                    "--output", tmp_path / "b2.json"]) == 0
    captured = capsys.readouterr()
    assert "p50 ms" in captured.out and "onnx" in captured.out and BASELINE in captured.out
    assert "mxnet-mkldnn" not in captured.out
    assert "[2/2] onnx" in captured.err  # progress on stderr


def test_bench_writes_into_the_build_by_default_and_other_batches_skip_static_graphs(capsys, small_builds, tmp_path):
    build = linked_copy(small_builds["x86-mkldnn"], tmp_path / "build")
    assert run_cli(["bench", build, "--batch", "3", "-n", "2", "--warmup", "0", "--no-roofline", "--threads", "1",
                    "--artifact", "mxnet-mkldnn", "--artifact", "onnx", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert json.loads((build / "bench" / "bench.json").read_text()) == data
    rows = {row["name"]: row for row in data["artifacts"]}
    assert data["batch"] == 3 and data["input_shape"][0] == 3 and data["options"]["threads"] == 1
    assert rows["onnx"]["status"] == "not run" and "recompile with --batch 3" in rows["onnx"]["reason"]
    for name in (BASELINE, "mxnet-mkldnn"):
        assert rows[name]["status"] == "ok" and rows[name]["output_shapes"][0][0] == 3
        assert rows[name]["output_check"] is None  # no reference outputs at this batch
    # The verify command still passes: bench output is not part of the build.
    assert run_cli(["verify", build]) == 0


def test_a_baseline_that_does_not_reproduce_the_reference_fails(capsys, small_builds, tmp_path):
    build = linked_copy(small_builds["x86-mkldnn"], tmp_path / "build")
    with np.load(build / "reference/outputs.npz") as data:
        doubled = {name: data[name] * 2 + 1 for name in data.files}
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **doubled)
    replace_listed_file(build, "reference/outputs.npz", buffer.getvalue())
    assert run_cli(["bench", build, "-n", "1", "--warmup", "0", "--no-roofline", "--artifact", BASELINE]) == \
        VerificationFailed.exit_code
    err = capsys.readouterr().err
    assert "baseline does not reproduce" in err and "Traceback" not in err
    # With --json stdout stays one JSON document that carries the problem; the exit code says it too.
    assert run_cli(["bench", build, "-n", "1", "--warmup", "0", "--no-roofline", "--artifact", BASELINE,
                    "--json"]) == VerificationFailed.exit_code
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["artifacts"][0]["output_check"]["status"] == "failed"
    assert "baseline does not reproduce" in data["problems"][0] and len(captured.err.strip().splitlines()) == 1


def test_an_engine_without_a_gpu_is_reported_not_run(capsys, small_builds, tmp_path):
    build = linked_copy(small_builds["x86-mkldnn"], tmp_path / "build")
    (build / "tensorrt").mkdir()
    (build / "tensorrt/model.engine").write_bytes(b"not an engine")
    manifest = load_manifest(build)
    manifest["artifacts"].append({"name": "tensorrt/model.engine", "kind": "tensorrt-engine",
                                  "path": "tensorrt/model.engine", "format": "engine", "bytes": 13,
                                  "sha256": sha256_path(build / "tensorrt/model.engine")})
    write_json_atomic(build / "manifest.json", manifest)
    from compiler.tensorrt import availability

    status = availability()
    if status.available:
        pytest.skip("a GPU with TensorRT is present: the engine would run (covered by the gpu tests)")
    assert run_cli(["bench", build, "-n", "1", "--warmup", "0", "--no-roofline", "--artifact", "tensorrt-engine",
                    "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["artifacts"]}
    assert rows["tensorrt-engine"]["status"] == "not run"
    assert rows["tensorrt-engine"]["reason"] == f"not run: {status.reason}"


def test_bench_rejects_bad_options_with_one_line(capsys, small_builds, tmp_path):
    build = small_builds["x86-mkldnn"]
    cases = [
        (["bench", tmp_path], UserError.exit_code, "not a finished infc build"),
        (["bench", build, "--iterations", "0"], UserError.exit_code, "--iterations 0"),
        (["bench", build, "--iterations", "3", "--duration", "2"], UserError.exit_code, "exclude each other"),
        (["bench", build, "--duration", "-1"], UserError.exit_code, "--duration"),
        (["bench", build, "--batch", "0"], UserError.exit_code, "--batch 0"),
        (["bench", build, "--artifact", "onnx-fp17"], UserError.exit_code, "pick from mxnet-imperative"),
    ]
    for args, code, needle in cases:
        assert run_cli(args) == code, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_bench_refuses_altered_files(capsys, small_builds, tmp_path):
    build = linked_copy(small_builds["x86-mkldnn"], tmp_path / "build")
    target = build / "onnx/model.onnx"
    data = bytearray(target.read_bytes())
    target.unlink()
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    assert run_cli(["bench", build, "-n", "1"]) == VerificationFailed.exit_code
    assert "onnx/model.onnx" in capsys.readouterr().err
    assert not (build / "bench").exists()


def test_reduced_precision_onnx_and_build_kit_copies(capsys, small_builds, tmp_path):
    """jetson-orin: an FP16 ONNX artifact, a build kit whose ONNX copies are not benched twice, no engine."""
    build = small_builds["jetson-orin"]
    assert run_cli(["bench", build, "-n", "2", "--warmup", "0", "--no-roofline", "--artifact", "onnx-fp16",
                    "--output", tmp_path / "b.json", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in data["artifacts"]}
    assert rows["onnx-fp16"]["status"] == "ok" and rows["onnx-fp16"]["precision"] == "fp16"
    assert rows["onnx-fp16"]["output_check"]["status"] == "passed"  # held to the target's fp16 tolerance
    assert rows["onnx-fp16"]["output_check"]["tolerance"]["rtol"] == load_manifest(build)["target"]["verify"]["fp16_rtol"]
    assert {s["path"] for s in data["skipped_files"]} >= {"build_kit/model.onnx", "build_kit/model.fp16.onnx"}


def test_rows_get_speedups_and_roofline_and_impossible_numbers_are_flagged():
    def row(name, precision, p50_ms, runtime="mxnet"):
        return {"name": name, "precision": precision, "runtime": runtime, "status": "ok", "latency_ms": {"p50": p50_ms}}

    rows = [row(BASELINE, "fp32", 100.0), row("onnx-int8", "int8", 25.0, "onnxruntime"),
            row("mxnet-mkldnn", "fp32", 10.0), {"name": "tensorrt-engine", "status": "not run"}]
    ceilings = {"fp32": {"gflops": 80.0}, "int8": {"gflops": 400.0}}
    warnings = compare_rows(rows, ceilings, flops_per_inference=1e9)  # 1 GFLOP per inference
    baseline, int8, fused, engine = rows
    assert baseline["speedup_vs_baseline"] == 1.0 and int8["speedup_vs_baseline"] == 4.0
    assert baseline["roofline"]["achieved_gflops"] == pytest.approx(10.0)
    assert baseline["roofline"]["percent_of_ceiling"] == pytest.approx(12.5)
    assert int8["roofline"]["ceiling"] == "int8" and int8["roofline"]["percent_of_ceiling"] == pytest.approx(10.0)
    assert fused["roofline"]["percent_of_ceiling"] == pytest.approx(125.0)
    assert len(warnings) == 1 and "mxnet-mkldnn" in warnings[0] and "above the measured fp32 GEMM ceiling" in warnings[0]
    assert "roofline" not in engine
    compare_rows(rows, {"error": "worker killed"}, 1e9)
    assert baseline["roofline"]["percent_of_ceiling"] is None and "not measured" in baseline["roofline"]["note"]


# --- the TensorRT runner against a double (the real engine needs a GPU) ---------------------------

class HostBuffers:
    """The buffer-backend interface of build_engine.py, on host memory."""
    name = "host"

    def __init__(self):
        self.memory, self.synced = {}, 0

    def alloc(self, nbytes):
        self.memory[len(self.memory) + 1] = None
        return len(self.memory)

    def htod(self, pointer, array):
        self.memory[pointer] = array.copy()

    def dtoh(self, array, pointer):
        array[...] = self.memory[pointer]

    def free(self, pointer):
        self.memory.pop(pointer)

    def stream_handle(self):
        return 7

    def synchronize(self):
        self.synced += 1

    def close(self):
        pass


def tensorrt_double(version: str, buffers: HostBuffers):
    """A tensorrt module whose engine doubles its input: 'data' (1x3) -> 'out' (1x3)."""
    tensor_api = not version.startswith("8.2")

    class Context:
        def __init__(self):
            self.addresses = {}

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer
            return True

        def execute_async_v3(self, stream):
            assert stream == 7
            buffers.memory[self.addresses["out"]] = buffers.memory[self.addresses["data"]] * 2
            return True

        def execute_v2(self, bindings):
            buffers.memory[bindings[1]] = buffers.memory[bindings[0]] * 2
            return True

    class Engine:
        names = ["data", "out"]
        if tensor_api:
            num_io_tensors = 2

            def get_tensor_name(self, index):
                return self.names[index]

            def get_tensor_mode(self, name):
                return "INPUT" if name == "data" else "OUTPUT"

            def get_tensor_shape(self, name):
                return (1, 3)

            def get_tensor_dtype(self, name):
                return "FLOAT"
        else:
            num_bindings = 2

            def get_binding_name(self, index):
                return self.names[index]

            def binding_is_input(self, index):
                return index == 0

            def get_binding_shape(self, index):
                return (1, 3)

            def get_binding_dtype(self, index):
                return "FLOAT"

            def get_binding_index(self, name):
                return self.names.index(name)

        def create_execution_context(self):
            return Context()

    class Trt:
        __version__ = version

        class TensorIOMode:
            INPUT = "INPUT"

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine() if data == b"engine" else None

        @staticmethod
        def nptype(dtype):
            return np.float32

    return Trt


@pytest.mark.parametrize("version", ["10.3.0", "8.2.1"])
def test_tensorrt_runner_reuses_its_buffers(monkeypatch, tmp_path, version):
    import compiler.device.build_engine as device
    import compiler.tensorrt as tensorrt
    from compiler.bench_worker import TensorRTRunner

    buffers = HostBuffers()
    monkeypatch.setattr(tensorrt, "availability", lambda: tensorrt.Availability(True, version=version))
    monkeypatch.setattr(device, "import_tensorrt", lambda: tensorrt_double(version, buffers))
    monkeypatch.setattr(device, "load_buffer_backend", lambda: buffers)
    (tmp_path / "model.engine").write_bytes(b"engine")
    runner = TensorRTRunner(tmp_path, {"files": {"engine": "model.engine"}}, {})
    runner.prepare([np.array([[1.0, 2.0, 3.0]])])
    for _ in range(3):
        (out,) = runner.infer()
        np.testing.assert_array_equal(out, [[2.0, 4.0, 6.0]])
    assert len(buffers.memory) == 2 and buffers.synced == 3  # allocated once, synchronized per run

    (tmp_path / "model.engine").write_bytes(b"from another TensorRT")
    with pytest.raises(VerificationFailed, match="does not deserialize"):
        TensorRTRunner(tmp_path, {"files": {"engine": "model.engine"}}, {})


def test_outputs_are_held_to_the_tolerance_the_build_verified_them_with():
    from compiler.bench import BenchArtifact, tolerance_for

    manifest = {"target": {"verify": {"rtol": 1e-4, "atol": 1e-5, "fp16_rtol": 1e-2, "fp16_atol": 1e-3}},
                "verifications": [{"artifact": "mxnet-bf16", "name": "reload-parity",
                                   "tolerance": {"rtol": 0.05, "atol": 0.001}},
                                  {"artifact": "onnx", "name": "onnx-checker", "tolerance": {}}]}
    def artifact(kind, precision):
        return BenchArtifact(kind, kind, "mxnet", precision)

    assert tolerance_for(manifest, artifact("mxnet-bf16", "bf16")) == (0.05, 0.001)
    assert tolerance_for(manifest, artifact("onnx", "fp32")) == (1e-4, 1e-5)
    assert tolerance_for(manifest, artifact(BASELINE, "fp32")) == (1e-4, 1e-5)
    assert tolerance_for(manifest, artifact("onnx-fp16", "fp16")) == (1e-2, 1e-3)
    assert tolerance_for(manifest, artifact("onnx-int8", "int8")) == (None, None)  # reported, not judged


def test_an_unwritable_output_fails_before_measuring(capsys, small_builds, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli(["bench", small_builds["x86-mkldnn"], "-n", "1", "--output", blocker / "bench.json"]) == \
        UserError.exit_code
    captured = capsys.readouterr()
    assert "cannot write the bench results" in captured.err and "[1/" not in captured.err


def test_rejected_runs_leave_the_build_untouched(capsys, small_builds, tmp_path):
    build = linked_copy(small_builds["x86-mkldnn"], tmp_path / "build")
    before = sorted(p.relative_to(build) for p in build.rglob("*"))
    for args in (["--artifact", "onnx-fp17"], ["--iterations", "0"], ["--batch", "0"]):
        assert run_cli(["bench", build, *args]) == UserError.exit_code
    assert run_cli(["profile", build, "--artifact", "nope"]) == UserError.exit_code
    assert sorted(p.relative_to(build) for p in build.rglob("*")) == before
