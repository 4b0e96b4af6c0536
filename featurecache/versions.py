"""Installed library versions, read from package metadata so nothing heavy gets imported."""

from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=None)
def version(package: str) -> str:
    # tensorflow ships under several distribution names; the first installed one wins.
    names = ("tensorflow", "tensorflow-cpu") if package == "tensorflow" else (package,)
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def library_versions(*packages: str) -> dict[str, str]:
    return {p: version(p) for p in packages}
