"""
The pipeline package's layers: imports flow one way, report -> stage -> launch -> runs -> data ->
params (with the helpers atomic, paths, env and cli beside params), so a lower layer never needs a
higher one, not even lazily inside a function.
"""
import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
# Layer of each module or subpackage, bottom first; demo only shells out to make/dvc.
LAYERS = {"params": 0, "atomic": 0, "paths": 0, "env": 0, "cli": 0,
          "data": 1, "runs": 2, "launch": 3, "stage": 4, "report": 5, "demo": 6}


def _layer(module: str) -> int:
    """``pipeline.runs.spec`` -> the layer of ``runs``; ``pipeline`` itself -> 0."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def _imports(path: Path):
    """Every ``pipeline.*`` module ``path`` imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            if node.module == "pipeline":  # from pipeline import params as P
                yield from (f"pipeline.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "pipeline")


def upward_imports(root: Path = PIPELINE):
    """``(module, imported)`` for each import of a higher layer."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("pipeline", *path.relative_to(root).with_suffix("").parts))
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        found += [(module, dep) for dep in _imports(path) if _layer(dep) > _layer(module)]
    return found


def test_every_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PIPELINE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert names == set(LAYERS)


def test_imports_flow_downward_only():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself, on a hand-made package: params importing runs lazily (as params.check did
    with runs.spec's study_rows until it moved to params) is reported; runs importing params is not."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "__init__.py").write_text("")
    (tmp_path / "runs" / "spec.py").write_text("from pipeline import params as P\n")
    (tmp_path / "params.py").write_text("def check():\n    from pipeline.runs.spec import study_rows\n")
    assert upward_imports(tmp_path) == [("pipeline.params", "pipeline.runs.spec")]
