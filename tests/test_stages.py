"""The code's shape: one stage table that everything reads, and layers that only point down."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from guidealign.stages import STAGES, get, run_stages

PKG = Path(__file__).resolve().parents[1] / "guidealign"

# storage, then what every stage shares, then the stages, then orchestration (the top-level
# modules of guidealign/ and the CLI)
LAYERS = {"shards": 0, "config": 1, "core": 1, "ingest": 2, "gen": 2, "retrieval": 2, "sft": 2,
          "hub": 2, "eval": 2, "cli": 3, "": 3}


def unit_of(module: str) -> str | None:
    """guidealign.gen.detect -> "gen"; guidealign.pipeline -> "" (orchestration); else None."""
    parts = module.split(".")
    if parts[0] != "guidealign":
        return None
    if parts[1:] == ["__main__"]:  # `python -m guidealign`: the CLI's entry point
        return "cli"
    if len(parts) > 1 and (PKG / parts[1]).is_dir():
        return parts[1]
    return ""


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> where, for every import in the package (function-level too)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        me = unit_of(".".join(rel.parts))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                u = unit_of(t)
                if u is not None and u != me and not (t == "guidealign"):
                    edges.setdefault((me, u), []).append(f"{rel}:{node.lineno}")
    return edges


def test_every_package_has_a_layer():
    units = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert units <= set(LAYERS), f"give these packages a layer: {sorted(units - set(LAYERS))}"


def test_imports_point_down_only():
    up = {k: v for k, v in import_edges().items() if LAYERS[k[1]] > LAYERS[k[0]]}
    assert not up, "imports that point up a layer: " + "; ".join(
        f"{a or 'guidealign'} -> {b or 'guidealign'} at {w[0]}" for (a, b), w in up.items())


def test_no_import_cycle_between_packages():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    units = sorted(LAYERS)
    idx = {u: i for i, u in enumerate(units)}
    edges = import_edges()
    rows = [idx[a] for a, _ in edges]
    cols = [idx[b] for _, b in edges]
    graph = csr_matrix(([1] * len(rows), (rows, cols)), shape=(len(units), len(units)))
    n, labels = connected_components(graph, directed=True, connection="strong")
    cycles = [[u for u in units if labels[idx[u]] == c] for c in range(n)]
    cycles = [c for c in cycles if len(c) > 1]
    assert not cycles, f"import cycles between packages: {cycles}; edges: " + "; ".join(
        f"{a} -> {b} at {w[0]}" for (a, b), w in edges.items() if a in cycles[0] and b in cycles[0])


def test_stage_names_are_listed_once():
    """No list of stage names outside the table (the table holds Stage rows, not names)."""
    names = {s.name for s in STAGES}
    found = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                vals = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(vals & names) >= 4:
                    found.append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
    assert not found, f"stage names listed outside guidealign/stages.py: {found}"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_function_has_the_one_signature(stage):
    fn = stage.function()
    params = inspect.signature(fn).parameters
    assert list(params)[:2] == ["cfg", "workdir"], stage.fn
    for name in ("rank", "world_size", "progress"):
        assert name in params and params[name].kind == inspect.Parameter.KEYWORD_ONLY, (stage.fn, name)
    assert "llm" in params or not stage.engine, stage.fn
    assert stage.kind in ("map", "reduce", "artifact")


def test_every_stage_has_its_command_and_config_section():
    from guidealign.cli import cli
    from guidealign.config import Config

    for stage in STAGES:
        assert stage.name in cli.commands, stage.name
        assert hasattr(Config(), stage.config), stage.config
    cfg = Config()
    assert [s.name for s in run_stages(cfg)] == [s.name for s in STAGES if s.in_run and s.name != "push"]
    cfg.push.repo_id = "me/data"
    assert run_stages(cfg)[-1].name == "push"
    with pytest.raises(ValueError, match="unknown stage"):
        get("nope")
