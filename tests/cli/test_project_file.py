"""featurecache.toml as a careless user and a hostile neighbour meet it (issue 25, findings 4 and 6a), and
serve's --port and --token-file: real CLI runs in subprocesses, in the folders a user would work in."""

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from conftest import error_line, free_port, run_child, run_cli, stop, wait_for_health

# VGG16 with seeded random weights at 32 px on a slice of digits: a real run, made fast.
INIT = ["init", "--data", "digits", "--weights", "random", "--size", "32", "--max-train", "60", "--max-test", "30"]
# The project file, not the tester's environment, decides here (click reads an empty variable as unset).
CLEAN = {"FEATURECACHE_DIR": "", "FEATURECACHE_TOKEN": ""}


def here(*args, cwd, env=None):
    """`featurecache ARGS` run in `cwd`, as a user working in that folder."""
    return run_cli(*args, cwd=cwd, env={**CLEAN, **(env or {})})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """base/proj: a folder made by `featurecache init`, with one run fitted there; base itself is the parent a
    neighbour could write into. Returns (base, proj, run id)."""
    base = tmp_path_factory.mktemp("shared")
    proj = base / "proj"
    proj.mkdir()
    for args in (INIT, ["fit", "--extract", "--json", "-q"]):
        done = here(*args, cwd=proj)
        assert done.returncode == 0, done.stderr
    return base, proj, json.loads(done.stdout)["run_id"]


def config_json(cwd, *words, env=None, named=None) -> tuple[dict, str]:
    """`featurecache [--config NAMED] config WORDS --json` in `cwd`: the values in force, and its stderr."""
    proc = here(*(["--config", named] if named else []), "config", *words, "--json", cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_export_works_in_the_folder_init_made(project):
    """Red team: `featurecache init --data digits ...; featurecache fit --extract; featurecache export --run ID`
    -> "error: --data goes with --check": the file's `data =` fed export's --data, which is check data there."""
    _, proj, run_id = project
    proc = here("export", "--run", run_id, "--json", cwd=proj)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (proj / out["path"]).resolve() == proj / f"{run_id}.onnx" and (proj / f"{run_id}.onnx").stat().st_size > 0
    # what the file cannot set for export: `[export] data` is an unknown key, not silently check data
    values, _ = config_json(proj, "export")
    assert values["values"]["data"] == {"value": None, "source": "default"}


def test_the_search_stops_at_home_and_at_a_listed_ceiling(tmp_path):
    """Red team: a featurecache.toml planted in a folder above the user's (here, above $HOME) set serve's
    defaults of every project below it; git stops at such a ceiling."""
    (tmp_path / "featurecache.toml").write_text('size = 48\n')
    home = tmp_path / "home" / "me"
    work = home / "proj"
    work.mkdir(parents=True)
    # The control: with $HOME elsewhere (not above tmp_path), the search finds the planted file from `work`.
    found, _ = config_json(work, env={"HOME": str(tmp_path / "elsewhere")})
    assert found["file"] == str(tmp_path / "featurecache.toml") and found["values"]["size"]["value"] == 48
    # $HOME is a ceiling: nothing above it is read ...
    above_home, _ = config_json(work, env={"HOME": str(home)})
    assert above_home["file"] is None and above_home["values"]["size"]["source"] == "default"
    # ... but the home folder's own file is the user's, and counts.
    (home / "featurecache.toml").write_text('size = 64\n')
    mine, _ = config_json(work, env={"HOME": str(home)})
    assert mine["file"] == str(home / "featurecache.toml") and mine["values"]["size"]["value"] == 64
    (home / "featurecache.toml").unlink()
    # FEATURECACHE_CEILING_DIRECTORIES, as GIT_CEILING_DIRECTORIES: the search does not enter a listed folder.
    listed, _ = config_json(work, env={"HOME": str(tmp_path / "elsewhere"),
                                       "FEATURECACHE_CEILING_DIRECTORIES": f"/nonexistent:{tmp_path / 'home'}"})
    assert listed["file"] is None


def test_the_search_stops_at_a_filesystem_boundary(tmp_path):
    """As git without GIT_DISCOVERY_ACROSS_FILESYSTEM: from a mounted folder (a USB stick, a network share,
    here a tmpfs in a private mount namespace) the search does not climb into the filesystem around it."""
    (tmp_path / "featurecache.toml").write_text("size = 48\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    found, _ = config_json(mnt, env={"HOME": str(tmp_path / "elsewhere")})  # the control: no mount, found
    assert found["file"] == str(tmp_path / "featurecache.toml")
    if shutil.which("unshare") is None or run_child(["unshare", "-m", "true"], timeout=60).returncode != 0:
        pytest.skip("mounting a filesystem for the test needs `unshare -m` (root, CAP_SYS_ADMIN)")
    script = 'mount -t tmpfs none "$1" && cd "$1" && exec "$2" -m featurecache.cli config --json'
    proc = run_child(["unshare", "-m", "sh", "-c", script, "sh", mnt, sys.executable], timeout=120,
                     env=dict(os.environ, HOME=str(tmp_path / "elsewhere"), **CLEAN))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["file"] is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user (chown) needs root")
def test_a_file_another_user_owns_is_ignored_with_a_notice(tmp_path):
    """Red team: in a folder anyone may write into, another user's featurecache.toml pointed `cache-dir` at a
    folder of their own (its planted head.joblib was unpickled) and `report --plot` at any path."""
    planted = tmp_path / "featurecache.toml"
    planted.write_text('cache-dir = "/tmp/their-cache"\nplot = "/tmp/anywhere.png"\n')
    os.chown(planted, 65534, 65534)
    work = tmp_path / "mine"
    work.mkdir()
    shown, stderr = config_json(work, env={"HOME": str(tmp_path / "elsewhere")})
    assert shown["file"] is None and shown["values"]["cache-dir"]["source"] == "default"
    notices = [l for l in stderr.splitlines() if l.startswith("notice: ")]
    assert len(notices) == 1 and str(planted) in notices[0] and "uid 65534" in notices[0], stderr
    assert "--config" in notices[0]  # and how to use it anyway
    # Named with --config, the user has chosen it: it is used.
    named, stderr = config_json(work, "report", named=planted)
    assert named["file"] == str(planted) and named["named"] is True
    assert named["values"]["plot"]["value"] == "/tmp/anywhere.png" and "notice" not in stderr


def test_a_found_file_cannot_open_the_server(project):
    """Red team: from a subfolder, a file planted higher up set `host = "0.0.0.0"` and `no-auth = true` for
    `featurecache serve`. Only a file named with --config may set host, no-auth, token and token-file."""
    base, _, _ = project
    planted = base / "featurecache.toml"
    planted.write_text('host = "0.0.0.0"\nno-auth = true\n[serve]\ntoken-file = "/dev/null"\n')
    work = base / "work"
    work.mkdir(exist_ok=True)
    try:
        found, stderr = config_json(work, "serve")
        values = found["values"]
        assert found["file"] == str(planted) and found["named"] is False
        assert values["host"] == {"value": "127.0.0.1", "source": "default"}
        assert values["no-auth"] == {"value": False, "source": "default"}
        assert values["token-file"]["source"] == "default"
        notice = [l for l in stderr.splitlines() if l.startswith("notice: ignoring ")]
        assert len(notice) == 1 and all(k in notice[0] for k in ("host", "no-auth", "token-file")), stderr
        # the same file, named: the user chose it, so it is trusted
        named, stderr = config_json(work, "serve", named=planted)
        assert named["values"]["host"]["value"] == "0.0.0.0" and named["values"]["no-auth"]["value"] is True
        assert "notice" not in stderr
        bad = here("--config", base / "nope.toml", "config", cwd=work)
        assert "--config" in error_line(bad) and "nope.toml" in error_line(bad) and bad.returncode == 2
    finally:
        planted.unlink()


def serve_in(cwd, args, log_path):
    """A real `featurecache serve ARGS --port P` started in `cwd` (where it looks for featurecache.toml)."""
    port = free_port()
    cmd = [sys.executable, "-m", "featurecache.cli", "serve", *map(str, args), "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **CLEAN))
    return proc, port, " ".join(cmd)


def test_serve_names_its_project_file_first_and_binds_as_flags_say(project, tmp_path):
    """Red team: serve from a subfolder under a planted file that sets host and token. The file is named on
    serve's first line; its host and token are left out (a notice says so): it binds 127.0.0.1, no token."""
    base, proj, run_id = project
    planted = base / "featurecache.toml"
    # 127.0.0.2 is loopback too (the test binds nothing off this machine), yet not where serve binds by default
    planted.write_text(f'host = "127.0.0.2"\ntoken = "planted-secret"\ncache-dir = "{proj / "cache"}"\n')
    work = base / "work"
    work.mkdir(exist_ok=True)
    log = tmp_path / "serve.log"
    proc, port, what = serve_in(work, ["--run", run_id], log)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc, log)
        assert httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).status_code == 200  # the planted token: not taken
    finally:
        stop(proc, what)
        planted.unlink()
    lines = log.read_text().splitlines()
    assert lines[0] == f"project file: {planted}", lines[:3]
    assert lines[1].startswith("notice: ignoring host, token in "), lines[:3]
    assert any(f"serving on http://127.0.0.1:{port}" in l for l in lines), lines


def test_port_out_of_range_is_a_usage_error_before_loading(project):
    """Red team: `featurecache serve --run ID --port 99999` loaded the models, then died with a traceback."""
    _, proj, run_id = project
    for port in ("99999", "0", "-1"):
        proc = here("serve", "--run", run_id, "--port", port, cwd=proj)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--port" in error_line(proc), proc.stderr
        assert "loading" not in proc.stderr, proc.stderr  # refused before any model loads


def test_token_file_keeps_the_token_out_of_ps(project, tmp_path):
    """Red team: `featurecache serve --token T` shows T to every local user (`ps -ef`). --token-file reads it
    from a file; a missing or empty file is one line before anything loads."""
    _, proj, run_id = project
    secret = "from-a-file-" + os.urandom(8).hex()
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    log = tmp_path / "serve.log"
    proc, port, what = serve_in(proj, ["--run", run_id, "--token-file", token_file], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, log)
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().decode()
        assert secret not in cmdline and str(token_file) in cmdline  # what `ps` shows
        assert httpx.get(f"{url}/info", timeout=10).status_code == 401
        ok = httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
        assert ok.status_code == 200, ok.text
    finally:
        stop(proc, what)
    assert log.read_text().splitlines()[0] == f"project file: {proj / 'featurecache.toml'}"
    (tmp_path / "empty").write_text("\n")
    cases = [(["--token-file", tmp_path / "missing"], ["--token-file", "missing", "cannot read"]),
             (["--token-file", tmp_path / "empty"], ["--token-file", "empty"]),
             (["--token-file", token_file, "--token", "t"], ["--token-file", "--token", "one of them"])]
    for args, words in cases:
        bad = here("serve", "--run", run_id, *args, cwd=proj)
        line = error_line(bad)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and "loading" not in bad.stderr, bad.stderr
        assert all(w in line for w in words), line
