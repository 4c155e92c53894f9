"""INT8 building blocks on a small real graph: layer naming, exclusions, sensitivity, Q/DQ rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compiler import quantize
from compiler.mxnet_env import mxnet

MODEL, SHAPE = "cifar_resnet20_v1", (1, 3, 16, 16)


def _export(net, prefix: Path) -> tuple[Path, Path]:
    mx = mxnet()
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.zeros(SHAPE))
    net.export(str(prefix))
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """cifar_resnet20_v1 with random weights and BatchNorm statistics, exported like the pipeline does."""
    from compiler.models import WeightsRequest, load_model, resolve_model

    model = load_model(resolve_model(MODEL), WeightsRequest("random"), SHAPE)
    root = tmp_path_factory.mktemp("quantize")
    symbol, params = _export(model.net, root / "fp32")
    batches = [np.random.RandomState(i).standard_normal(SHAPE).astype(np.float32) for i in range(4)]
    return {"net": model.net, "symbol": symbol, "params": params, "batches": batches, "root": root}


def test_compute_layers_are_the_convolutions_and_the_classifier(fp32):
    layers = quantize.compute_layers(fp32["symbol"])
    assert len(layers) == 22 and layers[0].endswith("conv0_fwd") and layers[-1].endswith("dense0_fwd")


def test_every_layer_maps_to_a_fused_mkldnn_node(fp32):
    symbol, _, _ = quantize.load_symbol_params(fp32["symbol"], fp32["params"])
    mapping = quantize.fused_layer_names(symbol.get_backend_symbol("MKLDNN_QUANTIZE"))
    layers = quantize.compute_layers(fp32["symbol"])
    assert set(layers) <= set(mapping)
    assert mapping[layers[0]].startswith("sg_mkldnn_conv") and mapping[layers[-1]].startswith("sg_mkldnn_fully")


def test_mxnet_int8_keeps_requested_layers_in_fp32_and_reuses_known_ranges(fp32):
    mx = mxnet()
    first = quantize.quantize_mxnet(fp32["symbol"], fp32["params"], "data", fp32["batches"], "naive")
    assert first.calibrated_now and set(first.calibrated_now) <= set(first.thresholds)
    layer = quantize.compute_layers(fp32["symbol"])[5]
    second = quantize.quantize_mxnet(fp32["symbol"], fp32["params"], "data", fp32["batches"], "naive",
                                     keep_fp32=[layer], known=first.thresholds)
    assert second.calibrated_now == []  # everything it needed was known
    prefix = fp32["root"] / "int8-keep"
    second.block.hybridize(static_alloc=True, static_shape=True)
    second.block(mx.nd.array(fp32["batches"][0]))
    second.block.export(str(prefix))
    names = {n["name"] for n in json.loads(Path(f"{prefix}-symbol.json").read_text())["nodes"]}
    symbol, _, _ = quantize.load_symbol_params(fp32["symbol"], fp32["params"])
    backend = symbol.get_backend_symbol("MKLDNN_QUANTIZE")
    victim = quantize.fused_layer_names(backend)[layer]
    producers = quantize.input_producers(backend, [victim])
    assert len(producers) == 1  # the previous block's conv+sum, whose INT8 output would feed the FP32 layer
    assert set(second.excluded_fused) == {victim, *producers, *second.backend_workaround}
    for name in (victim, *producers):
        assert name in names and f"quantized_{name}" not in names


def test_signed_residuals_into_relu_sums_are_kept_in_fp32(fp32):
    """CIFAR ResNet v1's stem and downsample shortcuts end without ReLU: their sums get the workaround."""
    result = quantize.quantize_mxnet(fp32["symbol"], fp32["params"], "data", fp32["batches"], "naive")
    assert len(result.backend_workaround) == 3
    assert all(name.startswith("sg_mkldnn_conv_bn_add_act") for name in result.backend_workaround)
    assert set(result.backend_workaround) <= set(result.excluded_fused)


def test_sensitivity_finds_the_layer_whose_input_has_an_outlier_channel(fp32):
    """One activation channel 1000x the others sets the per-tensor INT8 scale, and crushes the rest."""
    mx = mxnet()
    _, args, auxs = quantize.load_symbol_params(fp32["symbol"], fp32["params"])
    layers = quantize.compute_layers(fp32["symbol"])
    victim = layers[2]  # stage1 conv1, fed by ReLU(BatchNorm(stage1 conv0))
    beta = args["cifarresnetv10_stage1_batchnorm0_beta"].asnumpy()
    beta[0] = 1000.0
    args["cifarresnetv10_stage1_batchnorm0_beta"] = mx.nd.array(beta)
    weight = args[victim.replace("_fwd", "_weight")].asnumpy()
    weight[:, 0] = 0  # the outlier channel itself contributes nothing to the output
    args[victim.replace("_fwd", "_weight")] = mx.nd.array(weight)
    params = fp32["root"] / "outlier-0000.params"
    mx.nd.save(str(params), {**{f"arg:{k}": v for k, v in args.items()}, **{f"aux:{k}": v for k, v in auxs.items()}})
    scores = quantize.layer_sensitivity(fp32["symbol"], params, "data", fp32["batches"][:2])
    assert set(scores) == set(layers)
    assert max(scores, key=scores.get) == victim
    assert scores[victim] > 10 * sorted(scores.values())[-2]


@pytest.fixture(scope="module")
def fp32_onnx(fp32):
    from compiler.onnx_export import export_onnx

    path = fp32["root"] / "model.onnx"
    export_onnx(fp32["symbol"], fp32["params"], [SHAPE], path, 13, 8)
    return path


def test_qdq_onnx_is_symmetric_per_channel_and_honours_exclusions(fp32, fp32_onnx, tmp_path):
    import onnx

    layers = quantize.compute_layers(fp32["symbol"])
    result = quantize.quantize_onnx(fp32_onnx, tmp_path / "q.onnx", "data", fp32["batches"], "naive", 13, 7,
                                    tmp_path / "cache.json", keep_fp32=[layers[0]])
    assert not result.cache_hit and (tmp_path / "cache.json").is_file()
    summary = result.summary
    assert summary["symmetric"] and summary["problems"] == []
    assert summary["quantized_layers"] == len(layers) - 1 == summary["per_channel_weights"]
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 7
    excluded = [n for n in model.graph.node if n.name in result.excluded_nodes]
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    assert len(excluded) == 1 and all(producers.get(i) != "DequantizeLinear" for i in excluded[0].input)
    again = quantize.quantize_onnx(fp32_onnx, tmp_path / "q2.onnx", "data", fp32["batches"], "naive", 13, 7,
                                   tmp_path / "cache.json", keep_fp32=[layers[0]])
    assert again.cache_hit
    assert (tmp_path / "q.onnx").read_bytes() == (tmp_path / "q2.onnx").read_bytes()


def test_qdq_summary_flags_asymmetric_zero_points():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q0"),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq0")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                     helper.make_tensor("zp", TensorProto.UINT8, [], [128])])
    summary = quantize.qdq_summary(helper.make_model(graph))
    assert not summary["symmetric"]
    assert any("UINT8" in p for p in summary["problems"]) and any("non-zero" in p for p in summary["problems"])
