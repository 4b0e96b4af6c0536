"""What every `featurecache` command module shares: the typer apps, the global --verbose, and output helpers.

The commands live in featurecache/cli/commands.py (the pipeline: extract, fit, predict, ...) and
featurecache/cli/admin.py (the cache, the project file, export, serve); both register on these apps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .options import ConfigFile, Verbose
from ..settings import default_cache_dir

# No rich markup: help texts say "[default: ...]" literally, which markup would swallow as a tag.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Frozen CNN codes, memoized in HDF5, with light scikit-learn heads on top. Defaults for "
                       "any option can live in featurecache.toml (`featurecache init`).")
cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and clean the feature cache.")
app.add_typer(cache_app, name="cache")


@app.callback()
def _main(verbose: Verbose = False, config_file: ConfigFile = None):  # both read by cli.commands.main first
    if verbose:
        from . import quiet

        quiet.uninstall()


def cache_dir_of(cache_dir: Optional[Path]) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def say(msg: str) -> None:
    print(msg, file=sys.stderr)


def emit(obj, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=1) if as_json else text)


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))
