"""Post-training int8 quantisation (nncf -> OpenVINO), calibrated on the user's own training images.

The calibration sample is a seeded choice among the training images' content hashes, so the same
training set always gives the same sample (and the same int8 feature set), and its id enters the
feature key: a different sample may move int8 vectors, so it may not share their set.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from ..settings import CALIBRATION_SAMPLE as SAMPLE, calibration_sample  # noqa: F401  (named there: part of the key)


def quantize(onnx_path: str, images: np.ndarray):
    """An int8 OpenVINO model from the float ONNX graph and preprocessed NHWC calibration images."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(onnx_path)
    items = [images[k:k + 1] for k in range(len(images))]
    # nncf draws its progress bars on stdout, which `--json` keeps for the one JSON document: stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
