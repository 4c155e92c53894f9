#!/usr/bin/env python3
"""Run the model of an infc bundle on this device.

Usage (from the unpacked bundle directory, or with --bundle DIR):

    python3 run.py                  # the bundled reference input; checks the outputs against
                                    # the bundled reference outputs within the target's tolerance
    python3 run.py photo.jpg        # classification: top-5 classes; segmentation: writes the mask as PNG
    python3 run.py input.npy        # an array of the model's input shape (or an HxWx3 RGB image array)
    python3 run.py --backend onnxruntime|tensorrt|auto --runs 50 --json

Backends: the TensorRT engine that build_engine.py built on this device
(TensorRT runtime, with cuda-python, pycuda or libcudart.so for buffers),
else the ONNX graph on ONNX Runtime. Latency percentiles cover one full
inference each (input copy, execution, output copy).

This file is copied verbatim into bundles: it needs only the standard
library, numpy, and onnxruntime or tensorrt (Pillow for images and PNG
masks; without Pillow masks are written as .npy). It must stay Python 3.6
compatible (JetPack 4.6). The TensorRT path reuses build_engine.py from the
bundle's build kit for CUDA buffers and engine I/O.

Exit codes: 0 ok, 1 unexpected error (traceback shown), 2 usage / bad input /
bundle incomplete, 3 a library is missing (the message names what to
install), 4 no CUDA device, 5 outputs differ from the reference, 6 the
engine cannot be loaded or run.
"""

import argparse
import collections
import importlib.util
import json
import os
import sys
import time
import traceback

# A bundle for a discrete GPU keeps its build kit in tensorrt/ beside this script: with the
# script's directory first on sys.path, `import tensorrt` would find that directory (as an
# empty namespace package) instead of TensorRT. Nothing is imported from here by name.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

SCRIPT_NAME = "run"
MANIFEST_FILE = "manifest.json"
SETTINGS_FILE = "builder_settings.json"

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_MISSING_LIBRARY = 3
EXIT_NO_GPU = 4
EXIT_REFERENCE_MISMATCH = 5
EXIT_ENGINE_FAILED = 6

NUMPY_NOT_FOUND = "numpy not found: install it (pip3 install numpy)"
ORT_NOT_FOUND = ("ONNX Runtime not found: install it (pip3 install onnxruntime; on a Jetson the "
                 "onnxruntime-gpu wheel for your JetPack), or build the TensorRT engine with the "
                 "bundle's build_engine.py")
PIL_NOT_FOUND = "Pillow not found: install it to read images (pip3 install pillow), or pass a .npy array"

# GluonCV models are trained on RGB images scaled to [0, 1] and normalized with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class RunError(Exception):
    """A handled failure: ``code`` is the exit code, ``message`` one line."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = one_line(message)


def one_line(text):
    return " ".join(str(text).split())


def say(message, quiet=False):
    if not quiet:
        print(message)
        sys.stdout.flush()


def import_numpy():
    try:
        import numpy
    except ImportError:
        raise RunError(EXIT_MISSING_LIBRARY, NUMPY_NOT_FOUND)
    return numpy


# --------------------------------------------------------------------------
# The bundle

def load_manifest(bundle_dir):
    path = os.path.join(bundle_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise RunError(EXIT_USAGE, "%s not found in %s: run run.py from the unpacked bundle, or pass "
                                   "--bundle DIR" % (MANIFEST_FILE, bundle_dir))
    try:
        with open(path) as handle:
            return json.load(handle, object_pairs_hook=collections.OrderedDict)
    except ValueError as exc:
        raise RunError(EXIT_USAGE, "%s is not valid JSON (%s): unpack the bundle again" % (path, exc))


def artifacts_of_kind(manifest, kind):
    return [a["path"] for a in manifest.get("artifacts", []) if a.get("kind") == kind]


def kit_dirs(bundle_dir, manifest):
    """Directories holding build_engine.py: the bundle itself, then the build kits."""
    found = []
    candidates = [""] + [os.path.dirname(a["path"]) for a in manifest.get("artifacts", [])
                         if a["path"].endswith("build_engine.py")]
    for relative in candidates:
        directory = os.path.join(bundle_dir, relative) if relative else bundle_dir
        if os.path.isfile(os.path.join(directory, "build_engine.py")) and directory not in found:
            found.append(directory)
    return found


def load_build_engine(directory):
    """Import the kit's build_engine.py by path (it ships beside the kit, not on sys.path)."""
    path = os.path.join(directory, "build_engine.py")
    spec = importlib.util.spec_from_file_location("build_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kit_settings(directory):
    try:
        with open(os.path.join(directory, SETTINGS_FILE)) as handle:
            return json.load(handle)
    except (IOError, OSError, ValueError):
        return {}


def find_engine(bundle_dir, manifest, kits, explicit=None):
    if explicit:
        if not os.path.isfile(explicit):
            raise RunError(EXIT_USAGE, "engine %s does not exist" % explicit)
        return explicit
    for kit in kits:
        name = kit_settings(kit).get("engine") or "model.engine"
        path = os.path.join(kit, name)
        if os.path.isfile(path):
            return path
    for artifact in manifest.get("artifacts", []):
        path = os.path.join(bundle_dir, artifact["path"])
        if artifact["path"].endswith(".engine") and os.path.isfile(path):
            return path
    return None


def find_onnx(bundle_dir, manifest, explicit=None, fp16=False):
    if explicit:
        if not os.path.isfile(explicit):
            raise RunError(EXIT_USAGE, "ONNX file %s does not exist" % explicit)
        return explicit
    kinds = ("onnx-fp16", "onnx") if fp16 else ("onnx",)
    for kind in kinds:
        for relative in artifacts_of_kind(manifest, kind):
            if relative.endswith(".onnx") and os.path.isfile(os.path.join(bundle_dir, relative)):
                return os.path.join(bundle_dir, relative)
    raise RunError(EXIT_USAGE, "the bundle has no ONNX graph for ONNX Runtime: unpack it again, "
                               "or build the TensorRT engine with build_engine.py")


def is_fp16_onnx(manifest, bundle_dir, path):
    fp16 = [os.path.realpath(os.path.join(bundle_dir, p)) for p in artifacts_of_kind(manifest, "onnx-fp16")]
    return os.path.realpath(path) in fp16 or path.endswith(".fp16.onnx")


# --------------------------------------------------------------------------
# Backends

class OnnxRuntimeRunner(object):
    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise RunError(EXIT_MISSING_LIBRARY, ORT_NOT_FOUND)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = onnxruntime.InferenceSession(path, options, providers=providers or available)
        self.name = "onnxruntime %s (%s, %s)" % (onnxruntime.__version__, self.session.get_providers()[0],
                                                 os.path.basename(path))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return collections.OrderedDict(zip(self.output_names, self.session.run(None, feeds)))

    def close(self):
        pass


class TensorRTRunner(object):
    """One execution context with device buffers allocated once, reused for every run."""

    def __init__(self, engine_path, be, trt, input_shapes, buffers=None):
        import numpy as np
        self.np = np
        self.be = be
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive the engine
        with open(engine_path, "rb") as handle:
            self.engine = self.runtime.deserialize_cuda_engine(handle.read())
        if self.engine is None:
            raise RunError(EXIT_ENGINE_FAILED, "%s does not deserialize with TensorRT %s (built by another "
                                               "TensorRT or GPU?): rebuild it with build_engine.py --force"
                           % (engine_path, trt.__version__))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RunError(EXIT_ENGINE_FAILED, "could not create an execution context (out of device memory?)")
        self.v3 = be.tensorrt_version(trt) >= be.ENQUEUE_V3_FROM
        self.tensors = be.engine_io(self.engine, trt)
        self._fix_dynamic_shapes(input_shapes)
        self.buffers = buffers if buffers is not None else be.load_buffer_backend()
        self.name = "tensorrt %s (%s, %s)" % (trt.__version__, self.buffers.name, os.path.basename(engine_path))
        self.pointers = collections.OrderedDict()
        self.hosts = collections.OrderedDict()
        try:
            for tensor in self.tensors:
                dtype = be.numpy_dtype(trt, tensor["dtype"])
                tensor["np_dtype"] = dtype
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                self.pointers[tensor["name"]] = self.buffers.alloc(max(1, count * dtype.itemsize))
                if not tensor["input"]:
                    self.hosts[tensor["name"]] = np.empty(tensor["shape"], dtype=dtype)
            if self.v3:
                for tensor in self.tensors:
                    if self.context.set_tensor_address(tensor["name"], self.pointers[tensor["name"]]) is False:
                        raise RunError(EXIT_ENGINE_FAILED, "set_tensor_address failed for %r" % tensor["name"])
            else:
                # One optimization profile (what build_engine.py builds): binding i is I/O tensor i.
                self.bindings = [0] * len(self.tensors)
                for tensor in self.tensors:
                    self.bindings[tensor["index"]] = self.pointers[tensor["name"]]
        except BaseException:
            self.close()
            raise

    def _fix_dynamic_shapes(self, input_shapes):
        """Engines with dynamic inputs run at the bundle's input shape; outputs follow from the context."""
        if all(d >= 0 for t in self.tensors for d in t["shape"]):
            return
        for tensor in self.tensors:
            if tensor["input"] and any(d < 0 for d in tensor["shape"]):
                shape = input_shapes[tensor["name"]]
                if hasattr(self.context, "set_input_shape"):
                    self.context.set_input_shape(tensor["name"], tuple(shape))
                else:
                    self.context.set_binding_shape(tensor["index"], tuple(shape))
                tensor["shape"] = list(shape)
        for tensor in self.tensors:
            if not tensor["input"]:
                if hasattr(self.context, "get_tensor_shape"):
                    tensor["shape"] = [int(d) for d in self.context.get_tensor_shape(tensor["name"])]
                else:
                    tensor["shape"] = [int(d) for d in self.context.get_binding_shape(tensor["index"])]

    def run(self, feeds):
        np = self.np
        for tensor in self.tensors:
            if tensor["input"]:
                array = np.ascontiguousarray(feeds[tensor["name"]], dtype=tensor["np_dtype"])
                if list(array.shape) != tensor["shape"]:
                    raise RunError(EXIT_USAGE, "input %r has shape %s, the engine takes %s"
                                   % (tensor["name"], list(array.shape), tensor["shape"]))
                self.buffers.htod(self.pointers[tensor["name"]], array)
        if self.v3:
            ok = self.context.execute_async_v3(self.buffers.stream_handle())
            self.buffers.synchronize()
        else:
            ok = self.context.execute_v2(self.bindings)
        if not ok:
            raise RunError(EXIT_ENGINE_FAILED, "TensorRT inference failed (execute returned False)")
        outputs = collections.OrderedDict()
        for name, host in self.hosts.items():
            self.buffers.dtoh(host, self.pointers[name])
            outputs[name] = host.copy()
        return outputs

    def close(self):
        buffers = getattr(self, "buffers", None)
        if buffers is None:
            return
        for pointer in getattr(self, "pointers", {}).values():
            buffers.free(pointer)
        self.pointers = collections.OrderedDict()
        buffers.close()
        self.buffers = None


def open_tensorrt(bundle_dir, manifest, kits, engine_arg):
    """The TensorRT runner, or RunError naming what is missing (checked in the order a user fixes it)."""
    if not kits:
        raise RunError(EXIT_USAGE, "this bundle (target %s) has no TensorRT build kit: use --backend onnxruntime"
                       % manifest["target"]["name"])
    be = load_build_engine(kits[0])
    try:
        trt = be.import_tensorrt()
        available, reason = be.cuda_device_available()
        if not available:
            raise RunError(EXIT_NO_GPU, "no CUDA device: %s" % reason)
        engine = find_engine(bundle_dir, manifest, kits, engine_arg)
        if engine is None:
            script = os.path.relpath(os.path.join(kits[-1], "build_engine.py"), bundle_dir)
            raise RunError(EXIT_USAGE, "no TensorRT engine in the bundle yet: build it on this device with "
                                       "`python3 %s`" % script)
        shapes = dict((name, spec["shape"]) for name, spec in manifest["model"]["inputs"].items())
        return TensorRTRunner(engine, be, trt, shapes), kit_settings(os.path.dirname(engine))
    except be.BuildError as exc:
        raise RunError(exc.code, exc.message)


def open_backend(args, bundle_dir, manifest):
    """(runner, tolerance, notes)."""
    verify = manifest["target"].get("verify", {})
    fp32_tolerance = (verify.get("rtol", 1e-4), verify.get("atol", 1e-5))
    fp16_tolerance = (verify.get("fp16_rtol", 1e-2), verify.get("fp16_atol", 1e-3))
    notes = []
    backend = "tensorrt" if args.engine and args.backend == "auto" else args.backend
    if backend in ("auto", "tensorrt"):
        kits = kit_dirs(bundle_dir, manifest)
        try:
            runner, settings = open_tensorrt(bundle_dir, manifest, kits, args.engine)
            tolerance = settings.get("tolerance") or {}
            reduced = manifest["target"].get("precision", "fp32") != "fp32"
            default = fp16_tolerance if reduced else fp32_tolerance
            return runner, (tolerance.get("rtol", default[0]), tolerance.get("atol", default[1])), notes
        except RunError as exc:
            if backend == "tensorrt" or exc.code not in (EXIT_USAGE, EXIT_MISSING_LIBRARY, EXIT_NO_GPU):
                raise
            if kits:
                notes.append("TensorRT not used: %s" % exc.message)
    path = find_onnx(bundle_dir, manifest, args.onnx, args.fp16)
    runner = OnnxRuntimeRunner(path)
    return runner, fp16_tolerance if is_fp16_onnx(manifest, bundle_dir, path) else fp32_tolerance, notes


# --------------------------------------------------------------------------
# Inputs

def input_specs(manifest):
    return collections.OrderedDict((name, spec) for name, spec in manifest["model"]["inputs"].items())


def load_image(path, np):
    try:
        from PIL import Image
    except ImportError:
        raise RunError(EXIT_MISSING_LIBRARY, PIL_NOT_FOUND)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (IOError, OSError) as exc:
        raise RunError(EXIT_USAGE, "cannot read image %s: %s" % (path, one_line(exc)))


def image_to_input(pixels, shape, np):
    """HxWx3 RGB pixels (0-255) -> the model's NCHW float input: resize, scale, ImageNet-normalize."""
    if len(shape) != 4 or shape[1] != 3:
        raise RunError(EXIT_USAGE, "this model's input is %s, not an RGB image: pass a .npy of that shape"
                       % "x".join(map(str, shape)))
    height, width = shape[2], shape[3]
    if pixels.shape[:2] != (height, width):
        try:
            from PIL import Image
        except ImportError:
            raise RunError(EXIT_MISSING_LIBRARY, PIL_NOT_FOUND)
        bilinear = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 moved the constants
        resized = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((width, height), bilinear)
        pixels = np.asarray(resized)
    scaled = pixels.astype(np.float32) / 255.0
    normalized = (scaled - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    chw = normalized.transpose(2, 0, 1)
    return np.ascontiguousarray(np.broadcast_to(chw, tuple(shape)), dtype=np.float32)


def fit_array(array, name, shape, source, np):
    shape = tuple(shape)
    if array.shape == shape:
        return np.ascontiguousarray(array, dtype=np.float32)
    if array.shape == shape[1:]:
        return np.ascontiguousarray(np.broadcast_to(array, shape), dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 3:
        return image_to_input(array, shape, np)
    raise RunError(EXIT_USAGE, "%s has shape %s; input %r takes %s (or an HxWx3 RGB image array)"
                   % (source, "x".join(map(str, array.shape)), name, "x".join(map(str, shape))))


def load_inputs(path, bundle_dir, manifest, np):
    """(feeds, description, is_reference)."""
    specs = input_specs(manifest)
    if path is None:
        reference = os.path.join(bundle_dir, manifest["reference"]["inputs"])
        if not os.path.isfile(reference):
            raise RunError(EXIT_USAGE, "bundled reference input %s is missing: unpack the bundle again" % reference)
        with np.load(reference, allow_pickle=False) as data:
            feeds = collections.OrderedDict((name, data[name]) for name in specs)
        return feeds, "bundled reference input (seed %s)" % manifest["reference"].get("seed"), True
    if not os.path.isfile(path):
        raise RunError(EXIT_USAGE, "input %s does not exist" % path)
    lower = path.lower()
    if lower.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in specs if name not in data.files]
            if missing:
                raise RunError(EXIT_USAGE, "%s has no array named %s (it has %s)"
                               % (path, ", ".join(missing), ", ".join(data.files)))
            feeds = collections.OrderedDict((name, fit_array(data[name], name, spec["shape"], path, np))
                                            for name, spec in specs.items())
        return feeds, path, False
    if len(specs) != 1:
        raise RunError(EXIT_USAGE, "the model has %d inputs: pass them as a .npz with arrays %s"
                       % (len(specs), ", ".join(specs)))
    name, spec = list(specs.items())[0]
    if lower.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (IOError, OSError, ValueError) as exc:
            raise RunError(EXIT_USAGE, "cannot read %s as a .npy array: %s" % (path, one_line(exc)))
        return collections.OrderedDict([(name, fit_array(array, name, spec["shape"], path, np))]), path, False
    if not lower.endswith(IMAGE_SUFFIXES):
        raise RunError(EXIT_USAGE, "%s is neither an image (%s) nor a .npy/.npz array"
                       % (path, ", ".join(IMAGE_SUFFIXES)))
    pixels = load_image(path, np)
    return collections.OrderedDict([(name, image_to_input(pixels, spec["shape"], np))]), path, False


# --------------------------------------------------------------------------
# Outputs

def compare(actual, reference, rtol, atol, np):
    """max|a-b| <= atol + rtol * max|ref|, the rule infc and build_engine.py use."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        return {"ok": False, "error": "shape %s, reference %s" % (list(a.shape), list(r.shape))}
    if a.size == 0:
        return {"ok": True, "max_abs": 0.0, "rel": 0.0, "allowed": atol}
    max_abs = float(np.max(np.abs(a - r)))
    peak = float(np.max(np.abs(r)))
    allowed = atol + rtol * peak
    rel = max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = bool(np.all(np.isfinite(a))) and max_abs <= allowed
    return {"ok": ok, "max_abs": max_abs, "rel": rel, "allowed": allowed}


def check_reference(outputs, bundle_dir, manifest, tolerance, np):
    path = os.path.join(bundle_dir, manifest["reference"]["outputs"])
    if not os.path.isfile(path):
        raise RunError(EXIT_USAGE, "bundled reference outputs %s are missing: unpack the bundle again" % path)
    rtol, atol = float(tolerance[0]), float(tolerance[1])
    results = collections.OrderedDict()
    with np.load(path, allow_pickle=False) as expected:
        for name in manifest["model"]["outputs"]:
            if name not in outputs:
                results[name] = {"ok": False, "error": "the backend produced no output %r" % name}
            elif name not in expected.files:
                results[name] = {"ok": False, "error": "the reference has no output %r" % name}
            else:
                results[name] = compare(outputs[name], expected[name], rtol, atol, np)
    return {"ok": all(r["ok"] for r in results.values()), "rtol": rtol, "atol": atol, "outputs": results}


def softmax(logits, np):
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    exp = np.exp(shifted)
    return exp / exp.sum()


def read_labels(path):
    if not path:
        return None
    try:
        with open(path) as handle:
            return [line.strip() for line in handle]
    except (IOError, OSError) as exc:
        raise RunError(EXIT_USAGE, "cannot read labels %s: %s" % (path, one_line(exc)))


def classify(outputs, top, labels, np):
    logits = np.asarray(list(outputs.values())[0])
    logits = logits.reshape(logits.shape[0], -1) if logits.ndim > 1 else logits.reshape(1, -1)
    items = []
    for row in logits[:4]:
        probabilities = softmax(row, np)
        order = np.argsort(-row, kind="stable")[:top]
        items.append([{"class": int(i), "label": labels[i] if labels and i < len(labels) else None,
                       "probability": float(probabilities[i]), "score": float(row[i])} for i in order])
    return items


VOC_LIKE_PALETTE_SIZE = 256


def palette():
    """The PASCAL VOC colour map: class k gets a distinct colour, class 0 is black."""
    colours = []
    for index in range(VOC_LIKE_PALETTE_SIZE):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.extend((red, green, blue))
    return colours


def segment(outputs, out_path, np):
    scores = None
    for array in outputs.values():
        if np.ndim(array) == 4:
            scores = np.asarray(array)
            break
    if scores is None:
        raise RunError(EXIT_USAGE, "no NxCxHxW output to take a mask from (outputs: %s)"
                       % ", ".join("x".join(map(str, np.shape(a))) for a in outputs.values()))
    mask = np.argmax(scores[0], axis=0)
    classes, counts = np.unique(mask, return_counts=True)
    shares = sorted(zip(counts.tolist(), classes.tolist()), reverse=True)[:5]
    written = write_mask(mask, scores.shape[1], out_path, np)
    return {"mask": written, "shape": list(mask.shape), "classes": int(scores.shape[1]),
            "top_classes": [{"class": int(c), "share": float(n) / mask.size} for n, c in shares]}


def write_mask(mask, class_count, out_path, np):
    """PNG with a palette (class k = pixel value k), else .npy when Pillow is absent or classes > 256."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    base = out_path[:-4] if out_path.lower().endswith((".png", ".npy")) else out_path
    if Image is not None and class_count <= 256:
        image = Image.fromarray(mask.astype(np.uint8))
        image.putpalette(palette())  # turns the L image into P: pixel values stay the class indices
        path = base + ".png"
        tmp = path + ".tmp-%d" % os.getpid()
        image.save(tmp, format="PNG")
    else:
        path = base + ".npy"
        tmp = path + ".tmp-%d.npy" % os.getpid()
        np.save(tmp, mask.astype(np.uint16 if class_count > 255 else np.uint8))
    os.replace(tmp, path)
    return path


def summarize(outputs, np):
    return [{"name": name, "shape": list(np.shape(a)), "min": float(np.min(a)), "max": float(np.max(a)),
             "mean": float(np.mean(a))} for name, a in outputs.items()]


def percentiles(seconds, np):
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return collections.OrderedDict([
        ("runs", int(ms.size)), ("p50", float(np.percentile(ms, 50))), ("p90", float(np.percentile(ms, 90))),
        ("p99", float(np.percentile(ms, 99))), ("mean", float(ms.mean())), ("min", float(ms.min())),
        ("max", float(ms.max()))])


# --------------------------------------------------------------------------
# Main

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="run.py", description="Run the model of an infc bundle: TensorRT engine if built, else ONNX Runtime.")
    parser.add_argument("input", nargs="?", default=None,
                        help="an image, a .npy/.npz array, or nothing for the bundled reference input")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the directory of this script)")
    parser.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                        help="auto: the TensorRT engine when it is built and usable here, else ONNX Runtime")
    parser.add_argument("--engine", default=None, help="a TensorRT engine file (default: the build kit's)")
    parser.add_argument("--onnx", default=None, help="an ONNX file for ONNX Runtime (default: the FP32 graph)")
    parser.add_argument("--fp16", action="store_true", help="ONNX Runtime: run the FP16 graph")
    parser.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    parser.add_argument("--top", type=int, default=5, help="classes to show (default 5)")
    parser.add_argument("--labels", default=None, help="class names, one per line")
    parser.add_argument("--out", default=None, help="segmentation mask file (default: <input>_mask.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.top < 1:
        parser.error("--runs and --top must be >= 1, --warmup >= 0")
    return args


def default_mask_path(input_path):
    if input_path is None:
        return "reference_mask.png"
    stem = os.path.splitext(os.path.basename(input_path))[0]
    return stem + "_mask.png"


def run(args):
    bundle_dir = os.path.abspath(args.bundle or os.path.dirname(os.path.abspath(__file__)))
    manifest = load_manifest(bundle_dir)
    np = import_numpy()
    feeds, source, is_reference = load_inputs(args.input, bundle_dir, manifest, np)
    labels = read_labels(args.labels)
    runner, tolerance, notes = open_backend(args, bundle_dir, manifest)
    model = manifest["model"]
    report = collections.OrderedDict([
        ("model", model["name"]), ("family", model["family"]), ("target", manifest["target"]["name"]),
        ("backend", runner.name), ("input", source), ("notes", notes)])
    if manifest.get("weights", {}).get("source") == "random-init":
        notes.append("random-init weights: a structure-only build, predictions are meaningless")
    try:
        for _ in range(args.warmup):
            runner.run(feeds)
        times = []
        outputs = None
        for _ in range(args.runs):
            started = time.perf_counter()
            outputs = runner.run(feeds)
            times.append(time.perf_counter() - started)
    finally:
        runner.close()
    report["latency_ms"] = percentiles(times, np)
    batch = list(feeds.values())[0].shape[0] if feeds else 1
    report["throughput_per_s"] = batch * 1000.0 / report["latency_ms"]["mean"]
    family = model["family"]
    if family == "classification":
        report["top"] = classify(outputs, args.top, labels, np)
    elif family == "segmentation":
        report["segmentation"] = segment(outputs, args.out or default_mask_path(args.input), np)
    report["outputs"] = summarize(outputs, np)
    if is_reference:
        report["reference_check"] = check_reference(outputs, bundle_dir, manifest, tolerance, np)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, feeds)
    if is_reference and not report["reference_check"]["ok"]:
        worst = [n for n, r in report["reference_check"]["outputs"].items() if not r["ok"]][0]
        result = report["reference_check"]["outputs"][worst]
        print("%s: error: output %r differs from the reference: %s" % (
            SCRIPT_NAME, worst, result.get("error") or "max abs error %.3g > allowed %.3g"
            % (result["max_abs"], result["allowed"])), file=sys.stderr)
        return EXIT_REFERENCE_MISMATCH
    return EXIT_OK


def print_report(report, feeds):
    say("%s (%s) for %s on %s" % (report["model"], report["family"], report["target"], report["backend"]))
    for note in report["notes"]:
        say("note: " + note)
    say("input: %s (%s)" % (report["input"], ", ".join(
        "%s %s" % (name, "x".join(map(str, array.shape))) for name, array in feeds.items())))
    for index, item in enumerate(report.get("top", [])):
        say("top-%d (item %d):" % (len(item), index))
        for rank, entry in enumerate(item, 1):
            label = "  %s" % entry["label"] if entry["label"] else ""
            say("  %d. class %4d  p=%.4f  score %.4f%s" % (rank, entry["class"], entry["probability"],
                                                         entry["score"], label))
    if "segmentation" in report:
        seg = report["segmentation"]
        say("mask: %s (%s, %d classes); largest: %s" % (
            seg["mask"], "x".join(map(str, seg["shape"])), seg["classes"],
            ", ".join("class %d %.1f%%" % (c["class"], 100 * c["share"]) for c in seg["top_classes"])))
    if "top" not in report and "segmentation" not in report:
        for output in report["outputs"]:
            say("output %s: %s, min %.4g, max %.4g, mean %.4g" % (
                output["name"], "x".join(map(str, output["shape"])), output["min"], output["max"], output["mean"]))
    latency = report["latency_ms"]
    say("latency over %d runs: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms (mean %.2f, min %.2f, max %.2f); %.1f/s"
        % (latency["runs"], latency["p50"], latency["p90"], latency["p99"], latency["mean"], latency["min"],
           latency["max"], report["throughput_per_s"]))
    check = report.get("reference_check")
    if check:
        for name, result in check["outputs"].items():
            if "error" in result:
                say("reference %s: FAILED: %s" % (name, result["error"]))
            else:
                say("reference %s: %s (max abs error %.3g, rel %.3g, allowed %.3g = atol %g + rtol %g x peak)"
                    % (name, "ok" if result["ok"] else "FAILED", result["max_abs"], result["rel"],
                       result["allowed"], check["atol"], check["rtol"]))


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse printed usage or help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return run(args)
    except RunError as exc:
        print("%s: error: %s" % (SCRIPT_NAME, exc.message), file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("%s: interrupted" % SCRIPT_NAME, file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.: stop quietly, like other tools
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except Exception:
        traceback.print_exc()
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
