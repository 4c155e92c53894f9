"""The Makefile's artifact rules (MODELS x TARGETS, content stamps, bundles, clean) and the per-build lock.

make runs with VENV set to the environment running these tests, whose infc
exists, so it never installs anything; OUT and TARGETS_DIR point into tmp
dirs, so the repository's artifacts/ and targets/ are never touched.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiler import bundle as bundle_mod
from compiler.errors import OutputLocked, UserError
from compiler.pipeline import output_lock
from compiler.verify import verify_build

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
FLAGS = "--random-init --input-shape 1x3x64x64 --quiet"

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or not (VENV / "bin" / "infc").exists(),
    reason="needs GNU make and infc installed in the environment running the tests")


def make(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, INFC_CACHE_DIR=str(tmp_path / "cache"))
    started = time.perf_counter()
    proc = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", f"VENV={VENV}", *args],
                          capture_output=True, text=True, timeout=900, env=env)
    return proc, time.perf_counter() - started


def compiled_targets(output: str) -> list[str]:
    return sorted(re.findall(r"infc compile \S+ --target (\S+)", output))


@pytest.fixture
def targets_dir(tmp_path):
    copy = tmp_path / "targets"
    shutil.copytree(REPO / "targets", copy)
    return copy


@pytest.mark.slow  # two resnet18_v1 builds plus one rebuild: 30-50 s on 2 cores
def test_artifacts_build_every_pair_then_rebuild_only_what_changed(tmp_path, targets_dir):
    out = tmp_path / "out"
    common = [f"OUT={out}", f"TARGETS_DIR={targets_dir}", "MODELS=resnet18_v1", "TARGETS=x86-mkldnn jetson",
              f"INFC_FLAGS={FLAGS}"]
    x86 = out / "resnet18_v1" / "x86-mkldnn" / "manifest.json"
    jetson = out / "resnet18_v1" / "jetson-orin" / "manifest.json"  # the alias resolves to its file

    proc, _ = make(tmp_path, "-j2", "artifacts", *common)
    assert proc.returncode == 0, proc.stderr
    assert compiled_targets(proc.stdout) == ["jetson-orin", "x86-mkldnn"]
    assert "pip install" not in proc.stdout
    assert json.loads(x86.read_text())["status"] == "ok" and json.loads(jetson.read_text())["status"] == "ok"
    first = {path: path.stat().st_mtime_ns for path in (x86, jetson)}

    proc, seconds = make(tmp_path, "artifacts", *common)
    assert proc.returncode == 0, proc.stderr
    assert seconds < 2.0 and compiled_targets(proc.stdout) == []
    assert {path: path.stat().st_mtime_ns for path in first} == first

    later = time.time() + 60
    for spec in targets_dir.glob("*.toml"):
        os.utime(spec, (later, later))
    proc, seconds = make(tmp_path, "artifacts", *common)
    assert proc.returncode == 0 and compiled_targets(proc.stdout) == [] and seconds < 2.0
    assert {path: path.stat().st_mtime_ns for path in first} == first

    spec = targets_dir / "jetson-orin.toml"
    text = spec.read_text()
    assert "workspace_mib = 2048" in text
    spec.write_text(text.replace("workspace_mib = 2048", "workspace_mib = 1536"))
    proc, _ = make(tmp_path, "artifacts", *common)
    assert proc.returncode == 0, proc.stderr
    assert compiled_targets(proc.stdout) == ["jetson-orin"]
    assert x86.stat().st_mtime_ns == first[x86] and jetson.stat().st_mtime_ns != first[jetson]
    assert json.loads(jetson.read_text())["target"]["tensorrt"]["workspace_mib"] == 1536


def test_bundles_and_clean_artifacts(tmp_path, targets_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".keep").write_text("")
    common = [f"OUT={out}", f"TARGETS_DIR={targets_dir}", "MODEL=mobilenet0.25", "TARGET=x86-mkldnn",
              f"INFC_FLAGS={FLAGS}"]
    proc, _ = make(tmp_path, "bundles", *common)
    assert proc.returncode == 0, proc.stderr
    bundle = out / "mobilenet0.25" / "x86-mkldnn.tar.gz"
    assert "infc package" in proc.stdout and bundle.is_file()
    unpacked = bundle_mod.unpack_bundle(bundle, tmp_path / "device")
    assert verify_build(unpacked.path)
    stamp = bundle.stat().st_mtime_ns

    proc, seconds = make(tmp_path, "bundles", *common)
    assert proc.returncode == 0 and seconds < 2.0
    assert "infc package" not in proc.stdout and "infc compile" not in proc.stdout
    assert bundle.stat().st_mtime_ns == stamp

    proc, _ = make(tmp_path, "clean-artifacts", f"OUT={out}")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == [".keep"]


def test_dry_run_resolves_aliases_and_passes_flags(tmp_path, targets_dir):
    out = tmp_path / "out"
    proc, _ = make(tmp_path, "-n", "artifacts", f"OUT={out}", f"TARGETS_DIR={targets_dir}",
                   "MODELS=resnet18_v1 deeplab_resnet101_coco", "TARGETS=jetson x86-mkldnn jetson-orin",
                   "INFC_FLAGS=--random-init --seed 3")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if " compile " in line]
    assert len(commands) == 4  # jetson and jetson-orin are one target
    assert all(f"INFC_TARGETS_DIR={targets_dir}" in c and c.endswith("--random-init --seed 3") for c in commands)
    assert sorted(re.findall(r"compile (\S+) --target (\S+)", "\n".join(commands))) == [
        ("deeplab_resnet101_coco", "jetson-orin"), ("deeplab_resnet101_coco", "x86-mkldnn"),
        ("resnet18_v1", "jetson-orin"), ("resnet18_v1", "x86-mkldnn")]
    assert not out.exists()


def test_unknown_target_fails_with_a_message(tmp_path, targets_dir):
    proc, _ = make(tmp_path, "artifacts", f"OUT={tmp_path / 'out'}", f"TARGETS_DIR={targets_dir}",
                   "TARGETS=jetsonn")
    assert proc.returncode != 0
    assert "unknown target 'jetsonn'" in proc.stderr and "infc targets" in proc.stderr


# --- one writer per build directory ------------------------------------------------------------

def _hold_lock(final: str, seconds: float, ready) -> None:
    with output_lock(Path(final)):
        ready.set()
        time.sleep(seconds)


def _start_holder(final: Path, seconds: float):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_lock, args=(str(final), seconds, ready))
    holder.start()
    assert ready.wait(30)
    return holder


def test_second_writer_waits_for_the_first_and_says_so(tmp_path):
    final = tmp_path / "model" / "x86-mkldnn"
    final.parent.mkdir()
    holder = _start_holder(final, 1.0)
    messages = []
    started = time.monotonic()
    with output_lock(final, on_wait=messages.append):
        waited = time.monotonic() - started
    holder.join(10)
    assert waited > 0.5
    assert messages == [f"infc: another infc process is building {final} (pid {holder.pid}); "
                        "waiting for it to finish ..."]


def test_waiting_for_a_lock_this_process_holds_fails_at_once(tmp_path):
    final = tmp_path / "model" / "x86-mkldnn"
    final.parent.mkdir()
    started = time.monotonic()
    with output_lock(final):
        with pytest.raises(OutputLocked, match="same process .* would never end"):
            with output_lock(final):
                pass
    assert time.monotonic() - started < 5


def test_lock_timeout_fails_clearly(tmp_path, monkeypatch):
    final = tmp_path / "model" / "jetson-orin"
    final.parent.mkdir()
    holder = _start_holder(final, 1.5)
    try:
        monkeypatch.setenv("INFC_LOCK_TIMEOUT", "0")
        with pytest.raises(OutputLocked, match="is building") as info:
            with output_lock(final):
                pass
        assert info.value.exit_code == 6 and "another --out" in info.value.one_line()
        monkeypatch.setenv("INFC_LOCK_TIMEOUT", "0.4")
        started = time.monotonic()
        with pytest.raises(OutputLocked, match="still building .* after 0.4 s"):
            with output_lock(final, on_wait=lambda text: None):
                pass
        assert time.monotonic() - started >= 0.4
        monkeypatch.setenv("INFC_LOCK_TIMEOUT", "soon")
        with pytest.raises(UserError, match="INFC_LOCK_TIMEOUT"):
            with output_lock(final):
                pass
    finally:
        holder.join(10)


def test_compile_waits_for_a_build_of_the_same_directory(tmp_path):
    out = tmp_path / "out"
    final = out / "mobilenet0.25" / "x86-mkldnn"
    final.parent.mkdir(parents=True)
    env = dict(os.environ, INFC_CACHE_DIR=str(tmp_path / "cache"))
    with output_lock(final):
        proc = subprocess.Popen([str(VENV / "bin" / "infc"), "compile", "mobilenet0.25", "--target", "x86-mkldnn",
                                 "--out", str(out), *FLAGS.split()], stderr=subprocess.PIPE, text=True, env=env)
        first_line = proc.stderr.readline()
        assert "another infc process is building" in first_line and "waiting" in first_line
        assert str(final) in first_line
        assert not final.exists()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert verify_build(final)
