"""Incremental builds: unchanged rebuilds are no-ops, changed specs rerun only what depends on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cache import StageCache
from compiler.models import WeightsRequest
from compiler.pipeline import CompileSpec, compile_model
from compiler.targets import resolve_target

from .conftest import SMALL_MODEL, read_manifest, run_cli


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts from an empty stage cache."""
    monkeypatch.setenv("INFC_CACHE_DIR", str(tmp_path / "cache"))


def _spec(out: Path, target) -> CompileSpec:
    target = resolve_target(str(target)) if not isinstance(target, str) or target.endswith(".toml") \
        else resolve_target(target)
    return CompileSpec(model=SMALL_MODEL, target=target, out_dir=out, input_shape=(1, 3, 32, 32),
                       weights=WeightsRequest("random"))


def _copy_target(tmp_path: Path, name: str, edit=lambda text: text) -> Path:
    path = tmp_path / "specs" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(edit(Path(resolve_target(name).source).read_text()))
    return path


def _cached_stages(manifest: dict) -> dict[str, bool]:
    return {s["name"]: s["cached"] for s in manifest["stages"]}


def test_an_unchanged_rebuild_is_a_no_op(tmp_path):
    first = compile_model(_spec(tmp_path, "x86-mkldnn"))
    manifest_bytes = (first.build_dir / "manifest.json").read_bytes()
    again = compile_model(_spec(tmp_path, "x86-mkldnn"))
    assert again.cached and not first.cached
    assert (first.build_dir / "manifest.json").read_bytes() == manifest_bytes  # nothing rewritten
    assert first.manifest["build_key"] and again.manifest["build_key"] == first.manifest["build_key"]


def test_the_no_op_needs_no_mxnet_and_says_cached(tmp_path):
    args = ["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--random-init", "--input-shape", "1x3x32x32",
            "--out", str(tmp_path)]
    assert run_cli(args + ["--quiet"]) == 0
    code = ("import sys; from compiler.cli import main; rc = main(%r); "
            "print(rc, 'mxnet' in sys.modules, 'onnx' in sys.modules)" % args)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cached:" in result.stdout and "is up to date" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "0 False False"


def test_touching_the_target_file_rebuilds_nothing(tmp_path):
    spec_file = _copy_target(tmp_path, "jetson-orin")
    compile_model(_spec(tmp_path, spec_file))
    spec_file.write_text(spec_file.read_text())
    assert compile_model(_spec(tmp_path, spec_file)).cached


def test_a_changed_builder_setting_reruns_only_the_kit(tmp_path):
    spec_file = _copy_target(tmp_path, "jetson-orin")
    fresh = compile_model(_spec(tmp_path, spec_file))
    assert not any(_cached_stages(fresh.manifest).values())
    spec_file.write_text(spec_file.read_text().replace("workspace_mib = 2048", "workspace_mib = 1024"))
    rebuilt = compile_model(_spec(tmp_path, spec_file))
    assert not rebuilt.cached
    assert _cached_stages(rebuilt.manifest) == {"load": True, "mxnet-portable": True, "onnx": True,
                                                "onnx-fp16": True, "tensorrt-build-kit": False, "reference": True}
    settings = json.loads((rebuilt.build_dir / "build_kit/builder_settings.json").read_text())
    assert settings["workspace_bytes"] == 1024 << 20
    # Replayed artifacts are the same bytes a fresh build writes.
    hashes = {a["path"]: a["sha256"] for a in rebuilt.manifest["artifacts"]}
    assert hashes["onnx/model.onnx"] == {a["path"]: a["sha256"] for a in fresh.manifest["artifacts"]}["onnx/model.onnx"]
    assert run_cli(["verify", rebuilt.build_dir]) == 0


def test_a_changed_opset_setting_reruns_onnx_and_below(tmp_path):
    spec_file = _copy_target(tmp_path, "jetson-orin")
    compile_model(_spec(tmp_path, spec_file))
    spec_file.write_text(spec_file.read_text().replace("ir_version = 8", "ir_version = 9"))
    rebuilt = compile_model(_spec(tmp_path, spec_file))
    assert _cached_stages(rebuilt.manifest) == {"load": True, "mxnet-portable": True, "onnx": False,
                                                "onnx-fp16": False, "tensorrt-build-kit": False, "reference": True}
    import onnx

    assert onnx.load(str(rebuilt.build_dir / "onnx/model.onnx")).ir_version == 9


def test_other_weights_miss_the_cache(tmp_path):
    first = compile_model(_spec(tmp_path, "x86-mkldnn"))
    other = compile_model(CompileSpec(model=SMALL_MODEL, target=resolve_target("x86-mkldnn"), out_dir=tmp_path,
                                      input_shape=(1, 3, 32, 32), weights=WeightsRequest("random", seed=7)))
    assert not other.cached and not any(_cached_stages(other.manifest).values())
    assert other.manifest["weights"]["sha256"] != first.manifest["weights"]["sha256"]


def test_cache_listing_names_the_stages(tmp_path, capsys):
    compile_model(_spec(tmp_path, "x86-mkldnn"))
    stages = {entry.stage for entry in StageCache().ls()}
    assert {"load", "mxnet-portable", "mxnet-mkldnn", "onnx", "reference"} <= stages
    # The cache keeps the load stage's reference data, never in the published build.
    assert not (tmp_path / SMALL_MODEL / "x86-mkldnn" / "reference/mxnet-outputs.npz").exists()


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("INFC_NO_CACHE", "1")
    compile_model(_spec(tmp_path, "x86-mkldnn"))
    again = compile_model(_spec(tmp_path, "x86-mkldnn"))
    assert not again.cached and not any(_cached_stages(again.manifest).values())
    assert read_manifest(again.build_dir)["status"] == "ok"
