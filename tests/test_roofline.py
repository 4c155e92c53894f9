"""FLOP counting from ONNX and MXNet graphs, and the GEMM ceilings."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.roofline import (achieved, ceiling_for, count_mxnet_flops, count_onnx_flops, int8_gemm_model,
                               measure_fp32_ceiling, measure_int8_ceiling)


def _save(tmp_path, nodes, inputs, outputs, initializers, name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _weights(name, shape):
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


def test_onnx_conv_grouped_strided_and_dense_count_exactly(tmp_path):
    # Conv 8->16, 3x3, groups 2, stride 2, pad 1 on 2x8x10x10: output 2x16x5x5,
    # each output sums (8/2)*3*3 = 36 products.
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=2)
    flatten = helper.make_node("Flatten", ["c"], ["f"])
    # Gemm with transB: f is 2x400, weight 10x400 -> 2x10, K = 400.
    gemm = helper.make_node("Gemm", ["f", "g", "b"], ["y"], transB=1)
    path = _save(tmp_path, [conv, flatten, gemm], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 10, 10])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                 [_weights("w", [16, 4, 3, 3]), _weights("g", [10, 400]), _weights("b", [10])])
    count = count_onnx_flops(path)
    assert count.by_op == {"Conv": 2 * (2 * 16 * 5 * 5) * 36, "Gemm": 2 * 2 * 10 * 400}
    assert count.total == sum(count.by_op.values()) and count.batch == 2 and count.counted_nodes == 2
    assert count.per_sample == count.total / 2


def test_onnx_transposed_conv_and_batched_matmul(tmp_path):
    # ConvTranspose 4->6, 2x2, stride 2 on 1x4x5x5: every input element feeds 6*2*2 outputs.
    deconv = helper.make_node("ConvTranspose", ["x", "w"], ["d"], kernel_shape=[2, 2], strides=[2, 2])
    reshape = helper.make_node("Reshape", ["d", "shape"], ["r"])
    matmul = helper.make_node("MatMul", ["r", "m"], ["y"])  # [6, 10, 10] x [10, 3] -> [6, 10, 3]
    shape = numpy_helper.from_array(np.array([6, 10, 10], dtype=np.int64), "shape")
    path = _save(tmp_path, [deconv, reshape, matmul], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 10, 3])],
                 [_weights("w", [4, 6, 2, 2]), shape, _weights("m", [10, 3])])
    count = count_onnx_flops(path)
    assert count.by_op == {"ConvTranspose": 2 * (4 * 5 * 5) * (6 * 2 * 2), "MatMul": 2 * (6 * 10 * 3) * 10}


def test_mxnet_symbol_count_matches_hand_count(tmp_path):
    from compiler.mxnet_env import mxnet

    mx = mxnet()
    data = mx.sym.var("data")
    conv = mx.sym.Convolution(data, kernel=(3, 3), num_filter=12, pad=(1, 1), num_group=3, name="conv")
    dense = mx.sym.FullyConnected(mx.sym.flatten(conv), num_hidden=7, name="fc")
    path = tmp_path / "net-symbol.json"
    dense.save(str(path))
    count = count_mxnet_flops(path, {"data": [2, 6, 8, 8]})
    assert count.by_op == {"Convolution": 2 * (2 * 12 * 8 * 8) * (2 * 3 * 3),
                           "FullyConnected": 2 * (2 * 7) * (12 * 8 * 8)}


def test_onnx_and_mxnet_counts_agree_on_a_real_build(small_builds):
    from compiler.manifest import load_manifest

    build = small_builds["x86-mkldnn"]
    manifest = load_manifest(build)
    shape = next(iter(manifest["model"]["inputs"].values()))["shape"]
    from_onnx = count_onnx_flops(build / "onnx/model.onnx")
    from_mxnet = count_mxnet_flops(build / "mxnet/portable-symbol.json", {"data": shape})
    assert from_onnx.total == from_mxnet.total > 0
    assert from_onnx.counted_nodes == from_mxnet.counted_nodes


def test_int8_ceiling_runs_a_real_integer_gemm():
    import onnxruntime as ort

    model = int8_gemm_model(64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).integers(0, 255, size=(64, 64), dtype=np.uint8)
    (out,) = session.run(None, {"A": a})
    weight = numpy_helper.to_array(model.graph.initializer[0])
    assert out.dtype == np.int32 and weight.dtype == np.int8
    np.testing.assert_array_equal(out, a.astype(np.int64) @ weight.astype(np.int64))


def test_ceilings_are_the_best_gemm_of_every_library_and_size_tried():
    fp32 = measure_fp32_ceiling((128, 256), budget_s=0.02)
    int8 = measure_int8_ceiling((128, 256), budget_s=0.02, threads=1)
    assert [c["method"].split()[0] for c in fp32.candidates] == ["numpy", "onnxruntime", "onnxruntime"]
    assert [c["size"] for c in int8.candidates] == [128, 256]
    for ceiling in (fp32, int8):
        assert all(c["runs"] >= 3 for c in ceiling.candidates)
        for candidate in ceiling.candidates:
            assert candidate["gflops"] == pytest.approx(2 * candidate["size"] ** 3 / candidate["seconds"] / 1e9)
        assert ceiling.gflops == max(c["gflops"] for c in ceiling.candidates)
        assert ceiling.method == max(ceiling.candidates, key=lambda c: c["gflops"])["method"]


def test_each_precision_is_held_against_its_own_ceiling():
    assert ceiling_for("fp32")[0] == "fp32"
    assert ceiling_for("int8")[0] == "int8"
    assert ceiling_for("fp16")[0] == "fp32" and "fp16" in ceiling_for("fp16")[1]
    numbers = achieved(flops_per_inference=4e9, p50_seconds=0.02, ceiling_gflops=400.0)
    assert numbers["achieved_gflops"] == pytest.approx(200.0)
    assert numbers["percent_of_ceiling"] == pytest.approx(50.0)
    assert achieved(4e9, 0.02, None)["percent_of_ceiling"] is None
