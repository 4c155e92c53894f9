"""Agreement metrics against the FP32 reference, and the budget verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.accuracy import format_table, mean_iou, measure


def test_classification_top1_and_top5_agreement():
    reference = np.array([[9, 1, 0, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0, 0], [0, 0, 9, 1, 0, 0, 0],
                          [0, 0, 0, 9, 1, 0, 0]], dtype=np.float32)
    actual = reference.copy()
    actual[1] = [0, 1, 9, 0, 0, 0, 0]          # top-1 flips, the reference class is second
    actual[3] = [5, 5, 5, 5, 5, 6, 6]          # top-1 flips, reference class 3 ties at rank 3-6
    report = measure("onnx-int8", "classification", [actual], [reference], images=4)
    assert report.top1_agreement == pytest.approx(0.5)
    assert report.headline == "top1_agreement" and report.drop_pp == pytest.approx(50.0)
    assert report.top5_agreement == pytest.approx(1.0)
    assert report.max_abs_error == pytest.approx(8.0)
    assert report.rel_error == pytest.approx(8.0 / 9.0)
    assert report.within(50.0) is True and report.within(49.9) is False


def test_padding_images_beyond_the_count_are_ignored():
    reference = np.eye(3, dtype=np.float32)
    actual = np.eye(3, dtype=np.float32)
    actual[2] = [1, 0, 0]  # the padded repeat disagrees; it must not count
    report = measure("mxnet-int8", "classification", [actual], [reference], images=2)
    assert report.top1_agreement == 1.0 and report.images == 2


def test_segmentation_pixel_agreement_and_miou():
    reference_mask = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    actual_mask = reference_mask.copy()
    actual_mask[0, 2] = 0  # one pixel of class 1 predicted as class 0

    def logits(mask):
        return np.eye(3, dtype=np.float32)[mask].transpose(2, 0, 1)[None]

    report = measure("mxnet-int8", "segmentation", [logits(actual_mask)], [logits(reference_mask)], images=1)
    assert report.pixel_agreement == pytest.approx(15 / 16)
    # class 0: 4 / 5, class 1: 3 / 4, class 2: 8 / 8
    assert report.miou == pytest.approx((4 / 5 + 3 / 4 + 1.0) / 3)
    assert report.headline == "pixel_agreement" and report.drop_pp == pytest.approx(100 / 16)


def test_mean_iou_ignores_classes_absent_from_both():
    mask = np.array([[0, 1], [1, 1]])
    assert mean_iou(mask, mask, classes=5) == 1.0


def test_families_without_a_metric_report_errors_only():
    reference = [np.ones((1, 10, 6), np.float32)]
    report = measure("onnx-int8", "detection", [reference[0] * 1.01], reference, images=1)
    assert report.headline is None and report.drop_pp is None and report.within(1.0) is None
    assert report.rel_error == pytest.approx(0.01, rel=1e-3)


def test_table_marks_what_missed():
    good = measure("mxnet-int8", "classification", [np.eye(4)], [np.eye(4)], images=4)
    bad_logits = np.eye(4)
    bad_logits[0] = [0, 1, 0, 0]
    bad = measure("onnx-int8", "classification", [bad_logits], [np.eye(4)], images=4)
    lines = format_table([good, bad], max_drop_pp=1.0).splitlines()
    assert "budget 1 pp" in lines[0]
    assert lines[1].split()[0] == "mxnet-int8" and lines[1].endswith("ok")
    assert lines[2].split()[0] == "onnx-int8" and lines[2].endswith("MISSED") and "25.00" in lines[2]
