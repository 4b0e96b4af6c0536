"""Running an exported featurecache model with ONNX Runtime and numpy only (no TensorFlow, no scikit-learn).

This module imports nothing heavy: `featurecache export --check` runs it in a child process
(`python -m featurecache.export.runtime MODEL IMAGES.npy OUT.npz`) so that the exported file is
proved to work without TensorFlow, and docs/EXPORT.md shows the same few lines for use anywhere.

The file takes `images`: uint8 (N, S, S, 3) RGB, already resized to S x S by the caller (metadata
`input_size` and `resize` say which S and which method); it returns `scores` (N, K) float32,
`label` (N,) int64 (an index into the metadata's `class_names`) and `label_name` (N,) strings.
"""

from __future__ import annotations

import json
import sys

import numpy as np

OUTPUTS = ("scores", "label", "label_name")
JSON_KEYS = ("class_names", "score_classes", "feature_key")


def session(path: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # skl2onnx's binary heads declare (N, 2) where they give (N, 1): harmless
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def metadata(sess) -> dict:
    """The file's metadata_props, with the JSON-valued ones decoded."""
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    for k in JSON_KEYS:
        if k in meta:
            meta[k] = json.loads(meta[k])
    return meta


def run(sess, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """scores, label and label_name of uint8 (N, S, S, 3) images, `batch` at a time."""
    outs = {k: [] for k in OUTPUTS}
    for start in range(0, len(images), batch):
        x = np.ascontiguousarray(images[start:start + batch], dtype=np.uint8)
        for k, v in zip(OUTPUTS, sess.run(list(OUTPUTS), {"images": x})):
            outs[k].append(v)
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}


def main(argv: list[str]) -> int:
    model, images_path, out_path = argv
    sess = session(model)
    images = np.load(images_path, mmap_mode="r")
    res = run(sess, images)
    import onnxruntime

    np.savez(out_path, scores=res["scores"], label=res["label"], label_name=res["label_name"].astype(str),
             tensorflow_imported=np.array("tensorflow" in sys.modules),
             sklearn_imported=np.array("sklearn" in sys.modules),
             onnxruntime_version=np.array(onnxruntime.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
