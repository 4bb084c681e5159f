"""Lower layers never import higher ones (DESIGN.md's layer table): the KV layer and the model
runner read plan objects from `kv/plan.py`, never from the scheduler."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "orbitflow_ray"
HIGHER = ("orbitflow_ray.sched", "orbitflow_ray.planner", "orbitflow_ray.engine", "orbitflow_ray.sim",
          "orbitflow_ray.serving", "orbitflow_ray.executor")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if node.level == 0 else f"<relative {node.level}>.{node.module}")
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("layer", ["kv", "model"])
def test_kv_and_model_import_nothing_above_them(layer):
    files = sorted((PKG / layer).glob("*.py"))
    assert files
    bad = {f.name: sorted(m for m in _imports(f) if m.startswith(HIGHER) or m.startswith("<relative"))
           for f in files}
    assert {k: v for k, v in bad.items() if v} == {}
