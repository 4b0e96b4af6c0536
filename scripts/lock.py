"""The lock: the exact versions the test suite passed with, and how it moves on purpose.

    python scripts/lock.py check              # the lock agrees with pyproject.toml's ranges (exit 2 if not)
    python scripts/lock.py compile            # rewrite requirements.lock, keeping locked versions where they fit
    python scripts/lock.py upgrade            # newest releases -> fresh venv -> whole test suite; keep or report

`requirements.lock` is written by uv (`uv pip compile`), for the machines CI and the README's set-up
command run on: CPython 3.11 on x86-64 Linux. pyproject.toml keeps open ranges (a library is installed
beside other tools); the lock is what a fresh machine gets (`pip install -c requirements.lock ...`),
so a release next week cannot change what the tests ran against. `upgrade` is how drift is found: by
us, on a schedule, in a throwaway venv, never by a user.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
EXTRAS = ("test",)
TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]


def _requirements() -> list:
    """pyproject's dependencies and the locked extras, as packaging Requirements."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(r) for r in reqs if not r.startswith("featurecache")]


def read_lock(path: Path) -> dict[str, str]:
    """Canonical name -> pinned version, from `name==version` lines (uv's comments ignored)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def problems(lock: Path) -> list[str]:
    """Each declared dependency must be pinned in the lock, at a version its range admits."""
    from packaging.utils import canonicalize_name

    if not lock.is_file():
        return [f"{lock}: no lock file; run `python scripts/lock.py compile`"]
    pins = read_lock(lock)
    out = []
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            out.append(f"{req.name} ({req}) is not pinned")
        elif not req.specifier.contains(pinned, prereleases=True):
            out.append(f"{req.name}=={pinned} is outside pyproject's range '{req.specifier}'")
    return out


def check(lock: Path) -> int:
    found = problems(lock)
    if found:
        print(f"error: {lock} does not match pyproject.toml: {'; '.join(found)}; "
              "run `python scripts/lock.py compile`", file=sys.stderr)
        return 2
    print(f"{lock.name}: {len(read_lock(lock))} pins, every declared range satisfied")
    return 0


def _uv() -> list[str]:
    if shutil.which("uv"):
        return ["uv"]
    probe = subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uv"], check=True)
    return [sys.executable, "-m", "uv"]


def compile_lock(out: Path, upgrade: bool) -> None:
    cmd = [*_uv(), "pip", "compile", "pyproject.toml", *sum((["--extra", e] for e in EXTRAS), []), *TARGET,
           "--no-header", "-o", str(out)]
    if upgrade:
        cmd.append("--upgrade")
    elif LOCK.is_file() and out != LOCK:
        shutil.copy(LOCK, out)  # uv keeps the versions already in the output file where they still fit
    header = ("# The exact versions the test suite passed with (CPython 3.11, x86-64 Linux).\n"
              "# Installed by the README's set-up command and .ci/run: pip install -c requirements.lock -e \".[test]\"\n"
              "# Regenerate: python scripts/lock.py compile   (newest releases, tested: python scripts/lock.py upgrade)\n")
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    out.write_text(header + out.read_text())


def upgrade(keep_venv: bool) -> int:
    old = LOCK.read_text() if LOCK.is_file() else ""
    work = Path(tempfile.mkdtemp(prefix="featurecache-upgrade-"))
    new = work / "requirements.lock"
    compile_lock(new, upgrade=True)
    moved = [l for l in difflib.unified_diff(old.splitlines(), new.read_text().splitlines(), lineterm="", n=0)
             if l[:1] in "+-" and "==" in l]
    print("\n".join(moved) or "no release moved")
    venv = work / "venv"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin/pip"), "install", "-q", "-c", str(new), "-e", ".[test]"],
             [str(venv / "bin/python"), "-m", "pytest", "-q", "-x"]]
    for step in steps:
        if subprocess.run(step, cwd=ROOT, env=dict(os.environ, CI="true")).returncode != 0:
            print(f"error: the newest releases fail `{' '.join(step[-3:])}`; requirements.lock is unchanged. "
                  f"Candidate lock and venv kept in {work}", file=sys.stderr)
            return 1
    shutil.copy(new, LOCK)
    if not keep_venv:
        shutil.rmtree(work, ignore_errors=True)
    print(f"tests pass on the newest releases; {LOCK} updated ({len(moved)} lines moved): commit it")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="does the lock satisfy pyproject.toml's ranges?")
    c.add_argument("--lock", type=Path, default=LOCK)
    sub.add_parser("compile", help="rewrite the lock, keeping locked versions where they still fit")
    u = sub.add_parser("upgrade", help="newest releases, tested in a fresh venv, then written to the lock")
    u.add_argument("--keep-venv", action="store_true")
    args = parser.parse_args()
    if args.cmd == "check":
        return check(args.lock)
    if args.cmd == "compile":
        compile_lock(LOCK, upgrade=False)
        return check(LOCK)
    return upgrade(args.keep_venv)


if __name__ == "__main__":
    sys.exit(main())
