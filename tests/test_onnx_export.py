from __future__ import annotations

import numpy as np
import onnx
import pytest

from compiler.onnx_export import (check_onnx, convert_to_fp16, ensure_onnx_mapping, export_onnx, io_signature,
                                  pinned_opset, restore_fp32_outputs)


def test_mapping_stand_in_has_the_tables_the_exporter_reads():
    ensure_onnx_mapping()
    assert onnx.mapping.NP_TYPE_TO_TENSOR_TYPE[np.dtype("float32")] == onnx.TensorProto.FLOAT
    assert onnx.mapping.NP_TYPE_TO_TENSOR_TYPE[np.dtype("int64")] == onnx.TensorProto.INT64
    assert onnx.mapping.TENSOR_TYPE_TO_NP_TYPE[onnx.TensorProto.FLOAT16] == np.dtype("float16")


def test_opset_pin_is_restored():
    newest = onnx.defs.onnx_opset_version()
    with pinned_opset(13):
        assert onnx.defs.onnx_opset_version() == 13
    assert onnx.defs.onnx_opset_version() == newest > 13


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from compiler.mxnet_env import mxnet
    from compiler.models import WeightsRequest, load_model, reference_input, resolve_model

    mx = mxnet()
    tmp = tmp_path_factory.mktemp("export")
    shape = (1, 3, 32, 32)
    model = load_model(resolve_model("cifar_resnet20_v1"), WeightsRequest("random"), shape)
    x = reference_input(shape, 0)
    reference = model.net(mx.nd.array(x)).asnumpy()
    model.net.hybridize(static_alloc=True, static_shape=True)
    model.net(mx.nd.array(x))
    model.net.export(str(tmp / "net"))
    path = tmp / "model.onnx"
    info = export_onnx(tmp / "net-symbol.json", tmp / "net-0000.params", [shape], path, opset=13, ir_version=7)
    return path, info, x, reference


def test_export_declares_the_requested_opset_and_ir(exported):
    path, info, _, _ = exported
    model = onnx.load(str(path))
    assert model.ir_version == 7
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 13)]
    check_onnx(path)
    assert info["initializers_moved_out_of_inputs"] > 0


def test_initializers_are_not_graph_inputs_and_nodes_are_named(exported):
    model = onnx.load(str(exported[0]))
    initializers = {i.name for i in model.graph.initializer}
    assert [i.name for i in model.graph.input] == ["data"]
    assert not initializers & {i.name for i in model.graph.input}
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    # Stored as raw bytes, not Python float lists.
    assert all(i.raw_data for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims)


def test_onnxruntime_matches_mxnet(exported):
    import onnxruntime as ort

    path, _, x, reference = exported
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"data": x})
    assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()


def test_fp16_has_fp32_io_and_half_weights(exported, tmp_path):
    import onnxruntime as ort

    path, _, x, reference = exported
    half = tmp_path / "model.fp16.onnx"
    convert_to_fp16(path, half)
    check_onnx(half)
    signature = io_signature(half)
    assert all(v["dtype"] == "float32" for v in signature["inputs"].values())
    assert all(v["dtype"] == "float32" for v in signature["outputs"].values())
    model = onnx.load(str(half))
    weight_types = {i.data_type for i in model.graph.initializer if len(i.dims) == 4}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    assert model.ir_version == 7
    (out,) = ort.InferenceSession(str(half), providers=["CPUExecutionProvider"]).run(None, {"data": x})
    rel = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < rel < 1e-2  # really half precision, and still close


def test_batchnorm_folding_preserves_the_function(exported, tmp_path):
    import onnxruntime as ort

    from compiler.onnx_export import fold_batchnorm_into_conv

    path, _, x, reference = exported
    model = onnx.load(str(path))
    before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    folded = fold_batchnorm_into_conv(model)
    assert folded > 0 and sum(n.op_type == "BatchNormalization" for n in model.graph.node) == before - folded
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # judge our fold, not ORT's
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"data": x})
    assert np.abs(out - reference).max() <= 1e-5 * np.abs(reference).max() + 1e-6


def test_fp16_outputs_behind_fp32_ops_are_cast_back():
    """onnxconverter-common leaves such outputs FP16 (Resize is kept in FP32 and cast down again)."""
    from onnx import TensorProto, helper

    # x (fp16) -> Cast to fp32 -> Identity (a "blocked" op) -> Cast to fp16 -> y, as the converter emits.
    nodes = [
        helper.make_node("Cast", ["x"], ["r_input_cast_0"], to=TensorProto.FLOAT, name="c1"),
        helper.make_node("Identity", ["r_input_cast_0"], ["r_output_cast_0"], name="r"),
        helper.make_node("Cast", ["r_output_cast_0"], ["y"], to=TensorProto.FLOAT16, name="c2"),
        helper.make_node("Relu", ["x"], ["z"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert restore_fp32_outputs(model) == 2
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert "c2" not in [n.name for n in model.graph.node]
    assert model.graph.node[-1].op_type == "Cast" and model.graph.node[-1].output[0] == "z"
    onnx.checker.check_model(model, full_check=True)


def test_unsupported_ops_name_the_op(tmp_path):
    from compiler.errors import UnsupportedModel
    from compiler.mxnet_env import mxnet

    mx = mxnet()
    data = mx.sym.var("data")
    sym = mx.sym.contrib.box_iou(data, data)
    sym.save(str(tmp_path / "s-symbol.json"))
    mx.nd.save(str(tmp_path / "s-0000.params"), {})
    with pytest.raises(UnsupportedModel, match="_contrib_box_iou"):
        export_onnx(tmp_path / "s-symbol.json", tmp_path / "s-0000.params", [(4, 4)], tmp_path / "s.onnx", 13, 7)
