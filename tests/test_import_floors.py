"""The house's floors point down: cache/ (the store library) < pipeline/ (the shared core) < the stages < the
workflows that run stages (stages/recipe.py, stages/demo.py) < the command line (stages/cli.py) < the public surface
(dskd_pipe/). An import from a lower floor to a higher one, one stage importing another, or a cycle of imports
anywhere fails here, naming the arrow. Lazy imports inside functions count too: they are arrows all the same."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "pipeline", "stages", "dskd_pipe")
WORKFLOWS = {"stages.recipe": 3, "stages.demo": 4}  # run other stages' `run`; the demo runs the recipe
FLOORS = {"cache": 0, "pipeline": 1, "stages": 2, "stages.cli": 5, "dskd_pipe": 6}


def floor(module: str) -> float:
    if module in WORKFLOWS:
        return WORKFLOWS[module]
    return FLOORS.get(module, FLOORS[module.split(".")[0]])


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def project_name(target: str) -> str:
    """dskd_pipe.pipeline.x -> pipeline.x (the installed names of the top-level folders)."""
    parts = target.split(".")
    return ".".join(parts[1:]) if parts[0] == "dskd_pipe" and len(parts) > 1 and parts[1] in PACKAGES else target


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules `name` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            base = project_name(node.module)
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.ImportFrom):  # relative: from . import x (the public surface)
            package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            base = ".".join([package] + ([node.module] if node.module else []))
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [project_name(a.name) for a in node.names]
        else:
            continue
        target = next((c for c in candidates if c in known), None)
        if target and target != name:
            out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_graph_is_read(graph):
    assert len(graph) > 40 and "stages.distill" in graph["stages.cli"] and "pipeline.step" in graph["stages.distill"]
    assert "cache.reader" in graph["pipeline.teacher"]  # lazy imports count


def test_no_import_points_up(graph):
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))
    assert not upward, "imports that point up a floor: " + "; ".join(upward)


def test_stages_do_not_import_each_other(graph):
    side = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if a.startswith("stages.") and b.startswith("stages.") and floor(a) == floor(b) == 2)
    assert not side, "a stage imports another (shared code belongs in pipeline/): " + "; ".join(side)


def test_no_cycles(graph):
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_what_they_look_for():
    """The checks fail on the kinds of arrow they guard against (a guard that cannot fail guards nothing)."""
    assert floor("pipeline.cli") < floor("stages.distill") < floor("stages.recipe") < floor("stages.cli")
    assert floor("cache.streaming") < floor("pipeline.data")
    bad = {"pipeline.a": {"stages.b"}, "stages.b": {"pipeline.a"}}
    assert [f"{a} -> {b}" for a, t in bad.items() for b in t if floor(b) > floor(a)] == ["pipeline.a -> stages.b"]
