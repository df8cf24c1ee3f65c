"""The package's layering: no import cycle between its modules, and imports point downward only.

The layers, bottom first (``LAYERS``); a module may import its own package and the packages of
lower layers, never a higher one or a sibling of its own layer:

- ``errors``, ``rng``: leaf modules every layer may use (error classes, keyed random streams).
- ``config``: the typed schema, YAML loading and the rules that need only the config itself.
- ``parallel``: process groups, collectives and megatron-core compatibility probes.
- ``console``: how entry points print and log (needs the rank, so above ``parallel``).
- ``data``: tokenizers, records and prompt templates.
- ``tasks``: the task generators and verifiers (built on ``data``'s examples).
- ``models``: the LLaDA model on megatron-core, its conversion and checkpoint I/O.
- ``likelihood``, ``rollout``: ELBO estimation and sampling, both on the model, independent of
  each other.
- ``algorithms``: losses and their registry, on likelihood estimates.
- ``setup``: a run's inputs resolved (HF directories, hub ids, shipped files, the tokenizer) and
  the rules the losses and tasks declare checked, before any process group exists.
- ``plan``: memory and time planning from the config and the model's shapes (the trainer logs
  its FLOP throughput with it, so it sits below ``training``).
- ``training``: the trainer, checkpoints, evaluation.
- ``train``, ``evaluate``: the entry points (``rspo-plan``'s is ``plan.cli``).

Every import statement counts, at any depth of a file (``TYPE_CHECKING`` blocks excepted), so a
function-level import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rspo_mega"
LAYERS: list[set[str]] = [
    {"errors", "rng"},
    {"config"},
    {"parallel"},
    {"console"},
    {"data"},
    {"tasks"},
    {"models"},
    {"likelihood", "rollout"},
    {"algorithms"},
    {"setup"},
    {"plan"},
    {"training"},
    {"train", "evaluate"},
]


def _modules() -> dict[str, Path]:
    """Dotted module name (packages without ``.__init__``) -> file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING"):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    """Dotted names one import statement may load."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package and its own submodules excluded)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            for target in _targets(module, path, node):
                found = owner(target) if target.split(".")[0] == PACKAGE.name else None
                if found and found != module and not module.startswith(found + ".") \
                        and not found.startswith(module + "."):
                    graph[module].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module}: its package {top!r} is in no layer of tests/test_imports.py")


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_imports_point_downward():
    bad = []
    for module, imported in sorted(_graph().items()):
        if module == PACKAGE.name:
            continue
        own_top = module.split(".")[1]
        for target in sorted(imported):
            if target == PACKAGE.name or target.split(".")[1] == own_top:
                continue
            if _layer(target) >= _layer(module):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    for module in _modules():
        if module != PACKAGE.name:
            _layer(module)
