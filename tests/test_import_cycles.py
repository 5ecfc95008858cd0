"""No import circle inside svlib/: a lower layer never imports a higher one (docs/DESIGN, "No import circles").

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import``
anywhere in a module, at the top or inside a function (a function-level import that would close a circle is
still the circle, only deferred), absolute or relative; ``from svlib.x import y`` is an import of the submodule
``svlib.x.y`` when there is one. Importing ``svlib.x.y`` from outside ``svlib.x`` also runs
``svlib/x/__init__.py``, so that is an edge too; from inside, the package is already being imported, and an
``__init__`` that re-exports its own submodules is no circle.

Any of the three circles this test was written against, put back, fails it, e.g. ``svlib/model/frontend.py``
loading pruned folders with ``from svlib.pruning.shrink import enable_pruned_loading`` again (``shrink``
builds on ``svlib.model.structure``, whose package ``__init__`` imports ``frontend``)::

    import cycles in svlib/: svlib.model -> svlib.model.frontend -> svlib.pruning.shrink -> svlib.model

(``test_a_circle_is_reported`` builds the three in a temporary folder and checks the message;
``test_lower_layers_import_no_higher_one`` refuses the upward import itself, circle or not.)
"""
from __future__ import annotations

import ast
from pathlib import Path

SVLIB = Path(__file__).resolve().parents[1] / "svlib"


def module_name(path: Path, root: Path) -> str:
    """``<root>/data/lists.py`` -> ``svlib.data.lists``; a package's ``__init__.py`` is the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that the source of module ``name`` (file ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is this package, each further level one package up
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule pkg.sub; ``from mod import name`` only mod
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
                found |= outside_packages(target, name) & known
    return found


def outside_packages(target: str, importer: str) -> set[str]:
    """The packages above ``target`` whose ``__init__`` importing it runs: those not above ``importer`` too."""
    parts = target.split(".")
    above = {".".join(parts[:i]) for i in range(2, len(parts))}  # not svlib itself: its __init__ is the root
    importer_parts = importer.split(".")
    return {p for p in above if p != importer and importer_parts[:p.count(".") + 1] != p.split(".")}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(closed_path(graph, component) for component in components)


def closed_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first inside the component)."""
    start, members = component[0], set(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{component}: not strongly connected")


def cycle_report(root: Path) -> str:
    cycles = find_cycles(import_graph(root))
    return "" if not cycles else f"import cycles in {root.name}/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_svlib_has_no_import_cycle():
    assert cycle_report(SVLIB) == ""


def test_a_circle_is_reported(tmp_path):
    """The three circles this test guards against, rebuilt in a small tree: each is reported as a path."""
    files = {
        "__init__.py": "",
        "model/__init__.py": "from svlib.model.frontend import load_encoder\n",
        # a function-level import still closes the circle
        "model/frontend.py": "def load_encoder():\n    from svlib.pruning.shrink import enable_pruned_loading\n",
        "pruning/__init__.py": "from .objective import DistillPair\nfrom .shrink import prune_model\n",
        "pruning/objective.py": "from svlib.model.speaker import SpeakerModel\n",  # via model/__init__.py
        "pruning/shrink.py": "",
        "model/speaker.py": "",
        "data/__init__.py": "",
        "data/augment.py": "from .channel import telephone\n",
        "data/channel.py": "from svlib.data import augment\n",  # ``from pkg import submodule``
        "corpora/__init__.py": "",
        "corpora/prepare.py": "from . import demo_data\n",
        "corpora/demo_data.py": "from ..corpora.prepare import _rel\n",
        "corpora/common.py": "import svlib.data.augment\n",  # an edge, but no circle
    }
    root = tmp_path / "svlib"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert cycle_report(root) == (
        "import cycles in svlib/: svlib.corpora.demo_data -> svlib.corpora.prepare -> svlib.corpora.demo_data; "
        "svlib.data.augment -> svlib.data.channel -> svlib.data.augment; "
        "svlib.model -> svlib.model.frontend -> svlib.pruning -> svlib.pruning.objective -> svlib.model")
    (root / "data/channel.py").write_text("import math\n")
    assert "svlib.data.augment" not in cycle_report(root)


def test_lower_layers_import_no_higher_one():
    """Beyond circles: the model layer never imports pruning (pruned folders load through
    ``svlib.model.structure``), the training data layer never imports corpus preparation."""
    graph = import_graph(SVLIB)
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    for low, high in (("svlib.model", "svlib.pruning"), ("svlib.data", "svlib.corpora"))
                    if a.startswith(low) and b.startswith(high))
    assert upward == []
