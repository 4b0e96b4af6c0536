"""The project file, `featurecache.toml`: defaults for any command-line option, per working folder.

Found from the current folder upwards, as git finds its repository. Top-level keys are option names
without their dashes (`data`, `weights`, `size`, `cache-dir`, `layer = ["block3_pool"]`) and apply to
every command that takes that option; a table named after a command (`[fit]`, `[serve]`) holds
defaults for that command alone. The values become click's `default_map`, so click itself decides
precedence and remembers where a value came from: a flag wins over the environment
(FEATURECACHE_DIR, FEATURECACHE_ENGINE), which wins over the file, which wins over the built-in default.
Paths in the file are relative to the file's folder, and so is the cache unless the file names one.

A file found by searching is trusted less than one the user names (`featurecache --config FILE`), as
git trusts a repository it finds (red-team issue 25: a file planted in a parent folder opened `serve`
to the network):
- The search stops at a ceiling: it never leaves the start folder's filesystem, never climbs above the
  home folder (the home folder's own file still counts), and never enters a folder listed in
  FEATURECACHE_CEILING_DIRECTORIES (colon-separated, as GIT_CEILING_DIRECTORIES).
- The nearest file found is used only if the user owns it; another's is ignored, with a notice.
- The keys that open or lock the server's door (DOOR_KEYS) are taken only from a named file.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FeatureCacheError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FILENAME = "featurecache.toml"
PATH_KEYS = ("data-dir", "cache-dir", "plot")  # always paths: relative to the file's folder
NOT_SETTABLE = {"help", "json", "force"}  # per-invocation switches have no place in a project file
# Keys a file may set for most commands but not for these: there the same flag means something else
# (export's --data is the data to --check an exported file on, not the project's training data).
FLAG_ONLY = {"export": {"data"}}
# Who may reach the server, and with which secret: taken only from a file named with --config.
DOOR_KEYS = ("host", "no-auth", "token", "token-file")
CEILING_ENV = "FEATURECACHE_CEILING_DIRECTORIES"


@dataclass(frozen=True)
class ProjectFile:
    path: Path
    common: dict[str, Any]  # key -> value for every command that takes the key
    sections: dict[str, dict[str, Any]]  # command name -> key -> value

    @property
    def root(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class Choice:
    """Which project file is in force for this call, and how it was chosen."""
    path: Path | None  # None: no file
    named: bool = False  # given with --config: trusted with DOOR_KEYS
    notices: tuple[str, ...] = ()  # one line each for stderr: a file passed over, keys left out

    def describe(self) -> str:
        if self.path is None:
            return f"project file: none in {Path.cwd()} or above (`featurecache init --data D` writes one)"
        return f"project file: {self.path}" + (" (named with --config)" if self.named else "")


def choose(named: str | None = None, start: Path | None = None) -> Choice:
    """The file named with --config, else the nearest one the search may use (see the module's text)."""
    if named is not None:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FeatureCacheError(f"--config {named}: no such file; give the path of a featurecache.toml")
        return Choice(path.resolve(), named=True)
    found = find(start)
    if found is None:
        return Choice(None)
    owner, me = found.stat().st_uid, os.geteuid()
    if owner != me:  # anyone may write into /tmp or a shared folder above ours: not our settings
        return Choice(None, notices=(f"notice: ignoring {found}: owned by uid {owner}, not by you (uid {me}); "
                                     f"name it with `featurecache --config {found} ...` to use it",))
    return Choice(found)


def choice_of(ctx) -> Choice:
    """The Choice that `main` made for this call (a click context of it), or the search's where none was made."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Choice) else choose()


def find(start: Path | None = None) -> Path | None:
    """The nearest featurecache.toml in `start` or a folder above it, below the ceiling (whoever owns it)."""
    here = (start or Path.cwd()).resolve()
    ceilings = _ceilings()
    device = here.stat().st_dev
    for folder in (here, *here.parents):
        if folder != here and (folder in ceilings or _stat_dev(folder) != device):
            return None  # as git: not into a ceiling folder, not across a filesystem boundary
        candidate = folder / FILENAME
        if candidate.is_file():
            return candidate
        if folder == _home():
            return None  # the home folder's own file counts; nothing above it does
    return None


def _ceilings() -> set[Path]:
    listed = os.environ.get(CEILING_ENV, "").split(os.pathsep)
    return {Path(p).resolve() for p in listed if p and Path(p).is_absolute()}


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no password entry: no home ceiling
        return None


def _stat_dev(folder: Path) -> int | None:
    try:
        return folder.stat().st_dev
    except OSError:  # an unreadable parent: treat it as a boundary
        return None


def commands(root) -> dict[str, Any]:
    """Command name ('fit', 'cache verify') -> click command, for a click group."""
    out = {}
    for name, cmd in getattr(root, "commands", {}).items():
        sub = commands(cmd)
        out.update({f"{name} {k}": v for k, v in sub.items()} if sub else {name: cmd})
    return out


def key_of(param) -> str | None:
    """The file key of a click option: its long flag without dashes; None for arguments and switches."""
    longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    if param.param_type_name != "option" or not longs:
        return None
    key = longs[0][2:]
    return None if key in NOT_SETTABLE else key


def settable(root) -> dict[str, dict[str, Any]]:
    """File key -> {command name: click option} over every command."""
    out: dict[str, dict[str, Any]] = {}
    for cname, cmd in commands(root).items():
        for param in cmd.params:
            key = key_of(param)
            if key and key not in FLAG_ONLY.get(cname, ()):
                out.setdefault(key, {})[cname] = param
    return out


def load(path: Path, root_command) -> ProjectFile:
    """Read and check a project file against the options of `root_command`'s commands."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FeatureCacheError(f"{path}: not valid TOML ({e}); fix it or run `featurecache init --force`") from None
    except OSError as e:
        raise FeatureCacheError(f"{path}: cannot read it ({e.strerror})") from None
    options = settable(root_command)
    cmds = commands(root_command)
    common, sections = {}, {}
    for key, value in raw.items():
        if isinstance(value, dict):
            name = key
            if name not in cmds:
                raise FeatureCacheError(f"{path}: [{name}] is not a command; tables name commands: "
                                        + ", ".join(sorted(c for c in cmds if " " not in c)))
            sections[name] = {k: _check(path, k, v, options, {name: cmds[name]}, f"[{name}] ", cmds)
                              for k, v in value.items()}
        else:
            common[key] = _check(path, key, value, options, None, "", cmds)
    return ProjectFile(path, _paths(path.parent, common),
                       {c: _paths(path.parent, v) for c, v in sections.items()})


def trusted(project: ProjectFile, choice: Choice) -> tuple[ProjectFile, tuple[str, ...]]:
    """`project` less DOOR_KEYS unless its file was named with --config; the notice saying what was left out."""
    if choice.named:
        return project, ()
    common = {k: v for k, v in project.common.items() if k not in DOOR_KEYS}
    sections = {c: {k: v for k, v in vs.items() if k not in DOOR_KEYS} for c, vs in project.sections.items()}
    left = sorted({k for k in project.common if k in DOOR_KEYS}
                  | {k for vs in project.sections.values() for k in vs if k in DOOR_KEYS})
    if not left:
        return project, ()
    return ProjectFile(project.path, common, sections), (
        f"notice: ignoring {', '.join(left)} in {project.path}: a file found by searching may not open the "
        f"server; give them as flags, or name the file with `featurecache --config {project.path} ...`",)


def _check(path: Path, key: str, value, options: dict, only: dict | None, where: str, commands_of: dict):
    key = key.replace("_", "-")
    if key not in options or (only and not set(only) & set(options[key])):
        known = sorted(options if not only else {k for k, cs in options.items() if set(only) & set(cs)})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FeatureCacheError(f"{path}: {where}unknown key '{key}'; {hint}known keys: {', '.join(known)}")
    cname, param = next(iter(options[key].items()))
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not param.multiple:
        raise FeatureCacheError(f"{path}: {where}{key} = {json.dumps(value)}: takes one value, not a list")
    if any(isinstance(v, (dict, list)) for v in items):
        raise FeatureCacheError(f"{path}: {where}{key}: give a value or a list of values")
    for item in items:
        if isinstance(item, bool) != bool(param.is_flag):
            want = "true or false" if param.is_flag else "a value, not true/false"
            raise FeatureCacheError(f"{path}: {where}{key} = {json.dumps(item)}: give {want}")
    try:  # the option's own declared type and constraints decide, exactly as for a flag
        import typer

        done = param.process_value(typer.Context(commands_of[cname], info_name=cname),
                                   items if param.multiple else value)
    except Exception as e:  # click's BadParameter (typer vendors its own click; duck-typed)
        text = e.format_message() if hasattr(e, "format_message") else str(e)
        raise FeatureCacheError(f"{path}: {where}{key} = {json.dumps(value)}: {_one_line(text)}") from None
    # TOML values are typed: a number where a name or path belongs (or the other way) is a mistake,
    # even where click could convert it.
    for item, kept in zip(items, done if param.multiple else [done]):
        if not param.is_flag and isinstance(kept, (str, Path)) != isinstance(item, str):
            want = "a string in quotes" if isinstance(kept, (str, Path)) else "a number, without quotes"
            raise FeatureCacheError(f"{path}: {where}{key} = {json.dumps(value)}: give {want}")
    return [str(v) for v in items] if param.multiple else value


def _paths(root: Path, values: dict) -> dict:
    out = dict(values)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = str((root / out[key]).resolve()) if not Path(out[key]).is_absolute() else out[key]
    # --data is a path or a built-in name: a path that exists beside the file is taken from there.
    if isinstance(out.get("data"), str) and (root / out["data"]).exists():
        out["data"] = str((root / out["data"]).resolve())
    return out


def setup(root_command, named: str | None) -> tuple[Choice, dict | None]:
    """The project file in force (named with --config, or found) and click's default_map from it."""
    choice = choose(named)
    if choice.path is None:
        return choice, None
    project, left = trusted(load(choice.path, root_command), choice)
    return Choice(choice.path, choice.named, choice.notices + left), default_map(root_command, project)


def default_map(root_command, project: ProjectFile) -> dict:
    """click's nested default_map: {command: {parameter name: value}}, subcommands nested."""
    options = settable(root_command)
    values = {"cache-dir": str(project.root / "cache")} | project.common
    out: dict = {}
    for cname in commands(root_command):
        entry = {}
        for key, value in (values | project.sections.get(cname, {})).items():
            param = options.get(key, {}).get(cname)
            if param is not None:
                entry[param.name] = value
        node = out
        *parents, leaf = cname.split(" ")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = entry
    return out


def render(values: dict[str, Any]) -> str:
    """TOML text for flat key -> value pairs (strings, numbers, booleans, lists of strings)."""
    def one(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(one(x) for x in v) + "]"
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    return "".join(f"{k} = {one(v)}\n" for k, v in values.items())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def in_force(root_ctx, words: list[str]) -> dict[str, dict]:
    """Key -> {value, source} for one command called with `words`' flags, or for every command.

    Over every command, a key is shown once, from the first command that takes it, and again as
    'command:key' where another command would use a different value (a [fit] table, another default).
    """
    cmds = commands(root_ctx.command)
    chosen, args = None, []
    for n in (2, 1):
        if len(words) >= n and " ".join(words[:n]) in cmds:
            chosen, args = " ".join(words[:n]), words[n:]
            break
    if words and chosen is None:
        raise FeatureCacheError(f"config {words[0]}: not a command; give one of: {', '.join(cmds)}")
    choice = choice_of(root_ctx)
    found = choice.path
    in_file = set(trusted(load(found, root_ctx.command), choice)[0].common) if found else set()
    rows: dict[str, dict] = {}
    # The pipeline's commands first, so a key shows the value extract or fit would use.
    order = [c for c in ("extract", "fit", "plan", "sweep", "predict", "serve") if c in cmds]
    for name in [chosen] if chosen else order + [c for c in cmds if c not in order]:
        defaults = root_ctx.default_map or {}
        for part in name.split(" "):
            defaults = defaults.get(part, {}) if isinstance(defaults, dict) else {}
        ctx = cmds[name].make_context(f"featurecache {name}", list(args), parent=root_ctx,
                                      resilient_parsing=True, default_map=defaults)
        for param in cmds[name].params:
            key = key_of(param)
            if not key:
                continue
            row = {"value": _plain(ctx.params.get(param.name)), "source": _source(ctx, param, key, in_file, found)}
            if row["value"] is None and param.required:
                row["source"] = "not set (required)"
            if key not in rows:
                rows[key] = row
            elif rows[key]["value"] != row["value"] and row["source"] != "default":
                rows[f"{name}:{key}"] = row
    return rows


def _source(ctx, param, key: str, in_file: set, found: Path | None) -> str:
    source = ctx.get_parameter_source(param.name)
    kind = source.name if source is not None else "DEFAULT"
    if kind == "COMMANDLINE":
        return "flag"
    if kind == "ENVIRONMENT":
        return f"environment (${param.envvar})"
    if kind == "DEFAULT_MAP":
        if key == "cache-dir" and key not in in_file:
            return f"default beside {found}"
        return f"file ({found})"
    return "default"


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
