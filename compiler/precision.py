"""Reduced precision as pipeline stages: INT8 (MKL-DNN, Q/DQ ONNX), FP16/BF16 (MXNet AMP).

Every reduced-precision artifact is measured against the FP32 MXNet
reference on the calibration images (or --val-data) and held to the
target's accuracy budget. An INT8 artifact that misses it gets its most
sensitive layers put back into FP32, a few more each round, until it fits
or the allowance of FP32 layers runs out; the manifest records every round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .targets import CALIB_MODES, PRECISIONS


@dataclass(frozen=True)
class PrecisionRequest:
    """What `--precision` and its companions asked for; all None means "as the target says"."""
    precision: str | None = None
    calib_data: Path | None = None
    calib_count: int | None = None
    calib_mode: str | None = None
    val_data: Path | None = None
    max_accuracy_drop: float | None = None  # percentage points

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def reduced_kinds(precision: str, device_kind: str, emits_onnx: bool) -> tuple[str, ...]:
    """Artifacts a precision adds on a device kind; an unusable pairing is a user error."""
    if precision == "int8":
        kinds = ("mxnet-int8",) if device_kind == "x86" else ()
        if emits_onnx:
            kinds += ("onnx-int8",)
        if not kinds:
            raise UserError(f"--precision int8 on a {device_kind} target needs its 'onnx' artifact",
                            "add 'onnx' to the target's emit list")
        return kinds
    if precision == "bf16":
        if device_kind != "x86":
            raise UserError(f"--precision bf16 is for x86 CPUs, not {device_kind} targets",
                            "use --precision fp16 or int8 on GPU targets")
        return ("mxnet-bf16",)
    if precision == "fp16":
        if device_kind == "x86":
            raise UserError("--precision fp16 has no fast path on x86 CPUs (MXNet has no CPU FP16 GEMM)",
                            "use --precision bf16 or int8 for x86 targets")
        return ("mxnet-fp16",) if device_kind == "cuda" else ()
    return ()


def apply_request(target, request: PrecisionRequest):
    """The target as this build sees it: precision, extra artifacts, calibration mode and budget."""
    if request.precision is None:
        given = [flag for flag, value in (("--calib-data", request.calib_data), ("--calib-count", request.calib_count),
                                          ("--calib-mode", request.calib_mode), ("--val-data", request.val_data),
                                          ("--max-accuracy-drop", request.max_accuracy_drop)) if value is not None]
        if given:
            raise UserError(f"{given[0]} applies to reduced-precision builds", "add --precision int8 (or fp16/bf16)")
        return target
    if request.precision not in PRECISIONS:
        raise UserError(f"unknown --precision '{request.precision}'", f"use one of {', '.join(PRECISIONS)}")
    if request.calib_mode is not None and request.calib_mode not in CALIB_MODES:
        raise UserError(f"unknown --calib-mode '{request.calib_mode}'", f"use one of {', '.join(CALIB_MODES)}")
    if request.precision == "int8" and request.calib_data is None:
        raise UserError("--precision int8 needs calibration images",
                        "pass --calib-data DIR with JPEG/PNG photos like the ones the model will see")
    if request.precision != "int8" and (request.calib_data or request.calib_count or request.calib_mode):
        raise UserError(f"--calib-data/--calib-count/--calib-mode calibrate INT8, not {request.precision}",
                        "pass --val-data DIR to measure accuracy instead")
    if request.max_accuracy_drop is not None and not 0 <= request.max_accuracy_drop <= 100:
        raise UserError(f"--max-accuracy-drop {request.max_accuracy_drop} is not between 0 and 100",
                        "give percentage points, e.g. 1.0")
    from .calibration import image_files

    # Bad image directories fail now, not after the model has loaded.
    if request.calib_data is not None:
        image_files(request.calib_data, "--calib-data")
    if request.val_data is not None:
        image_files(request.val_data, "--val-data")
    if request.calib_count is not None and request.calib_count <= 0:
        raise UserError(f"--calib-count {request.calib_count} is not positive", "pass a positive number of images")
    extra = reduced_kinds(request.precision, target.device.kind, target.emits("onnx"))
    quantize = target.quantize
    if request.calib_mode is not None:
        quantize = dataclasses.replace(quantize, calib_mode=request.calib_mode)
    accuracy = target.accuracy
    if request.max_accuracy_drop is not None:
        accuracy = dataclasses.replace(accuracy, max_drop=float(request.max_accuracy_drop))
    return dataclasses.replace(target, precision=request.precision,
                               emit=target.emit + tuple(k for k in extra if k not in target.emit),
                               quantize=quantize, accuracy=accuracy)


# --- state shared by the precision stages (in memory, not in the manifest) --------------------------

@dataclass
class PrecisionState:
    calibration: object | None          # calibration.ImageSet
    evaluation: object                  # calibration.ImageSet, or None for the seeded input
    eval_batches: list[np.ndarray]
    eval_count: int
    eval_reference: list[np.ndarray]    # FP32 MXNet outputs stacked over the evaluation images
    reports: list = field(default_factory=list)
    sensitivity: list[tuple[str, float]] | None = None


def _state(ctx) -> PrecisionState:
    return ctx.work["precision"]


def _stack(per_batch: list[list[np.ndarray]], count: int) -> list[np.ndarray]:
    return [np.concatenate([outs[i] for outs in per_batch])[:count] for i in range(len(per_batch[0]))]


def stage_eval_images(ctx) -> str:
    """Load calibration and evaluation images and the FP32 reference outputs on them."""
    from .calibration import load_image_set
    from .runner import load_mxnet, run_mxnet

    request = ctx.spec.precision
    name, family = ctx.info.name, ctx.info.family
    calibration = None
    if request.calib_data is not None:
        calibration = load_image_set(request.calib_data, ctx.input_shape, name, family, request.calib_count)
        ctx.extra["calibration"] = {**calibration.record(), "mode": ctx.target.quantize.calib_mode}
    evaluation = calibration
    if request.val_data is not None:
        evaluation = load_image_set(request.val_data, ctx.input_shape, name, family, option="--val-data")
    if evaluation is not None:
        batches, count = list(evaluation.batches), evaluation.count
        ctx.extra["evaluation"] = {**evaluation.record(), "role": "validation" if request.val_data else "calibration"}
    else:
        batches, count = [ctx.reference_inputs[0]], ctx.input_shape[0]
        ctx.extra["evaluation"] = {"role": "seeded reference input", "count": count}
        ctx.notes.append("accuracy measured on the seeded reference input only: pass --val-data DIR for photos")
    # The reference is the portable FP32 graph (bit-identical to the imperative model, and independent of
    # whatever backend the in-memory network was hybridized with since).
    fp32 = load_mxnet(ctx.staging / "mxnet/portable-symbol.json", ctx.staging / "mxnet/portable-0000.params",
                      ctx.input_names)
    per_batch = [run_mxnet(fp32, [b]) for b in batches]
    ctx.work["precision"] = PrecisionState(calibration, evaluation, batches, count, _stack(per_batch, count))
    what = f"{count} {'image(s)' if evaluation is not None else 'seeded input(s)'}"
    if calibration is not None:
        return f"{calibration.count} calibration image(s) (sha256 {calibration.sha256[:12]}); evaluating on {what}"
    return f"evaluating on {what}"


def eval_config(ctx) -> dict:
    """What the precision stages' outputs depend on besides their parent and the target."""
    request = ctx.spec.precision
    state = ctx.work.get("precision")
    return {"request": request.to_dict(),
            "calibration": state.calibration.sha256 if state and state.calibration else None,
            "evaluation": state.evaluation.sha256 if state and state.evaluation else None}


def _evaluate(ctx, artifact: str, run: Callable[[np.ndarray], list[np.ndarray]]):
    from .accuracy import measure

    state = _state(ctx)
    outputs = _stack([run(b) for b in state.eval_batches], state.eval_count)
    return measure(artifact, ctx.info.family, outputs, state.eval_reference, state.eval_count)


def _record_budget(ctx, report, steps: list[dict] | None = None, kept_fp32: list[str] = ()) -> None:
    from .verify import FAILED, NOT_RUN, PASSED, Check

    budget = ctx.target.accuracy.max_drop
    within = report.within(budget)
    if within is None:
        status = NOT_RUN
        detail = (f"not run: no accuracy metric for {report.family} models; "
                  f"rel error {report.rel_error:.2e} on {report.images} image(s)")
    else:
        status = PASSED if within else FAILED
        detail = (f"{report.headline.replace('_', ' ')} {100 * getattr(report, report.headline):.2f}% "
                  f"(drop {report.drop_pp:.2f} pp, budget {budget:g} pp) on {report.images} image(s)")
        if steps and len(steps) > 1:
            detail += f"; {len(kept_fp32)} layer(s) kept in FP32 after {len(steps) - 1} fallback round(s)"
    ctx.add_check(Check("accuracy-budget", report.artifact, status, detail, numbers=report.to_dict(),
                        tolerance={"max_drop_pp": budget}))
    _state(ctx).reports.append(report)
    ctx.extra.setdefault("accuracy", {"budget_pp": budget, "reference": "FP32 MXNet outputs", "artifacts": {}})
    ctx.extra["accuracy"]["artifacts"][report.artifact] = {**report.to_dict(), "kept_fp32": list(kept_fp32),
                                                           "fallback": steps or []}


def _sensitivity(ctx) -> list[tuple[str, float]]:
    """Layers, most sensitive first; computed once per build from the FP32 graph."""
    from .quantize import layer_sensitivity

    state = _state(ctx)
    if state.sensitivity is None:
        batches = list(state.calibration.batches)[:2]
        scores = layer_sensitivity(ctx.staging / "mxnet/portable-symbol.json",
                                   ctx.staging / "mxnet/portable-0000.params", ctx.input_names[0], batches)
        state.sensitivity = sorted(scores.items(), key=lambda kv: -kv[1])
        ctx.extra["layer_sensitivity"] = [{"layer": k, "relative_error": round(v, 6)} for k, v in state.sensitivity]
    return state.sensitivity


def fit_budget(ctx, artifact: str, build: Callable[[list[str]], Callable]) -> tuple[object, list[str], list[dict]]:
    """Quantize, measure, and put the most sensitive layers back into FP32 until the budget holds.

    `build(keep_fp32)` quantizes with those layers left in FP32 and returns a
    function that runs one batch. Rounds keep 1, 2, 4, ... layers, up to the
    target's `quantize.max_fp32_layers`. Returns the best round's report, its
    FP32 layers and every round's numbers.
    """
    budget = ctx.target.accuracy.max_drop
    limit = ctx.target.quantize.max_fp32_layers
    steps: list[dict] = []
    best = None

    def attempt(keep: list[str]):
        nonlocal best
        started = time.perf_counter()
        report = _evaluate(ctx, artifact, build(keep))
        steps.append({"kept_fp32": list(keep), "drop_pp": report.drop_pp, "rel_error": report.rel_error,
                      "seconds": round(time.perf_counter() - started, 2)})
        # Fewest points lost wins; between equals, the smaller error.
        if best is None or (report.drop_pp or 0, report.rel_error) < (best[0].drop_pp or 0, best[0].rel_error):
            best = (report, list(keep))
        return report

    report = attempt([])
    if report.within(budget) is not False or limit <= 0:
        return best[0], best[1], steps
    ranking = [name for name, _ in _sensitivity(ctx)]
    count = 1
    while report.within(budget) is False:
        keep = ranking[:min(count, limit, len(ranking))]
        if keep == steps[-1]["kept_fp32"]:
            break  # nothing more may go back to FP32
        report = attempt(keep)
        count *= 2
    return best[0], best[1], steps


def _graph_sha256(ctx) -> str:
    from .manifest import sha256_path

    return sha256_path(ctx.staging / "mxnet/portable-symbol.json")


def _quiet():
    """Libraries that print progress to stdout would corrupt `--json` output."""
    return contextlib.redirect_stdout(io.StringIO())


def _step_summary(steps: list[dict]) -> str:
    if len(steps) == 1:
        return ""
    def measured(step: dict) -> str:
        return f"{step['drop_pp']:.2f} pp" if step["drop_pp"] is not None else f"rel error {step['rel_error']:.1e}"

    return "; fallback " + " -> ".join(f"{len(s['kept_fp32'])} FP32: {measured(s)}" for s in steps)


# --- INT8 on MKL-DNN ---------------------------------------------------------------------------

def stage_mxnet_int8(ctx) -> str:
    from .calibration import cache_root, calibration_key, read_cached_thresholds, write_cached_thresholds
    from .mxnet_env import mxnet
    from .quantize import quantize_mxnet
    from .runner import as_output_list

    mx = mxnet()
    state = _state(ctx)
    mode = ctx.target.quantize.calib_mode
    symbol = ctx.staging / "mxnet/portable-symbol.json"
    params = ctx.staging / "mxnet/portable-0000.params"
    key = calibration_key(ctx.model.weights["sha256"], _graph_sha256(ctx), state.calibration.sha256, mode,
                          ctx.target.to_dict(), "mxnet-mkldnn")
    cache_file = cache_root() / f"{key}.mxnet.json"
    known = read_cached_thresholds(cache_file) or {}
    measured: set[str] = set()
    built = {}

    def build(keep: list[str]):
        result = quantize_mxnet(symbol, params, ctx.input_names[0], list(state.calibration.batches), mode,
                                keep_fp32=keep, known=known)
        known.update(result.thresholds)
        measured.update(result.calibrated_now)
        built[tuple(keep)] = result
        return lambda batch: [o.asnumpy() for o in as_output_list(result.block(mx.nd.array(batch)))]

    with _quiet():
        report, keep, steps = fit_budget(ctx, "mxnet-int8", build)
    if measured:
        write_cached_thresholds(cache_file, known, {"key": key, "mode": mode, "backend": "mxnet-mkldnn",
                                                    "weights": ctx.model.weights["sha256"],
                                                    "images": state.calibration.sha256})
    cache_note = (f"calibration cached ({len(known)} tensor ranges, key {key[:12]})" if measured
                  else f"reused cached calibration ({len(known)} tensor ranges, key {key[:12]})")
    chosen = built[tuple(keep)]
    in_memory = [o.asnumpy() for o in as_output_list(chosen.block(mx.nd.array(ctx.reference_inputs[0])))]
    prefix = "mxnet/int8"
    ctx.path(prefix)
    chosen.block.export(str(ctx.staging / prefix))
    symbol_rel, params_rel = f"{prefix}-symbol.json", f"{prefix}-0000.params"
    ctx.add_artifact(symbol_rel, "mxnet-int8", "mxnet-symbol-json")
    ctx.add_artifact(params_rel, "mxnet-int8", "mxnet-params")
    parity = _reload_parity(ctx, "mxnet-int8", symbol_rel, params_rel, in_memory)
    ctx.extra.setdefault("int8", {})["mxnet-int8"] = {
        "backend": "MKL-DNN (quantize_net_v2, quantized_dtype auto, channel-wise weights)",
        "calibration_mode": mode, "calibration_cache": "hit" if not measured else "miss",
        "calibration_key": key, "kept_fp32": keep, "kept_fp32_fused": chosen.excluded_fused,
        "kept_fp32_backend_defect": chosen.backend_workaround,
        "fused_nodes_quantized": _count_quantized_nodes(ctx.staging / symbol_rel)}
    if not measured:
        ctx.notes.append(f"mxnet-int8: {cache_note}")
    if chosen.backend_workaround:
        ctx.notes.append(f"mxnet-int8: {len(chosen.backend_workaround)} fused conv+sum node(s) with a signed residual "
                         "kept in FP32 (MXNet 1.9.1 MKL-DNN computes them wrongly in INT8)")
    _record_budget(ctx, report, steps, keep)
    return f"{cache_note}; {_budget_word(report, ctx)}{_step_summary(steps)}; reload {parity.status}"


def _count_quantized_nodes(symbol_path: Path) -> int:
    return sum(1 for n in json.loads(symbol_path.read_text())["nodes"] if n["name"].startswith("quantized_"))


def _budget_word(report, ctx) -> str:
    budget = ctx.target.accuracy.max_drop
    if report.drop_pp is None:
        return f"rel error {report.rel_error:.2e} (no accuracy metric for {report.family})"
    verdict = "within" if report.within(budget) else "MISSES"
    return f"{report.headline.replace('_', ' ')} {100 - report.drop_pp:.2f}% ({verdict} {budget:g} pp budget)"


def _reload_parity(ctx, artifact: str, symbol_rel: str, params_rel: str, expected: list[np.ndarray]):
    """The exported files, loaded as a deployment would, must reproduce the in-memory model."""
    from .runner import load_mxnet, run_mxnet
    from .verify import Check, compare_outputs

    started = time.perf_counter()
    block = load_mxnet(ctx.staging / symbol_rel, ctx.staging / params_rel, ctx.input_names)
    verify = ctx.target.verify
    comparison = compare_outputs(run_mxnet(block, ctx.reference_inputs), expected, ctx.output_names,
                                 verify.rtol, verify.atol)
    check = Check.from_comparison("reload-parity", artifact, comparison)
    check.detail = "against the in-memory quantized model: " + check.detail
    check.seconds = time.perf_counter() - started
    return ctx.add_check(check)


# --- INT8 Q/DQ ONNX ------------------------------------------------------------------------------

def stage_onnx_int8(ctx) -> str:
    from .calibration import cache_root, calibration_key
    from .quantize import quantize_onnx
    from .runner import ort_session, run_onnx
    from .verify import FAILED, PASSED, Check

    state = _state(ctx)
    mode = ctx.target.quantize.calib_mode
    key = calibration_key(ctx.model.weights["sha256"], _graph_sha256(ctx), state.calibration.sha256, mode,
                          ctx.target.to_dict(), "onnx-qdq")
    cache_file = cache_root() / f"{key}.onnx.json"
    relative = "onnx/model.int8.onnx"
    destination = ctx.path(relative)
    results = {}

    def build(keep: list[str]):
        with _quiet():
            result = quantize_onnx(ctx.staging / "onnx/model.onnx", destination, ctx.input_names[0],
                                   list(state.calibration.batches), mode, ctx.target.onnx.opset,
                                   ctx.target.onnx.ir_version, cache_file, keep_fp32=keep)
        results[tuple(keep)] = (result, destination.read_bytes())
        session = ort_session(destination)
        return lambda batch: run_onnx(session, [batch])

    report, keep, steps = fit_budget(ctx, "onnx-int8", build)
    result, payload = results[tuple(keep)]
    destination.write_bytes(payload)
    ctx.add_artifact(relative, "onnx-int8", "onnx")
    cache_hit = next(iter(results.values()))[0].cache_hit
    summary = result.summary
    started = time.perf_counter()
    try:
        from .onnx_export import check_onnx

        check_onnx(destination)
        problems = [] if summary["symmetric"] else summary["problems"]
        status = FAILED if problems else PASSED
        detail = ("; ".join(problems) if problems else
                  f"onnx.checker full_check; {summary['quantized_layers']} layers with symmetric INT8 Q/DQ "
                  f"(zero points 0, {summary['per_channel_weights']} per-channel weights)")
    except Exception as exc:  # noqa: BLE001 - any checker complaint is a failed check
        status, detail = FAILED, " ".join(str(exc).split())[:300]
    ctx.add_check(Check("onnx-checker", "onnx-int8", status, detail, numbers=summary,
                        seconds=time.perf_counter() - started))
    ctx.extra.setdefault("int8", {})["onnx-int8"] = {
        "format": "QDQ: symmetric INT8 activations, per-channel INT8 weights, zero points 0, FP32 bias and I/O",
        "calibration_mode": mode, "calibration_cache": "hit" if cache_hit else "miss", "calibration_key": key,
        "kept_fp32": keep, "excluded_nodes": result.excluded_nodes, **summary}
    if ctx.target.emits("tensorrt-engine") or ctx.target.emits("tensorrt-build-kit"):
        _engine_from_int8(ctx, destination)
    cache_note = (f"reused cached calibration (key {key[:12]})" if cache_hit
                  else f"calibration cached (key {key[:12]})")
    if cache_hit:
        ctx.notes.append(f"onnx-int8: {cache_note}")
    _record_budget(ctx, report, steps, keep)
    return (f"{cache_note}; {summary['quantized_layers']} Q/DQ layers; {_budget_word(report, ctx)}"
            f"{_step_summary(steps)}; checker {status}")


def _engine_from_int8(ctx, onnx_path: Path) -> None:
    """Have the TensorRT stages build from the Q/DQ ONNX, and hold the engine to twice the error
    that ONNX shows on ONNX Runtime (the same quantization, other kernels), at least the FP16 tolerance."""
    from .runner import ort_session, run_onnx
    from .verify import compare_outputs

    outputs = run_onnx(ort_session(onnx_path), ctx.reference_inputs)
    measured = compare_outputs(outputs, ctx.reference_outputs, ctx.output_names, 0.0, 0.0).rel_error
    verify = ctx.target.verify
    ctx.extra["engine_onnx"] = onnx_path.name
    ctx.extra["precision"] = "int8"
    ctx.extra["engine_tolerance"] = {"rtol": max(verify.fp16_rtol, round(2 * measured, 4)), "atol": verify.fp16_atol}


# --- FP16 / BF16 through MXNet AMP ------------------------------------------------------------------

AMP_DTYPES = {"mxnet-fp16": "float16", "mxnet-bf16": "bfloat16"}


def amp_runnable_here(kind: str) -> tuple[bool, str]:
    from .mxnet_env import cpu_supports

    if kind == "mxnet-fp16":
        return False, "MXNet has no FP16 GEMM on CPU; run it on a CUDA GPU"
    if not cpu_supports("avx512_bf16"):
        return False, "this CPU lacks avx512_bf16"
    return True, ""


def _export_amp(block, input_names: list[str], symbol_path: Path, params_path: Path) -> None:
    """Like HybridBlock.export, without the forward pass export needs (FP16 cannot run on a CPU)
    and keeping the amp_cast nodes, which export drops by default."""
    from .mxnet_env import mxnet

    mx = mxnet()
    symbol = block(*[mx.sym.var(name) for name in input_names])
    if isinstance(symbol, (list, tuple)):  # several outputs (deeplab's main and auxiliary heads)
        symbol = mx.sym.Group(list(symbol))
    symbol.save(str(symbol_path), remove_amp_cast=False)
    arguments, auxiliary = set(symbol.list_arguments()), set(symbol.list_auxiliary_states())
    saved = {}
    for name, param in block.collect_params().items():
        if name in arguments:
            saved[f"arg:{name}"] = param.data()
        elif name in auxiliary:
            saved[f"aux:{name}"] = param.data()
    mx.nd.save(str(params_path), saved)


# Ops MXNet 1.9.1's BF16 lists call neutral although they need one input type:
# a Concat fed by a BF16 branch and an FP32-only branch (deeplab's ASPP image
# pooling ends in BilinearResize2D) fails type inference. The FP16 lists cast
# them to the widest input type instead; for BF16 they are kept in FP32.
_AMP_SINGLE_TYPE_OPS = ("Concat", "concat")


def _amp_convert(block, dtype: str):
    """AMP-convert a FP32 block; returns (converted block, ops forced to FP32 to make it convert)."""
    from .mxnet_env import mxnet

    mx = mxnet()
    from mxnet.contrib import amp

    try:
        with _quiet():
            return amp.convert_hybrid_block(block, target_dtype=dtype, ctx=mx.cpu(), cast_optional_params=False), []
    except mx.base.MXNetError as exc:
        if "Non-uniform data type" not in str(exc):
            raise
    # The op-list getters take numpy's dtype object, not the name convert_hybrid_block accepts.
    list_dtype = amp.amp.bfloat16 if dtype == "bfloat16" else dtype
    legal = set(amp.list_lp16_fp32_ops(list_dtype))
    forced = [op for op in _AMP_SINGLE_TYPE_OPS if op in legal]
    fp32_ops = list(amp.list_fp32_ops(list_dtype)) + forced
    with _quiet():
        converted = amp.convert_hybrid_block(block, target_dtype=dtype, fp32_ops=fp32_ops,
                                             ctx=mx.cpu(), cast_optional_params=False)
    return converted, forced


def _forced_word(forced_fp32: list[str]) -> str:
    return f" ({'/'.join(forced_fp32)} kept in FP32)" if forced_fp32 else ""


def stage_mxnet_amp(ctx, kind: str) -> str:
    from .mxnet_env import mxnet
    from .runner import as_output_list, load_mxnet
    from .verify import NOT_RUN, Check, compare_outputs

    mx = mxnet()
    dtype = AMP_DTYPES[kind]
    fp32 = load_mxnet(ctx.staging / "mxnet/portable-symbol.json", ctx.staging / "mxnet/portable-0000.params",
                      ctx.input_names)
    prefix = f"mxnet/{dtype.replace('float', 'fp').replace('bfp', 'bf')}"
    symbol_rel, params_rel = f"{prefix}-symbol.json", f"{prefix}-0000.params"
    try:
        converted, forced_fp32 = _amp_convert(fp32, dtype)
        _export_amp(converted, ctx.input_names, ctx.path(symbol_rel), ctx.path(params_rel))
    except mx.base.MXNetError as exc:
        from .errors import UnsupportedModel
        from .models import mxnet_error_summary

        raise UnsupportedModel(f"MXNet AMP cannot convert {ctx.info.name} to {dtype}: {mxnet_error_summary(exc)}",
                               "build without --precision "
                               f"{'bf16' if dtype == 'bfloat16' else 'fp16'}, or use --precision int8") from None
    ctx.add_artifact(symbol_rel, kind, "mxnet-symbol-json")
    ctx.add_artifact(params_rel, kind, "mxnet-params")
    casts = sum(1 for n in json.loads((ctx.staging / symbol_rel).read_text())["nodes"]
                if n["op"] in ("amp_cast", "amp_multicast"))
    ctx.extra.setdefault("amp", {})[kind] = {"target_dtype": dtype, "amp_casts": casts,
                                             "forced_fp32_ops": forced_fp32}
    runnable, reason = amp_runnable_here(kind)
    if not runnable:
        ctx.add_check(Check("reload-parity", kind, NOT_RUN, f"not run: {reason}"))
        ctx.add_check(Check("accuracy-budget", kind, NOT_RUN, f"not run: {reason}"))
        ctx.extra["amp"][kind]["verified"] = f"not run: {reason}"
        return f"{casts} AMP casts{_forced_word(forced_fp32)}; not run here: {reason}"
    verify = ctx.target.verify
    reloaded = load_mxnet(ctx.staging / symbol_rel, ctx.staging / params_rel, ctx.input_names)
    outputs = [o.asnumpy().astype(np.float32) for o in
               as_output_list(reloaded(mx.nd.array(ctx.reference_inputs[0])))]
    comparison = compare_outputs(outputs, ctx.reference_outputs, ctx.output_names, verify.fp16_rtol, verify.fp16_atol)
    parity = ctx.add_check(Check.from_comparison("reload-parity", kind, comparison))
    report = _evaluate(ctx, kind, lambda batch: [o.asnumpy().astype(np.float32)
                                                 for o in as_output_list(reloaded(mx.nd.array(batch)))])
    _record_budget(ctx, report)
    return f"{casts} AMP casts{_forced_word(forced_fp32)}; reload vs FP32 {parity.status} ({comparison.summary()}); {_budget_word(report, ctx)}"


def stage_accuracy_report(ctx) -> str:
    """Measure the ONNX FP16 artifact too when this build asked for a precision, and sum up."""
    from .accuracy import format_table
    from .runner import ort_session, run_onnx

    if ctx.target.emits("onnx-fp16") and not any(r.artifact == "onnx-fp16" for r in _state(ctx).reports):
        session = ort_session(ctx.staging / "onnx/model.fp16.onnx")
        _record_budget(ctx, _evaluate(ctx, "onnx-fp16", lambda batch: run_onnx(session, [batch])))
    reports = _state(ctx).reports
    table = format_table(reports, ctx.target.accuracy.max_drop)
    ctx.extra.setdefault("accuracy", {})["table"] = table.splitlines()
    missed = [r.artifact for r in reports if r.within(ctx.target.accuracy.max_drop) is False]
    verdict = f"MISSED: {', '.join(missed)}" if missed else "all within budget"
    return f"{len(reports)} artifact(s) measured; {verdict}"


def budget_table(manifest: dict) -> str:
    """The accuracy table of a manifest, for messages."""
    return "\n".join(manifest.get("details", {}).get("accuracy", {}).get("table", []))
