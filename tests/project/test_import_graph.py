"""The package layout as a test: who may import whom (ARCHITECTURE.md), read from the source's imports.

- ``common`` (what every stage builds on) imports no stage, toy lab, benchmark or tool;
- ``pretrain`` (the method) and ``transfer`` (everything downstream of a checkpoint) never import each other
  (nor ``slurm``, ``toylab``, ``benchmarks``);
- the project's own modules are imported at the top of a file, never inside a function (lazy imports are
  kept for heavy optional libraries: detectron2, submitit, hydra, matplotlib), except the few listed
  below with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "pretrain", "transfer", "slurm", "toylab", "benchmarks", "tools")

# package -> the project packages it must never import
FORBIDDEN = {
    "common": {"pretrain", "transfer", "slurm", "toylab", "benchmarks", "tools"},
    "pretrain": {"transfer", "slurm", "toylab", "benchmarks", "tools"},
    "transfer": {"pretrain", "slurm", "toylab", "benchmarks", "tools"},
    "slurm": {"toylab", "benchmarks", "tools"},
}

# Function-level imports of project modules that are on purpose, with why.
LAZY_ALLOWED = {
    # The launcher reads detection run folders; transfer.detection imports detectron2 at module level,
    # which `submit pretrain` must not pay for (nor need installed).
    ("slurm/submit.py", "transfer.detection.aggregate"),
    ("slurm/protocol.py", "transfer.detection.aggregate"),  # the same, for `submit protocol`'s detection seeds
    ("slurm/protocol_report.py", "transfer.detection.aggregate"),  # the same, for the protocol's table
    # `import transfer.detection` registers detectron2 components; train_net's worker imports the trainer
    # (detectron2's engine) only inside the job.
    ("transfer/detection/train_net.py", "transfer.detection.trainer"),
    # intl-convert to torchvision .pth must work without detectron2; only --check and .pkl reach for it.
    ("transfer/convert.py", "transfer.detection.config"),
    ("transfer/convert.py", "transfer.detection.weights"),
}


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level?) for every import of a project package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # imports under a module-level `if`/`try` still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    package = path.relative_to(root).parts[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                names = [package]
            elif node.module:
                names = [node.module + "." + a.name if node.module in PACKAGES else node.module for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((name, node.lineno, id(node) in top_level))
    return found


def layout_violations(root: Path = ROOT) -> list[str]:
    """Every forbidden edge and every unlisted function-level project import, one line each."""
    problems = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for name, line, at_top in project_imports(path, root):
                target = name.split(".")[0]
                if target in FORBIDDEN.get(package, ()):
                    problems.append(f"{rel}:{line} imports {name}: {package}/ must not import {target}/")
                if not at_top and (rel, name) not in LAZY_ALLOWED and (rel, name.rsplit(".", 1)[0]) not in LAZY_ALLOWED:
                    problems.append(f"{rel}:{line} imports {name} inside a function; fix: import it at the top")
    return problems


def test_the_packages_import_only_what_the_layout_allows():
    assert layout_violations() == []


@pytest.mark.parametrize("package, line, expected", [
    ("common", "from pretrain.losses import iternorm\n", "common/ must not import pretrain/"),
    ("pretrain", "import transfer.knn\n", "pretrain/ must not import transfer/"),
    ("transfer", "from pretrain import engine\n", "transfer/ must not import pretrain/"),
    ("pretrain", "def f():\n    from common.atomic import write_json\n", "inside a function"),
])
def test_a_back_import_is_reported(tmp_path, package, line, expected):
    for p in PACKAGES:
        (tmp_path / p).mkdir()
    (tmp_path / package / "module.py").write_text(line)
    problems = layout_violations(tmp_path)
    assert len(problems) == 1 and expected in problems[0] and f"{package}/module.py:" in problems[0]
