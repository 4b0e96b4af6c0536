"""The package's shape, read from its import graph: no import cycle, no module taking another's
underscore names, one image chain, use cases that take values.

Imports are read from the source with `ast`, not by importing, so the tests see every import the
code can run: top-level ones and those inside functions (lazy imports that keep TensorFlow off a
cache hit's path). Both count: a cycle hidden in a function still ties two modules together, and is
one call away from the import-order failure a top-level cycle gives at once.

Modules are found by walking the package folder, wherever they sit (subpackages included), and
every relative import is resolved to the absolute module it names, so the tests hold as modules
move between folders. Nothing here names a file path.
"""

import ast
import functools
from pathlib import Path

import featurecache

PACKAGE = Path(featurecache.__file__).resolve().parent

# The use cases (issue 21): each has one entry point of the shape (data or sources, FeatureSpec,
# RunSettings[, HeadSpec]); the entry points are found as the functions their CLI command calls.
USE_CASES = ("extract", "plan", "fit", "sweep", "predict", "verify", "export")
MAX_PARAMETERS = 5
# The chain's steps that only the encoder may take: an engine's forward pass and the numpy pooling of
# the network's maps. (module's last name, function) or (module's last name, class, method): a method
# counts where a module imports the class and calls `.method(...)` on anything.
CHAIN_STEPS = {("engines", "make_forward"), ("taps", "pool_maps"), ("pooling", "Pooling", "maps")}
CHAIN_COMPOSER = "encoder"  # the module's last name


def module_name(path: Path) -> str:
    parts = ["featurecache", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def last(module: str) -> str:
    return module.rpartition(".")[2]


def from_target(name: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module a `from X import ...` in module `name` reads from; None outside its package."""
    if node.level:
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    if node.module and node.module.split(".")[0] == name.split(".")[0]:
        return node.module
    return None


def bindings(name: str, path: Path, known=None):
    """(node, module, imported name or None, local name) for every featurecache import in `name`'s source:
    `from M import x` gives (M, x); `from P import sub` of a submodule gives (P.sub, None); `import M` gives
    (M, None). Imports inside functions count. `known`: the package's modules (default: walked)."""
    known = modules() if known is None else known
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == name.split(".")[0]:
                    yield node, a.name, None, a.asname or a.name
        elif isinstance(node, ast.ImportFrom):
            target = from_target(name, path, node)
            if target is None:
                continue
            for a in node.names:  # `from . import x` names a submodule or a name in the package
                sub = f"{target}.{a.name}"
                if sub in known:
                    yield node, sub, None, a.asname or a.name
                else:
                    yield node, target, a.name, a.asname or a.name


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """featurecache modules that `name` imports anywhere in its source."""
    return {m for _, m, _, _ in bindings(name, path, known) if m in known and m != name}


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a cycle's members."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def outside_privacy(importer: str, module: str) -> bool:
    """Whether `module` (a.b._c.d) is private to a package that `importer` is not inside of."""
    parts = module.split(".")
    return any(private(p) and not importer.startswith(".".join(parts[:k]) + ".") for k, p in enumerate(parts))


def private_uses(name: str, path: Path, known=None) -> list[str]:
    """Where module `name` reaches another module's underscore names: `from .x import _y`, a private
    module of another package, or `x._y` on a module it imported."""
    found, aliases = [], {}
    for node, module, imported, local in bindings(name, path, known):
        where = f"{name}:{node.lineno}"
        if module != name and imported is not None and private(imported):
            found.append(f"{where} takes {imported} from {module}")
        elif outside_privacy(name, module):
            found.append(f"{where} imports the private module {module}")
        if imported is None:
            aliases[local] = module
    for node in ast.walk(tree(path)):
        if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and aliases[node.value.id] != name):
            found.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def calls_to(name: str, path: Path, wanted: set[tuple]) -> set[tuple]:
    """Which steps of `wanted` module `name` takes: a function it imports or reaches as `module.function`,
    or a method it calls on a class it imports (see CHAIN_STEPS)."""
    functions = {s for s in wanted if len(s) == 2}
    methods = {s[:2]: s[2] for s in wanted if len(s) == 3}
    found, aliases = set(), {}
    for _, module, imported, local in bindings(name, path):
        step = (last(module), imported)
        if imported is not None and step in functions:
            found.add(step)
        if imported is not None and step in methods and any(
                isinstance(n, ast.Attribute) and n.attr == methods[step] for n in ast.walk(tree(path))):
            found.add((*step, methods[step]))
        if imported is None:
            aliases[local] = module
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            step = (last(aliases[node.value.id]), node.attr)
            if step in functions:
                found.add(step)
    return found


def command_name(fn: ast.FunctionDef) -> str | None:
    """The CLI name of a function decorated `@<typer app>.command(...)`, else None."""
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command":
            if d.args and isinstance(d.args[0], ast.Constant):
                return d.args[0].value
            return fn.name.replace("_", "-")
    return None


def called(name: str, fn: ast.FunctionDef) -> set[tuple[str, str]]:
    """(module, function) of every featurecache function that `fn`, defined in module `name`, calls by
    an imported name (`f(...)`) or on an imported module (`m.f(...)`)."""
    aliases = {local: (module, imported) for _, module, imported, local in bindings(name, modules()[name])}
    out = set()
    for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
        f = call.func
        if isinstance(f, ast.Name) and f.id in aliases and aliases[f.id][1]:
            out.add(aliases[f.id])
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in aliases \
                and aliases[f.value.id][1] is None:
            out.add((aliases[f.value.id][0], f.attr))
    return out


def definition(module: str, function: str) -> ast.FunctionDef | None:
    path = modules().get(module)
    defs = {n.name: n for n in tree(path).body if isinstance(n, ast.FunctionDef)} if path else {}
    return defs.get(function)


def entry_points() -> dict[str, dict[str, ast.FunctionDef]]:
    """Use case -> {"module.function": its definition}: the functions of the use case's module (one with
    the use case's name in its dotted name) that its CLI command calls, directly or through one function
    of another featurecache module (the `api` face)."""
    out = {u: {} for u in USE_CASES}
    for name, path in modules().items():
        for fn in (n for n in ast.walk(tree(path)) if isinstance(n, ast.FunctionDef)):
            use_case = command_name(fn)
            if use_case not in USE_CASES:
                continue
            targets = called(name, fn)
            for module, function in list(targets):
                d = definition(module, function)
                if d is not None and use_case not in module.split(".")[1:]:
                    targets |= called(module, d)  # one hop: the command calls a convenience function
            for module, function in targets:
                d = definition(module, function)
                if d is not None and use_case in module.split(".")[1:]:
                    out[use_case][f"{module}.{function}"] = d
    return out


def parameters(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + \
        [f"*{p.arg}" for p in (a.vararg,) if p] + [f"**{p.arg}" for p in (a.kwarg,) if p]


# ---- the walker itself ----------------------------------------------------------------------------

def test_the_walker_sees_relative_package_and_lazy_imports():
    edges = graph()
    extract = next(m for m in edges if last(m) == "extract")
    assert any(last(m) == "encoder" for m in edges[extract])  # from . import encoder as encoderlib
    assert "featurecache.engines.tensorflow" in edges["featurecache.engines"]  # inside make_forward
    assert any(last(m) == "settings" for m in edges["featurecache.engines.graphs"])  # from ..settings import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_private_name_rule_reads_every_spelling(tmp_path):
    """On a made-up package (pkg.box, pkg.jar, pkg.crate._lid), so nothing here moves with the real modules."""
    assert outside_privacy("pkg.box", "pkg.crate._lid")  # private to pkg.crate
    assert not outside_privacy("pkg.crate.box", "pkg.crate._lid") and not outside_privacy("pkg.box", "pkg._lid.x")
    src = tmp_path / "probe.py"
    src.write_text("from .box import _lid, lid\nfrom pkg.jar import _rows\nfrom .crate._lid import x\n"
                   "def f():\n    from . import box\n    return box._lid, box.lid, box.__name__\n")
    known = {"pkg", "pkg.box", "pkg.jar", "pkg.crate", "pkg.crate._lid", "pkg.probe"}
    assert [u.split(" ", 1)[1] for u in private_uses("pkg.probe", src, known)] == [
        "takes _lid from pkg.box", "takes _rows from pkg.jar", "imports the private module pkg.crate._lid",
        "uses pkg.box._lid"]


# ---- the rules ------------------------------------------------------------------------------------

def test_no_import_cycle_among_featurecache_modules():
    found = cycles(graph())
    assert not found, "import cycles (top-level or inside functions): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_takes_another_modules_underscore_names():
    """A name shared between modules is public: `from .x import _name` (or `x._name`) across modules
    means the split was made by length, not by meaning."""
    found = [use for name, path in modules().items() for use in private_uses(name, path)]
    assert not found, "underscore names used across modules:\n" + "\n".join(found)


def test_only_the_encoder_runs_the_forward_pass_and_the_pooling():
    """No second chain: images reach an engine's forward pass and the numpy pooling through the encoder only."""
    others = {}
    for name, path in modules().items():
        steps = calls_to(name, path, CHAIN_STEPS)
        if steps and last(name) != CHAIN_COMPOSER:
            others[name] = sorted(".".join(s) for s in steps)
    assert not others, f"besides the {CHAIN_COMPOSER}: {others}"


def test_the_chain_rule_finds_the_encoders_steps():
    encoder = next((n, p) for n, p in modules().items() if last(n) == CHAIN_COMPOSER)
    steps = calls_to(*encoder, CHAIN_STEPS)
    assert ("engines", "make_forward") in steps and steps & {s for s in CHAIN_STEPS if "pool" in s[0]}


def test_use_case_entry_points_take_few_parameters():
    """Each use case's entry point takes values (data, FeatureSpec, RunSettings[, HeadSpec]), not a
    parameter per setting."""
    found = entry_points()
    assert not [u for u, fns in found.items() if not fns], f"use cases whose CLI command calls no function " \
                                                          f"of their module: {[u for u, f in found.items() if not f]}"
    wide = {f"{fn}({', '.join(parameters(d))})": len(parameters(d))
            for fns in found.values() for fn, d in fns.items() if len(parameters(d)) > MAX_PARAMETERS}
    assert not wide, f"entry points over {MAX_PARAMETERS} parameters:\n" + "\n".join(wide)
