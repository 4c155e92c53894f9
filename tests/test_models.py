from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import MissingDependency, UnsupportedModel, UserError
from compiler.models import (WeightsRequest, default_input_shape, family_of, list_models, load_model,
                             parse_input_shape, reference_input, resolve_model)


@pytest.mark.parametrize("name, family, shape", [
    ("resnet18_v1", "classification", (1, 3, 224, 224)),
    ("inceptionv3", "classification", (1, 3, 299, 299)),
    ("cifar_resnet20_v1", "classification", (1, 3, 32, 32)),
    ("deeplab_resnet101_coco", "segmentation", (1, 3, 480, 480)),
    ("hrnet_w18_small_v1_s", "segmentation", (1, 3, 480, 480)),
    ("hrnet_w18_small_v1_c", "classification", (1, 3, 224, 224)),
    ("ssd_512_resnet50_v1_voc", "detection", (1, 3, 512, 512)),
    ("ssd_300_vgg16_atrous_voc", "detection", (1, 3, 300, 300)),
    ("yolo3_darknet53_coco", "detection", (1, 3, 416, 416)),
    ("simple_pose_resnet18_v1b", "pose", (1, 3, 256, 192)),
    ("i3d_resnet50_v1_kinetics400", "action", (1, 3, 32, 224, 224)),
    ("monodepth2_resnet18_kitti_stereo_640x192", "depth", (1, 3, 192, 640)),
])
def test_family_and_default_shape(name, family, shape):
    assert family_of(name) == family
    assert default_input_shape(name, family) == shape


def test_the_list_covers_both_zoos_and_filters_by_family():
    names = {m.name for m in list_models()}
    assert {"deeplab_resnet101_coco", "resnet18_v1", "squeezenet1.1", "yolo3_darknet53_coco"} <= names
    segmentation = list_models("segmentation")
    assert segmentation and all(m.family == "segmentation" for m in segmentation)
    with pytest.raises(UserError, match="unknown family 'segmentaton'.*segmentation"):
        list_models("segmentaton")


def test_misspelled_model_suggests_close_matches():
    with pytest.raises(UserError) as err:
        resolve_model("deeplab_resnet101_cocoo")
    assert "deeplab_resnet101_coco" in str(err.value)


@pytest.mark.parametrize("text, shape", [("1x3x480x480", (1, 3, 480, 480)), ("2X3X64X64", (2, 3, 64, 64))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "480", "1x3x0x4", "1x3xax4", "1x-3x4x4"])
def test_bad_input_shapes(text):
    with pytest.raises(UserError, match="bad --input-shape"):
        parse_input_shape(text)


def test_random_init_is_deterministic_and_says_so():
    info = resolve_model("mobilenet0.25")
    first = load_model(info, WeightsRequest("random", seed=3), (1, 3, 32, 32))
    second = load_model(info, WeightsRequest("random", seed=3), (1, 3, 32, 32))
    other = load_model(info, WeightsRequest("random", seed=4), (1, 3, 32, 32))
    assert first.weights["source"] == "random-init" and first.weights["seed"] == 3
    assert first.weights["sha256"] == second.weights["sha256"] != other.weights["sha256"]


def test_weights_file_round_trip(tmp_path):
    from compiler.mxnet_env import mxnet

    mx = mxnet()
    info = resolve_model("mobilenet0.25")
    shape = (1, 3, 32, 32)
    trained = load_model(info, WeightsRequest("random", seed=1), shape)
    path = tmp_path / "mine.params"
    trained.net.save_parameters(str(path))
    loaded = load_model(info, WeightsRequest("file", path), shape)
    x = mx.nd.array(reference_input(shape, 0))
    np.testing.assert_array_equal(trained.net(x).asnumpy(), loaded.net(x).asnumpy())
    assert loaded.weights["source"] == "file" and len(loaded.weights["sha256"]) == 64


def test_weights_of_another_architecture_are_refused(tmp_path):
    info = resolve_model("mobilenet0.25")
    other = load_model(resolve_model("mobilenet0.5"), WeightsRequest("random"), (1, 3, 32, 32))
    path = tmp_path / "other.params"
    other.net.save_parameters(str(path))
    with pytest.raises(UserError, match="does not fit model 'mobilenet0.25'"):
        load_model(info, WeightsRequest("file", path), (1, 3, 32, 32))


def test_corrupt_and_missing_weights(tmp_path):
    info = resolve_model("mobilenet0.25")
    corrupt = tmp_path / "corrupt.params"
    corrupt.write_bytes(b"not a params file")
    with pytest.raises(UserError, match="does not fit"):
        load_model(info, WeightsRequest("file", corrupt), (1, 3, 32, 32))
    with pytest.raises(UserError, match="does not exist"):
        load_model(info, WeightsRequest("file", tmp_path / "missing.params"), (1, 3, 32, 32))


def test_offline_pretrained_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    with pytest.raises(MissingDependency) as err:
        load_model(resolve_model("mobilenet0.25"), WeightsRequest("pretrained"), (1, 3, 32, 32))
    text = str(err.value)
    assert "--weights" in text and "--random-init" in text and str(tmp_path) in text


def test_pre_quantized_zoo_graphs_point_to_precision():
    with pytest.raises(UnsupportedModel, match="--precision int8"):
        load_model(resolve_model("resnet50_v1_int8"), WeightsRequest("random"), (1, 3, 32, 32))


def test_wrong_input_rank_is_a_user_error():
    with pytest.raises(UserError, match="cannot run on input shape"):
        load_model(resolve_model("mobilenet0.25"), WeightsRequest("random"), (1, 3, 32))
