"""INT8 speed-up on x86: deeplab_resnet101_coco (480x480, batch 1) against MXNet imperative FP32.

    .venv/bin/python benchmarks/int8_speedup.py [--model M] [--iterations N] [--json out.json]

Builds the model with `--precision int8` for x86-mkldnn (random weights with
BatchNorm statistics from the seeded input, since pretrained weights cannot
be downloaded here), calibrated on photographs that scikit-image ships, then
times in one process, one after another: MXNet imperative FP32 (the seed
baseline, the same weights), the MKL-DNN FP32 graph, the MKL-DNN INT8 graph
and the Q/DQ INT8 ONNX on ONNX Runtime. It prints a table with each one's
speed-up against the baseline and the INT8 artifacts' pixel agreement with
FP32 on the calibration photos and on photos held out from calibration.
Goal: INT8 >= 3.6x the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALIBRATION_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                      "motorcycle_left.png", "retina.jpg", "rocket.jpg")
HELD_OUT_PHOTOS = ("motorcycle_right.png", "camera.png", "coins.png", "brick.png")
GOAL = 3.6


def write_photos(directory: Path, names) -> Path:
    import skimage
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        with Image.open(Path(skimage.data.__file__).parent / name) as image:
            image.convert("RGB").save(directory / (Path(name).stem + ".png"))
    return directory


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def time_runs(run, sample, warmup: int, iterations: int) -> dict:
    for _ in range(warmup):
        run(sample)
    seconds = []
    for _ in range(iterations):
        started = time.perf_counter()
        run(sample)
        seconds.append(time.perf_counter() - started)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs": len(seconds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deeplab_resnet101_coco")
    parser.add_argument("--input-shape", default=None, help="default: the model's (1x3x480x480 for deeplab)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calib-mode", default="naive", choices=("naive", "entropy"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/int8_speedup.json"))
    args = parser.parse_args(argv)

    from compiler.accuracy import measure
    from compiler.calibration import load_image_set
    from compiler.models import WeightsRequest, load_model, parse_input_shape, reference_input, resolve_model
    from compiler.mxnet_env import mxnet
    from compiler.pipeline import CompileSpec, compile_model
    from compiler.precision import PrecisionRequest
    from compiler.runner import as_output_list, load_mxnet, ort_session, run_onnx
    from compiler.targets import resolve_target

    mx = mxnet()
    work = Path(tempfile.mkdtemp(prefix="infc-int8-bench-"))
    os.environ.setdefault("INFC_CACHE_DIR", str(work / "cache"))
    calibration = write_photos(work / "calibration", CALIBRATION_PHOTOS)
    held_out = write_photos(work / "held-out", HELD_OUT_PHOTOS)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None

    started = time.perf_counter()
    build = compile_model(CompileSpec(
        model=args.model, target=resolve_target("x86-mkldnn"), out_dir=work / "out", input_shape=shape,
        weights=WeightsRequest("random"),
        precision=PrecisionRequest("int8", calibration, calib_mode=args.calib_mode, max_accuracy_drop=100.0)))
    compile_seconds = time.perf_counter() - started
    build_dir, manifest = build.build_dir, build.manifest
    input_shape = tuple(manifest["model"]["inputs"]["data"]["shape"])
    sample = reference_input(input_shape, 0)

    info = resolve_model(args.model)
    imperative = load_model(info, WeightsRequest("random"), input_shape).net  # the seed baseline, not hybridized
    portable = load_mxnet(build_dir / "mxnet/portable-symbol.json", build_dir / "mxnet/portable-0000.params")
    mkldnn = load_mxnet(build_dir / "mxnet/mkldnn-symbol.json", build_dir / "mxnet/mkldnn-0000.params")
    int8 = load_mxnet(build_dir / "mxnet/int8-symbol.json", build_dir / "mxnet/int8-0000.params")
    for block in (portable, mkldnn, int8):
        block.hybridize(static_alloc=True, static_shape=True)
    session = ort_session(build_dir / "onnx/model.int8.onnx")

    def mxnet_runner(block):
        return lambda x: [o.asnumpy() for o in as_output_list(block(mx.nd.array(x)))]

    runners = {
        "MXNet imperative FP32 (baseline)": mxnet_runner(imperative),
        "MKL-DNN FP32 (mxnet-mkldnn)": mxnet_runner(mkldnn),
        "MKL-DNN INT8 (mxnet-int8)": mxnet_runner(int8),
        "ONNX Runtime Q/DQ INT8 (onnx-int8)": lambda x: run_onnx(session, [x]),
    }
    timings = {name: time_runs(run, sample, args.warmup, args.iterations) for name, run in runners.items()}
    baseline = timings["MXNet imperative FP32 (baseline)"]["median_s"]
    for entry in timings.values():
        entry["speedup"] = baseline / entry["median_s"]

    # Agreement with FP32 on the calibration photos (from the manifest) and on photos it never saw.
    artifacts = manifest["details"]["accuracy"]["artifacts"]
    metrics = ("pixel_agreement", "miou") if info.family == "segmentation" else ("top1_agreement", "top5_agreement")
    agreement = {"calibration photos": {name: {k: artifacts[name][k] for k in metrics + ("images",)}
                                        for name in ("mxnet-int8", "onnx-int8")}}
    held = load_image_set(held_out, input_shape, info.name, info.family)
    reference = [np.concatenate(o)[:held.count] for o in zip(*[mxnet_runner(portable)(b) for b in held.batches])]
    agreement["held-out photos"] = {}
    for name, run in (("mxnet-int8", runners["MKL-DNN INT8 (mxnet-int8)"]),
                      ("onnx-int8", runners["ONNX Runtime Q/DQ INT8 (onnx-int8)"])):
        outputs = [np.concatenate(o)[:held.count] for o in zip(*[run(b) for b in held.batches])]
        report = measure(name, info.family, outputs, reference, held.count)
        agreement["held-out photos"][name] = {**{k: getattr(report, k) for k in metrics}, "images": held.count}
    classes = sorted(int(c) for c in np.unique(reference[0].argmax(axis=1)))

    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    print(f"{args.model} {'x'.join(map(str, input_shape))}, {time.strftime('%Y-%m-%d')}, {machine}, "
          f"random-init weights, calibration {args.calib_mode} on {len(CALIBRATION_PHOTOS)} photos")
    print(f"  {'artifact':<38} {'median s':>9} {'min s':>8} {'speed-up':>9}")
    for name, entry in timings.items():
        print(f"  {name:<38} {entry['median_s']:9.3f} {entry['min_s']:8.3f} {entry['speedup']:8.2f}x")
    int8_speedup = timings["MKL-DNN INT8 (mxnet-int8)"]["speedup"]
    print(f"  INT8 speed-up {int8_speedup:.2f}x (goal {GOAL}x: {'met' if int8_speedup >= GOAL else 'NOT met'})")
    print(f"  {'agreement with FP32':<38} {'images':>6} " + " ".join(f"{m.split('_')[0]:>8}" for m in metrics))
    for role, by_artifact in agreement.items():
        for name, a in by_artifact.items():
            print(f"  {name + ' on ' + role:<38} {a['images']:>6} "
                  + " ".join(f"{100 * a[m]:7.2f}%" for m in metrics))
    print(f"  classes the FP32 model predicts on the held-out photos: {classes} (random weights)")
    print(f"  compile with --precision int8: {compile_seconds:.1f} s")

    report = {"model": args.model, "input_shape": list(input_shape), "date": time.strftime("%Y-%m-%d"),
              "machine": machine, "python": platform.python_version(), "calib_mode": args.calib_mode,
              "timings": timings, "int8_speedup": int8_speedup, "goal": GOAL, "goal_met": int8_speedup >= GOAL,
              "pixel_agreement": agreement, "classes_in_fp32_masks": classes,
              "compile_seconds": round(compile_seconds, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"  JSON: {args.json}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
