"""INT8: MXNet on the MKL-DNN backend, and ONNX with explicit symmetric Q/DQ.

Layers are named as in the FP32 MXNet graph (the Convolution/FullyConnected
node names, e.g. `resnetv10_stage1_conv0_fwd`) everywhere: in sensitivity
rankings, in the list of layers kept in FP32, and in the manifest. Each
backend maps those names to its own: MKL-DNN fuses a convolution with its
BatchNorm/ReLU/add into a `sg_mkldnn_conv_*` node, and the ONNX exporter
leaves the original name on the convolution's output tensor.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .mxnet_env import mxnet

COMPUTE_OPS = ("Convolution", "FullyConnected")
MKLDNN_QUANTIZE = "MKLDNN_QUANTIZE"


def load_symbol_params(symbol_path: Path, params_path: Path):
    """(symbol, arg_params, aux_params) from a Gluon export."""
    mx = mxnet()
    symbol = mx.sym.load(str(symbol_path))
    args, auxs = {}, {}
    for key, value in mx.nd.load(str(params_path)).items():
        kind, _, name = key.partition(":")
        (auxs if kind == "aux" else args)[name] = value
    return symbol, args, auxs


def compute_layers(symbol_path: Path) -> list[str]:
    """Convolution and FullyConnected node names in graph order: the layers INT8 quantizes."""
    nodes = json.loads(Path(symbol_path).read_text())["nodes"]
    return [n["name"] for n in nodes if n["op"] in COMPUTE_OPS]


# --- MXNet / MKL-DNN ---------------------------------------------------------------------

def fused_layer_names(backend_symbol) -> dict[str, str]:
    """FP32 layer name -> name of the MKL-DNN node that contains it (itself when not fused)."""
    mapping = {}
    for node in json.loads(backend_symbol.tojson())["nodes"]:
        if node["op"] in COMPUTE_OPS:
            mapping[node["name"]] = node["name"]
        for subgraph in node.get("subgraphs", []):
            for inner in subgraph["nodes"]:
                if inner["op"] in COMPUTE_OPS:
                    mapping[inner["name"]] = node["name"]
    return mapping


# Ops that pass one tensor through; a producer is looked for behind them.
_PASS_THROUGH = ("Activation", "Pooling", "Flatten", "Dropout", "Reshape", "_contrib_quantize_v2")


def input_producers(backend_symbol, fused_names: list[str]) -> list[str]:
    """The fused compute nodes whose output is the data input of these nodes.

    MKL-DNN requantizes a quantized convolution's output to INT8 whatever
    consumes it, so a layer kept in FP32 still gets an INT8-rounded input
    unless the node producing that input stays in FP32 too.
    """
    nodes = json.loads(backend_symbol.tojson())["nodes"]
    index = {node["name"]: i for i, node in enumerate(nodes)}
    compute = {"_sg_mkldnn_conv", "_sg_mkldnn_fully_connected"} | set(COMPUTE_OPS)
    producers = []
    for name in fused_names:
        entry = nodes[index[name]]["inputs"][0]
        node = nodes[entry[0]]
        while node["op"] in _PASS_THROUGH and node["inputs"]:
            node = nodes[node["inputs"][0][0]]
        if node["op"] in compute:
            producers.append(node["name"])
    return producers


class FixedThresholds:
    """A quantize_net_v2 'customize' collector that hands over thresholds found earlier.

    Calibration happens in `collect_thresholds` (or comes from the cache); the
    one forward pass quantize_net_v2 insists on needs to record nothing.
    """

    def __init__(self, thresholds: dict[str, tuple[float, float]]):
        self.min_max_dict = dict(thresholds)
        self.include_layer = set(thresholds)

    def collect(self, name, arr):
        pass


def _data_iter(batches, input_name: str):
    mx = mxnet()
    return mx.io.NDArrayIter(data={input_name: np.concatenate(batches)}, batch_size=batches[0].shape[0])


def _calibration_layers(backend_symbol, args, auxs, excluded: list[str]) -> list[str]:
    """Tensor names whose ranges the quantized graph needs, with these fused nodes left in FP32."""
    mx = mxnet()
    from mxnet.contrib import quantization

    _, _, _, collector = quantization.quantize_graph(
        backend_symbol, args, auxs, ctx=mx.cpu(), excluded_sym_names=list(excluded), calib_mode="naive",
        quantized_dtype="auto", quantize_mode="full", quantize_granularity="channel-wise")
    return sorted(collector.include_layer)


def collect_thresholds(backend_symbol, args, auxs, input_name: str, batches, names: list[str],
                       mode: str) -> dict[str, tuple[float, float]]:
    """Run the FP32 graph over the calibration batches and derive a range for each named tensor."""
    mx = mxnet()
    from mxnet.contrib import quantization

    module = mx.mod.Module(symbol=backend_symbol, context=mx.cpu(), data_names=[input_name], label_names=None)
    module.bind(for_training=False, data_shapes=[(input_name, batches[0].shape)])
    module.set_params(args, auxs, allow_missing=False, force_init=True)
    if mode == "entropy":
        collector = quantization._LayerHistogramCollector(include_layer=set(names))
    else:
        collector = quantization._LayerOutputMinMaxCollector(quantized_dtype="auto", include_layer=set(names))
    quantization._collect_layer_statistics(module, _data_iter(batches, input_name), collector)
    if mode == "entropy":
        return {k: (float(lo), float(hi)) for k, (lo, hi) in
                quantization._get_optimal_thresholds(collector.hist_dict, "auto").items()}
    return {k: (float(lo), float(hi)) for k, (lo, hi) in collector.min_max_dict.items()}


def signed_sum_into_unsigned(backend_symbol, thresholds: dict, input_name: str) -> list[str]:
    """Fused conv+sum+ReLU nodes whose summed-in residual is signed: MXNet 1.9.1 gets these wrong in INT8.

    The fused node writes UINT8 (ReLU after the sum) in place over the
    residual; a signed INT8 residual is then read as unsigned. On a
    CIFAR ResNet trained on digits, whose stem has no ReLU, the three such
    nodes alone made the INT8 output 37% off (relative error); with them in
    FP32 it is 1.2% off.
    """
    nodes = json.loads(backend_symbol.tojson())["nodes"]
    bad = []
    for node in nodes:
        attrs = node.get("attrs", {})
        if node["op"] != "_sg_mkldnn_conv" or attrs.get("with_sum") != "true" \
                or attrs.get("with_postsum_act") != "true":
            continue
        data_inputs = [e for e in node["inputs"]
                       if nodes[e[0]]["op"] != "null" or nodes[e[0]]["name"] == input_name]
        if len(data_inputs) < 2:
            continue
        producer = nodes[data_inputs[-1][0]]["name"]
        low = thresholds.get(producer if producer == input_name else f"{producer}_output", (0.0, 0.0))[0]
        if low < 0:
            bad.append(node["name"])
    return bad


@dataclass
class MXNetQuantized:
    block: object                      # the quantized SymbolBlock
    thresholds: dict[str, tuple[float, float]]
    calibrated_now: list[str]          # tensors whose ranges were measured in this call
    excluded_fused: list[str]
    # Fused nodes kept in FP32 because the backend computes them wrongly in INT8.
    backend_workaround: list[str] = field(default_factory=list)


def quantize_mxnet(symbol_path: Path, params_path: Path, input_name: str, batches, mode: str,
                   keep_fp32: list[str] = (), known: dict | None = None) -> MXNetQuantized:
    """INT8 SymbolBlock through quantize_net_v2 on MKL-DNN, reusing known tensor ranges."""
    mx = mxnet()
    from mxnet.contrib import quantization

    from .runner import load_mxnet

    symbol, args, auxs = load_symbol_params(symbol_path, params_path)
    backend = symbol.get_backend_symbol(MKLDNN_QUANTIZE)
    fused = fused_layer_names(backend)
    kept = sorted({fused[name] for name in keep_fp32 if name in fused})
    excluded = sorted(set(kept) | set(input_producers(backend, kept)))
    thresholds = dict(known or {})
    calibrated_now: list[str] = []

    def calibrate(excluded_now: list[str]) -> None:
        missing = [n for n in _calibration_layers(backend, args, auxs, excluded_now) if n not in thresholds]
        if missing:
            thresholds.update(collect_thresholds(backend, args, auxs, input_name, batches, missing, mode))
            calibrated_now.extend(missing)

    calibrate(excluded)
    workaround = [n for n in signed_sum_into_unsigned(backend, thresholds, input_name) if n not in excluded]
    if workaround:
        excluded = sorted(set(excluded) | set(workaround))
        calibrate(excluded)
    fp32 = load_mxnet(symbol_path, params_path, [input_name])
    quantized = quantization.quantize_net_v2(
        fp32, quantized_dtype="auto", quantize_mode="full", quantize_granularity="channel-wise",
        exclude_layers=list(excluded), calib_data=_data_iter(batches[:1], input_name),
        calib_mode="customize", LayerOutputCollector=FixedThresholds(thresholds),
        num_calib_examples=batches[0].shape[0], ctx=mx.cpu())
    return MXNetQuantized(quantized, thresholds, calibrated_now, excluded, workaround)


# --- per-layer sensitivity ---------------------------------------------------------------------

def _fake_quantize(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric INT8 round trip (UINT8 for non-negative tensors, as MKL-DNN does after ReLU)."""
    if axis is None:
        peak = np.max(np.abs(values))
        levels = 255.0 if values.min() >= 0 else 127.0
    else:
        reduce = tuple(i for i in range(values.ndim) if i != axis)
        peak = np.max(np.abs(values), axis=reduce, keepdims=True)
        levels = 127.0
    scale = np.where(peak > 0, peak / levels, 1.0)
    return np.round(values / scale) * scale


def layer_sensitivity(symbol_path: Path, params_path: Path, input_name: str, batches) -> dict[str, float]:
    """Relative output error each Convolution/FullyConnected adds when only it runs in INT8.

    Each layer is fed its exact FP32 input (captured from the FP32 graph), so
    the number is the error that layer itself introduces, not what it
    inherited: ||f(q(x), q(W)) - f(x, W)|| / ||f(x, W)||, with per-tensor
    activation and per-channel weight quantization.
    """
    mx = mxnet()
    symbol, args, auxs = load_symbol_params(symbol_path, params_path)
    graph = json.loads(Path(symbol_path).read_text())
    nodes = graph["nodes"]
    internals = symbol.get_internals()
    available = set(internals.list_outputs())

    def entry_name(entry) -> str:
        node = nodes[entry[0]]
        if node["op"] == "null":
            return node["name"]
        for candidate in (f"{node['name']}_output", f"{node['name']}_output{entry[1]}"):
            if candidate in available:
                return candidate
        raise KeyError(node["name"])

    layers = [n for n in nodes if n["op"] in COMPUTE_OPS]
    inputs = sorted({entry_name(n["inputs"][0]) for n in layers})
    group = mx.sym.Group([internals[name] for name in inputs])
    executor = group.simple_bind(mx.cpu(), grad_req="null", **{input_name: batches[0].shape})
    executor.copy_params_from(args, auxs, allow_extra_params=True)
    captured: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    for batch in batches:
        outputs = executor.forward(is_train=False, **{input_name: mx.nd.array(batch)})
        for name, out in zip(inputs, outputs):
            captured[name].append(out.asnumpy())
    del executor
    scores = {}
    for node in layers:
        x = np.concatenate(captured[entry_name(node["inputs"][0])])
        weight = args[nodes[node["inputs"][1][0]]["name"]].asnumpy()
        bias = args[nodes[node["inputs"][2][0]]["name"]] if len(node["inputs"]) > 2 else None
        attrs = dict(node.get("attrs", {}))
        op = getattr(mx.nd, node["op"])

        def run(data, w):
            kwargs = {"data": mx.nd.array(data), "weight": mx.nd.array(w), **attrs}
            if bias is not None:
                kwargs["bias"] = bias
            return op(**kwargs).asnumpy().astype(np.float64)

        exact = run(x, weight)
        approx = run(_fake_quantize(x, None), _fake_quantize(weight, 0))
        norm = np.linalg.norm(exact)
        scores[node["name"]] = float(np.linalg.norm(approx - exact) / norm) if norm else 0.0
    return scores


# --- ONNX with explicit Q/DQ -----------------------------------------------------------------

# Q/DQ on the inputs of weighted layers only, the placement TensorRT documents
# for explicit quantization (it propagates and fuses the rest); an excluded
# layer then runs entirely in FP32.
QDQ_OP_TYPES = ("Conv", "Gemm", "MatMul")


def onnx_layer_nodes(model) -> dict[str, str]:
    """FP32 MXNet layer name -> ONNX node name (the exporter names the output tensor after the layer)."""
    return {node.output[0]: node.name for node in model.graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul") and node.output}


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over in-memory batches."""

    def __init__(self, input_name: str, batches):
        self.feeds = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self.feeds, None)


@dataclass
class OnnxQuantized:
    path: Path
    excluded_nodes: list[str]
    cache_hit: bool
    summary: dict = field(default_factory=dict)


def quantize_onnx(src: Path, dst: Path, input_name: str, batches, mode: str, opset: int, ir_version: int,
                  cache_path: Path, keep_fp32: list[str] = (), op_types=QDQ_OP_TYPES) -> OnnxQuantized:
    """INT8 Q/DQ ONNX in the form TensorRT 8.5+/10/11 take: symmetric INT8 activations and
    per-channel weights with zero points 0, FP32 biases, FP32 inputs and outputs."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_export import name_all_nodes, set_opset_and_ir

    nodes = onnx_layer_nodes(onnx.load(str(src), load_external_data=False))
    exclude = sorted(nodes[name] for name in keep_fp32 if name in nodes)
    cache_hit = Path(cache_path).is_file()
    Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    import logging

    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # it advises pre-processing on every call, which we did
    try:
        with tempfile.TemporaryDirectory(prefix="infc-qdq-") as tmp:
            # Folds BatchNorm into the convolutions first, so Q/DQ sit where TensorRT fuses them.
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(dst), _BatchReader(input_name, batches), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, op_types_to_quantize=list(op_types),
                calibrate_method=CalibrationMethod.Entropy if mode == "entropy" else CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
                calibration_cache_path=str(cache_path))
    finally:
        root_logger.setLevel(previous_level)
    model = onnx.load(str(dst))
    set_opset_and_ir(model, opset, ir_version)
    used = {node.domain or "" for node in model.graph.node}
    keep = [op for op in model.opset_import if (op.domain or "") in used | {"", "ai.onnx"}]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    name_all_nodes(model)
    onnx.save(model, str(dst))
    return OnnxQuantized(Path(dst), exclude, cache_hit, qdq_summary(model))


def qdq_summary(model) -> dict:
    """Counts, and whether the model keeps TensorRT's Q/DQ rules: INT8, zero points 0, per-channel weights."""
    from onnx import TensorProto, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    problems = []
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    per_channel_weights = 0
    for node in quantize + dequantize:
        if len(node.input) < 3 or node.input[2] not in initializers:
            problems.append(f"{node.name}: no constant zero point")
            continue
        zero_point = initializers[node.input[2]]
        if zero_point.data_type != TensorProto.INT8:
            problems.append(f"{node.name}: zero point type {TensorProto.DataType.Name(zero_point.data_type)}")
        if np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append(f"{node.name}: non-zero zero point")
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            if numpy_helper.to_array(initializers[node.input[1]]).size > 1:
                per_channel_weights += 1
    dequantized = {out for node in dequantize for out in node.output}
    quantized_layers = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                           and len(n.input) > 1 and n.input[0] in dequantized and n.input[1] in dequantized)
    return {"quantize_linear": len(quantize), "dequantize_linear": len(dequantize),
            "per_channel_weights": per_channel_weights, "quantized_layers": quantized_layers,
            "symmetric": not problems, "problems": problems[:5]}
