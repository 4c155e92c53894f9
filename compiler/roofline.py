"""How much arithmetic a model does, and how much this machine can do.

Model FLOPs are counted from the graph: the multiply-accumulates of every
convolution, transposed convolution, dense layer and matrix product (two FLOPs
per MAC). Element-wise ops, pooling and resizing are left out: they are memory
bound and a small share of the arithmetic of the networks infc compiles.

The ceilings are measured, not looked up, in the same run as the artifacts:
large float32 GEMMs through numpy (OpenBLAS) and ONNX Runtime (MLAS) for FP32,
and large uint8 x int8 GEMMs through ONNX Runtime's MatMulInteger (MLAS, which
uses VNNI/AVX2 integer dot products) for INT8; each ceiling is the best of them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# ONNX ops with MACs, and the input index of their weight (None: both operands are activations).
_ONNX_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_ONNX_MATMUL_OPERANDS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


@dataclass
class FlopCount:
    """FLOPs (2 x MACs) of one inference at the graph's own input shape."""
    total: int
    batch: int
    source: str                                  # the graph file they were counted from
    by_op: dict[str, int] = field(default_factory=dict)
    counted_nodes: int = 0

    @property
    def per_sample(self) -> float:
        return self.total / max(self.batch, 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gflops"] = self.total / 1e9
        return data


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


# --- ONNX ------------------------------------------------------------------------------------

def _onnx_shapes(model) -> dict[str, list[int]]:
    """Static shape of every tensor: inputs, initializers, and inferred intermediates."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attribute(node, name, default=None):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def count_onnx_flops(path: Path) -> FlopCount:
    """FLOPs of an ONNX graph with static shapes."""
    import onnx

    model = onnx.load(str(path))
    shapes = _onnx_shapes(model)
    by_op: dict[str, int] = {}
    counted = 0
    batch = 1
    graph_inputs = {i.name for i in model.graph.input} - {init.name for init in model.graph.initializer}
    for name in graph_inputs:
        if shapes.get(name):
            batch = shapes[name][0]
            break
    for node in model.graph.node:
        macs = None
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in _ONNX_CONV_WEIGHT:
            weight = shapes.get(node.input[_ONNX_CONV_WEIGHT[node.op_type]])
            if out and weight:
                # Each output element sums over (C_in / group) x kernel.
                macs = _prod(out) * _prod(weight[1:])
        elif node.op_type == "ConvTranspose":
            data, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
            if data and weight:
                # Each input element scatters into (C_out / group) x kernel outputs.
                macs = _prod(data) * _prod(weight[1:])
        elif node.op_type == "Gemm":
            a = shapes.get(node.input[0])
            if out and a:
                k = a[0] if _attribute(node, "transA", 0) else a[1]
                macs = _prod(out) * k
        elif node.op_type in _ONNX_MATMUL_OPERANDS:
            a = shapes.get(node.input[_ONNX_MATMUL_OPERANDS[node.op_type][0]])
            if out and a:
                macs = _prod(out) * a[-1]
        if macs is not None:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + 2 * macs
            counted += 1
    return FlopCount(total=sum(by_op.values()), batch=batch, source=str(path), by_op=by_op, counted_nodes=counted)


# --- MXNet -----------------------------------------------------------------------------------

_MXNET_OPS = ("Convolution", "Deconvolution", "FullyConnected", "dot", "batch_dot")


def count_mxnet_flops(symbol_path: Path, input_shapes: dict[str, list[int]]) -> FlopCount:
    """FLOPs of an (unfused) MXNet symbol, with shapes inferred from the input shapes."""
    from .mxnet_env import mxnet

    mx = mxnet()
    graph = json.loads(Path(symbol_path).read_text())
    symbol = mx.sym.load(str(symbol_path))
    internals = symbol.get_internals()
    arg_shapes, out_shapes, aux_shapes = internals.infer_shape(**{k: tuple(v) for k, v in input_shapes.items()})
    if out_shapes is None:
        raise ValueError(f"cannot infer shapes of {symbol_path} from {input_shapes}")
    shapes = dict(zip(internals.list_outputs(), out_shapes))
    shapes.update(zip(internals.list_arguments(), arg_shapes))
    shapes.update(zip(internals.list_auxiliary_states(), aux_shapes))
    nodes = graph["nodes"]

    def shape_of(entry) -> tuple | None:
        node = nodes[entry[0]]
        if node["op"] == "null":
            return shapes.get(node["name"])
        return shapes.get(f"{node['name']}_output" if entry[1] == 0 else f"{node['name']}_output{entry[1]}")

    by_op: dict[str, int] = {}
    counted = 0
    for node in nodes:
        op = node["op"]
        if op not in _MXNET_OPS:
            continue
        out = shapes.get(f"{node['name']}_output")
        inputs = [shape_of(entry) for entry in node["inputs"]]
        macs = None
        if op == "Convolution" and out and inputs[1]:
            macs = _prod(out) * _prod(inputs[1][1:])
        elif op == "Deconvolution" and inputs[0] and inputs[1]:
            macs = _prod(inputs[0]) * _prod(inputs[1][1:])
        elif op == "FullyConnected" and out and inputs[1]:
            macs = _prod(out) * inputs[1][1]
        elif op in ("dot", "batch_dot") and out and inputs[0]:
            attrs = node.get("attrs", {})
            transpose_a = attrs.get("transpose_a", "False") in ("True", "true", "1")
            a = inputs[0]
            k = (a[-2] if transpose_a else a[-1]) if op == "batch_dot" else (a[0] if transpose_a else a[-1])
            macs = _prod(out) * k
        if macs is not None:
            by_op[op] = by_op.get(op, 0) + 2 * macs
            counted += 1
    batch = next(iter(input_shapes.values()))[0] if input_shapes else 1
    return FlopCount(total=sum(by_op.values()), batch=batch, source=str(symbol_path), by_op=by_op,
                     counted_nodes=counted)


# --- ceilings --------------------------------------------------------------------------------

@dataclass
class Ceiling:
    """The best throughput a large GEMM reached on this machine, over a few libraries and sizes."""
    precision: str      # "fp32" or "int8"
    gflops: float       # 2*M*N*K / best seconds / 1e9 (GOP/s for int8) of the best candidate
    method: str         # the best candidate's library and size
    size: int
    best_seconds: float
    runs: int
    candidates: list[dict] = field(default_factory=list)   # every library/size tried, with its GFLOP/s

    def to_dict(self) -> dict:
        return asdict(self)


def _best_time(run, budget_s: float, min_runs: int) -> tuple[float, int]:
    run()  # first call pays for allocation, packing and thread start-up
    best, runs, started = float("inf"), 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best, runs


def _best_of(precision: str, candidates: list[dict]) -> Ceiling:
    best = max(candidates, key=lambda c: c["gflops"])
    return Ceiling(precision, best["gflops"], best["method"], best["size"], best["seconds"], best["runs"], candidates)


def _candidate(method: str, size: int, run, budget_s: float, min_runs: int) -> dict:
    seconds, runs = _best_time(run, budget_s, min_runs)
    return {"method": method, "size": size, "gflops": 2 * size ** 3 / seconds / 1e9, "seconds": seconds, "runs": runs}


def _blas_name() -> str:
    """numpy's BLAS and the kernel set it picked for this CPU (OpenBLAS may fall back to older ISAs)."""
    try:
        from threadpoolctl import threadpool_info

        for library in threadpool_info():
            if library.get("user_api") == "blas":
                return f"{library.get('internal_api')} {library.get('version')}, {library.get('architecture')} kernels"
    except Exception:  # noqa: BLE001 - threadpoolctl is optional; the name is only a label
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001
        return "BLAS"


def _gemm_model(size: int, precision: str):
    """A one-node ONNX graph: [size, size] activations times a constant [size, size] weight."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    if precision == "int8":
        weight = rng.integers(-128, 127, size=(size, size), dtype=np.int8)
        node, in_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    else:
        weight = rng.standard_normal((size, size), dtype=np.float32)
        node, in_type, out_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(node, ["A", "B"], ["Y"], name=f"{precision}_gemm")], f"{precision}_ceiling",
        [helper.make_tensor_value_info("A", in_type, [size, size])],
        [helper.make_tensor_value_info("Y", out_type, [size, size])],
        [numpy_helper.from_array(weight, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def int8_gemm_model(size: int):
    """uint8 [size, size] x constant int8 [size, size] -> int32 (MatMulInteger)."""
    return _gemm_model(size, "int8")


def _ort_candidate(precision: str, size: int, budget_s: float, min_runs: int, threads: int | None) -> dict:
    from .runner import onnxruntime

    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(_gemm_model(size, precision).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    a = (rng.integers(0, 255, size=(size, size), dtype=np.uint8) if precision == "int8"
         else rng.standard_normal((size, size), dtype=np.float32))
    label = "MatMulInteger u8 x s8" if precision == "int8" else "MatMul float32"
    return _candidate(f"onnxruntime {ort.__version__} {label} {size}^3 (MLAS)", size,
                      lambda: session.run(None, {"A": a}), budget_s, min_runs)


DEFAULT_SIZES = (1024, 1536, 2048)


def measure_fp32_ceiling(sizes: tuple[int, ...] = DEFAULT_SIZES, budget_s: float = 0.5, min_runs: int = 3,
                         threads: int | None = None) -> Ceiling:
    """Large SGEMMs through numpy (OpenBLAS) and ONNX Runtime (MLAS): the best is the ceiling.

    Both are measured because either may miss the CPU's widest vector units (OpenBLAS 0.3.23
    runs its AVX2 kernels on AVX-512 Zen 5 cores, for one).
    """
    size = max(sizes)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    candidates = [_candidate(f"numpy float32 matmul {size}^3 ({_blas_name()})", size,
                             lambda: np.matmul(a, b, out=out), budget_s, min_runs)]
    candidates += [_ort_candidate("fp32", n, budget_s, min_runs, threads) for n in sizes]
    return _best_of("fp32", candidates)


def measure_int8_ceiling(sizes: tuple[int, ...] = DEFAULT_SIZES, budget_s: float = 0.5, min_runs: int = 3,
                         threads: int | None = None) -> Ceiling:
    """Large uint8 x int8 GEMMs through ONNX Runtime's MatMulInteger (VNNI / AVX2 integer dot products)."""
    return _best_of("int8", [_ort_candidate("int8", n, budget_s, min_runs, threads) for n in sizes])


def measure_ceilings(sizes: tuple[int, ...] = DEFAULT_SIZES, budget_s: float = 0.5,
                     threads: int | None = None) -> dict[str, Ceiling]:
    return {"fp32": measure_fp32_ceiling(sizes, budget_s, threads=threads),
            "int8": measure_int8_ceiling(sizes, budget_s, threads=threads)}


# --- per-artifact numbers --------------------------------------------------------------------

def ceiling_for(precision: str) -> tuple[str | None, str]:
    """Which measured ceiling an artifact of this precision is held against, and why."""
    if precision == "int8":
        return "int8", "int8 GEMM ceiling"
    if precision == "fp32":
        return "fp32", "fp32 SGEMM ceiling"
    if precision in ("fp16", "bf16"):
        # Reduced float precision on a CPU: ONNX Runtime's CPU kernels compute FP16 graphs
        # mostly in FP32 (with casts), so the FP32 roof is the honest reference.
        return "fp32", f"{precision} held against the fp32 SGEMM ceiling (no {precision} ceiling measured)"
    return None, f"no ceiling for precision {precision}"


def achieved(flops_per_inference: float, p50_seconds: float, ceiling_gflops: float | None) -> dict:
    gflops = flops_per_inference / p50_seconds / 1e9 if p50_seconds > 0 else float("nan")
    percent = 100.0 * gflops / ceiling_gflops if ceiling_gflops else None
    return {"achieved_gflops": gflops, "percent_of_ceiling": percent}
