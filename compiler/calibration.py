"""Calibration and validation images: reading, GluonCV preprocessing, set hashes, cached results.

A directory of JPEG/PNG photos becomes a float32 batch in the layout the
model was trained on, preprocessed the way GluonCV's own evaluation presets
do it per family. Anything else in the directory is an error, not something
silently skipped: a calibration set that is not what the user thinks it is
gives an INT8 model that is quietly worse.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# gluoncv.data.transforms for CIFAR-10 (train_cifar10.py).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# GluonCV evaluates ImageNet classifiers on a center crop of 87.5% of the short side (224 of 256).
CROP_RATIO = 0.875


@dataclass(frozen=True)
class Preprocess:
    """How one family turns a photo into an input tensor."""
    name: str
    resize: str  # "short-side-crop": resize the short side, center-crop; "stretch": resize to H x W
    short_side: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def describe(self) -> str:
        norm = f"normalize mean {self.mean} std {self.std}" if self.mean else "scale to [0, 1]"
        if self.resize == "short-side-crop":
            return f"{self.name}: resize short side to {self.short_side}, center crop, {norm}"
        return f"{self.name}: resize to the input size, {norm}"


def preprocess_for(model_name: str, family: str, input_shape: tuple[int, ...]) -> Preprocess:
    """GluonCV's evaluation transform for this model, at this input size."""
    if len(input_shape) != 4:
        raise UserError(f"images cannot feed {model_name}: its input is "
                        f"{'x'.join(map(str, input_shape))}, not NxCxHxW",
                        "calibrate a 2-D image model, or omit --calib-data/--val-data")
    if input_shape[1] != 3:
        raise UserError(f"images are RGB but {model_name} takes {input_shape[1]} input channels",
                        "pass --input-shape with 3 channels")
    height, width = input_shape[2:]
    if family == "classification":
        if model_name.startswith("cifar_"):
            return Preprocess("cifar (transform_eval)", "stretch", max(height, width), CIFAR_MEAN, CIFAR_STD)
        return Preprocess("imagenet (presets.imagenet.transform_eval)", "short-side-crop",
                          int(math.ceil(max(height, width) / CROP_RATIO)), IMAGENET_MEAN, IMAGENET_STD)
    if family == "segmentation":
        # Segmentation tests run on the crop size itself: no enlargement before the crop.
        return Preprocess("segmentation (test transform)", "short-side-crop", max(height, width),
                          IMAGENET_MEAN, IMAGENET_STD)
    if family == "depth":
        return Preprocess("monodepth2 (ToTensor only)", "stretch", max(height, width), None, None)
    # SSD/YOLO/pose presets resize to the network's input size and normalize like ImageNet.
    return Preprocess(f"{family} (resize to input, imagenet normalize)", "stretch", max(height, width),
                      IMAGENET_MEAN, IMAGENET_STD)


def load_image(path: Path, height: int, width: int, preprocess: Preprocess) -> np.ndarray:
    """One photo as a CxHxW float32 array.

    Resizing follows gluon.data.vision.transforms (OpenCV bilinear; with keep_ratio the long
    side is truncated) and center crops like mx.image.center_crop, so a classifier sees what
    gluoncv's presets.imagenet.transform_eval would give it.
    """
    import cv2
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"{path} is not a readable image ({' '.join(str(exc).split())[:120]})",
                        "remove it or replace it with a JPEG/PNG photo") from None
    if preprocess.resize == "short-side-crop":
        h, w = pixels.shape[:2]
        short = preprocess.short_side
        size = (short, int(h * short / w)) if h > w else (int(w * short / h), short)  # (width, height)
        size = (max(size[0], width), max(size[1], height))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
        top, left = int((pixels.shape[0] - height) / 2), int((pixels.shape[1] - width) / 2)
        pixels = pixels[top:top + height, left:left + width]
    else:
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    pixels = pixels.astype(np.float32) / 255.0
    if preprocess.mean is not None:
        pixels = (pixels - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images, batched to the model's static input shape."""
    directory: str
    files: tuple[str, ...]
    sha256: str
    preprocess: str
    batches: tuple[np.ndarray, ...]  # each of the input shape; the last one padded by repetition

    @property
    def count(self) -> int:
        return len(self.files)

    def record(self) -> dict:
        return {"directory": self.directory, "count": self.count, "sha256": self.sha256,
                "preprocess": self.preprocess, "files": list(self.files[:20]),
                "files_listed": min(self.count, 20)}


def image_files(directory: Path, option: str) -> list[Path]:
    """The directory's images, sorted; anything else in it is an error."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{option} directory {directory} does not exist", "pass a directory of JPEG/PNG images")
    if not directory.is_dir():
        raise UserError(f"{option} {directory} is not a directory", "pass a directory of JPEG/PNG images")
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    others = [p for p in entries if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(f"{option} {directory} holds {others[0].name}{more}, which is not a .jpg/.jpeg/.png image",
                        "keep only images in the directory")
    if not entries:
        raise UserError(f"{option} directory {directory} has no images", "add JPEG/PNG images to it")
    return entries


def hash_files(paths: list[Path]) -> str:
    """Hash of the set: names and contents, independent of the directory's location."""
    from .manifest import sha256_path

    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{sha256_path(path)}\n".encode())
    return digest.hexdigest()


def load_image_set(directory: Path, input_shape: tuple[int, ...], model_name: str, family: str,
                   count: int | None = None, option: str = "--calib-data") -> ImageSet:
    if count is not None and count <= 0:
        raise UserError(f"--calib-count {count} is not positive", "pass a positive number of images")
    paths = image_files(directory, option)
    if count is not None:
        if count > len(paths):
            raise UserError(f"--calib-count {count} but {directory} has only {len(paths)} images",
                            f"pass --calib-count {len(paths)} or fewer, or add images")
        paths = paths[:count]
    preprocess = preprocess_for(model_name, family, input_shape)
    batch, height, width = input_shape[0], input_shape[2], input_shape[3]
    images = [load_image(p, height, width, preprocess) for p in paths]
    while len(images) % batch:
        images.append(images[len(images) % len(paths)])
    batches = tuple(np.stack(images[i:i + batch]) for i in range(0, len(images), batch))
    return ImageSet(directory=str(Path(directory).resolve()), files=tuple(p.name for p in paths),
                    sha256=hash_files(paths), preprocess=preprocess.describe(), batches=batches)


# --- cached calibration results -------------------------------------------------------

def cache_root() -> Path:
    """Calibration results live beside the stage cache ($INFC_CACHE_DIR, else ~/.cache/infc)."""
    try:
        from .cache import default_cache_root
    except ImportError:  # the stage cache is optional; keep its location rule
        override = os.environ.get("INFC_CACHE_DIR")
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infc"
        return (Path(override).expanduser() if override else base) / "calibration"
    return default_cache_root() / "calibration"


def calibration_key(weights_sha256: str, graph_sha256: str, set_sha256: str, mode: str, target: dict,
                    backend: str) -> str:
    """Weights, graph, image set, mode and target decide the thresholds; the accuracy budget does not.

    The graph (with its input shape and tensor names, which the thresholds are keyed by) is the
    FP32 symbol's hash."""
    target = {k: v for k, v in target.items() if k not in ("source", "accuracy", "emit", "precision")}
    blob = json.dumps({"weights": weights_sha256, "graph": graph_sha256, "images": set_sha256, "mode": mode,
                       "target": target, "backend": backend}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_cached_thresholds(path: Path) -> dict[str, tuple[float, float]] | None:
    try:
        data = json.loads(Path(path).read_text())
        return {name: (float(lo), float(hi)) for name, (lo, hi) in data["thresholds"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: recalibrate and overwrite


def write_cached_thresholds(path: Path, thresholds: dict[str, tuple[float, float]], about: dict) -> None:
    from .manifest import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), {**about, "thresholds": {k: [float(lo), float(hi)]
                                                           for k, (lo, hi) in sorted(thresholds.items())}})
