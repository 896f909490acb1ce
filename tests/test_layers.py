"""The packages of stages/ form layers: counted with each sub-package as one node, their imports
(those inside functions included) make no cycle, and no library module imports a stage script."""

import ast
from pathlib import Path

STAGES = Path(__file__).resolve().parents[1] / "stages"
PACKAGES = sorted(p.name for p in STAGES.iterdir() if p.is_dir() and (p / "__init__.py").exists())
SCRIPTS = sorted(p.stem for p in STAGES.glob("*.py") if p.name != "__init__.py")


def imported(path):
    """Every `stages...` module name a file imports, anywhere in it."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the project imports `stages.` by name")
    return [n for n in names if n.split(".")[0] == "stages"]


def graph():
    """({package: {package it imports: [files]}}, [library module -> script imports])."""
    edges, upward = {}, []
    for package in PACKAGES:
        for path in sorted((STAGES / package).rglob("*.py")):
            for name in imported(path):
                parts = name.split(".")
                if len(parts) < 2 or parts[1] == package:
                    continue
                if parts[1] in SCRIPTS and len(parts) == 2:
                    upward.append(f"{path.relative_to(STAGES.parent)} imports the script {name}")
                elif parts[1] in PACKAGES:
                    edges.setdefault(package, {}).setdefault(parts[1], []).append(str(path.relative_to(STAGES.parent)))
    return edges, upward


def cycles(edges, packages=PACKAGES):
    """Each elementary cycle once, as a list of packages starting from its smallest name."""
    found = set()

    def walk(start, node, path):
        for nxt in edges.get(node, {}):
            if nxt == start:
                found.add(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for package in packages:
        walk(package, package, [package])
    return [list(c) for c in sorted(found)]


def test_the_packages_of_stages_import_each_other_without_a_cycle():
    edges, _ = graph()
    problems = []
    for ring in cycles(edges):
        hops = list(zip(ring, ring[1:] + ring[:1], strict=False))
        problems.append(" -> ".join(ring + [ring[0]]) + ": "
                        + "; ".join(f"{a}->{b} ({edges[a][b][0]})" for a, b in hops))
    assert problems == []


def test_no_library_module_imports_a_stage_script():
    assert graph()[1] == []


def test_the_checker_finds_cycles_and_imports_inside_functions(tmp_path):
    edges = {"a": {"b": ["x.py"]}, "b": {"c": ["y.py"], "a": ["v.py"]}, "c": {"a": ["z.py"]}, "d": {"a": ["w.py"]}}
    assert cycles(edges, ["a", "b", "c", "d"]) == [["a", "b"], ["a", "b", "c"]]
    script = tmp_path / "m.py"
    script.write_text("def f():\n    from stages import midtrain\n    import stages.training.loop\n")
    assert imported(script) == ["stages", "stages.midtrain", "stages.training.loop"]
