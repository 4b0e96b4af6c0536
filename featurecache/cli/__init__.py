"""The `featurecache` command line: commands (the pipeline's), admin (cache, project file, export, serve),
options (every option declared once, grouped into the settings values), config (featurecache.toml), quiet
(no library log line reaches a user). `main` is the console script; `python -m featurecache.cli` runs it too."""

from .commands import app, main  # noqa: F401  (importing commands registers every command)
