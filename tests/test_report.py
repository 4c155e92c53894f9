"""`infc report`: a self-contained HTML page, rendered in a real headless browser."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest

from compiler.bench import BenchOptions, bench_build
from compiler.errors import UserError
from compiler.manifest import load_manifest
from compiler.profiling import ProfileOptions, profile_build
from compiler.report import latency_chart

from .conftest import run_cli

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                                               "(apt-get install chromium)")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed (apt-get install graphviz)")


@pytest.fixture(scope="module")
def measured(small_builds, tmp_path_factory):
    """Bench and profile results of the small x86 build, kept outside the shared build directory."""
    out = tmp_path_factory.mktemp("measured")
    # The fused artifacts are enough for every section (the baseline always runs): keeps the test short.
    bench = bench_build(small_builds["x86-mkldnn"], BenchOptions(iterations=3, warmup=1, artifacts=("mxnet-mkldnn",),
                                                                 output=out / "bench.json"))
    profile = profile_build(small_builds["x86-mkldnn"], ProfileOptions(iterations=2, artifacts=("mxnet-mkldnn", "onnx"),
                                                                       out_dir=out / "profile"))
    return small_builds["x86-mkldnn"], bench, profile


def chromium(*args: str, tmp_path) -> subprocess.CompletedProcess:
    profile_dir = tmp_path / "chromium-profile"
    profile_dir.mkdir(exist_ok=True)
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@needs_chromium
@needs_dot
def test_report_renders_in_headless_chromium(capsys, measured, tmp_path):
    from PIL import Image

    build, bench, profile = measured
    model = load_manifest(build)["model"]["name"]
    report = tmp_path / "report.html"
    assert run_cli(["report", build, "-o", report, "--bench", bench.path, "--profile-dir", profile.out_dir]) == 0
    assert str(report) in capsys.readouterr().out
    page = report.read_text()
    for section in ("id='manifest'", "id='verification'", "alt='latency chart'", "alt='roofline chart'",
                    "op type", "Fusion: op counts", "alt='graph of "):
        assert section in page, section
    # Self-contained: every image is inline and nothing is fetched.
    sources = re.findall(r"src='([^']*)'", page)
    assert sources and all(re.match(r"data:image/(png|svg\+xml);base64,", s) for s in sources)
    assert "http://" not in page and "https://" not in page

    screenshot = tmp_path / "shot.png"
    result = chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", report.as_uri(), tmp_path=tmp_path)
    assert screenshot.exists(), result.stderr[-2000:]
    image = Image.open(screenshot).convert("L")
    assert image.size == (1280, 2000)
    histogram = image.histogram()
    non_white = sum(histogram[:240]) / sum(histogram)
    assert non_white > 0.02, f"screenshot is blank ({non_white:.3%} non-white pixels)"
    assert len([count for count in histogram if count]) > 20  # text and charts, not a flat fill

    dom = chromium("--dump-dom", report.as_uri(), tmp_path=tmp_path).stdout
    assert model in dom and "<h1>" in dom


def test_report_without_measurements_says_what_to_run(capsys, small_builds, tmp_path):
    report = tmp_path / "r.html"
    assert run_cli(["report", small_builds["jetson-orin"], "-o", report, "--profile-dir", tmp_path / "none-yet"]) == \
        UserError.exit_code
    assert "profile.json" in capsys.readouterr().err
    assert run_cli(["report", small_builds["jetson-orin"], "-o", report, "--json"]) == 0
    page = report.read_text()
    assert "infc bench BUILD_DIR" in page and "infc profile BUILD_DIR" in page
    assert "deferred to the device" in page  # the engine's state from the manifest
    assert "onnxruntime-parity" in page and "random-init" in page


def test_report_refuses_bench_results_of_another_model(capsys, measured, small_builds, tmp_path):
    _, bench, _ = measured
    import json

    other = json.loads(bench.path.read_text())
    other["model"] = "another_model"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    assert run_cli(["report", small_builds["x86-mkldnn"], "-o", tmp_path / "r.html", "--bench", path]) == \
        UserError.exit_code
    assert "another_model" in capsys.readouterr().err
    assert run_cli(["report", small_builds["x86-mkldnn"], "-o", tmp_path / "r.html", "--bench", tmp_path / "no.json"]) \
        == UserError.exit_code
    assert not (tmp_path / "r.html").exists()


def test_latency_chart_is_a_png(measured):
    from PIL import Image

    _, bench, _ = measured
    uri = latency_chart(bench.data)
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.format == "PNG" and image.size[0] > 300
