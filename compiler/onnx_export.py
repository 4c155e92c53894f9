"""The one compatibility layer around MXNet 1.9.1's ONNX exporter.

The stock exporter, run against a modern onnx, (1) imports the removed
`onnx.mapping` tables, (2) picks the installed onnx's newest opset although it
only has translations up to 13, (3) stamps the newest IR version, which older
runtimes refuse, (4) lists every initializer among the graph inputs, which
stops ONNX Runtime from folding BatchNorm into Conv, and (5) leaves many nodes
unnamed. Each is repaired here; see notes/mxnet-onnx.md for the evidence.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import types
from pathlib import Path

from .errors import UnsupportedModel
from .mxnet_env import mxnet


def ensure_onnx_mapping() -> None:
    """Provide `onnx.mapping` (removed in onnx 1.19) from `onnx.helper`."""
    import numpy as np
    import onnx

    if hasattr(onnx, "mapping") and hasattr(onnx.mapping, "NP_TYPE_TO_TENSOR_TYPE"):
        return
    tensor_to_np = {}
    for code in onnx.TensorProto.DataType.values():
        if code == onnx.TensorProto.UNDEFINED:
            continue
        try:
            tensor_to_np[code] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code))
        except (KeyError, TypeError, ValueError):
            continue
    np_to_tensor = {}
    for code, dtype in tensor_to_np.items():
        # First code wins: float32 -> FLOAT, not one of the exotic aliases.
        np_to_tensor.setdefault(dtype, code)
    np_to_tensor[np.dtype("bool")] = onnx.TensorProto.BOOL
    np_to_tensor[np.dtype("float16")] = onnx.TensorProto.FLOAT16
    mapping = types.ModuleType("onnx.mapping")
    mapping.TENSOR_TYPE_TO_NP_TYPE = tensor_to_np
    mapping.NP_TYPE_TO_TENSOR_TYPE = np_to_tensor
    onnx.mapping = mapping
    sys.modules["onnx.mapping"] = mapping


@contextlib.contextmanager
def pinned_opset(opset: int):
    """Make the exporter (which reads the installed onnx's newest opset) translate at `opset`."""
    import onnx.defs

    original = onnx.defs.onnx_opset_version
    onnx.defs.onnx_opset_version = lambda: opset
    try:
        yield
    finally:
        onnx.defs.onnx_opset_version = original


@contextlib.contextmanager
def raw_float_tensors():
    """Have the exporter's `make_tensor` calls store float weights as raw bytes.

    It passes every weight as a Python list into a repeated protobuf field,
    which is most of the export time for large models.
    """
    import numpy as np
    import onnx.helper

    original = onnx.helper.make_tensor

    def make_tensor(name, data_type, dims, vals, raw=False):
        if not raw and data_type == onnx.TensorProto.FLOAT and isinstance(vals, list) and len(vals) > 64:
            return original(name, data_type, dims, np.asarray(vals, dtype="<f4").tobytes(), raw=True)
        return original(name, data_type, dims, vals, raw)

    onnx.helper.make_tensor = make_tensor
    try:
        yield
    finally:
        onnx.helper.make_tensor = original


def set_opset_and_ir(model, opset: int, ir_version: int) -> None:
    default_domain = [op for op in model.opset_import if op.domain in ("", "ai.onnx")]
    for op in default_domain:
        op.version = opset
    if not default_domain:
        entry = model.opset_import.add()
        entry.domain, entry.version = "", opset
    model.ir_version = ir_version


def move_initializers_out_of_inputs(model) -> int:
    """Drop initializers from graph.input so runtimes may treat them as constants."""
    initializer_names = {init.name for init in model.graph.initializer}
    keep = [inp for inp in model.graph.input if inp.name not in initializer_names]
    removed = len(model.graph.input) - len(keep)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return removed


def initializers_to_raw_data(model) -> None:
    """Store initializers as raw bytes: the exporter writes Python float lists,
    which are larger on disk and slow every later pass that reads them."""
    from onnx import numpy_helper

    for index, init in enumerate(model.graph.initializer):
        if not init.raw_data and init.data_location != 1:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))


def name_all_nodes(model) -> None:
    """Give every node a unique name: some runtimes reject duplicate or empty ones."""
    used: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in used:
            name = f"{name}_{index}"
        node.name = name
        used.add(name)


def export_onnx(symbol_path: Path, params_path: Path, input_shapes: list[tuple[int, ...]],
                out_path: Path, opset: int, ir_version: int) -> dict:
    """Export an MXNet symbol/params pair to an ONNX file at the given opset and IR version."""
    import numpy as np
    import onnx

    mx = mxnet()
    ensure_onnx_mapping()
    exporter_logger = logging.getLogger()
    previous_level = exporter_logger.level
    exporter_logger.setLevel(logging.WARNING)  # the exporter logs every node at INFO
    try:
        with pinned_opset(opset), raw_float_tensors():
            mx.onnx.export_model(str(symbol_path), str(params_path), input_shapes, [np.float32] * len(input_shapes),
                                 str(out_path), dynamic=False)
    except AttributeError as exc:
        match = re.search(r"No conversion function registered for op type (\S+)", str(exc))
        if match:
            raise UnsupportedModel(
                f"the ONNX exporter has no translation for MXNet op '{match.group(1)}'",
                "this model can only be emitted as MXNet artifacts (use a target without onnx)") from None
        raise
    finally:
        exporter_logger.setLevel(previous_level)
    model = onnx.load(str(out_path))
    set_opset_and_ir(model, opset, ir_version)
    moved = move_initializers_out_of_inputs(model)
    initializers_to_raw_data(model)
    name_all_nodes(model)
    onnx.save(model, str(out_path))
    return {"opset": opset, "ir_version": ir_version, "initializers_moved_out_of_inputs": moved,
            "nodes": len(model.graph.node)}


def check_onnx(path: Path) -> None:
    """onnx.checker with full shape inference; raises onnx.checker.ValidationError."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def fold_batchnorm_into_conv(model) -> int:
    """Fold inference BatchNormalization into the Conv that feeds it, in FP32.

    Done before FP16 conversion: BatchNorm evaluated in half precision divides
    by sqrt(var + 1e-5) where 1e-5 is subnormal, which costs MobileNet
    several percent of output accuracy; folded in FP32 it costs nothing.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in model.graph.output}
    producers = {out: node for node in model.graph.node for out in node.output}
    folded = 0
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0]) != 1
                or conv.output[0] in graph_outputs
                or not all(name in inits for name in list(bn.input[1:5]) + list(conv.input[1:]))):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        conv_bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2
                     else np.zeros(weight.shape[0]))
        factor = scale / np.sqrt(var + eps)
        new_weight = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        new_bias = ((conv_bias - mean) * factor + bias).astype(np.float32)
        weight_name, bias_name = f"{conv.name}_folded_weight", f"{conv.name}_folded_bias"
        model.graph.initializer.extend([numpy_helper.from_array(new_weight, weight_name),
                                        numpy_helper.from_array(new_bias, bias_name)])
        conv.input[:] = [conv.input[0], weight_name, bias_name]
        conv.output[0] = bn.output[0]
        model.graph.node.remove(bn)
        folded += 1
    # Drop initializers nothing reads any more.
    used = {name for node in model.graph.node for name in node.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return folded


def convert_to_fp16(src: Path, dst: Path) -> dict:
    """FP16 weights and tensors inside, FP32 inputs and outputs at the edges."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    folded = fold_batchnorm_into_conv(model)
    ir_version = model.ir_version
    opsets = {op.domain: op.version for op in model.opset_import}
    import warnings

    with warnings.catch_warnings():
        # It warns of "truncation" for every tiny weight, and truncates nothing.
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    restore_fp32_outputs(converted)
    # The converter re-stamps nothing, but keep the target's values explicit.
    converted.ir_version = ir_version
    for op in converted.opset_import:
        if op.domain in opsets:
            op.version = opsets[op.domain]
    name_all_nodes(converted)
    onnx.save(converted, str(dst))
    casts = sum(1 for n in converted.graph.node if n.op_type == "Cast")
    return {"cast_nodes": casts, "batchnorms_folded": folded}


def restore_fp32_outputs(model) -> int:
    """Make every graph output FP32 again.

    onnxconverter-common casts an output back to FP16 when its producer is an
    op it keeps in FP32 (Resize, for one), despite keep_io_types. Where that
    cast's input is already FP32 the cast is dropped; otherwise one to FP32 is
    appended.
    """
    import onnx
    from onnx import TensorProto, helper

    producers = {out: node for node in model.graph.node for out in node.output}
    fixed = 0
    for output in model.graph.output:
        tensor_type = output.type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        producer = producers.get(output.name)
        is_cast_down = (producer is not None and producer.op_type == "Cast"
                        and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in producer.attribute))
        if is_cast_down and producer.input[0].endswith("_output_cast_0"):
            # The blocked op already produced FP32: bypass the cast.
            source = producer.input[0]
            model.graph.node.remove(producer)
            for node in model.graph.node:
                if node.output and source in node.output:
                    node.output[list(node.output).index(source)] = output.name
        else:
            half = output.name + "_fp16"
            for node in model.graph.node:
                node.output[:] = [half if o == output.name else o for o in node.output]
                node.input[:] = [half if i == output.name else i for i in node.input]
            model.graph.node.append(helper.make_node("Cast", [half], [output.name], to=TensorProto.FLOAT,
                                                     name=f"{output.name}_cast_to_fp32"))
        tensor_type.elem_type = TensorProto.FLOAT
        fixed += 1
    del model.graph.value_info[:]
    model.CopyFrom(onnx.shape_inference.infer_shapes(model))
    return fixed


def io_signature(path: Path) -> dict:
    """Input and output names, shapes and element types, in graph order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = {}
        for value in values:
            tensor = value.type.tensor_type
            out[value.name] = {
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            }
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": max((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), default=0),
            "ir_version": model.ir_version}
