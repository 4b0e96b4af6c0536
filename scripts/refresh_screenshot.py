"""Refresh docs/serve-page.png, the picture of `featurecache serve`'s page the README links to.

    python scripts/refresh_screenshot.py [-o docs/serve-page.png]

It runs the page's own browser test (tests/serving/test_web.py: `featurecache fit` and `featurecache serve`
through the CLI, Debian's chromium driven by Selenium) with FEATURECACHE_SCREENSHOT pointing at the output,
so the picture is of a page that test has just checked, never of a broken one: the file is replaced only
when the test passes. The test suite itself writes its screenshot under its temporary folder and never
touches the tracked docs/. Needs chromium and chromium-driver (apt) and the `[test]` extra.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/serving/test_web.py"
TIMEOUT = 1200  # s: a fit on pretrained codes, a server start and a browser on 2 cores; a hang fails


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "serve-page.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "serve-page.png"
        env = dict(os.environ, FEATURECACHE_SCREENSHOT=str(shot), FEATURECACHE_REQUIRE_BROWSER="1")
        cmd = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"error: {' '.join(cmd)} still running after {TIMEOUT} s; {args.output} left as it was",
                  file=sys.stderr)
            return 1
        if proc.returncode != 0 or not shot.is_file():
            print(f"error: the page's test failed (above); {args.output} left as it was", file=sys.stderr)
            return 1
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(shot.read_bytes())
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
