from __future__ import annotations

import dataclasses

import pytest

from compiler.errors import UserError
from compiler.targets import (DEVICE_KINDS, ARTIFACT_KINDS, TargetSpec, builtin_targets_dir, list_targets,
                              load_target_file, resolve_target)

REQUIRED_BUILTINS = {"x86-mkldnn", "cuda-fp16", "jetson-orin", "jetson-xavier", "jetson-nano", "jetson-thor"}


def test_every_required_builtin_loads_and_validates():
    names = {t.name for t in list_targets()}
    assert REQUIRED_BUILTINS <= names
    for target in list_targets():
        assert target.device.kind in DEVICE_KINDS
        assert set(target.emit) <= set(ARTIFACT_KINDS)
        with pytest.raises(dataclasses.FrozenInstanceError):
            target.name = "changed"


def test_jetson_is_an_alias_of_orin():
    assert resolve_target("jetson").name == "jetson-orin"


@pytest.mark.parametrize("name, trt, jetpack, ir", [
    ("jetson-nano", "8.2", "4.6", 7),
    ("jetson-xavier", "8.5", "5.1", 8),
    ("jetson-orin", "10.3", "6.1", 8),
    ("jetson-thor", "10.13", "7.1", 8),
])
def test_jetson_specs_match_their_jetpack(name, trt, jetpack, ir):
    spec = resolve_target(name)
    assert spec.tensorrt.version == trt
    assert spec.device.jetpack == jetpack
    assert spec.onnx.ir_version == ir
    # What we emit must be inside what that TensorRT's ONNX parser accepts.
    assert spec.onnx.runtime_min_opset <= spec.onnx.opset <= spec.onnx.runtime_max_opset
    assert spec.onnx.ir_version <= spec.onnx.runtime_max_ir
    assert spec.emits("tensorrt-build-kit") and not spec.emits("tensorrt-engine")


def test_dla_only_where_the_device_has_it():
    assert resolve_target("jetson-orin").device.dla_cores == 2
    assert resolve_target("jetson-nano").device.dla_cores == 0
    assert resolve_target("jetson-thor").device.dla_cores == 0


def test_content_hash_ignores_location_but_not_content(tmp_path):
    source = builtin_targets_dir() / "x86-mkldnn.toml"
    copy = tmp_path / "x86-mkldnn.toml"
    copy.write_text(source.read_text())
    assert load_target_file(copy).content_hash() == resolve_target("x86-mkldnn").content_hash()
    copy.write_text(source.read_text().replace("rtol = 1e-4", "rtol = 2e-4"))
    assert load_target_file(copy).content_hash() != resolve_target("x86-mkldnn").content_hash()


def _write(tmp_path, text: str):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


MINIMAL = '''
name = "mine"
description = "test target"
device = { kind = "x86" }
emit = ["mxnet-portable", "onnx"]
'''


def test_a_user_file_can_be_passed_as_a_path(tmp_path):
    spec = resolve_target(str(_write(tmp_path, MINIMAL)))
    assert isinstance(spec, TargetSpec) and spec.name == "mine"
    assert spec.onnx.opset == 13 and spec.source.endswith("mine.toml")


@pytest.mark.parametrize("extra, message", [
    ("[onnx]\nopsett = 13\n", "unknown key 'onnx.opsett'"),
    ("colour = 'red'\n", "unknown key 'colour'"),
    ("[onnx]\nopset = '13'\n", "key 'onnx.opset' must be an integer"),
    ("[verify]\nrtol = 'tight'\n", "key 'verify.rtol' must be a number"),
    ("[onnx]\nopset = 17\n", "no MXNet exporter translations"),
    ("[onnx]\nir_version = 12\n", "onnx.ir_version 12"),
    ("precision = 'int4'\n", "precision 'int4'"),
])
def test_invalid_specs_name_the_key(tmp_path, extra, message):
    with pytest.raises(UserError) as err:
        load_target_file(_write(tmp_path, MINIMAL + extra))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_artifact_and_missing_key(tmp_path):
    with pytest.raises(UserError, match="emit lists unknown artifact 'onnx16'.*onnx-fp16"):
        load_target_file(_write(tmp_path, MINIMAL.replace('"onnx"]', '"onnx16"]')))
    with pytest.raises(UserError, match="missing required key 'emit'"):
        load_target_file(_write(tmp_path, MINIMAL.replace('emit = ["mxnet-portable", "onnx"]', "")))


def test_kit_without_tensorrt_table_is_rejected(tmp_path):
    text = MINIMAL.replace('"onnx"]', '"onnx", "tensorrt-build-kit"]').replace('"x86"', '"jetson"')
    with pytest.raises(UserError, match=r"no \[tensorrt\] table"):
        load_target_file(_write(tmp_path, text))


def test_malformed_toml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_target_file(_write(tmp_path, "name = \n"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_target(str(tmp_path / "nope.toml"))


def test_unknown_target_suggests_close_names():
    with pytest.raises(UserError) as err:
        resolve_target("jetson-orn")
    assert "jetson-orin" in str(err.value)
