"""The command line as a new user meets it: usage errors, a quiet start, the project file, the lock."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_child

# Lines the native libraries print in their own formats (absl/glog, TensorFlow's older logger) or words
# that only their start-up messages use.
NATIVE = re.compile(r"^[IWEF]\d{4} |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |absl::InitializeLog|oneDNN|"
                    r"cuda|cuInit|TensorRT|TF-TRT|rebuild TensorFlow", re.IGNORECASE)


def cli(*args, cwd: Path, env: dict | None = None):
    """The installed entry point in a subprocess, in `cwd`, with no TF_CPP_MIN_LOG_LEVEL help from us."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("TF_CPP_MIN_LOG_LEVEL", "FEATURECACHE_DIR", "FEATURECACHE_ENGINE", "FEATURECACHE_DEBUG")}
    return run_child([sys.executable, "-m", "featurecache.cli", *args], cwd=cwd, env=base | (env or {}))


def one_usage_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["extract"], ["Missing option", "--data", "featurecache init"]),
    (["extract", "--data", "digits", "--no-such-flag"], ["No such option", "--no-such-flag"]),
    (["extract", "--data", "digits", "--pool", "median"], ["--pool", "median", "flatten", "avg", "max"]),
    (["extract", "--data", "digits", "--size", "big"], ["--size", "integer"]),
    (["fit", "--data", "digits", "--max-train", "0"], ["--max-train", "1"]),
    (["sweep", "--data", "digits", "--engine", "cuda"], ["--engine", "onnxruntime"]),
    (["nosuchcommand"], ["No such command", "nosuchcommand"]),
])
def test_usage_errors_are_one_line_with_status_2(tmp_path, args, words):
    line = one_usage_line(cli(*args, cwd=tmp_path))
    for w in words:
        assert w in line
    assert "--help" in line  # where to read the usage
    assert not (tmp_path / "cache").exists()  # a usage error touches nothing


def test_sweep_takes_every_feature_option_extract_takes():
    from typer.main import get_command

    from featurecache.cli.commands import app

    commands = get_command(app).commands
    extract = {o for p in commands["extract"].params for o in p.opts} - {"--json", "--help"}
    for name in ("sweep", "plan", "fit", "init"):
        have = {o for p in commands[name].params for o in p.opts}
        # sweep varies the taps and sizes itself; plan estimates the images' pass, not the views'
        missing = extract - have - ({"--layer", "--size"} if name == "sweep" else set()) \
            - ({"--augment", "--tta"} if name == "plan" else set())
        assert not missing, f"{name} lacks {sorted(missing)}"
    sweep = {o for p in commands["sweep"].params for o in p.opts}
    assert {"--resize", "--preprocess", "--precision", "--engine", "--on-error"} <= sweep


def test_quickstart_prints_no_native_log_line_unless_verbose(tmp_path):
    proc = cli("quickstart", "--quiet", "--cache-dir", tmp_path / "cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    assert [l for l in proc.stderr.splitlines() if NATIVE.search(l)] == [], proc.stderr
    assert all(l.startswith("notice: ") for l in proc.stderr.splitlines()), proc.stderr  # ours stay
    # --verbose lets the libraries speak (a fresh cache, so TensorFlow builds the model again)
    loud = cli("--verbose", "extract", "--data", "digits", "--max-train", "20", "--max-test", "10", "--weights",
               "random", "--size", "32", "--layer", "block1_pool", "--quiet", "--cache-dir", tmp_path / "c2",
               cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert any(NATIVE.search(l) for l in loud.stderr.splitlines()), loud.stderr


def test_init_then_the_cards_own_commands(tmp_path):
    """The product's usage lines, exactly: extract --model vgg16 --layer block5_pool, then fit --head linsvc."""
    made = cli("init", "--data", "digits", "--weights", "hed-bsds", "--size", "32", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "featurecache.toml").read_text().count("=") == 3
    work = tmp_path / "notebooks"  # found from a subfolder, as git finds its repository
    work.mkdir()
    ex = cli("extract", "--model", "vgg16", "--layer", "block5_pool", "--quiet", cwd=work)
    assert ex.returncode == 0, ex.stderr
    assert "extracted: digits, 1797 images, vgg16 (hed-bsds) at 32px" in ex.stdout
    fit = cli("fit", "--head", "linsvc", "--json", cwd=work)
    assert fit.returncode == 0, fit.stderr
    run = json.loads(fit.stdout)
    assert run["features"] == "vgg16/block5_pool/flatten 32px" and run["dims"] == 512
    assert 0.5 < run["test_accuracy"] <= 1.0  # real pretrained codes of digits: far above chance (0.1)
    assert (tmp_path / "cache" / "runs" / run["run_id"]).is_dir()  # the cache sits beside the project file
    assert not (work / "cache").exists()
    again = cli("init", "--data", "digits", cwd=tmp_path)
    assert "exists" in one_usage_line(again) and "--force" in again.stderr


def test_flag_beats_environment_beats_file_and_config_says_which(tmp_path):
    (tmp_path / "featurecache.toml").write_text('data = "digits"\nsize = 48\nengine = "tensorflow"\n'
                                                 'cache-dir = "store"\n[fit]\nhead = "logreg"\nsize = 64\n')
    shown = cli("config", "--json", cwd=tmp_path, env={"FEATURECACHE_ENGINE": "openvino"})
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)["values"]
    assert rows["size"]["value"] == 48 and "file" in rows["size"]["source"]
    assert rows["engine"] == {"value": "openvino", "source": "environment ($FEATURECACHE_ENGINE)"}
    assert rows["cache-dir"]["value"] == str(tmp_path / "store")  # relative to the file's folder
    assert rows["fit:size"]["value"] == 64 and rows["head"]["value"] == "logreg"
    assert rows["pool"] == {"value": "flatten", "source": "default"}
    one = json.loads(cli("config", "fit", "--size", "96", "--json", cwd=tmp_path).stdout)["values"]
    assert one["size"] == {"value": 96, "source": "flag"}
    assert one["head"]["value"] == "logreg"


@pytest.mark.parametrize("text, words", [
    ("data = [", ["not valid TOML"]),
    ('data = "digits"\nsizee = 32\n', ["unknown key 'sizee'", "did you mean 'size'"]),
    ("size = \"big\"\n", ["size", "big"]),
    ('pool = "median"\n', ["pool", "median", "flatten", "avg", "max"]),
    ("layer = 3\n", ["layer", "string in quotes"]),
    ("size = \"32\"\n", ["size", "a number"]),
    ("size = [32, 64]\n", ["size", "one value"]),
    ("quiet = \"yes\"\n", ["quiet", "true or false"]),
    ('[fitt]\nhead = "linsvc"\n', ["[fitt] is not a command"]),
    ('[fit]\nhost = "0.0.0.0"\n', ["[fit]", "unknown key 'host'"]),
    # the heads and their options come from featurecache/heads: the file is checked against them too
    ('[fit]\nhead = "boosting"\n', ["[fit]", "head", "boosting", "linsvc"]),
    ('[fit]\nalpha = "strong"\n', ["[fit]", "alpha", "strong"]),
    ('[sweep]\nheads = "linsvc,boosting"\n', ["[sweep]", "heads", "unknown head 'boosting'"]),
])
def test_a_bad_project_file_is_one_line_naming_file_and_key(tmp_path, text, words):
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    (cache / "features" / "keep.txt").write_text("cached work")
    (tmp_path / "featurecache.toml").write_text(text)
    line = one_usage_line(cli("extract", "--data", "digits", "--weights", "random", cwd=tmp_path))
    assert str(tmp_path / "featurecache.toml") in line
    for w in words:
        assert w in line, line
    assert [p.name for p in cache.rglob("*")] == ["features", "keep.txt"]  # nothing cached is touched


def test_the_lock_pins_every_declared_dependency_inside_its_range(tmp_path):
    script = ROOT / "scripts" / "lock.py"
    ok = run_child([sys.executable, script, "check"])
    assert ok.returncode == 0, ok.stderr
    # The environment the suite runs in is the locked one (what `pip install -c requirements.lock` gives).
    from importlib.metadata import PackageNotFoundError, version

    sys.path.insert(0, str(script.parent))
    try:
        from lock import read_lock
    finally:
        sys.path.pop(0)
    pins = read_lock(ROOT / "requirements.lock")
    for name in ("tensorflow", "keras", "typer", "filelock", "numpy", "scikit-learn", "h5py", "onnxruntime"):
        try:
            assert version(name) == pins[name], f"{name} {version(name)} installed, {pins[name]} locked"
        except PackageNotFoundError:
            pytest.fail(f"{name} is locked but not installed")
    # A lock that drifted outside pyproject's ranges is one line, exit 2.
    bad = tmp_path / "requirements.lock"
    bad.write_text(re.sub(r"(?m)^numpy==.*$", "numpy==1.20.0", (ROOT / "requirements.lock").read_text())
                   .replace("\ntyper==", "\n# typer=="))
    proc = run_child([sys.executable, script, "check", "--lock", bad])
    line = one_usage_line(proc)
    assert "numpy==1.20.0 is outside pyproject's range '>=1.26'" in line and "typer" in line
