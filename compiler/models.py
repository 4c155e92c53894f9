"""Model frontend: zoo names, families, default input shapes, weights.

Names come from GluonCV's model zoo and MXNet's `gluon.model_zoo.vision`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingDependency, UnsupportedModel, UserError
from .manifest import sha256_path
from .mxnet_env import gluoncv, mxnet

FAMILIES = ("classification", "segmentation", "detection", "pose", "action", "depth", "tracking")

_FAMILY_PATTERNS = (
    ("segmentation", r"^(fcn|psp|deeplab|icnet|danet|fastscnn)_|^hrnet_.*_s$"),
    ("detection", r"^(ssd|yolo3|faster_rcnn|mask_rcnn|center_net|doublehead_rcnn|custom_faster_rcnn|custom_mask_rcnn)_?"),
    ("pose", r"^(simple_pose|alpha_pose|mobile_pose)_"),
    ("action", r"^(i3d|slowfast|c3d|p3d|r2plus1d)_|_(ucf101|hmdb51|kinetics400|kinetics700|sthsthv2)(_int8)?$|_v1b_custom$"),
    ("depth", r"^monodepth2_"),
    ("tracking", r"^siamrpn_"),
)

# Video networks whose input is (N, C, T, H, W).
_VIDEO_3D = r"^(i3d|slowfast|c3d|p3d|r2plus1d)_"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    source: str  # "gluoncv" or "mxnet.vision"
    default_input_shape: tuple[int, ...]


def family_of(name: str) -> str:
    for family, pattern in _FAMILY_PATTERNS:
        if re.search(pattern, name):
            return family
    return "classification"


def default_input_shape(name: str, family: str) -> tuple[int, ...]:
    """Per-family defaults, refined where an architecture fixes its own size."""
    if family == "classification":
        if name.startswith("cifar_"):
            return (1, 3, 32, 32)
        if "inception" in name or name.startswith("xception"):
            return (1, 3, 299, 299)
        if name == "nasnet_6_4032":
            return (1, 3, 331, 331)
        return (1, 3, 224, 224)
    if family == "segmentation":
        return (1, 3, 480, 480)
    if family == "detection":
        if name.startswith("ssd_300"):
            return (1, 3, 300, 300)
        if name.startswith("yolo3_"):
            return (1, 3, 416, 416)
        return (1, 3, 512, 512)
    if family == "pose":
        return (1, 3, 320, 256) if name.startswith("alpha_pose") else (1, 3, 256, 192)
    if family == "action":
        if name.startswith("c3d_"):
            return (1, 3, 16, 112, 112)
        if re.search(_VIDEO_3D, name):
            return (1, 3, 32, 224, 224)
        return (1, 3, 299, 299) if "inception" in name else (1, 3, 224, 224)
    if family == "depth":
        return (1, 3, 192, 640)
    return (1, 3, 224, 224)


def _vision_names() -> list[str]:
    """MXNet's own zoo has no public list: its error message is the list."""
    mx = mxnet()
    try:
        mx.gluon.model_zoo.vision.get_model("\0")
    except ValueError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return []


def list_models(family: str | None = None) -> list[ModelInfo]:
    if family is not None and family not in FAMILIES:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        raise UserError(f"unknown family '{family}'",
                        f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(FAMILIES)}")
    seen: dict[str, ModelInfo] = {}
    for source, names in (("gluoncv", gluoncv().model_zoo.get_model_list()), ("mxnet.vision", _vision_names())):
        for name in names:
            if name not in seen:
                fam = family_of(name)
                seen[name] = ModelInfo(name, fam, source, default_input_shape(name, fam))
    infos = sorted(seen.values(), key=lambda m: (FAMILIES.index(m.family), m.name))
    return [m for m in infos if family is None or m.family == family]


def resolve_model(name: str) -> ModelInfo:
    models = {m.name: m for m in list_models()}
    if name in models:
        return models[name]
    lowered = {k.lower(): v for k, v in models.items()}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, list(models), n=3, cutoff=0.6)
    fix = f"did you mean {', '.join(close)}?" if close else "run `infc models` for the list"
    raise UserError(f"unknown model '{name}'", fix)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1x3x480x480' -> (1, 3, 480, 480)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise UserError(f"bad --input-shape '{text}'",
                        "write positive dimensions joined by x, e.g. 1x3x480x480")
    return dims


# --- weights -------------------------------------------------------------------

@dataclass(frozen=True)
class WeightsRequest:
    """Where parameters come from: 'pretrained' (model store), 'file' or 'random'."""
    kind: str = "pretrained"
    path: Path | None = None
    seed: int = 0


@dataclass
class LoadedModel:
    info: ModelInfo
    net: object
    weights: dict  # source, path, sha256, ...


def model_store_root() -> Path:
    """MXNet's data_dir() (MXNET_HOME, else ~/.mxnet), without importing MXNet."""
    return Path(os.environ.get("MXNET_HOME") or "~/.mxnet").expanduser() / "models"


def _construct(info: ModelInfo, input_shape: tuple[int, ...] | None = None):
    """Build the architecture without fetching anything.

    Segmentation networks bake their input size into pooling branches, so a
    non-default --input-shape must reach the constructor.
    """
    if re.search(r"_int8$", info.name):
        raise UnsupportedModel(
            f"'{info.name}' is a pre-quantized zoo graph, not a trainable architecture",
            f"compile '{info.name[:-5]}' with --precision int8 instead")
    if info.source == "mxnet.vision":
        return mxnet().gluon.model_zoo.vision.get_model(info.name, pretrained=False)
    get_model = gluoncv().model_zoo.get_model
    size_kwargs = [{}]
    if info.family == "segmentation" and input_shape and tuple(input_shape[2:]) != info.default_input_shape[2:]:
        height, width = input_shape[2], input_shape[3]
        size_kwargs = [{"height": height, "width": width, "crop_size": height}] if height != width else [
            {"crop_size": height}, {"height": height, "width": width, "crop_size": height}]
    # Many GluonCV constructors download a backbone unless told not to; the
    # others reject the keyword.
    last_error = None
    for sizes in size_kwargs:
        for extra in ({"pretrained_base": False}, {}):
            try:
                return get_model(info.name, pretrained=False, **extra, **sizes)
            except TypeError as exc:
                last_error = exc
    raise last_error


def _pretrained_file(info: ModelInfo) -> Path:
    root = model_store_root()
    if info.source == "mxnet.vision":
        fetch = mxnet().gluon.model_zoo.model_store.get_model_file
    else:
        fetch = gluoncv().model_zoo.model_store.get_model_file
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return Path(fetch(info.name, root=str(root)))
    except ValueError:
        raise UserError(f"the model store has no pretrained weights for '{info.name}'",
                        "pass --weights FILE or --random-init") from None
    except OSError as exc:  # requests' errors derive from OSError
        raise MissingDependency(
            f"pretrained weights for '{info.name}' are not in {root} and cannot be downloaded "
            f"({type(exc).__name__})",
            "pass --weights FILE (a Gluon .params file), set MXNET_HOME to a store that has them, "
            "or use --random-init") from None


def _load_params(net, path: Path, name: str) -> None:
    mx = mxnet()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist", "check the --weights path")
    try:
        net.load_parameters(str(path), ctx=mx.cpu(), allow_missing=False, ignore_extra=False)
    except (mx.base.MXNetError, AssertionError, ValueError, OSError, RuntimeError) as exc:
        first = mxnet_error_summary(exc)
        raise UserError(f"weights file {path} does not fit model '{name}': {first}",
                        "pass the Gluon save_parameters() file of this exact architecture") from None


RESIDUAL_BRANCH_GAMMA = 0.2
_ADD_OPS = {"elemwise_add", "_plus", "_Plus", "broadcast_add", "add_n", "ElementWiseSum"}
_PASS_THROUGH_OPS = {"Activation", "relu", "LeakyReLU", "Dropout", "_copy", "clip"}


def _residual_branch_batchnorms(net) -> set[str]:
    """Names of the BatchNorm blocks that end a residual branch (not a shortcut).

    A BatchNorm ends a residual branch when its output is added to a skip
    connection and the convolution before it reads another BatchNorm's
    (activated) output; a downsampling shortcut's convolution reads the
    block input instead.
    """
    import json

    mx = mxnet()
    try:
        outputs = net(mx.sym.var("data"))
        if isinstance(outputs, (list, tuple)):
            outputs = mx.sym.Group(list(outputs))
        graph = json.loads(outputs.tojson())
    except Exception:  # noqa: BLE001 - not symbolically traceable: no residual structure known
        return set()
    nodes = graph["nodes"]

    def producer(index):
        node = nodes[index]
        while node["op"] in _PASS_THROUGH_OPS and node["inputs"]:
            node = nodes[node["inputs"][0][0]]
        return node

    found = set()
    for node in nodes:
        if node["op"] not in _ADD_OPS:
            continue
        for entry in node["inputs"]:
            bn = nodes[entry[0]]
            if bn["op"] != "BatchNorm":
                continue
            conv = nodes[bn["inputs"][0][0]]
            if conv["op"] == "Convolution" and producer(conv["inputs"][0][0])["op"] == "BatchNorm":
                found.add(bn["name"].removesuffix("_fwd"))
    return found


def _calibrate_batchnorm(net, sample) -> None:
    """Give random weights the numerics of a trained network.

    Left at unit running variance, random activations shrink layer by layer
    (MobileNet's outputs reach 1e-19: FP16 underflows, INT8 calibrates on
    nothing). So every BatchNorm gets its statistics from the batch it sees
    (MXNet 1.x updates them only in backward, hence a pre-hook in one
    inference pass). Normalized that way a deep ResNet is chaotic -- a 1e-7
    input change moved deeplab_resnet101's outputs by 1e-3 -- because every
    residual branch is as large as its skip path; trained ResNets keep their
    branches small, so the BatchNorm ending each branch is scaled by
    RESIDUAL_BRANCH_GAMMA, as zero/small-gamma initialisation does.
    """
    mx = mxnet()
    branch_ends = _residual_branch_batchnorms(net)

    def set_statistics(block, inputs):
        # numpy reduces over (N, H, W) about ten times faster than MXNet's CPU reduce.
        x = inputs[0].asnumpy()
        axis = block._kwargs.get("axis", 1) % x.ndim
        reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
        block.running_mean.set_data(mx.nd.array(x.mean(axis=reduce_axes)))
        block.running_var.set_data(mx.nd.array(x.var(axis=reduce_axes)))
        if block.name in branch_ends:
            block.gamma.set_data(mx.nd.full(block.gamma.shape, RESIDUAL_BRANCH_GAMMA))

    handles = []

    def attach(block):
        if isinstance(block, mx.gluon.nn.BatchNorm):
            handles.append(block.register_forward_pre_hook(set_statistics))

    net.apply(attach)
    try:
        net(sample)
    finally:
        for handle in handles:
            handle.detach()


def load_model(info: ModelInfo, weights: WeightsRequest, input_shape: tuple[int, ...]) -> LoadedModel:
    mx = mxnet()
    try:
        # A fresh name counter: the graph's names (and so every artifact) do not
        # depend on how many models this process built before.
        with mx.name.NameManager():
            net = _construct(info, input_shape)
    except (UnsupportedModel, UserError):
        raise
    except Exception as exc:  # noqa: BLE001 - constructors raise anything
        raise UnsupportedModel(f"GluonCV cannot construct '{info.name}' offline: "
                               f"{' '.join(str(exc).split())[:160]}", "pick another model") from None
    if weights.kind == "random":
        mx.random.seed(weights.seed)
        net.collect_params().initialize(mx.init.Xavier(magnitude=2.0), ctx=mx.cpu(), force_reinit=True)
        _check_input_shape(net, info.name, input_shape, weights.seed)
        # Statistics from other seeded images than the reference input, so the
        # reference is not normalized by its own statistics.
        calibration_shape = (max(2, input_shape[0]),) + tuple(input_shape[1:])
        _calibrate_batchnorm(net, mx.nd.array(reference_input(calibration_shape, weights.seed + 1)))
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "random.params"
            net.save_parameters(str(saved))
            digest = sha256_path(saved)
        record = {"source": "random-init", "seed": weights.seed, "sha256": digest,
                  "note": "random weights with BatchNorm statistics from the seeded input: structure-only build"}
    else:
        path = Path(weights.path) if weights.kind == "file" else _pretrained_file(info)
        _load_params(net, path, info.name)
        record = {"source": "file" if weights.kind == "file" else "model-store",
                  "path": str(path.resolve()), "sha256": sha256_path(path)}
        _check_input_shape(net, info.name, input_shape, weights.seed)
    return LoadedModel(info=info, net=net, weights=record)


def _check_input_shape(net, name: str, input_shape, seed: int) -> None:
    """Refuse an input shape the architecture cannot take, and give deferred parameters their shapes.

    Symbolic shape inference does both in milliseconds; a forward pass (the
    fallback for networks that cannot be traced) costs seconds on a large
    network (7 s for deeplab_resnet101 at 480x480), and the compile runs
    the reference forward right after anyway.
    """
    mx = mxnet()
    try:
        # MXNet prints its shape-inference complaints to stdout as well.
        with contextlib.redirect_stdout(io.StringIO()):
            if isinstance(net, mx.gluon.HybridBlock):
                try:
                    net.infer_shape(mx.nd.zeros(input_shape))
                except (AttributeError, NotImplementedError, TypeError, ValueError):
                    pass  # not traceable, or shapes only a forward can tell: the forward below finds them
                else:
                    for parameter in net.collect_params().values():
                        # What a first forward does after inferring shapes: initialize
                        # the parameters whose shapes were deferred until now.
                        parameter._finish_deferred_init()
                    return
            net(mx.nd.array(reference_input(input_shape, seed)))
    except (mx.base.MXNetError, ValueError, AssertionError) as exc:
        first = mxnet_error_summary(exc)
        raise UserError(f"'{name}' cannot run on input shape {'x'.join(map(str, input_shape))}: {first}",
                        "pass an --input-shape the architecture accepts") from None


def mxnet_error_summary(exc: Exception) -> str:
    """The informative part of an MXNet error: its 'Check failed' clause, else its last line."""
    text = str(exc).split("Stack trace")[0]
    if "Check failed:" in text:
        text = text[text.index("Check failed:"):]
    else:
        text = [line for line in text.splitlines() if line.strip()][-1] if text.strip() else type(exc).__name__
    return " ".join(text.split())[:200]


def reference_input(shape: tuple[int, ...], seed: int):
    """The fixed input every verification runs on: seeded N(0, 1), like a normalized image."""
    import numpy as np

    return np.random.RandomState(seed).standard_normal(shape).astype("float32")
