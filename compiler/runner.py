"""Running artifacts on this machine: MXNet symbol/params and ONNX on ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MissingDependency
from .mxnet_env import mxnet


def as_output_list(result) -> list:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def mxnet_input_names(symbol_path: Path) -> list[str]:
    """Graph inputs that are not parameters: 'data' for zoo models."""
    graph = json.loads(Path(symbol_path).read_text())
    nodes = graph["nodes"]
    params_like = ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "moving_mean", "moving_var",
                   "min_calib_range", "max_calib_range")
    return [nodes[i]["name"] for i in graph["arg_nodes"]
            if nodes[i]["op"] == "null" and not nodes[i]["name"].endswith(params_like)
            and "__init__" not in nodes[i].get("attrs", {})][:1] or ["data"]


def load_mxnet(symbol_path: Path, params_path: Path, input_names: list[str] | None = None):
    """A SymbolBlock from exported files, as a deployment would load it."""
    mx = mxnet()
    names = input_names or mxnet_input_names(symbol_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mx.gluon.SymbolBlock.imports(str(symbol_path), names, str(params_path), ctx=mx.cpu())


def run_mxnet(block, inputs: list[np.ndarray]) -> list[np.ndarray]:
    mx = mxnet()
    outputs = as_output_list(block(*[mx.nd.array(x) for x in inputs]))
    return [o.asnumpy() for o in outputs]


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependency(f"onnxruntime cannot be imported: {exc}", "run `make install`") from None
    return ort


def ort_session(path: Path, threads: int | None = None, profile_prefix: str | None = None):
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: list[np.ndarray]) -> list[np.ndarray]:
    feeds = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def run_artifact(root: Path, artifacts: list[dict], kind: str, inputs: list[np.ndarray],
                 input_names: list[str]) -> list[np.ndarray] | None:
    """Run one artifact kind of a build (manifest records) on this CPU; None if it has no CPU runtime here."""
    files = {a["format"]: a["path"] for a in artifacts if a["kind"] == kind}
    if "mxnet-symbol-json" in files and "mxnet-params" in files:
        if kind == "mxnet-fp16":
            return None  # MXNet has no FP16 GEMM on the CPU
        block = load_mxnet(root / files["mxnet-symbol-json"], root / files["mxnet-params"], input_names)
        return run_mxnet(block, inputs)
    if "onnx" in files:
        return run_onnx(ort_session(root / files["onnx"]), inputs)
    return None
