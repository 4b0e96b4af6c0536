"""Post-training int8 quantisation (nncf -> OpenVINO), calibrated on the user's own training images.

The calibration sample is a seeded choice among the training images' content hashes, so the same
training set always gives the same sample (and the same int8 feature set), and its id enters the
feature key: a different sample may move int8 vectors, so it may not share their set.
"""

from __future__ import annotations

import hashlib

import numpy as np

SAMPLE = 300  # nncf's default subset size; more brought no accuracy on Fashion-MNIST and costs time


def calibration_sample(train_ids: list[str], n: int = SAMPLE) -> tuple[list[str], str]:
    """(chosen image ids, 12-hex id of the sample), independent of file order."""
    unique = sorted(set(train_ids))
    order = np.random.default_rng(0).permutation(len(unique))[:n]
    chosen = sorted(unique[k] for k in order)
    return chosen, hashlib.blake2b("\n".join(chosen).encode(), digest_size=6).hexdigest()


def quantize(onnx_path: str, images: np.ndarray):
    """An int8 OpenVINO model from the float ONNX graph and preprocessed NHWC calibration images."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(onnx_path)
    items = [images[k:k + 1] for k in range(len(images))]
    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
