"""The package's shape: no import cycle among featurecache's modules, no module grown too long.

Imports are read from the source with `ast`, not by importing, so the test sees every import the
code can run: top-level ones and those inside functions (lazy imports that keep TensorFlow off a
cache hit's path). Both count: a cycle hidden in a function still ties two modules together, and is
one call away from the import-order failure a top-level cycle gives at once.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featurecache"
LIMIT = 450  # lines; a module longer than this holds more than one idea
DATA_TABLES = {"imagenet_classes.py"}  # a list of 1,000 names, not code
PENDING: dict[str, str] = {}  # modules known to be over the limit, each with why (none now)


def module_name(path: Path) -> str:
    parts = ["featurecache", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """featurecache modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "featurecache"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "featurecache":
                target = node.module
            else:
                continue
            for a in node.names:  # `from . import x` names a submodule or a name in the package
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name}


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


def test_the_walker_sees_relative_package_and_lazy_imports():
    edges = graph()
    assert "featurecache.encoder" in edges["featurecache.extract"]  # from . import encoder as encoderlib
    assert "featurecache.engines.tensorflow" in edges["featurecache.engines"]  # inside make_forward
    assert "featurecache.settings" in edges["featurecache.engines.graphs"]  # from ..settings import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_featurecache_modules():
    found = cycles(graph())
    assert not found, "import cycles (top-level or inside functions): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_image_chain_is_composed_in_one_module():
    """Only the encoder runs preprocess -> forward -> pool; everyone else asks it."""
    composers = []
    for name, path in modules().items():
        text = path.read_text()
        if "pool_maps(" in text and "preprocess(" in text and name != "featurecache.encoder":
            composers.append(name)
    assert composers == []


def test_no_module_over_the_line_limit():
    long = {p.name: n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > LIMIT and p.name not in DATA_TABLES | set(PENDING)}
    assert not long, f"over {LIMIT} lines: {long}"
