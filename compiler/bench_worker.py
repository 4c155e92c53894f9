"""The child process of `infc bench` and `infc profile`: one artifact (or the GEMM ceilings) per process.

A fresh process per artifact gives each one its own peak-RSS figure, its own
thread settings (OMP_NUM_THREADS must be set before MXNet loads) and a clean
MXNet profiler. The parent writes a JSON request file and runs

    python -m compiler.bench_worker REQUEST.json

Events come back as JSON lines on the original stdout; anything the libraries
print is sent to stderr, which the parent keeps for error messages.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .errors import InfcError, MissingDependency, UserError, VerificationFailed
from .memory import own_peak_resident_bytes

PROGRESS_EVERY_S = 0.5


# --- runners: load once, then infer() on prepared inputs, returning numpy outputs ---------------

class MxnetImperativeRunner:
    """The model's Gluon code, un-hybridized, with the build's own portable weights."""

    def __init__(self, build_dir: Path, artifact: dict, request: dict):
        from .mxnet_env import mxnet

        self.mx = mxnet()
        self.net, self.parameter_report = load_imperative(request["model"], build_dir / artifact["files"]["params"],
                                                          tuple(request["build_input_shape"]))

    def prepare(self, inputs: list[np.ndarray]) -> None:
        self.inputs = [self.mx.nd.array(x) for x in inputs]

    def infer(self) -> list[np.ndarray]:
        from .runner import as_output_list

        return [o.asnumpy() for o in as_output_list(self.net(*self.inputs))]


class MxnetSymbolRunner:
    """An exported symbol/params pair as a deployment loads it, hybridized with the target's flags."""

    def __init__(self, build_dir: Path, artifact: dict, request: dict):
        from .mxnet_env import mxnet
        from .runner import load_mxnet

        self.mx = mxnet()
        files = artifact["files"]
        self.net = load_mxnet(build_dir / files["symbol"], build_dir / files["params"], request["input_names"])
        flags = request.get("mxnet_flags") or {}
        self.net.hybridize(static_alloc=bool(flags.get("static_alloc", False)),
                           static_shape=bool(flags.get("static_shape", False)))

    def prepare(self, inputs: list[np.ndarray]) -> None:
        self.inputs = [self.mx.nd.array(x) for x in inputs]

    def infer(self) -> list[np.ndarray]:
        from .runner import as_output_list

        return [o.asnumpy() for o in as_output_list(self.net(*self.inputs))]


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


class OnnxRunner:
    def __init__(self, build_dir: Path, artifact: dict, request: dict, profile_prefix: str | None = None,
                 optimized_model_path: str | None = None):
        from .runner import onnxruntime

        ort = onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if request.get("threads"):
            options.intra_op_num_threads = int(request["threads"])
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        if optimized_model_path:
            options.optimized_model_filepath = optimized_model_path
        self.session = ort.InferenceSession(str(build_dir / artifact["files"]["onnx"]), options,
                                            providers=["CPUExecutionProvider"])

    def prepare(self, inputs: list[np.ndarray]) -> None:
        self.feeds = {i.name: np.ascontiguousarray(x, dtype=_ORT_TYPES.get(i.type, x.dtype))
                      for i, x in zip(self.session.get_inputs(), inputs)}

    def infer(self) -> list[np.ndarray]:
        return self.session.run(None, self.feeds)


class TensorRTRunner:
    """A serialized engine with device buffers allocated once, through build_engine.py's helpers."""

    def __init__(self, build_dir: Path, artifact: dict, request: dict):
        from .device import build_engine as device
        from .tensorrt import availability

        status = availability()
        if not status.available:
            raise MissingDependency(f"cannot run the TensorRT engine: {status.reason}", status.fix)
        self.device = device
        self.trt = trt = device.import_tensorrt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((build_dir / artifact["files"]["engine"]).read_bytes())
        if self.engine is None:
            raise VerificationFailed(f"{artifact['files']['engine']} does not deserialize with TensorRT "
                                     f"{trt.__version__}", "rebuild the engine on this machine")
        self.tensors = device.engine_io(self.engine, trt)
        self.backend = device.load_buffer_backend()
        self.context = self.engine.create_execution_context()
        self.use_v3 = device.tensorrt_version(trt) >= device.ENQUEUE_V3_FROM
        self.pointers: dict[str, int] = {}
        self.outputs: dict[str, np.ndarray] = {}
        for tensor in self.tensors:
            dtype = device.numpy_dtype(trt, tensor["dtype"])
            self.pointers[tensor["name"]] = self.backend.alloc(max(1, int(np.prod(tensor["shape"])) * dtype.itemsize))
            if not tensor["input"]:
                self.outputs[tensor["name"]] = np.empty(tensor["shape"], dtype=dtype)
        if self.use_v3:
            for name, pointer in self.pointers.items():
                self.context.set_tensor_address(name, pointer)
        else:
            self.bindings = [0] * self.engine.num_bindings
            for tensor in self.tensors:
                self.bindings[self.engine.get_binding_index(tensor["name"])] = self.pointers[tensor["name"]]

    def prepare(self, inputs: list[np.ndarray]) -> None:
        engine_inputs = [t for t in self.tensors if t["input"]]
        self.host_inputs = [(self.pointers[t["name"]],
                             np.ascontiguousarray(x, dtype=self.device.numpy_dtype(self.trt, t["dtype"])))
                            for t, x in zip(engine_inputs, inputs)]

    def infer(self) -> list[np.ndarray]:
        for pointer, array in self.host_inputs:
            self.backend.htod(pointer, array)
        if self.use_v3:
            ok = self.context.execute_async_v3(self.backend.stream_handle())
        else:
            ok = self.context.execute_v2(self.bindings)
        self.backend.synchronize()
        if not ok:
            raise VerificationFailed("TensorRT inference returned False", "check the engine with `infc verify`")
        for name, array in self.outputs.items():
            self.backend.dtoh(array, self.pointers[name])
        return [array.copy() for array in self.outputs.values()]


RUNNERS = {"mxnet-imperative": MxnetImperativeRunner, "mxnet": MxnetSymbolRunner, "onnxruntime": OnnxRunner,
           "tensorrt": TensorRTRunner}


# --- the imperative baseline ------------------------------------------------------------------

def match_parameter_names(net_names: list[str], net_prefix: str, saved_names: list[str]) -> dict[str, str]:
    """Map the fresh network's parameter names to the names saved in the build.

    They differ only in the top-level block's counter ('resnetv10_' vs 'resnetv11_') when
    the build constructed other networks first in its process.
    """
    saved = set(saved_names)
    if saved <= set(net_names):
        return {name: name for name in net_names if name in saved}
    tops = {re.match(r"^[^_]*_", name).group(0) if "_" in name else "" for name in saved_names}
    if len(tops) != 1:
        raise UserError(f"the saved parameters have {len(tops)} different top-level prefixes "
                        f"({', '.join(sorted(tops)[:3])}): cannot match them to the network",
                        "rebuild with `infc compile`")
    saved_prefix = tops.pop()
    mapping = {name: saved_prefix + name[len(net_prefix):] for name in net_names if name.startswith(net_prefix)}
    mapping = {net: old for net, old in mapping.items() if old in saved}
    unmatched = saved - set(mapping.values())
    if unmatched:
        raise UserError(f"{len(unmatched)} saved parameter(s) match nothing in a freshly built network "
                        f"(first: {sorted(unmatched)[0]})",
                        "the build was made by another architecture or infc version: rebuild it")
    return mapping


def load_imperative(model_name: str, params_path: Path, input_shape: tuple[int, ...]):
    """Construct the architecture offline and give it the exported weights (no hybridize)."""
    import inspect
    import warnings

    from .models import _construct, resolve_model
    from .mxnet_env import mxnet

    mx = mxnet()
    info = resolve_model(model_name)
    # Segmentation constructors bake a non-default input size into their pooling branches,
    # where the build's constructor takes the shape.
    sized = {"input_shape": input_shape} if "input_shape" in inspect.signature(_construct).parameters else {}
    with mx.name.NameManager():  # a fresh counter: the names the build's first network got
        net = _construct(info, **sized)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.initialize(ctx=mx.cpu())
    saved = {key.split(":", 1)[-1]: value for key, value in mx.nd.load(str(params_path)).items()}
    params = net.collect_params()
    mapping = match_parameter_names(list(params.keys()), net.prefix, list(saved))
    for name, saved_name in mapping.items():
        params[name].set_data(saved[saved_name])
    unused = [name for name in params.keys() if name not in mapping]
    return net, {"loaded": len(mapping), "not_in_graph": len(unused)}


# --- inputs and checks ------------------------------------------------------------------------

def bench_inputs(build_dir: Path, request: dict) -> list[np.ndarray]:
    source = request["inputs"]
    if source["kind"] == "reference":
        with np.load(build_dir / source["path"]) as data:
            return [data[name] for name in request["input_names"]]
    from .models import reference_input

    return [reference_input(tuple(shape), source["seed"]) for shape in source["shapes"]]


def check_outputs(build_dir: Path, request: dict, outputs: list[np.ndarray]) -> dict | None:
    """Compare the first inference with the build's reference outputs (reference inputs only)."""
    check = request.get("check")
    if not check:
        return None
    from .verify import compare_outputs

    with np.load(build_dir / check["path"]) as data:
        names = list(check["output_names"])
        reference = [data[name] for name in names]
    comparison = compare_outputs([np.asarray(o, dtype=np.float32) for o in outputs], reference, names,
                                 check.get("rtol") or 0.0, check.get("atol") or 0.0)
    judged = check.get("rtol") is not None
    return {"status": ("passed" if comparison else "failed") if judged else "not judged",
            "detail": comparison.summary() if judged or comparison.problem else
            f"rel error {comparison.rel_error:.2e} (no tolerance for this precision in the target spec)",
            "rel_error": comparison.rel_error, "max_abs_error": comparison.max_abs_error,
            "argmax_agreement": min((o.argmax_agreement for o in comparison.outputs
                                     if o.argmax_agreement is not None), default=None),
            "tolerance": {"rtol": check.get("rtol"), "atol": check.get("atol")} if judged else None}


# Memory in decimal megabytes (10^6 bytes), the unit the tables print.
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def peak_rss_mb() -> float:
    """This process's own peak (VmHWM): a worker's parent's size is not the worker's."""
    return own_peak_resident_bytes() / 1e6


# --- tasks ------------------------------------------------------------------------------------

def import_runtime(runtime: str) -> None:
    """Import the runtime's libraries up front, so that loading measures the artifact alone."""
    if runtime.startswith("mxnet"):
        from .mxnet_env import gluoncv, mxnet

        mxnet()
        if runtime == "mxnet-imperative":
            gluoncv()
    elif runtime == "onnxruntime":
        from .runner import onnxruntime

        onnxruntime()


def open_runner(build_dir: Path, request: dict, **kwargs):
    artifact = request["artifact"]
    runner_class = RUNNERS[artifact["runtime"]]
    return runner_class(build_dir, artifact, request, **kwargs)


def bench_task(request: dict, emit) -> dict:
    build_dir = Path(request["build_dir"])
    inputs = bench_inputs(build_dir, request)
    emit({"event": "phase", "phase": "import"})
    started = time.perf_counter()
    import_runtime(request["artifact"]["runtime"])
    import_s = time.perf_counter() - started
    rss_before = rss_mb()
    emit({"event": "phase", "phase": "load", "seconds": import_s})
    started = time.perf_counter()
    runner = open_runner(build_dir, request)
    runner.prepare(inputs)
    load_s = time.perf_counter() - started
    rss_loaded = rss_mb()

    emit({"event": "phase", "phase": "first inference", "seconds": load_s})
    started = time.perf_counter()
    outputs = runner.infer()
    first_s = time.perf_counter() - started
    check = check_outputs(build_dir, request, outputs)

    warmup = int(request["warmup"])
    emit({"event": "phase", "phase": "warmup", "seconds": first_s, "total": warmup})
    started = time.perf_counter()
    for _ in range(warmup):
        runner.infer()
    warmup_s = time.perf_counter() - started

    iterations, duration = request.get("iterations"), request.get("duration")
    min_iterations = int(request.get("min_iterations", 1))
    emit({"event": "phase", "phase": "steady", "seconds": warmup_s, "total": iterations})
    latencies: list[float] = []
    started = last_report = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runner.infer()
        now = time.perf_counter()
        latencies.append(now - t0)
        if iterations is not None and len(latencies) >= iterations:
            break
        if duration is not None and now - started >= duration and len(latencies) >= min_iterations:
            break
        if now - last_report >= PROGRESS_EVERY_S:
            emit({"event": "progress", "done": len(latencies), "total": iterations,
                  "elapsed": now - started, "duration": duration})
            last_report = now
    steady_s = time.perf_counter() - started
    result = {
        "phases": {"import_s": import_s, "load_s": load_s, "first_inference_s": first_s, "warmup_s": warmup_s, "warmup_iterations": warmup,
                   "steady_s": steady_s},
        "latencies_s": latencies,
        "memory": {"rss_before_load_mb": rss_before, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb()},
        "output_check": check,
        "output_shapes": [list(np.shape(o)) for o in outputs],
    }
    if isinstance(runner, MxnetImperativeRunner):
        result["parameters"] = runner.parameter_report
    return result


def ceilings_task(request: dict, emit) -> dict:
    from .roofline import measure_fp32_ceiling, measure_int8_ceiling

    sizes = tuple(request["sizes"])
    emit({"event": "phase", "phase": "fp32 SGEMM"})
    fp32 = measure_fp32_ceiling(sizes, request["budget_s"], threads=request.get("threads"))
    emit({"event": "phase", "phase": "int8 GEMM"})
    int8 = measure_int8_ceiling(sizes, request["budget_s"], threads=request.get("threads"))
    return {"fp32": fp32.to_dict(), "int8": int8.to_dict()}


def profile_task(request: dict, emit) -> dict:
    """Run the artifact under its runtime's profiler; write a chrome://tracing JSON file."""
    build_dir = Path(request["build_dir"])
    out_dir = Path(request["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = bench_inputs(build_dir, request)
    artifact = request["artifact"]
    warmup, iterations = int(request["warmup"]), int(request["iterations"])
    trace_path = out_dir / "trace.json"
    tmp_trace = out_dir / f".trace.{os.getpid()}.json"
    result: dict = {"warmup": warmup, "iterations": iterations, "runtime": artifact["runtime"]}
    emit({"event": "phase", "phase": "load"})
    if artifact["runtime"] == "onnxruntime":
        optimized = out_dir / "optimized.onnx"
        runner = OnnxRunner(build_dir, artifact, request, profile_prefix=str(out_dir / f".ort-profile-{os.getpid()}"),
                            optimized_model_path=str(optimized))
        runner.prepare(inputs)
        emit({"event": "phase", "phase": "profiled runs", "total": warmup + iterations})
        for _ in range(warmup + iterations):
            runner.infer()
        raw_path = Path(runner.session.end_profiling())
        events = json.loads(raw_path.read_text())
        raw_path.unlink(missing_ok=True)
        # ORT writes a bare event array; wrap it so both runtimes' traces read the same way.
        tmp_trace.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                         "otherData": {"runtime": "onnxruntime", "skip_runs": warmup}}))
        result["optimized_graph"] = optimized.name if optimized.exists() else None
    else:
        from .mxnet_env import mxnet

        mx = mxnet()
        runner = open_runner(build_dir, request)
        runner.prepare(inputs)
        emit({"event": "phase", "phase": "warmup", "total": warmup})
        for _ in range(max(warmup, 1)):  # the first call builds the cached graph: keep it out of the trace
            runner.infer()
        mx.nd.waitall()
        mx.profiler.set_config(profile_symbolic=True, profile_imperative=True, profile_memory=False,
                               profile_api=False, aggregate_stats=True, filename=str(tmp_trace))
        emit({"event": "phase", "phase": "profiled runs", "total": iterations})
        mx.profiler.set_state("run")
        for _ in range(iterations):
            runner.infer()
        mx.nd.waitall()
        mx.profiler.set_state("stop")
        mx.profiler.dump()
        result["aggregate_stats"] = mx.profiler.dumps(reset=True)
    os.replace(tmp_trace, trace_path)
    result["trace"] = trace_path.name
    return result


TASKS = {"bench": bench_task, "ceilings": ceilings_task, "profile": profile_task}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    # Keep the protocol stream clean: the libraries' own prints (C and Python) go to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event: dict) -> None:
        channel.write(json.dumps(event, default=float) + "\n")
        channel.flush()

    import warnings

    warnings.simplefilter("ignore")
    try:
        result = TASKS[request["task"]](request, emit)
    except InfcError as exc:
        emit({"event": "error", "kind": type(exc).__name__, "message": exc.one_line()})
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the parent with the traceback on stderr
        traceback.print_exc()
        emit({"event": "error", "kind": "internal", "message": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
        return 1
    emit({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
