"""Replace one `## heading` section of a Markdown file in place, leaving the others alone."""

from __future__ import annotations

import re
import time
from pathlib import Path


def write_section(path: Path, heading: str, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is written by the script it names.\n"
    section = f"## {heading}\n\n_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
