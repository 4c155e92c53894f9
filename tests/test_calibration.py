"""Calibration images: reading, GluonCV preprocessing, set hashes, and the threshold cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler.calibration import (calibration_key, image_files, load_image_set, preprocess_for,
                                  read_cached_thresholds, write_cached_thresholds)
from compiler.errors import UserError


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    import skimage

    directory = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        shutil.copy(Path(skimage.data.__file__).parent / name, directory / name)
    return directory


def test_classifier_preprocessing_matches_gluoncv_transform_eval(photo_dir):
    from compiler.mxnet_env import gluoncv, mxnet

    mx = mxnet()
    from PIL import Image

    images = load_image_set(photo_dir, (1, 3, 224, 224), "resnet18_v1", "classification")
    for path, ours in zip(sorted(photo_dir.iterdir()), images.batches):
        pixels = mx.nd.array(np.asarray(Image.open(path).convert("RGB")), dtype="uint8")
        theirs = gluoncv().data.transforms.presets.imagenet.transform_eval(pixels).asnumpy()
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        assert np.max(np.abs(ours - theirs)) < 0.02, path.name  # rounding of the uint8 resize only


def test_family_presets():
    assert "short side to 256" in preprocess_for("resnet18_v1", "classification", (1, 3, 224, 224)).describe()
    assert preprocess_for("cifar_resnet20_v1", "classification", (1, 3, 32, 32)).mean == (0.4914, 0.4822, 0.4465)
    assert preprocess_for("deeplab_resnet101_coco", "segmentation", (1, 3, 480, 480)).short_side == 480
    assert preprocess_for("ssd_512_resnet50_v1_voc", "detection", (1, 3, 512, 512)).resize == "stretch"
    assert preprocess_for("monodepth2_resnet18_kitti_stereo_640x192", "depth", (1, 3, 192, 640)).mean is None
    with pytest.raises(UserError, match="not NxCxHxW"):
        preprocess_for("i3d_resnet50_v1_kinetics400", "action", (1, 3, 32, 224, 224))
    with pytest.raises(UserError, match="1 input channels"):
        preprocess_for("resnet18_v1", "classification", (1, 1, 28, 28))


def test_set_is_batched_to_the_static_shape_with_padding(photo_dir):
    images = load_image_set(photo_dir, (2, 3, 32, 32), "resnet18_v1", "classification")
    assert images.count == 3 and len(images.batches) == 2
    assert all(b.shape == (2, 3, 32, 32) and b.dtype == np.float32 for b in images.batches)
    np.testing.assert_array_equal(images.batches[1][1], images.batches[0][0])  # the pad repeats the first
    record = images.record()
    assert record["count"] == 3 and record["files"] == ["astronaut.png", "coffee.png", "rocket.jpg"]


def test_count_takes_the_first_images_by_name(photo_dir):
    images = load_image_set(photo_dir, (1, 3, 16, 16), "resnet18_v1", "classification", count=2)
    assert images.files == ("astronaut.png", "coffee.png")
    with pytest.raises(UserError, match="has only 3 images"):
        load_image_set(photo_dir, (1, 3, 16, 16), "resnet18_v1", "classification", count=4)


def test_hash_follows_content_not_location(photo_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(photo_dir, copy)
    shape = (1, 3, 16, 16)
    first = load_image_set(photo_dir, shape, "resnet18_v1", "classification").sha256
    assert load_image_set(copy, shape, "resnet18_v1", "classification").sha256 == first
    (copy / "coffee.png").write_bytes((photo_dir / "astronaut.png").read_bytes())
    assert load_image_set(copy, shape, "resnet18_v1", "classification").sha256 != first


def test_hidden_files_are_ignored_and_others_refused(photo_dir, tmp_path):
    directory = tmp_path / "set"
    shutil.copytree(photo_dir, directory)
    (directory / ".DS_Store").write_bytes(b"x")
    assert len(image_files(directory, "--calib-data")) == 3
    (directory / "labels.csv").write_text("a,b")
    with pytest.raises(UserError, match="labels.csv, which is not"):
        image_files(directory, "--calib-data")
    (directory / "sub").mkdir()
    with pytest.raises(UserError, match="and 1 more"):
        image_files(directory, "--val-data")


def test_threshold_cache_round_trip_and_damage(tmp_path):
    path = tmp_path / "c" / "key.mxnet.json"
    assert read_cached_thresholds(path) is None
    write_cached_thresholds(path, {"b": (0.0, 2.5), "a": (-1.0, 1.0)}, {"mode": "naive"})
    assert read_cached_thresholds(path) == {"a": (-1.0, 1.0), "b": (0.0, 2.5)}
    path.write_text("{not json")
    assert read_cached_thresholds(path) is None


def test_key_ignores_the_budget_but_not_the_mode_or_images():
    target = {"name": "x86-mkldnn", "onnx": {"opset": 13}, "accuracy": {"max_drop": 1.0}, "source": "/a"}
    key = calibration_key("w", "g", "images", "naive", target, "mxnet-mkldnn")
    assert key == calibration_key("w", "g", "images", "naive", {**target, "accuracy": {"max_drop": 5.0},
                                                                "source": "/b"}, "mxnet-mkldnn")
    assert key != calibration_key("w", "g", "images", "entropy", target, "mxnet-mkldnn")
    assert key != calibration_key("w", "g", "other", "naive", target, "mxnet-mkldnn")
    assert key != calibration_key("w", "g2", "images", "naive", target, "mxnet-mkldnn")
    assert key != calibration_key("w", "g", "images", "naive", target, "onnx-qdq")
