"""The code's shape, held by tests: no import cycles in graphopt, the runtime importable without torch,
the network contract's names spelled in one module, every built-in pipeline in an order its passes'
requires/ensures accept."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt import contract
from graphopt.pass_manager import STAGES, check_order, get_pass
from graphopt.targets import TARGET_NAMES, get_target

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (pyproject's package-dir).
PACKAGES = {"graphopt": REPO / "graphopt", "graphopt.passes": REPO / "passes", "graphopt.targets": REPO / "targets"}
# Imports that load plugins by name: the pass registry imports the packages that register passes.
PLUGIN_LOADING = {("graphopt.pass_manager", "graphopt.passes"), ("graphopt.pass_manager", "graphopt.targets")}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, root in sorted(PACKAGES.items(), key=lambda p: -len(p[1].parts)):
        for path in root.rglob("*.py"):
            if path.name.endswith("_test.py") or "/." in str(path):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            modules.setdefault(name, path)
    # The worker scripts run under the toolchain's Python and import nothing of graphopt.
    return {n: p for n, p in modules.items() if not n.endswith(("sim_worker", "top_passes.run", "cmodel_device"))}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every graphopt module `module` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_graphopt_has_no_import_cycle():
    """Checked on the source (module-level and function-level imports alike), not by importing it."""
    modules = _modules()
    edges = {m: _imports(p, m, set(modules)) - {t for f, t in PLUGIN_LOADING if f == m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how a package is made, not a cycle.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_runtime_imports_without_torch():
    probe = "import sys, graphopt.runtime, graphopt.targets.pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _contract_names() -> set[str]:
    names = {v for k, v in vars(contract).items() if k.isupper() and isinstance(v, str)} - {contract.MASK_VALUE}
    for spec in (*contract.LLAMA3_1_DEMO.networks, *contract.ENCODER_DECODER.networks):
        names |= {spec.name, *spec.inputs, *spec.outputs, spec.name.replace("{layer}", "")}
    return names


def _string_literals(path: Path):
    """String constants that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_contract_names_appear_in_one_module():
    names = _contract_names()
    # (the model layer speaks transformers' names, some of which are also the contract's: model.encoder)
    spelled = [f"{path.relative_to(REPO)}:{line} {value!r}" for name, path in _modules().items()
               if name != "graphopt.contract" and not name.startswith("graphopt.models")
               for line, value in _string_literals(path) if value in names]
    assert not spelled, "contract names spelled outside graphopt/contract.py:\n" + "\n".join(spelled)


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_every_built_in_pipeline_is_in_an_order_its_passes_accept(target):
    built = get_target(target)
    for stage in STAGES:
        pipeline = built.pipeline(stage)
        check_order(pipeline, stage)  # raises on a pass whose requires no earlier pass ensures
        assert all(get_pass(name).stage == stage for name in pipeline)


def test_the_order_rules_the_pipeline_comments_state_are_requires():
    """What targets/pipeline.py's comments say must come before what, as requires/ensures."""
    def before(first: str, then: str) -> bool:
        return bool(set(get_pass(first).ensures) & set(get_pass(then).requires))

    assert before("strip-trace-noise", "views-to-reshapes")
    assert before("views-to-reshapes", "attention-canonical")
    assert before("cross-kv-inputs", "fixed-mask") and before("cross-kv-inputs", "kv-layout")
    assert before("fixed-mask", "clamp-mask") and before("kv-layout", "concat-cache")
    assert before("concat-cache", "attention-lower") and before("attention-lower", "export-legalize")
    assert before("onnx-simplify", "onnx-tidy")
