"""Mutation testing of the core modules with mutmut, in a private copy of the repository.

    .venv/bin/python tests/mutation/mutate.py offsets envelope      # some modules
    .venv/bin/python tests/mutation/mutate.py --all --minutes 20    # every module, at most 20 minutes each
    .venv/bin/python tests/mutation/mutate.py metrics --only 'pipeline.evaluation.metrics.x_f1_max*'   # one function

For each module the working tree is copied to a temporary folder (the tree itself is never touched), a
`[tool.mutmut]` section naming the module and the tests that claim it is added to the copy's
pyproject.toml, and `mutmut run` mutates the module one change at a time and runs the covering tests
against each mutant. Printed per module: mutants killed / total (the score) and each survivor as a
diff (`mutmut show NAME` in the copy, which is kept: its path is printed). A survivor is either an
equivalent mutant (say why in the review) or a missing test (add one). Not part of CI: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# module -> (files to mutate, tests that make claims about them, mutant-name globs: the functions in scope)
MODULES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "anoclip": (["pipeline/model/anoclip.py"],
                ["tests/unit/test_scorer.py", "tests/unit/test_claims_scorer.py", "tests/unit/test_tiling_reference.py",
                 "tests/unit/test_properties.py"], []),
    "offsets": (["pipeline/streaming/offsets.py"],
                ["tests/unit/test_offsets.py", "tests/unit/test_claims_offsets.py", "tests/unit/test_properties.py",
                 "tests/unit/test_worker_rebalance.py", "tests/unit/test_claims_worker.py"], []),
    "envelope": (["pipeline/streaming/envelope.py"],
                 ["tests/unit/test_envelope.py", "tests/unit/test_claims_envelope.py", "tests/unit/test_properties.py"],
                 []),
    "thresholds": (["pipeline/inspection/thresholds.py"],
                   ["tests/unit/test_thresholds.py", "tests/unit/test_claims_thresholds.py",
                    "tests/unit/test_properties.py", "tests/unit/test_claims_worker.py"], []),
    "metrics": (["pipeline/evaluation/metrics.py"],
                ["tests/unit/test_metrics.py", "tests/unit/test_claims_metrics.py", "tests/unit/test_properties.py"],
                []),
    "adapter_files": (["pipeline/adaptation/tta/files.py"],
                      ["tests/unit/test_adapter_files.py", "tests/unit/test_claims_adapter_files.py",
                       "tests/unit/test_claims_gate.py"], []),
    "registry": (["pipeline/adaptation/registry.py"],
                 ["tests/integration/test_registry_claims.py", "tests/integration/test_registry_races.py",
                  "tests/integration/test_adapter_claims.py"], []),
}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(module: str, root: Path) -> Path:
    files, tests, _ = MODULES[module]
    copy = root / module
    ignore = shutil.ignore_patterns(".venv", ".git", ".kafka", ".stack", "mutants", "test-output", "__pycache__",
                                    "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis")
    shutil.copytree(REPO, copy, ignore=ignore)
    pyproject = copy / "pyproject.toml"
    text = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", pyproject.read_text())
    pyproject.write_text(text + "\n[tool.mutmut]\n"
                         'source_paths = ["pipeline"]\n'
                         f"only_mutate = {_toml_list(files)}\n"
                         f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
                         'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
                         'process_isolation = "forkserver"\n')
    return copy


def run(module: str, root: Path, minutes: float, children: int, only: list[str] | None = None) -> dict[str, object]:
    copy = prepare(module, root)
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutation", "OMP_NUM_THREADS": "1",
           "ANOCLIP_TANSU_CACHE": str(REPO / ".kafka"), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    t0 = time.monotonic()
    scope = only or MODULES[module][2]
    proc = subprocess.Popen([str(VENV_BIN / "mutmut"), "run", "--max-children", str(children), *scope], cwd=copy,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        log, _ = proc.communicate(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        log, _ = proc.communicate()
    (copy / "mutmut-run.log").write_text(log or "")
    res = subprocess.run([str(VENV_BIN / "mutmut"), "results", "--all", "true"], cwd=copy, env=env,
                         capture_output=True, text=True)
    status: dict[str, str] = {}
    for line in res.stdout.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and name:
            status[name] = state
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    # "no tests": no test even runs the mutated function, so nothing would notice it: counted as a survivor
    judged = {k: v for k, v in status.items() if v in ("killed", "survived", "timeout", "suspicious", "no tests")}
    killed = sum(1 for v in judged.values() if v in ("killed", "timeout"))
    survivors = sorted(k for k, v in status.items() if v in ("survived", "no tests", "suspicious"))
    diffs = {}
    for name in survivors:
        shown = subprocess.run([str(VENV_BIN / "mutmut"), "show", name], cwd=copy, env=env, capture_output=True,
                               text=True)
        diffs[name] = "\n".join(x for x in shown.stdout.splitlines() if x.startswith(("+", "-")) and
                                not x.startswith(("+++", "---")))
    return {"module": module, "copy": str(copy), "minutes": round((time.monotonic() - t0) / 60, 1),
            "timed_out": timed_out, "counts": counts, "killed": killed, "judged": len(judged),
            "score": round(killed / len(judged), 3) if judged else None, "survivors": diffs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"of {', '.join(MODULES)}")
    parser.add_argument("--all", action="store_true", help="every module in MODULES")
    parser.add_argument("--minutes", type=float, default=10.0, help="time limit per module")
    parser.add_argument("--children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", action="append", metavar="GLOB",
                        help="only mutants whose name matches (repeatable), e.g. "
                             "'pipeline.evaluation.metrics.x_f1_max*' to re-check one function's survivors; "
                             "the score then covers those mutants only")
    args = parser.parse_args()
    modules = list(MODULES) if args.all else args.modules
    if not modules or set(modules) - set(MODULES):
        parser.error(f"name modules of {', '.join(MODULES)}, or pass --all")
    root = Path(tempfile.mkdtemp(prefix="anoclip-mutation-"))
    results = []
    for m in modules:
        r = run(m, root, args.minutes, args.children, args.only)
        results.append(r)
        partial = " (time limit hit: partial)" if r["timed_out"] else ""
        print(f"{m}: {r['killed']}/{r['judged']} killed = {r['score']}{partial} in {r['minutes']} min; {r['counts']}",
              flush=True)
        for name, diff in r["survivors"].items():  # type: ignore[union-attr]
            print(f"  survived {name}:\n    " + diff.replace("\n", "\n    "), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"copies kept under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
