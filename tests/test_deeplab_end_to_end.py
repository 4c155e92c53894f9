"""deeplab_resnet101_coco end to end through the CLI, as the README promises."""

from __future__ import annotations

import json

import onnx
import pytest

from .conftest import read_manifest, run_cli

pytestmark = pytest.mark.slow

MODEL = "deeplab_resnet101_coco"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("deeplab")


def test_jetson_build_without_gpu_or_tensorrt(out, capsys):
    assert run_cli(["compile", MODEL, "--target", "jetson", "--random-init", "--out", out]) == 0
    summary = capsys.readouterr().out
    assert "random-init" in summary
    build = out / MODEL / "jetson-orin"
    manifest = read_manifest(build)
    assert manifest["model"]["inputs"]["data"]["shape"] == [1, 3, 480, 480]
    # JetPack 6 ships TensorRT 10.3, whose ONNX parser takes opsets 9-20 and IR <= 10.
    model = onnx.load(str(build / "onnx/model.onnx"), load_external_data=False)
    opset = {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    assert opset == {13} and model.ir_version == 8
    parity = [c for c in manifest["verifications"] if c["artifact"] == "onnx" and c["name"] == "onnxruntime-parity"]
    assert parity[0]["status"] == "passed" and parity[0]["numbers"]["rel_error"] <= 1e-4
    assert len(parity[0]["numbers"]["outputs"]) == 2  # main and auxiliary heads
    assert manifest["engine"]["status"] == "deferred to the device"
    settings = json.loads((build / "build_kit/builder_settings.json").read_text())
    assert settings["expected_tensorrt"] == "10.3" and settings["inputs"] == {"data": [1, 3, 480, 480]}
    assert run_cli(["verify", build]) == 0


def test_x86_build_verifies(out, capsys):
    assert run_cli(["compile", MODEL, "--target", "x86-mkldnn", "--random-init", "--out", out, "--quiet"]) == 0
    build = out / MODEL / "x86-mkldnn"
    manifest = read_manifest(build)
    statuses = {(c["artifact"], c["name"]): c["status"] for c in manifest["verifications"]}
    assert statuses == {("mxnet-portable", "reload-parity"): "passed", ("mxnet-mkldnn", "reload-parity"): "passed",
                        ("onnx", "onnx-checker"): "passed", ("onnx", "onnxruntime-parity"): "passed"}
    assert run_cli(["verify", build]) == 0
