"""--resize auto: nearest when upsizing, antialiased bilinear when downsizing (JPEGs decoded at a reduced
DCT scale first), the default for new sets; `nearest` and `bilinear` (and their keys) unchanged."""

import io

import numpy as np
import pytest
from PIL import Image

from featurecache.encoding import images
from featurecache.encoding.encoder import decode
from featurecache.errors import FeatureCacheError
from featurecache.fingerprint import feature_key, key_id
from featurecache.settings import FeatureSpec, resolve


def photo(h=480, w=640, seed=0) -> np.ndarray:
    """A smooth gradient with noise: what a photo's spectrum looks like to a resizer."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    stripes = 40 * (np.sin(x * w * 1.3) > 0)[..., None]  # fine detail that nearest aliases
    return np.clip(base + stripes + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_auto_is_nearest_up_and_bilinear_down():
    small, big = photo(28, 28), photo(120, 90)
    assert images.resize_filter(small.shape, 64, "auto") == "nearest"
    assert images.resize_filter(big.shape, 64, "auto") == "bilinear"
    assert images.resize_filter((50, 100, 3), 64, "auto") == "bilinear"  # one side shrinks: antialiased
    assert images.resize_filter(big.shape, 64, "nearest") == "nearest"
    assert (images.resize(small, 64, "auto") == images.resize(small, 64, "nearest")).all()
    assert (images.resize(big, 64, "auto") == images.resize(big, 64, "bilinear")).all()
    same = images.resize(small, 28, "auto")
    assert same is small  # already the size: no copy


def test_downsizing_auto_does_not_alias_like_nearest():
    """A high-frequency pattern shrunk 8x: nearest keeps (aliased) full-contrast stripes, auto averages them."""
    x = np.tile(((np.arange(512) // 3) % 2 * 255).astype(np.uint8), (512, 1))
    rgb = np.repeat(x[:, :, None], 3, axis=2)
    assert images.resize(rgb, 64, "nearest").std() > 100
    assert images.resize(rgb, 64, "auto").std() < 40


def test_auto_decodes_jpegs_at_draft_scale_only_for_auto():
    rgb = photo()
    data = jpeg(rgb)
    full = images.decode_bytes(data, "p.jpg")
    assert full.shape == (480, 640, 3)
    drafted = images.decode_bytes(data, "p.jpg", target=224)
    assert drafted.shape == (240, 320, 3)  # 1/2: the smallest DCT scale that keeps both sides >= 224
    assert images.decode_bytes(data, "p.jpg", target=300).shape == (480, 640, 3)  # 1/2 would go below 300
    # nearest and bilinear read every pixel as before (their sets keep their vectors) ...
    assert (decode(data, "p.jpg", 224, "nearest") == images.resize(full, 224, "nearest")).all()
    assert (decode(data, "p.jpg", 224, "bilinear") == images.resize(full, 224, "bilinear")).all()
    # ... auto is the draft, then the antialiased filter, the same each time, and close to the full decode.
    a, b = decode(data, "p.jpg", 224, "auto"), decode(data, "p.jpg", 224, "auto")
    assert (a == b).all() and (a == images.resize(drafted, 224, "bilinear")).all()
    assert np.abs(a.astype(int) - images.resize(full, 224, "bilinear")).mean() < 4


def test_paths_and_bytes_decode_alike_under_auto(tmp_path):
    data = jpeg(photo(seed=1))
    (tmp_path / "p.jpg").write_bytes(data)
    assert (decode(str(tmp_path / "p.jpg"), None, 128, "auto") == decode(data, None, 128, "auto")).all()


def test_auto_is_the_default_and_in_the_key(tmp_path):
    from featurecache.cli.options import FEATURES, RESIZES

    assert FEATURES.fields["resize"][1] == "auto" and RESIZES == images.RESIZES
    assert FeatureSpec("vgg16").resize == "auto"
    auto = resolve(FeatureSpec("vgg16", "random", ("block5_pool",), size=64), None, tmp_path)
    near = resolve(FeatureSpec("vgg16", "random", ("block5_pool",), size=64, resize="nearest"), None, tmp_path)
    assert auto.keys["block5_pool"]["resize"] == "auto" and near.keys["block5_pool"]["resize"] == "nearest"
    assert auto.set_ids["block5_pool"] != near.set_ids["block5_pool"]
    # A nearest set keeps the id it had before `auto` existed: the key is built from the same parts.
    assert near.set_ids["block5_pool"] == key_id(feature_key("vgg16", near.weights.id, "block5_pool", "flatten", 64,
                                                             "nearest", near.preprocess_mode))


def test_upsizing_notice_names_the_filter(tmp_path):
    res = resolve(FeatureSpec("vgg16", "random", ("block5_pool",)), 8, tmp_path)
    assert any("(nearest)" in n for n in res.notices)


def test_unknown_resize_is_one_line(tmp_path):
    with pytest.raises(FeatureCacheError, match="--resize lanczos: unknown; use one of auto, nearest, bilinear"):
        resolve(FeatureSpec("vgg16", "random", ("block5_pool",), size=64, resize="lanczos"), None, tmp_path)


def test_auto_keys_same_sized_images_by_the_filter_it_picks(tmp_path):
    """`auto` on images that all share one size is one filter for all of them: the set is keyed by that
    filter, so sets extracted with `nearest` before `auto` became the default stay cache hits."""
    from featurecache.settings import FeatureSpec, resolve

    up = resolve(FeatureSpec("vgg16", "random", ("block1_pool",), size=32, resize="auto"), 8, tmp_path)
    old = resolve(FeatureSpec("vgg16", "random", ("block1_pool",), size=32, resize="nearest"), 8, tmp_path)
    assert up.resize == "nearest" and up.set_ids == old.set_ids
    down = resolve(FeatureSpec("vgg16", "random", ("block1_pool",), size=32, resize="auto"), 64, tmp_path)
    assert down.resize == "bilinear"
    files = resolve(FeatureSpec("vgg16", "random", ("block1_pool",), size=32, resize="auto"), None, tmp_path)
    assert files.resize == "auto" and files.set_ids != old.set_ids  # sizes vary per file: the rule is the key
