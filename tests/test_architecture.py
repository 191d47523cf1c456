"""The import rules of docs/architecture.md, read from the source (AST), so a new import that breaks
a floor fails here rather than in a review:

* a floor imports only from floors below it: launch/ and benchmarks/ → data_prep/ → pipeline/ →
  coma_kernels/ (coma_kernels/ imports none of the project's other packages);
* ``torch.distributed`` is used in two files only: pipeline/dist.py and coma_kernels/distributed.py
  (and the GPU self-check, which tests NCCL itself);
* the library modules of pipeline/ never import the trainer (pipeline/train.py, and pipeline/cli.py
  above it): the trainer uses the library, not the other way round.
"""
import ast

from conftest import REPO

FLOORS = {"launch": 4, "benchmarks": 4, "data_prep": 3, "pipeline": 2, "coma_kernels": 1}
DISTRIBUTED_HELPERS = {"pipeline/dist.py", "coma_kernels/distributed.py"}
# the GPU self-check drives NCCL directly: it tests the collectives themselves, on a bare device
ALSO_DISTRIBUTED = {"benchmarks/gpu_check.py"}
TRAINER = {"pipeline.train", "pipeline.cli"}
TRAINER_FILES = {"pipeline/train.py", "pipeline/cli.py"}


def _sources():
    for top in FLOORS:
        for f in sorted((REPO / top).rglob("*.py")):
            yield f.relative_to(REPO).as_posix(), ast.parse(f.read_text(encoding="utf-8"), filename=str(f))


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import, ``from x import y`` as ``x.y`` too (y may be a module)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _uses_torch_distributed(tree: ast.AST) -> list[int]:
    lines = [n for n, mod in _imports(tree) if mod == "torch.distributed" or mod.startswith("torch.distributed.")]
    for node in ast.walk(tree):   # torch.distributed.<x> without an import of its own
        if (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            lines.append(node.lineno)
    return lines


SOURCES = list(_sources())


def test_the_rules_see_the_code():
    names = {name for name, _ in SOURCES}
    assert DISTRIBUTED_HELPERS <= names and TRAINER_FILES <= names and len(names) > 60


def test_imports_go_down_the_floors():
    up = [f"{name}:{n} imports {mod}" for name, tree in SOURCES for n, mod in _imports(tree)
          if FLOORS.get(mod.split(".")[0], 0) > FLOORS[name.split("/")[0]]]
    assert not up, "imports run up the floors (docs/architecture.md): " + "; ".join(up)


def test_torch_distributed_only_in_the_distributed_helpers():
    bad = [f"{name}:{n}" for name, tree in SOURCES if name not in DISTRIBUTED_HELPERS | ALSO_DISTRIBUTED
           for n in _uses_torch_distributed(tree)]
    assert not bad, f"torch.distributed outside pipeline/dist.py and coma_kernels/distributed.py: {bad}"


def test_library_modules_do_not_import_the_trainer():
    bad = [f"{name}:{n} imports {mod}" for name, tree in SOURCES
           if name.startswith("pipeline/") and name not in TRAINER_FILES
           for n, mod in _imports(tree) if mod in TRAINER]
    assert not bad, "; ".join(bad)


def test_the_checks_fail_on_a_bad_import():
    """The rules are not vacuous: each one catches the import it forbids."""
    bad = ast.parse("import torch\nfrom pipeline import train\nimport torch.distributed as d\nx = torch.distributed.rank\n")
    assert [m for _, m in _imports(bad) if m in TRAINER] == ["pipeline.train"]
    assert _uses_torch_distributed(bad) == [3, 4]
    assert [m for _, m in _imports(ast.parse("from data_prep.shard import main"))
            if FLOORS.get(m.split(".")[0], 0) > FLOORS["pipeline"]]
