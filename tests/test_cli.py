"""The CLI in-process: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compiler.errors import MissingDependency, UserError, VerificationFailed

from .conftest import SMALL_MODEL, SMALL_SHAPE, read_manifest, run_cli


def test_help_does_not_import_mxnet_or_onnx():
    code = ("import sys; from compiler.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('mxnet', 'onnx', 'onnxruntime', 'tensorrt', 'gluoncv') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"


def test_targets_lists_every_target_with_a_description(capsys):
    assert run_cli(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("x86-mkldnn", "cuda-fp16", "jetson-orin", "jetson-xavier", "jetson-nano", "jetson-thor"):
        assert name in out
    assert "alias: jetson" in out
    assert run_cli(["targets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in data} >= {"jetson-thor"} and all(t["description"] for t in data)


def test_models_filters_by_family(capsys):
    assert run_cli(["models", "--family", "segmentation", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in data}
    assert "deeplab_resnet101_coco" in names and "resnet18_v1" not in names
    assert {m["family"] for m in data} == {"segmentation"}
    assert run_cli(["models", "--family", "classification"]) == 0
    assert "resnet18_v1" in capsys.readouterr().out


def _one_line_error(capsys, args, code, *needles):
    assert run_cli(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_get_one_line_and_their_exit_code(capsys, tmp_path):
    base = ["compile", SMALL_MODEL, "--random-init", "--out", tmp_path]
    _one_line_error(capsys, ["compile", "deeplab_resnet101_cocoo", "--target", "jetson", "--out", tmp_path],
                    UserError.exit_code, "unknown model", "deeplab_resnet101_coco")
    _one_line_error(capsys, base + ["--target", "jetsn-orin"], UserError.exit_code, "unknown target", "jetson-orin")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = [\n")
    _one_line_error(capsys, base + ["--target", bad_toml], UserError.exit_code, "not valid TOML")
    _one_line_error(capsys, base + ["--target", "x86-mkldnn", "--input-shape", "1x3xbig"], UserError.exit_code,
                    "bad --input-shape")
    _one_line_error(capsys, ["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--weights", tmp_path / "no.params",
                             "--out", tmp_path], UserError.exit_code, "does not exist")
    corrupt = tmp_path / "corrupt.params"
    corrupt.write_bytes(b"\x00" * 64)
    _one_line_error(capsys, ["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--weights", corrupt,
                             "--input-shape", SMALL_SHAPE, "--out", tmp_path], UserError.exit_code, "does not fit")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(capsys, ["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--random-init", "--out",
                             blocker / "out"], UserError.exit_code, "cannot write to --out")
    _one_line_error(capsys, base + ["--target", "x86-mkldnn", "--weights", corrupt], UserError.exit_code,
                    "exclude each other")
    # Nothing was published by any of them.
    assert not (tmp_path / SMALL_MODEL / "x86-mkldnn").exists()


def test_offline_pretrained_weights_name_the_fix(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "store"))
    _one_line_error(capsys, ["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--input-shape", SMALL_SHAPE,
                             "--out", tmp_path], MissingDependency.exit_code, "--weights", "--random-init")


def test_tensorrt_required_but_absent(capsys, tmp_path):
    _one_line_error(capsys, ["compile", SMALL_MODEL, "--target", "cuda-fp16", "--random-init", "--input-shape",
                             SMALL_SHAPE, "--require-engine", "--out", tmp_path], MissingDependency.exit_code,
                    "TensorRT engine")


def test_compile_summary_and_json(capsys, tmp_path):
    args = ["compile", SMALL_MODEL, "--target", "jetson", "--random-init", "--input-shape", SMALL_SHAPE,
            "--out", tmp_path]
    assert run_cli(args) == 0
    captured = capsys.readouterr()
    assert "random-init" in captured.out and "not for deployment" in captured.out
    assert "onnxruntime-parity" in captured.out and "deferred to the device" in captured.out
    assert "[1/" in captured.err  # per-stage progress
    assert run_cli(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "ok" and data["target"]["name"] == "jetson-orin"
    assert data["build_dir"].endswith(f"{SMALL_MODEL}/jetson-orin")


def test_quiet_prints_nothing(capsys, tmp_path):
    assert run_cli(["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--random-init", "--input-shape",
                    SMALL_SHAPE, "--out", tmp_path, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_verify_passes_then_fails_on_one_flipped_byte(capsys, small_builds, tmp_path):
    import shutil

    build = tmp_path / "copy"
    shutil.copytree(small_builds["x86-mkldnn"], build)
    assert run_cli(["verify", build, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and {c["artifact"] for c in report["checks"]} >= {"mxnet-portable", "mxnet-mkldnn", "onnx"}
    onnx_file = build / "onnx/model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    assert run_cli(["verify", build]) == VerificationFailed.exit_code
    captured = capsys.readouterr()
    assert "onnx/model.onnx" in captured.err and "sha256" in captured.err


def test_verify_reruns_numeric_checks(capsys, small_builds, tmp_path):
    """A consistent but wrong artifact (hash updated) must still fail its numeric check."""
    import shutil

    import numpy as np

    from compiler.manifest import sha256_path, write_json_atomic

    build = tmp_path / "copy"
    shutil.copytree(small_builds["x86-mkldnn"], build)
    outputs = dict(np.load(build / "reference/outputs.npz"))
    outputs = {k: v + 1.0 for k, v in outputs.items()}
    np.savez(build / "reference/outputs.npz", **outputs)
    manifest = read_manifest(build)
    for artifact in manifest["artifacts"]:
        if artifact["path"] == "reference/outputs.npz":
            artifact["sha256"] = sha256_path(build / artifact["path"])
            artifact["bytes"] = (build / artifact["path"]).stat().st_size
    write_json_atomic(build / "manifest.json", manifest)
    assert run_cli(["verify", build]) == VerificationFailed.exit_code
    assert "parity" in capsys.readouterr().err


def test_verify_and_inspect_refuse_a_non_build(capsys, tmp_path):
    _one_line_error(capsys, ["verify", tmp_path], UserError.exit_code, "not a finished infc build")
    _one_line_error(capsys, ["inspect", tmp_path], UserError.exit_code, "not a finished infc build")


def test_inspect_summarizes(capsys, small_builds):
    assert run_cli(["inspect", small_builds["jetson-nano"]]) == 0
    out = capsys.readouterr().out
    assert "jetson-nano" in out and SMALL_MODEL in out and "random init" in out
    assert "build_kit/build_engine.py" in out and "onnxruntime-parity" in out
    assert run_cli(["inspect", small_builds["jetson-nano"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"]["tensorrt"]["version"] == "8.2"


def test_json_errors_are_machine_readable(capsys, tmp_path):
    assert run_cli(["inspect", tmp_path, "--json"]) == UserError.exit_code
    captured = capsys.readouterr()
    assert json.loads(captured.out)["exit_code"] == UserError.exit_code


def test_console_script_runs(tmp_path):
    """The installed `infc` entry point, as a user runs it."""
    import shutil

    infc = shutil.which("infc", path=str(__import__("pathlib").Path(sys.executable).parent))
    if infc is None:
        pytest.skip("the infc console script is not installed in this environment (run `make install`)")
    result = subprocess.run([infc, "targets"], capture_output=True, text=True)
    assert result.returncode == 0 and "jetson-orin" in result.stdout
    result = subprocess.run([infc, "compile", "nope_net", "--target", "jetson", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == UserError.exit_code and "unknown model 'nope_net'" in result.stderr


def test_ctrl_c_mid_build_exits_130_and_keeps_the_previous_build(capsys, tmp_path, monkeypatch):
    import compiler.pipeline as pipeline

    monkeypatch.setenv("INFC_NO_CACHE", "1")
    args = ["compile", SMALL_MODEL, "--target", "x86-mkldnn", "--random-init", "--input-shape", SMALL_SHAPE,
            "--out", tmp_path, "--quiet"]
    assert run_cli(args) == 0
    build = tmp_path / SMALL_MODEL / "x86-mkldnn"
    before = (build / "manifest.json").read_bytes()

    def press_ctrl_c(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "STAGES", tuple(
        pipeline.Stage(s.name, s.parent, press_ctrl_c if s.name == "onnx" else s.run, s.applies, s.config)
        for s in pipeline.STAGES))
    assert run_cli(args) == 130
    err = capsys.readouterr().err.strip()
    assert "interrupted" in err and "intact" in err and len(err.splitlines()) == 1
    assert (build / "manifest.json").read_bytes() == before
    assert not [p for p in build.parent.iterdir() if "staging" in p.name]
