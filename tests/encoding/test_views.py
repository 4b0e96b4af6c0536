"""Fit-time pooling views of stored flattened maps agree with the network's own pooling layers."""

import numpy as np
import pytest

from featurecache.encoding.pooling import Pooling, check_stored
from featurecache.errors import FeatureCacheError


@pytest.mark.parametrize("shape", [(8, 8, 4), (7, 5, 3), (2, 2, 6)])
def test_window_views_equal_keras_pooling_layers(shape):
    import keras

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, *shape)).astype(np.float32)
    flat = maps.reshape(5, -1)  # what `--pool flatten` stores: NHWC order
    for pool, layer in (("max2x2", keras.layers.MaxPooling2D(2)), ("avg2x2", keras.layers.AveragePooling2D(2))):
        want = np.asarray(layer(maps)).reshape(5, -1)
        got = Pooling(pool).rows(flat, shape)
        assert got.shape == (5, Pooling(pool).dims(shape)) == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Pooling("avg").rows(flat, shape), maps.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(Pooling("max").rows(flat, shape), maps.max(axis=(1, 2)))


def test_grid_view_is_adaptive_max_pooling():
    maps = np.arange(2 * 5 * 5 * 2, dtype=np.float32).reshape(2, 5, 5, 2)
    got = Pooling("grid2").rows(maps.reshape(2, -1), (5, 5, 2)).reshape(2, 2, 2, 2)
    # bins of a 5-wide axis in 2: [0, 3) and [2, 5) (overlapping, as adaptive pooling's are)
    for i, (r0, r1) in enumerate([(0, 3), (2, 5)]):
        for j, (c0, c1) in enumerate([(0, 3), (2, 5)]):
            np.testing.assert_array_equal(got[:, i, j], maps[:, r0:r1, c0:c1].max(axis=(1, 2)))
    assert Pooling("grid1").dims((5, 5, 2)) == 2 and Pooling("max2x2").dims((8, 8, 256)) == 4096


def test_views_refuse_what_they_cannot_derive():
    assert Pooling("max2x2").derivable_from("flatten") and Pooling("avg").derivable_from("flatten")
    assert not Pooling("max2x2").derivable_from("avg") and not Pooling("max").derivable_from("avg")
    assert Pooling("grid3").stored == "flatten" and Pooling("grid3").is_view and Pooling.parse("avg").stored == "avg"
    with pytest.raises(FeatureCacheError, match="--pool median: unknown"):
        Pooling.parse("median")
    with pytest.raises(FeatureCacheError, match="not the 4x4x2 map"):
        Pooling("max2x2").rows(np.zeros((3, 2), np.float32), (4, 4, 2))
    with pytest.raises(FeatureCacheError, match="too small for 2x2"):
        Pooling("max2x2").rows(np.zeros((3, 2), np.float32), (1, 1, 2))
    for bad in ("grid", "grid0", "grid100", "Max"):
        with pytest.raises(FeatureCacheError, match=f"--pool {bad}: unknown"):
            Pooling.parse(bad)
    with pytest.raises(FeatureCacheError, match="--pool max2x2: a view .* made at fit time"):
        check_stored("max2x2")  # extraction stores flatten, avg or max only


def test_the_pool_options_take_their_choices_from_the_pooling_module():
    from featurecache.cli import options
    from featurecache.encoding import pooling

    assert options.POOLS == pooling.STORED
    assert all(v.replace("N", "") in pooling.HELP for v in pooling.VIEWS)
