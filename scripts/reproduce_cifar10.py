"""The classic CIFAR-10 protocol, exactly: VGG16 (ImageNet) codes + a linear SVM.

    python scripts/reproduce_cifar10.py --data-dir ~/Downloads/cifar-10-python.tar.gz

Images are upsized 32 -> 64 by nearest neighbour, scaled to [0, 1] (`--preprocess scale01`, as the
original blog post did), passed through VGG16's conv trunk with ImageNet weights; `block5_pool`
(2x2x512) is flattened to 2,048 dims, rows are L2-normalised and a one-vs-rest LinearSVC (C=1) is
fitted on the 50,000 training images and scored on the 10,000 test images (~71% expected).

Needs the CIFAR-10 "python version" archive (or its extracted cifar-10-batches-py folder) and Keras's
VGG16 ImageNet file; neither ships offline, so where one is missing the script stops with one line
saying which (give `--download` to let Keras fetch the weights, or `--weights PATH`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from featurecache.api import DataOptions
from featurecache.bench import run_cli
from featurecache.errors import FeatureCacheError

KERAS_VGG16_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def protocol_args(weights: str) -> list[str]:
    """The protocol's feature options, as `featurecache extract` and `fit` take them."""
    return ["--model", "vgg16", "--weights", weights, "--layer", "block5_pool", "--pool", "flatten", "--size", "64",
            "--resize", "nearest", "--preprocess", "scale01"]


def check_weights(weights: str, download: bool) -> None:
    """Fail before any network work when Keras would have to download the ImageNet file."""
    if weights != "imagenet" or download:
        return
    path = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / KERAS_VGG16_NOTOP
    if not path.is_file():
        raise FeatureCacheError(f"--weights imagenet: Keras's VGG16 file is not at {path}; pass --download "
                                "(needs the network) or --weights PATH to a Keras VGG16 notop weights file")


def data_args(args) -> list[str]:
    out = ["--data", "cifar10"]
    for flag, value in (("--data-dir", args.data_dir), ("--max-train", args.max_train), ("--max-test", args.max_test)):
        if value is not None:
            out += [flag, str(value)]
    return out


def run(args) -> dict | None:
    """Extract, then fit, each a `featurecache` command; None (after the command's own error line) on failure."""
    DataOptions("cifar10", args.data_dir, max_train=args.max_train, max_test=args.max_test).load()  # a missing
    check_weights(args.weights, args.download)  # archive is the likelier problem, and cheap to find: first
    env = dict(os.environ, FEATURECACHE_DIR=str(args.cache_dir), TF_CPP_MIN_LOG_LEVEL="3")
    extract = run_cli(["extract", *data_args(args), *protocol_args(args.weights), "--json"], env, check=False)
    if extract.returncode:
        return None
    fit = run_cli(["fit", *data_args(args), *protocol_args(args.weights), "--head", "linsvc", "--C", "1",
                   "--notes", "classic CIFAR-10 protocol", "--json"], env, check=False)
    if fit.returncode:
        return None
    summary, record = json.loads(extract.stdout), json.loads(fit.stdout)
    return {"n_train": record["n_train"], "n_test": record["n_test"], "dims": record["dims"],
            "extract_seconds": round(summary["seconds"], 1), "fit_seconds": record["fit_seconds"],
            "train_accuracy": record["train_accuracy"], "test_accuracy": record["test_accuracy"],
            "run_id": record["run_id"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="cifar-10-python.tar.gz or its cifar-10-batches-py folder "
                                      "[default: Keras's datasets folder]")
    p.add_argument("--weights", default="imagenet", help="imagenet (Keras's file) or PATH to VGG16 notop weights")
    p.add_argument("--download", action="store_true", help="let Keras download the ImageNet weights")
    p.add_argument("--cache-dir", default=os.environ.get("FEATURECACHE_DIR", "cache"))
    p.add_argument("--max-train", type=int, help="a stratified subset of N train images (quicker)")
    p.add_argument("--max-test", type=int, help="a stratified subset of N test images")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except FeatureCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is None:  # the failing command printed its own one-line error
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"vgg16/block5_pool 64px scale01, {result['dims']} dims, L2 rows + LinearSVC C=1: "
              f"{result['n_train']} train / {result['n_test']} test")
        print(f"  extract {result['extract_seconds']} s   fit {result['fit_seconds']} s   "
              f"train {result['train_accuracy']:.4f}   test {result['test_accuracy']:.4f}   run {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
