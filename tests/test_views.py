"""Fit-time pooling views of stored flattened maps agree with the network's own pooling layers."""

import numpy as np
import pytest

from featurecache import views
from featurecache.errors import FeatureCacheError


@pytest.mark.parametrize("shape", [(8, 8, 4), (7, 5, 3), (2, 2, 6)])
def test_window_views_equal_keras_pooling_layers(shape):
    import keras

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, *shape)).astype(np.float32)
    flat = maps.reshape(5, -1)  # what `--pool flatten` stores: NHWC order
    for pool, layer in (("max2x2", keras.layers.MaxPooling2D(2)), ("avg2x2", keras.layers.AveragePooling2D(2))):
        want = np.asarray(layer(maps)).reshape(5, -1)
        got = views.apply(flat, shape, pool)
        assert got.shape == (5, views.dims(shape, pool)) == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(views.apply(flat, shape, "avg"), maps.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(views.apply(flat, shape, "max"), maps.max(axis=(1, 2)))


def test_grid_view_is_adaptive_max_pooling():
    maps = np.arange(2 * 5 * 5 * 2, dtype=np.float32).reshape(2, 5, 5, 2)
    got = views.apply(maps.reshape(2, -1), (5, 5, 2), "grid2").reshape(2, 2, 2, 2)
    # bins of a 5-wide axis in 2: [0, 3) and [2, 5) (overlapping, as adaptive pooling's are)
    for i, (r0, r1) in enumerate([(0, 3), (2, 5)]):
        for j, (c0, c1) in enumerate([(0, 3), (2, 5)]):
            np.testing.assert_array_equal(got[:, i, j], maps[:, r0:r1, c0:c1].max(axis=(1, 2)))
    assert views.dims((5, 5, 2), "grid1") == 2 and views.dims((8, 8, 256), "max2x2") == 4096


def test_views_refuse_what_they_cannot_derive():
    assert views.derivable("flatten", "max2x2") and views.derivable("flatten", "avg")
    assert not views.derivable("avg", "max2x2") and not views.derivable("avg", "max")
    with pytest.raises(FeatureCacheError, match="--pool median: unknown"):
        views.check("median")
    with pytest.raises(FeatureCacheError, match="not the 4x4x2 map"):
        views.apply(np.zeros((3, 2), np.float32), (4, 4, 2), "max2x2")
    with pytest.raises(FeatureCacheError, match="too small for 2x2"):
        views.apply(np.zeros((3, 2), np.float32), (1, 1, 2), "max2x2")
