"""compile_model on a small network for every built-in target."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler.errors import MissingDependency, OutputLocked, UserError, VerificationFailed
from compiler.manifest import check_artifact_hashes
from compiler.models import WeightsRequest
from compiler.pipeline import CompileSpec, compile_model, output_lock
from compiler.targets import resolve_target

from .conftest import SMALL_MODEL, read_manifest


def _spec(tmp_path, target="x86-mkldnn", **kw) -> CompileSpec:
    return CompileSpec(model=SMALL_MODEL, target=resolve_target(target) if isinstance(target, str) else target,
                       out_dir=tmp_path, input_shape=(1, 3, 32, 32), weights=WeightsRequest("random"), **kw)


def test_every_target_builds_with_every_check_recorded(small_builds):
    for name, build in small_builds.items():
        manifest = read_manifest(build)
        assert manifest["status"] == "ok", name
        assert manifest["schema_version"] == 1
        assert manifest["weights"]["source"] == "random-init"
        assert not check_artifact_hashes(build, manifest), name
        kinds = {a["kind"] for a in manifest["artifacts"]}
        assert set(manifest["target"]["emit"]) <= kinds | {"tensorrt-engine"}, name
        checks = {(c["artifact"], c["name"]): c for c in manifest["verifications"]}
        assert checks[("mxnet-portable", "reload-parity")]["status"] == "passed"
        assert checks[("onnx", "onnx-checker")]["status"] == "passed"
        parity = checks[("onnx", "onnxruntime-parity")]
        assert parity["status"] == "passed" and parity["numbers"]["rel_error"] <= 1e-4, name
        assert {s["name"] for s in manifest["stages"]} >= {"load", "mxnet-portable", "onnx", "reference"}
        assert all(s["seconds"] >= 0 and len(s["key"]) == 64 for s in manifest["stages"])
        assert manifest["tools"]["mxnet"] == "1.9.1" and manifest["tools"]["onnxruntime"]


def test_x86_has_the_fused_graph(small_builds):
    build = small_builds["x86-mkldnn"]
    graph = json.loads((build / "mxnet/mkldnn-symbol.json").read_text())
    portable = json.loads((build / "mxnet/portable-symbol.json").read_text())
    assert any(n["op"].startswith("_sg_mkldnn") for n in graph["nodes"])
    assert not any(n["op"].startswith("_sg_mkldnn") for n in portable["nodes"])
    checks = {(c["artifact"], c["name"]): c["status"] for c in read_manifest(build)["verifications"]}
    assert checks[("mxnet-mkldnn", "reload-parity")] == "passed"


@pytest.mark.parametrize("target, ir_version", [("jetson-nano", 7), ("jetson-xavier", 8), ("jetson-orin", 8),
                                                ("jetson-thor", 8), ("cuda-fp16", 8), ("x86-mkldnn", 8)])
def test_onnx_declares_the_targets_opset_and_ir(small_builds, target, ir_version):
    model = onnx.load(str(small_builds[target] / "onnx/model.onnx"), load_external_data=False)
    assert model.ir_version == ir_version
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {13}


@pytest.mark.parametrize("target", ["jetson-nano", "jetson-xavier", "jetson-orin", "jetson-thor"])
def test_jetson_builds_ship_a_kit_and_defer_the_engine(small_builds, target):
    build = small_builds[target]
    manifest = read_manifest(build)
    kit = build / "build_kit"
    assert {p.name for p in kit.iterdir()} >= {"model.onnx", "model.fp16.onnx", "build_engine.py",
                                                "builder_settings.json", "reference_inputs.npz",
                                                "reference_outputs.npz", "README.txt"}
    settings = json.loads((kit / "builder_settings.json").read_text())
    spec = resolve_target(target)
    assert settings["expected_tensorrt"] == spec.tensorrt.version
    assert settings["workspace_bytes"] == spec.tensorrt.workspace_mib << 20
    assert settings["precision"] == "fp16" and settings["onnx_fp16"] == "model.fp16.onnx"
    assert list(settings["inputs"]) == list(manifest["model"]["inputs"])
    assert manifest["engine"]["status"] == "deferred to the device"
    build_check = [c for c in manifest["verifications"] if c["name"] == "engine-build"][0]
    assert build_check["status"] == "not run" and "deferred to the device" in build_check["detail"]
    # The kit's reference outputs are the build's reference outputs.
    ours = np.load(build / "reference/outputs.npz")
    kits = np.load(kit / "reference_outputs.npz")
    assert sorted(ours.files) == sorted(kits.files) == sorted(manifest["model"]["outputs"])


def test_cuda_target_without_gpu_records_why_and_leaves_a_kit(small_builds):
    build = small_builds["cuda-fp16"]
    manifest = read_manifest(build)
    check = [c for c in manifest["verifications"] if c["artifact"] == "tensorrt-engine"][0]
    assert check["status"] == "not run" and check["detail"].startswith("not run: ")
    assert manifest["engine"]["status"] == "deferred"
    settings = json.loads((build / "tensorrt/builder_settings.json").read_text())
    assert settings["onnx"] == "../onnx/model.onnx" and settings["expected_tensorrt"] is None
    fp16 = [c for c in manifest["verifications"] if c["artifact"] == "onnx-fp16" and c["name"] == "onnxruntime-parity"]
    assert fp16[0]["status"] == "passed" and 0 < fp16[0]["numbers"]["rel_error"] <= 1e-2


def test_require_engine_fails_without_a_gpu_and_publishes_nothing(tmp_path):
    with pytest.raises(MissingDependency, match="cannot build the TensorRT engine here"):
        compile_model(_spec(tmp_path, "cuda-fp16", require_engine=True))
    # Refused before any work: not even the model directory was made.
    assert not (tmp_path / SMALL_MODEL).exists()


def _renamed_orin(tmp_path: Path, file_name: str, fp16_tolerance: str | None = None) -> Path:
    """The jetson-orin spec under the name "edge", optionally with another FP16 tolerance."""
    text = Path(resolve_target("jetson-orin").source).read_text()
    text = text.replace('name = "jetson-orin"', 'name = "edge"').replace('aliases = ["jetson"]', "")
    if fp16_tolerance is not None:
        text = text.replace("fp16_rtol = 5e-2", f"fp16_rtol = {fp16_tolerance}").replace(
            "fp16_atol = 1e-3", f"fp16_atol = {fp16_tolerance}")
    path = tmp_path / file_name
    path.write_text(text)
    return path


def test_a_failed_check_keeps_the_previous_build_and_says_by_how_much(tmp_path):
    good = compile_model(_spec(tmp_path, resolve_target(str(_renamed_orin(tmp_path, "lenient.toml")))))
    before = (good.build_dir / "manifest.json").read_bytes()
    strict = resolve_target(str(_renamed_orin(tmp_path, "strict.toml", fp16_tolerance="0.0")))
    with pytest.raises(VerificationFailed) as err:
        compile_model(_spec(tmp_path, strict))
    assert "onnx-fp16 failed onnxruntime-parity" in str(err.value) and "rel error" in str(err.value)
    assert (good.build_dir / "manifest.json").read_bytes() == before
    failed = read_manifest(good.build_dir.parent / "edge.failed")
    assert failed["status"] == "failed"
    bad = [c for c in failed["verifications"] if c["status"] == "failed"]
    assert bad and bad[0]["numbers"]["rel_error"] > 0 and bad[0]["tolerance"] == {"rtol": 0.0, "atol": 0.0}


def test_interrupt_mid_build_leaves_the_previous_build(tmp_path, monkeypatch):
    import compiler.pipeline as pipeline

    monkeypatch.setenv("INFC_NO_CACHE", "1")  # the onnx stage must really run
    first = compile_model(_spec(tmp_path))
    before = (first.build_dir / "manifest.json").read_bytes()

    def interrupted(ctx):
        raise KeyboardInterrupt

    stages = tuple(pipeline.Stage(s.name, s.parent, interrupted if s.name == "onnx" else s.run, s.applies, s.config)
                   for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    with pytest.raises(KeyboardInterrupt):
        compile_model(_spec(tmp_path))
    assert (first.build_dir / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in first.build_dir.parent.iterdir() if not p.name.startswith(".x86-mkldnn.lock")) \
        == ["x86-mkldnn"]


def test_a_writer_in_the_same_process_is_refused_not_awaited(tmp_path):
    final = tmp_path / SMALL_MODEL / "x86-mkldnn"
    final.parent.mkdir(parents=True)
    with output_lock(final):
        with pytest.raises(OutputLocked, match="same process .* would never end"):
            compile_model(_spec(tmp_path))


def test_input_shape_of_the_wrong_rank(tmp_path):
    with pytest.raises(UserError, match="has 3 dimensions"):
        compile_model(CompileSpec(model=SMALL_MODEL, target=resolve_target("x86-mkldnn"), out_dir=tmp_path,
                                  input_shape=(1, 32, 32), weights=WeightsRequest("random")))


def test_batch_overrides_the_first_dimension(tmp_path):
    result = compile_model(_spec(tmp_path, "x86-mkldnn", batch=2))
    assert result.manifest["model"]["inputs"]["data"]["shape"] == [2, 3, 32, 32]
    outputs = np.load(result.build_dir / "reference/outputs.npz")
    assert all(outputs[k].shape[0] == 2 for k in outputs.files)


def test_unwritable_out_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write to --out"):
        compile_model(CompileSpec(model=SMALL_MODEL, target=resolve_target("x86-mkldnn"), out_dir=blocker / "sub",
                                  weights=WeightsRequest("random")))
