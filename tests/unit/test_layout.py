"""The package layout is the architecture: wings import only downwards, never in a cycle, and the model
stays pure torch. Checked on the source (module-level imports), so a new module is covered as it lands."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

# A module may import modules of its own wing or of a lower rank.
RANKS = {
    "base": 0,  # the loose modules every wing needs: pipeline.settings, errors, redis_keys
    "operators": 0.1,  # what operators say and read: alert labels, words for regions and verdicts
    "web": 0.2,  # access checks and the uvicorn thread shared by the dashboard and serve
    "observability": 0.3,  # Prometheus series and health endpoints, log lines, secret redaction
    "services": 0.4,  # connecting to Redis (TLS, ACL users, secrets)
    "model": 1,
    "inspection": 2,
    "adaptation": 3,
    "verdicts": 3.5,  # the one verdict path over what a line is served (adapter, bank, thresholds)
    "evaluation": 4,
    "streaming": 5,
    "dashboard": 6,
    "serving": 6,  # the HTTP inspection API (anoclip serve)
    "jobs": 7,  # whole jobs the commands run: a job may use every wing; nothing in pipeline imports jobs
}
MAX_WORKER_LINES = 150  # a command module parses arguments, makes one call, prints its summary
MODEL_MAY_IMPORT = {"torch", "open_clip", "numpy", "pipeline.errors", "pipeline.settings"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1] in RANKS else "base"


def _imports(path: Path) -> set[str]:
    """Modules imported at run time (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PIPELINE.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


GRAPH = _graph()


def test_every_wing_is_known() -> None:
    assert {_wing(m) for m in GRAPH} <= set(RANKS) | {"package"}
    assert {"model", "inspection", "adaptation", "streaming", "evaluation", "dashboard"} <= {_wing(m) for m in GRAPH}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _wing(m) != "package"))
def test_imports_only_downwards(module: str) -> None:
    wing = _wing(module)
    upward = [i for i in GRAPH[module]
              if _wing(i) != "package" and _wing(i) != wing and RANKS[_wing(i)] >= RANKS[wing]]
    assert not upward, f"{module} ({wing}) imports {upward}: a wing may only import lower wings"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("path", sorted((PIPELINE / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_is_pure_torch(path: Path) -> None:
    outside = {i for i in _imports(path) if not i.startswith("pipeline.model")}
    stdlib = {i for i in outside if i.split(".")[0] in sys.stdlib_module_names}
    bad = {i for i in outside - stdlib
           if not any(i == allowed or i.startswith(allowed + ".") for allowed in MODEL_MAY_IMPORT)}
    assert not bad, f"pipeline/model/{path.name} imports {sorted(bad)}: the model is torch only"


def test_workers_are_thin_commands() -> None:
    """Sub-commands parse arguments and call into pipeline: no classes, no command importing another (shared
    argument helpers, modules that are no command, may be imported), and short (a whole job belongs in
    pipeline/jobs/)."""
    from workers.cli import COMMANDS

    commands = {module for module, _ in COMMANDS.values()} | {"workers.cli"}
    for path in sorted((ROOT / "workers").glob("*.py")):
        tree = ast.parse(path.read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert not classes, f"workers/{path.name} defines {classes}: runtime classes belong in pipeline/"
        others = {i for i in _imports(path) if ".".join(i.split(".")[:2]) in commands}
        assert not others, f"workers/{path.name} imports {others}"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_WORKER_LINES, \
            f"workers/{path.name} has {lines} lines (at most {MAX_WORKER_LINES}): move the job to pipeline/jobs/"
