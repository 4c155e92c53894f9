"""Reduced-precision builds end to end: INT8 on real (trained) weights, the accuracy budget, the fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler.errors import AccuracyBudgetMissed, VerificationFailed
from compiler.precision import PrecisionRequest, apply_request, reduced_kinds
from compiler.targets import resolve_target

from .conftest import read_manifest, run_cli

DIGITS_MODEL = "cifar_resnet20_v1"
DIGITS_SHAPE = (1, 3, 16, 16)


# Colour photographs that scikit-image ships inside its wheel (no download).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "retina.jpg", "rocket.jpg")


@pytest.fixture(autouse=True)
def private_calibration_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("INFC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "infc-cache"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight real photos, shrunk so that reading them costs nothing."""
    import skimage
    from PIL import Image

    directory = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        with Image.open(Path(skimage.data.__file__).parent / name) as image:
            image = image.convert("RGB")
            image.thumbnail((160, 160))
            image.save(directory / name)
    return directory


# --- a small CNN trained on scikit-learn's digits -----------------------------------------------

def _write_digit_images(directory: Path, images: np.ndarray, indices) -> None:
    from PIL import Image

    directory.mkdir(parents=True)
    for i in indices:
        pixels = (images[i] / 16.0 * 255).astype(np.uint8)
        rgb = Image.fromarray(pixels).resize(DIGITS_SHAPE[2:], Image.BILINEAR).convert("RGB")
        rgb.save(directory / f"digit_{i:04d}.png")


def _load_digit_images(directory: Path) -> np.ndarray:
    """The images exactly as infc preprocesses them for this model."""
    from compiler.calibration import load_image_set

    images = load_image_set(directory, (1,) + DIGITS_SHAPE[1:], DIGITS_MODEL, "classification")
    return np.concatenate(images.batches)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A cifar_resnet20_v1 trained on digits (16x16 RGB) for a few epochs; ~10 s on 2 cores."""
    from sklearn.datasets import load_digits

    from compiler.models import _construct, resolve_model
    from compiler.mxnet_env import mxnet

    mx = mxnet()
    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    order = np.random.RandomState(0).permutation(len(data.target))
    train, held_out = order[:1400], order[1400:]
    _write_digit_images(root / "train", data.images, train)
    _write_digit_images(root / "heldout", data.images, held_out)
    calib = root / "calib"
    calib.mkdir()
    for name in sorted(p.name for p in (root / "train").iterdir())[:64]:
        shutil.copy(root / "train" / name, calib / name)
    x_train, y_train = _load_digit_images(root / "train"), data.target[np.sort(train)]
    x_test, y_test = _load_digit_images(root / "heldout"), data.target[np.sort(held_out)]

    mx.random.seed(0)
    net = _construct(resolve_model(DIGITS_MODEL))
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize(static_alloc=True)
    trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.003})
    loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    shuffle = np.random.RandomState(1)
    for _ in range(6):
        for start in range(0, len(y_train), 64):
            batch = shuffle.permutation(len(y_train))[:64]
            with mx.autograd.record():
                value = loss(net(mx.nd.array(x_train[batch])), mx.nd.array(y_train[batch]))
            value.backward()
            trainer.step(len(batch))
    weights = root / "digits.params"
    net.save_parameters(str(weights))
    return {"root": root, "weights": weights, "calib": calib, "heldout": root / "heldout",
            "x_test": x_test, "y_test": y_test}


def _compile_digits(digits, out: Path, target, *extra: str) -> int:
    return run_cli(["compile", DIGITS_MODEL, "--target", target, "--weights", digits["weights"],
                    "--input-shape", "x".join(map(str, DIGITS_SHAPE)), "--out", out, "--quiet",
                    "--precision", "int8", "--calib-data", digits["calib"], "--val-data", digits["heldout"], *extra])


def _accuracy(run, x: np.ndarray, y: np.ndarray) -> float:
    predictions = [int(np.argmax(run(x[i:i + 1])[0])) for i in range(len(x))]
    return float(np.mean(np.asarray(predictions) == y))


@pytest.fixture(scope="module")
def digits_x86(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-x86")
    assert _compile_digits(digits, out, "x86-mkldnn") == 0
    return out / DIGITS_MODEL / "x86-mkldnn"


@pytest.fixture(scope="module")
def digits_cuda(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-cuda")
    assert _compile_digits(digits, out, "cuda-fp16") == 0
    return out / DIGITS_MODEL / "cuda-fp16"


def test_digits_int8_heldout_accuracy_within_one_point_on_both_int8_paths(digits, digits_x86, digits_cuda):
    from compiler.runner import load_mxnet, ort_session, run_mxnet, run_onnx

    x, y = digits["x_test"], digits["y_test"]
    fp32 = load_mxnet(digits_x86 / "mxnet/portable-symbol.json", digits_x86 / "mxnet/portable-0000.params")
    fp32_accuracy = _accuracy(lambda batch: run_mxnet(fp32, [batch]), x, y)
    assert fp32_accuracy >= 0.93, f"the digits model did not train ({fp32_accuracy:.3f})"
    int8 = load_mxnet(digits_x86 / "mxnet/int8-symbol.json", digits_x86 / "mxnet/int8-0000.params")
    accuracies = {"mxnet-int8 (x86)": _accuracy(lambda batch: run_mxnet(int8, [batch]), x, y)}
    for name, build in (("onnx-int8 (x86)", digits_x86), ("onnx-int8 (cuda-fp16)", digits_cuda)):
        session = ort_session(build / "onnx/model.int8.onnx")
        accuracies[name] = _accuracy(lambda batch: run_onnx(session, [batch]), x, y)
    for name, accuracy in accuracies.items():
        assert fp32_accuracy - accuracy <= 0.01, f"{name}: {accuracy:.4f} vs FP32 {fp32_accuracy:.4f}"


def test_digits_manifest_records_calibration_and_accuracy(digits_x86):
    manifest = read_manifest(digits_x86)
    assert manifest["status"] == "ok"
    assert manifest["target"]["precision"] == "int8"
    calibration = manifest["details"]["calibration"]
    assert calibration["count"] == 64 and len(calibration["sha256"]) == 64
    assert calibration["mode"] == "naive"
    assert manifest["details"]["evaluation"]["count"] == 397
    kinds = {a["kind"] for a in manifest["artifacts"]}
    assert {"mxnet-int8", "onnx-int8"} <= kinds
    checks = {(c["artifact"], c["name"]): c for c in manifest["verifications"]}
    for artifact in ("mxnet-int8", "onnx-int8"):
        budget = checks[(artifact, "accuracy-budget")]
        assert budget["status"] == "passed", budget["detail"]
        assert budget["numbers"]["top1_agreement"] >= 0.99
        assert budget["numbers"]["images"] == 397
    assert checks[("mxnet-int8", "reload-parity")]["status"] == "passed"
    assert checks[("onnx-int8", "onnx-checker")]["status"] == "passed"
    table = manifest["details"]["accuracy"]["table"]
    assert table[0].split()[:2] == ["artifact", "images"] and len(table) == 3


def test_mkldnn_int8_graph_is_quantized(digits_x86):
    graph = json.loads((digits_x86 / "mxnet/int8-symbol.json").read_text())
    quantized = [n for n in graph["nodes"] if n["name"].startswith("quantized_")]
    assert len(quantized) >= 15
    assert any(n["op"] == "_contrib_quantize_v2" for n in graph["nodes"])


def test_cuda_int8_onnx_is_symmetric_qdq_that_tensorrt_takes(digits_cuda):
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(digits_cuda / "onnx/model.int8.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [13]
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    initializers = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zero_point = initializers[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8
        assert not np.any(numpy_helper.to_array(zero_point))
    weight_scales = [numpy_helper.to_array(initializers[n.input[1]]) for n in qdq
                     if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert weight_scales and all(s.ndim == 1 and s.size > 1 for s in weight_scales[:-1])
    # FP32 at the edges: what TensorRT binds and the build kit feeds.
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    manifest = read_manifest(digits_cuda)
    assert {a["kind"] for a in manifest["artifacts"]} >= {"onnx", "onnx-fp16", "onnx-int8"}
    checks = {(c["artifact"], c["name"]): c["status"] for c in manifest["verifications"]}
    assert checks[("onnx-int8", "accuracy-budget")] == "passed"
    assert checks[("onnx-fp16", "accuracy-budget")] == "passed"


def test_tensorrt_kits_build_the_int8_engine_from_the_qdq_onnx(digits, digits_cuda, tmp_path):
    settings = json.loads((digits_cuda / "tensorrt/builder_settings.json").read_text())
    assert settings["precision"] == "int8" and settings["onnx"] == "../onnx/model.int8.onnx"
    assert settings["tolerance"]["rtol"] >= 1e-2
    assert _compile_digits(digits, tmp_path, "jetson-nano") == 0
    build = tmp_path / DIGITS_MODEL / "jetson-nano"
    settings = json.loads((build / "build_kit/builder_settings.json").read_text())
    assert settings["precision"] == "int8" and settings["onnx"] == "model.int8.onnx"
    assert (build / "build_kit/model.int8.onnx").read_bytes() == (build / "onnx/model.int8.onnx").read_bytes()
    import onnx

    assert onnx.load(str(build / "build_kit/model.int8.onnx")).ir_version == 7  # TensorRT 8.2's parser


def test_rebuild_reuses_the_calibration_and_says_so(digits, tmp_path, capsys):
    assert _compile_digits(digits, tmp_path, "x86-mkldnn") == 0
    first = read_manifest(tmp_path / DIGITS_MODEL / "x86-mkldnn")
    capsys.readouterr()
    assert run_cli(["compile", DIGITS_MODEL, "--target", "x86-mkldnn", "--weights", digits["weights"],
                    "--input-shape", "x".join(map(str, DIGITS_SHAPE)), "--out", tmp_path,
                    "--precision", "int8", "--calib-data", digits["calib"], "--val-data", digits["heldout"]]) == 0
    output = capsys.readouterr()
    second = read_manifest(tmp_path / DIGITS_MODEL / "x86-mkldnn")
    assert "reused cached calibration" in output.err + output.out
    assert second["details"]["int8"]["mxnet-int8"]["calibration_cache"] == "hit"
    assert second["details"]["int8"]["onnx-int8"]["calibration_cache"] == "hit"
    assert first["details"]["int8"]["mxnet-int8"]["calibration_key"] == \
        second["details"]["int8"]["mxnet-int8"]["calibration_key"]
    assert any("reused cached calibration" in note for note in second["notes"])
    # The same thresholds give the same INT8 files.
    hashes = [{a["path"]: a["sha256"] for a in m["artifacts"]} for m in (first, second)]
    assert hashes[0]["onnx/model.int8.onnx"] == hashes[1]["onnx/model.int8.onnx"]


def test_other_calibration_mode_is_another_cache_entry(digits, tmp_path):
    assert _compile_digits(digits, tmp_path, "x86-mkldnn", "--calib-mode", "entropy", "--calib-count", "16") == 0
    manifest = read_manifest(tmp_path / DIGITS_MODEL / "x86-mkldnn")
    assert manifest["details"]["calibration"]["mode"] == "entropy" and manifest["details"]["calibration"]["count"] == 16
    assert manifest["details"]["int8"]["mxnet-int8"]["calibration_cache"] == "miss"


# --- budget and fallback -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_digits(digits):
    """The digits model made hostile to INT8 without changing its FP32 function.

    Channel 0 of the first residual block's inner activation is pushed to
    ~1000 and the convolution reading it ignores that channel: FP32 outputs
    are unchanged, but a per-tensor INT8 scale for that input crushes the
    other channels to a level or two.
    """
    from compiler.mxnet_env import mxnet

    mx = mxnet()
    params = mx.nd.load(str(digits["weights"]))
    beta = params["features.2.0.body.1.beta"].asnumpy()
    beta[0] = 1000.0
    params["features.2.0.body.1.beta"] = mx.nd.array(beta)
    weight = params["features.2.0.body.3.weight"].asnumpy()
    weight[:, 0] = 0.0
    params["features.2.0.body.3.weight"] = mx.nd.array(weight)
    path = digits["root"] / "hostile.params"
    mx.nd.save(str(path), params)
    return {**digits, "weights": path}


def _strict_target(tmp_path: Path, max_fp32_layers: int) -> Path:
    text = (Path(resolve_target("x86-mkldnn").source)).read_text()
    path = tmp_path / "strict.toml"
    path.write_text(text.replace('name = "x86-mkldnn"', 'name = "x86-strict"')
                    + f"\n[quantize]\nmax_fp32_layers = {max_fp32_layers}\n")
    return path


def test_fallback_puts_the_sensitive_layer_back_into_fp32_and_meets_the_budget(hostile_digits, tmp_path):
    assert _compile_digits(hostile_digits, tmp_path, "x86-mkldnn") == 0
    manifest = read_manifest(tmp_path / DIGITS_MODEL / "x86-mkldnn")
    victim = manifest["details"]["layer_sensitivity"][0]["layer"]
    assert victim == "cifarresnetv10_stage1_conv1_fwd"
    for artifact in ("mxnet-int8", "onnx-int8"):
        entry = manifest["details"]["accuracy"]["artifacts"][artifact]
        rounds = entry["fallback"]
        assert len(rounds) >= 2 and rounds[0]["kept_fp32"] == [] and rounds[0]["drop_pp"] > 5, artifact
        assert rounds[1]["kept_fp32"] == [victim]
        assert entry["kept_fp32"] == rounds[-1]["kept_fp32"] and rounds[-1]["drop_pp"] <= 1.0, artifact
        assert entry["drop_pp"] == rounds[-1]["drop_pp"]
    assert manifest["details"]["int8"]["mxnet-int8"]["kept_fp32"][0] == victim
    graph = json.loads((tmp_path / DIGITS_MODEL / "x86-mkldnn/mxnet/int8-symbol.json").read_text())
    kept_nodes = manifest["details"]["int8"]["mxnet-int8"]["kept_fp32_fused"]
    assert not any(n["name"] == f"quantized_{name}" for n in graph["nodes"] for name in kept_nodes)
    checks = {(c["artifact"], c["name"]): c for c in manifest["verifications"]}
    assert "kept in FP32 after" in checks[("onnx-int8", "accuracy-budget")]["detail"]


def test_missed_budget_exits_7_with_the_table_and_keeps_the_failed_build(hostile_digits, tmp_path, capsys):
    assert _compile_digits(hostile_digits, tmp_path, _strict_target(tmp_path, max_fp32_layers=0)) == \
        AccuracyBudgetMissed.exit_code
    err = capsys.readouterr().err
    assert "accuracy budget missed" in err and "MISSED" in err and "budget 1 pp" in err
    assert err.splitlines()[0].startswith("infc: accuracy budget missed: ")
    assert not (tmp_path / DIGITS_MODEL / "x86-strict").exists()
    manifest = read_manifest(tmp_path / DIGITS_MODEL / "x86-strict.failed")
    assert manifest["status"] == "failed"
    missed = {c["artifact"] for c in manifest["verifications"]
              if c["name"] == "accuracy-budget" and c["status"] == "failed"}
    assert missed == {"mxnet-int8", "onnx-int8"}
    assert all(len(a["fallback"]) == 1 for a in manifest["details"]["accuracy"]["artifacts"].values())


# --- requests that make no sense fail before any work ----------------------------------------------

@pytest.mark.parametrize("request_kwargs, message", [
    ({"precision": "int8"}, "needs calibration images"),
    ({"calib_data": Path("x")}, "--calib-data applies to reduced-precision builds"),
    ({"precision": "int4", "calib_data": Path("x")}, "unknown --precision"),
    ({"precision": "fp16", "calib_data": Path("x")}, "calibrate INT8"),
    ({"precision": "int8", "calib_data": Path("x"), "calib_mode": "percentile"}, "unknown --calib-mode"),
    ({"precision": "bf16", "max_accuracy_drop": 150.0}, "not between 0 and 100"),
])
def test_bad_precision_requests_are_user_errors(request_kwargs, message):
    from compiler.errors import UserError

    with pytest.raises(UserError, match=message):
        apply_request(resolve_target("x86-mkldnn"), PrecisionRequest(**request_kwargs))


def test_precision_adds_the_right_artifacts_per_device():
    assert reduced_kinds("int8", "x86", True) == ("mxnet-int8", "onnx-int8")
    assert reduced_kinds("int8", "jetson", True) == ("onnx-int8",)
    assert reduced_kinds("fp16", "cuda", True) == ("mxnet-fp16",)
    assert reduced_kinds("bf16", "x86", True) == ("mxnet-bf16",)
    assert reduced_kinds("fp32", "x86", True) == ()
    from compiler.errors import UserError

    with pytest.raises(UserError, match="bf16 is for x86"):
        reduced_kinds("bf16", "jetson", True)
    with pytest.raises(UserError, match="no fast path on x86"):
        reduced_kinds("fp16", "x86", True)


def test_request_overrides_mode_and_budget_and_keeps_the_rest(photos):
    base = resolve_target("jetson-orin")
    target = apply_request(base, PrecisionRequest("int8", photos, calib_mode="entropy", max_accuracy_drop=2.5))
    assert target.precision == "int8" and target.emit == base.emit + ("onnx-int8",)
    assert target.quantize.calib_mode == "entropy" and target.accuracy.max_drop == 2.5
    assert target.content_hash() != base.content_hash()
    assert apply_request(base, PrecisionRequest()) is base


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "has no images"),
    ("text", "notes.txt, which is not a .jpg/.jpeg/.png image"),
    ("file", "is not a directory"),
])
def test_cli_rejects_bad_calibration_directories_in_one_line(tmp_path, capsys, setup, message):
    directory = tmp_path / "calib"
    if setup == "empty":
        directory.mkdir()
    elif setup == "text":
        directory.mkdir()
        (directory / "notes.txt").write_text("not an image")
    elif setup == "file":
        directory.write_text("x")
    code = run_cli(["compile", "resnet18_v1", "--target", "x86-mkldnn", "--random-init", "--out", tmp_path / "out",
                    "--precision", "int8", "--calib-data", directory])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "resnet18_v1" / "x86-mkldnn").exists()


def test_cli_rejects_a_corrupt_image(tmp_path, capsys):
    directory = tmp_path / "calib"
    directory.mkdir()
    (directory / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    code = run_cli(["compile", "cifar_resnet20_v1", "--target", "x86-mkldnn", "--random-init",
                    "--out", tmp_path / "out", "--quiet", "--precision", "int8", "--calib-data", directory])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "broken.jpg is not a readable image" in err and len(err.splitlines()) == 1


# --- BF16 / FP16 through MXNet AMP ---------------------------------------------------------------------

def test_bf16_on_x86_is_built_and_verified_where_the_cpu_can(tmp_path, photos):
    from compiler.mxnet_env import cpu_supports

    assert run_cli(["compile", DIGITS_MODEL, "--target", "x86-mkldnn", "--random-init", "--input-shape", "1x3x32x32",
                    "--out", tmp_path, "--quiet", "--precision", "bf16", "--val-data", photos,
                    "--max-accuracy-drop", "100"]) == 0
    manifest = read_manifest(tmp_path / DIGITS_MODEL / "x86-mkldnn")
    graph = json.loads((tmp_path / DIGITS_MODEL / "x86-mkldnn/mxnet/bf16-symbol.json").read_text())
    assert any(n["op"] == "amp_cast" and n["attrs"]["dtype"] == "bfloat16" for n in graph["nodes"])
    assert manifest["details"]["amp"]["mxnet-bf16"]["forced_fp32_ops"] == []
    checks = {(c["artifact"], c["name"]): c for c in manifest["verifications"]}
    parity = checks[("mxnet-bf16", "reload-parity")]
    if cpu_supports("avx512_bf16"):
        assert parity["status"] == "passed" and 0 < parity["numbers"]["rel_error"] <= 1e-2
        assert checks[("mxnet-bf16", "accuracy-budget")]["numbers"]["images"] == len(list(photos.iterdir()))
    else:
        assert parity["status"] == "not run" and "avx512_bf16" in parity["detail"]


def _pooling_branch_concat_block(tmp_path: Path):
    """deeplab's ASPP in miniature: a convolution branch concatenated with an
    image-pooling branch that ends in BilinearResize2D (FP32-only in MXNet's BF16 lists)."""
    from compiler.mxnet_env import mxnet

    mx = mxnet()
    nn = mx.gluon.nn

    class PoolingBranchConcat(nn.HybridBlock):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(4, 3, padding=1)
            self.pool_conv = nn.Conv2D(4, 1)

        def hybrid_forward(self, F, x):
            pooled = self.pool_conv(F.contrib.AdaptiveAvgPooling2D(x, output_size=1))
            features = self.conv(x)
            # Two outputs, as deeplab's main and auxiliary heads.
            return F.concat(features, F.contrib.BilinearResize2D(pooled, height=8, width=8), dim=1), features

    net = PoolingBranchConcat()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    sample = mx.nd.array(np.random.default_rng(0).standard_normal((1, 3, 8, 8)))
    expected = [out.asnumpy() for out in net(sample)]
    net.export(str(tmp_path / "aspp"))
    block = mx.gluon.SymbolBlock.imports(str(tmp_path / "aspp-symbol.json"), ["data"],
                                         str(tmp_path / "aspp-0000.params"))
    block(sample)
    return block, sample, expected


def test_bf16_keeps_a_mixed_type_concat_in_fp32_instead_of_refusing(tmp_path):
    from compiler.mxnet_env import cpu_supports, mxnet
    from compiler.precision import _amp_convert, _export_amp
    from compiler.runner import load_mxnet

    mx = mxnet()
    from mxnet.contrib import amp  # after mxnet(): it sets numpy.bool for MXNet 1.9.1
    block, sample, expected = _pooling_branch_concat_block(tmp_path)
    with pytest.raises(mx.base.MXNetError, match="Non-uniform data type in Concat"):
        amp.convert_hybrid_block(block, target_dtype="bfloat16", ctx=mx.cpu())  # MXNet's own lists
    converted, forced = _amp_convert(block, "bfloat16")
    assert "Concat" in forced
    _export_amp(converted, ["data"], tmp_path / "bf16-symbol.json", tmp_path / "bf16-0000.params")
    nodes = json.loads((tmp_path / "bf16-symbol.json").read_text())["nodes"]
    concat = next(n for n in nodes if n["op"] == "Concat")
    conv_branch, pool_branch = (nodes[i] for i, *_ in concat["inputs"])
    assert conv_branch["op"] == "amp_cast" and conv_branch["attrs"]["dtype"] == "float32"  # BF16 convolution, cast up
    assert pool_branch["op"] == "_contrib_BilinearResize2D"  # FP32 already
    assert any(n["op"] == "amp_cast" and n["attrs"]["dtype"] == "bfloat16" for n in nodes)
    if cpu_supports("avx512_bf16"):
        reloaded = load_mxnet(tmp_path / "bf16-symbol.json", tmp_path / "bf16-0000.params", ["data"])
        got = [out.astype("float32").asnumpy() for out in reloaded(sample)]
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected):
            assert 0 < np.abs(g - e).max() <= 2e-2 * np.abs(e).max()  # BF16 rounding, no more
    # A graph MXNet converts as it is keeps MXNet's lists.
    assert _amp_convert(block, "float16")[1] == []


def test_fp16_for_cuda_is_built_and_honestly_not_run_here(tmp_path):
    assert run_cli(["compile", DIGITS_MODEL, "--target", "cuda-fp16", "--random-init", "--input-shape", "1x3x32x32",
                    "--out", tmp_path, "--quiet", "--precision", "fp16"]) == 0
    build = tmp_path / DIGITS_MODEL / "cuda-fp16"
    manifest = read_manifest(build)
    assert {"mxnet-fp16", "onnx-fp16"} <= {a["kind"] for a in manifest["artifacts"]}
    graph = json.loads((build / "mxnet/fp16-symbol.json").read_text())
    assert any(n["op"] == "amp_cast" and n["attrs"]["dtype"] == "float16" for n in graph["nodes"])
    checks = {(c["artifact"], c["name"]): c for c in manifest["verifications"]}
    assert checks[("mxnet-fp16", "reload-parity")]["status"] == "not run"
    assert "FP16 GEMM on CPU" in checks[("mxnet-fp16", "reload-parity")]["detail"]
    # The ONNX FP16 artifact does run here, and is measured against the budget on the seeded input.
    assert checks[("onnx-fp16", "accuracy-budget")]["status"] == "passed"
    assert any("seeded reference input" in note for note in manifest["notes"])


def test_verify_reruns_reduced_precision_artifacts(digits_x86, tmp_path, capsys):
    import shutil

    from compiler.manifest import sha256_path, write_json_atomic

    assert run_cli(["verify", digits_x86, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    reruns = {c["artifact"]: c["status"] for c in report["checks"] if c["name"] == "rerun-consistency"}
    assert reruns == {"mxnet-int8": "passed", "onnx-int8": "passed"}
    # An artifact that no longer computes what it did at build time fails, even with consistent hashes.
    build = tmp_path / "copy"
    shutil.copytree(digits_x86, build)
    recorded = build / "reference/mxnet-int8-outputs.npz"
    outputs = {k: v * 2.0 + 1.0 for k, v in np.load(recorded).items()}
    np.savez(recorded, **outputs)
    manifest = read_manifest(build)
    for artifact in manifest["artifacts"]:
        if artifact["path"] == "reference/mxnet-int8-outputs.npz":
            artifact["sha256"], artifact["bytes"] = sha256_path(recorded), recorded.stat().st_size
    write_json_atomic(build / "manifest.json", manifest)
    assert run_cli(["verify", build]) == VerificationFailed.exit_code
    assert "mxnet-int8 failed rerun-consistency" in capsys.readouterr().err
