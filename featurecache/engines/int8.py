"""Post-training int8 quantisation (nncf's ONNX backend), calibrated on the user's own training images.

The result is one ONNX graph with QuantizeLinear/DequantizeLinear pairs (QDQ): OpenVINO reads it and
runs its int8 kernels (as fast as nncf's OpenVINO-IR output, measured), and `featurecache export`
embeds the very graph the features came from, which an OpenVINO IR could not give (it has no ONNX writer).
How it is made is `settings.INT8_RECIPE`, whose id is part of every int8 key; the calibration sample is
a seeded choice among the training images' content hashes (`settings.calibration_sample`).
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from ..settings import INT8_RECIPE


def quantize(onnx_path: str, images: np.ndarray):
    """An int8 QDQ ONNX model (onnx.ModelProto) from the float ONNX graph and preprocessed NHWC images."""
    import logging

    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    model = onnx.load(onnx_path)
    name = model.graph.input[0].name
    items = [{name: np.ascontiguousarray(images[k:k + 1], dtype=np.float32)} for k in range(len(images))]
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
              "mixed": nncf.QuantizationPreset.MIXED}[INT8_RECIPE["preset"]]
    # nncf draws its progress bars on stdout, which `--json` keeps for the one JSON document: stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, nncf.Dataset(items), preset=preset, subset_size=len(items),
                             fast_bias_correction=INT8_RECIPE["fast_bias_correction"])
