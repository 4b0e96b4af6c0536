"""The image -> vector chain, run by every command that runs it, gives the same vectors.

extract (what the store holds), predict (recomputed into the store after the set is removed), serve's
compute path (decode the uploaded bytes, one forward pass), verify's recomputation (against the store)
and plan's warm-up all turn the same image files into vectors; here they are compared with each other
across backbones, pooling, resizing, preprocessing, engines and int8. One case per option change rather
than the full product keeps this to about a minute on 2 cores.
"""

import numpy as np
import pytest

from conftest import needs, write_digit_folder
from featurecache import engines
from featurecache.api import DataOptions, RunSettings, extract_dataset
from featurecache.extraction.extract import FeatureSpec
from featurecache.settings import HeadSpec
from featurecache.store.sets import FeatureStore, relative_difference

INT8 = engines.installed("openvino") and __import__("importlib").util.find_spec("nncf") is not None

# (model, pool, resize, preprocess, engine, precision)
CASES = [
    ("vgg16", "flatten", "nearest", "auto", "tensorflow", "float32"),
    ("vgg16", "avg", "bilinear", "auto", "tensorflow", "float32"),
    ("vgg16", "max", "nearest", "scale01", "onnxruntime", "float32"),
    ("efficientnet_lite0", "avg", "bilinear", "scale01", "tensorflow", "float32"),
    ("efficientnet_lite0", "flatten", "nearest", "auto", "onnxruntime", "float32"),
    pytest.param("vgg16", "avg", "nearest", "auto", "openvino", "int8",
                 marks=needs(INT8, "int8 needs openvino and nncf")),
]
LAYER = {"vgg16": "block4_pool", "efficientnet_lite0": "block5c_add"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("chains") / "digits"
    write_digit_folder(root, 4)  # 12 real 8x8 digits: upsized to 32, so resize matters
    return root


def close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    diff = relative_difference(b, a)  # as cache verify holds a recomputed row to its stored one
    assert diff < 1e-4, f"{what}: relative difference {diff:.2g}"


def plan_vectors(ds, spec, cache, engine, monkeypatch) -> tuple[list[str], np.ndarray]:
    """(ids, vectors) of the first warm-up batch plan runs through its encoder."""
    from featurecache.encoding import encoder as encoder_mod
    from featurecache.extraction.plan import run_plan

    ids = ds.train.images.ids + ds.test.images.ids  # plan's batches are keyed by position in this list
    seen = []
    real = encoder_mod.Encoder.run

    def run(self, batch):
        out = real(self, batch)
        seen.append(([ids[k] for k in batch.keys], out[self.taps[0]]))
        return out

    monkeypatch.setattr(encoder_mod.Encoder, "run", run)
    out = run_plan(ds, spec, RunSettings(cache, engine=engine, batch_size=64), probe=1)
    monkeypatch.undo()
    assert out["to_compute"] == len(seen[0][0]) == len(set(ids)) and out["engine"] == engine
    return seen[0]


@pytest.mark.parametrize("model, pool, resize, preprocess, engine, precision", CASES)
def test_every_chain_gives_the_same_vectors(folder, tmp_path, monkeypatch, model, pool, resize, preprocess, engine,
                                            precision):
    from featurecache.runs.fit import fit
    from featurecache.runs import record as runs
    from featurecache.runs.predict import features_for_files
    from featurecache.serving.server import ServeOptions, Service
    from featurecache.extraction.verify import verify

    cache = tmp_path / "cache"
    opts = DataOptions(str(folder))
    ds = opts.load()
    spec = FeatureSpec(model, "random", (LAYER[model],), pool, 32, resize, preprocess, precision=precision)
    layer = LAYER[model]
    files = [p for p in (ds.train.images.paths + ds.test.images.paths)]
    ids = ds.train.images.ids + ds.test.images.ids

    # plan's warm-up, before anything is stored (so it computes every image)
    plan_ids, planned = plan_vectors(ds, spec, cache, engine, monkeypatch)

    # extract: the stored vectors
    res, summary = extract_dataset(ds, spec, RunSettings(cache, progress=False, engine=engine))
    assert summary.computed == len(ids) and summary.engine == engine
    fs = FeatureStore(cache).get(res.set_ids[layer])
    stored = fs.gather(ids)
    close(planned, fs.gather(plan_ids), "plan's warm-up vs extract")

    # verify: recompute every row from the images and compare with the store
    report = verify(fs, ds, RunSettings(cache), len(ids))
    assert report.ok, report.line()
    assert f"recomputed {len(ids)} rows" in report.line()

    # serve's compute path: uploaded bytes decoded, one forward pass; the head is any fitted one
    record = fit(opts, spec, RunSettings(cache, engine, progress=False, log=lambda m: None),
                 HeadSpec("logreg", normalize="l2"))
    service = Service(ServeOptions(record["run_id"], str(cache), max_batch=4, engine=engine))
    assert service.engine == engine
    pixels = np.stack([service.decode(p.name, p.read_bytes()) for p in files])
    close(service.compute(pixels), stored, "serve vs extract")

    # predict: the set removed, so predict computes every file again (and stores it)
    FeatureStore(cache).remove(fs.id)
    again = features_for_files(files, runs.load(cache, record["run_id"]), RunSettings(cache, engine))
    close(again, stored, "predict vs extract")
