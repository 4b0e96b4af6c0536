"""scripts/ use the public API only: featurecache.api, featurecache.heads, featurecache.errors and
featurecache.bench (the helpers made for them), or the CLI in a subprocess. No sys.path edits, nothing
from tests/. The rule is read from each script's syntax tree, imports inside functions included."""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_child

PUBLIC = {"featurecache", "featurecache.api", "featurecache.heads", "featurecache.errors", "featurecache.bench"}
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
SIBLINGS = {p.stem for p in SCRIPTS}  # a script may import another script (bench_extract uses bench_engines)


def _imports(tree: ast.AST):
    """(module, [names]) of every import statement; names is None for `import module`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or ""), [a.name for a in node.names]


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for module, names in _imports(tree):
        top = module.split(".")[0]
        if module.startswith(".") or top in ("tests", "conftest"):
            bad.append(f"imports {module}")
        elif top == "featurecache":
            if module not in PUBLIC:
                bad.append(f"imports {module} (not public)")
            elif module == "featurecache":
                bad += [f"imports featurecache.{n} (not public)" for n in names or []
                        if f"featurecache.{n}" not in PUBLIC]
        elif top not in SIBLINGS and top in {p.stem for p in (ROOT / "tests").glob("*.py")}:
            bad.append(f"imports the test helper {module}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            bad.append(f"line {node.lineno}: touches sys.path")
        if isinstance(node, ast.Name) and node.id == "site":
            bad.append(f"line {node.lineno}: uses site (addsitedir)")
    return bad


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_uses_the_public_api_only(path):
    assert not _violations(path)


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_name_a_script_imports_from_featurecache_exists(path):
    """A renamed or removed public name fails here, not in a benchmark nobody ran."""
    for module, names in _imports(ast.parse(path.read_text())):
        if module in PUBLIC:
            mod = importlib.import_module(module)
            for name in names or []:
                assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), (path.name, module, name)


def test_the_rule_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.path.insert(0, 'tests')\nfrom conftest import x\n"
                   "def f():\n    from featurecache.extraction.extract import forward_fn\n    from featurecache import store\n"
                   "import tests.conftest\n")
    found = _violations(bad)
    assert any("sys.path" in v for v in found) and any("conftest" in v for v in found)
    assert "imports featurecache.extraction.extract (not public)" in found and "imports featurecache.store (not public)" in found
    assert "imports tests.conftest" in found
    good = tmp_path / "good.py"
    good.write_text("from featurecache import bench, heads\nfrom featurecache.api import load_features\n"
                    "import numpy as np\nimport bench_engines\n")
    assert _violations(good) == []


def _run(script, *args, **kw):
    return run_child([sys.executable, ROOT / "scripts" / script, *args], timeout=300, cwd=ROOT, **kw)


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS if "argparse" in p.read_text()])
def test_script_starts(script):
    """Every script with options at least starts: its imports resolve without sys.path help."""
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


# ---- featurecache.bench itself ---------------------------------------------------------------------------------


def test_write_section_replaces_only_its_section(tmp_path):
    from featurecache.bench import write_section

    doc = tmp_path / "B.md"
    write_section(doc, "One", "first")
    write_section(doc, "Two", "second")
    write_section(doc, "One", "first, again")
    text = doc.read_text()
    assert text.count("## One") == 1 and "first, again" in text and "first\n" not in text and "second" in text
    assert text.index("## One") < text.index("## Two")


def test_run_cli_measures_a_child(tmp_path):
    from featurecache.bench import run_cli

    out = run_cli(["models", "--json"], check=False)
    assert out.returncode == 0 and out.seconds > 0 and out.peak_rss > 10 * 2**20
    assert "vgg16" in json.loads(out.stdout)[0].values() or "vgg16" in out.stdout
    assert run_cli(["report", "--format", "xml"], check=False).returncode == 2


def test_images_and_shapes(tmp_path):
    from featurecache import bench
    from featurecache.errors import FeatureCacheError

    paths = bench.write_digit_images(tmp_path / "d", 2, classes=(0, 1))
    assert len(paths) == 4 and bench.decode_file(paths[0]).shape == (8, 8, 3)
    bench.check_file(paths[0])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(FeatureCacheError):
        bench.check_file(tmp_path / "bad.png")
    pngs = bench.noise_pngs(2, 16)
    assert len(pngs) == 2 and pngs[0] != pngs[1] and pngs[0][:4] == b"\x89PNG"
    shapes = bench.tap_shapes("vgg16", 32, tmp_path / "cache")
    assert shapes["block3_pool"] == (4, 4, 256) and list(shapes).index("block3_pool") < list(shapes).index("block5_pool")


def test_encoder_set_state_and_vectors_agree(tmp_path):
    """What the benchmarks read: a set's state after extraction, its vectors, and the encoder's for the same images."""
    from featurecache import bench
    from featurecache.api import DataOptions, FeatureSpec, RunSettings, extract_dataset, make_encoder

    cache = tmp_path / "cache"
    ds = DataOptions("digits", max_train=12, max_test=6).load()
    spec = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)
    res, _ = extract_dataset(ds, spec, RunSettings(cache, progress=False, engine="onnxruntime"))
    set_id = res.set_ids["block5_pool"]
    ids = ds.train.images.ids + ds.test.images.ids
    state = bench.set_state(cache, set_id)
    assert state.ids == frozenset(ids) and state.rows == len(ids) and not state.problems and state.temp_files == 0
    assert bench.set_state(cache, "0" * 16) is None
    stored = bench.set_vectors(cache, set_id, ids)
    enc = make_encoder(spec, RunSettings(cache, engine="onnxruntime"))
    pixels = enc.prepare([ds.train.images.load(k) for k in range(12)]).pixels
    vectors = enc.encode_pixels(pixels)["block5_pool"]
    assert enc.engine == "onnxruntime" and vectors.shape == (12, 512)
    np.testing.assert_allclose(vectors, stored[:12], rtol=1e-5, atol=1e-6)
