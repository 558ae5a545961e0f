"""The pytest fixture `golden_check`: hold a model to its golden from your own test suite.

    def test_my_pass_keeps_the_golden(golden_check):
        golden_check("tiny-llama", "tests/golden", pass_files=["my_passes.py"])

It compiles the model (with your passes), drives every stage like the chip runtime and fails
the test with the per-stage table (and per-network errors) of graphopt.golden when a stage
leaves the golden. graphopt registers it with pytest (entry point `pytest11`), so a suite that
has graphopt installed has the fixture. Record the golden first: `graphopt golden record MODEL`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def golden_check():
    """golden_check(model, directory, pass_files=..., target=..., seq_length=...): fail unless every stage gives the golden."""
    def check(model: str, directory: str | Path = "tests/golden", *, pass_files=(), insert_after: str | None = None,
              insert_before: str | None = None, **options):
        from graphopt.golden import check as check_golden
        from graphopt.plugins import PassPlugins

        plugins = PassPlugins(tuple(str(f) for f in pass_files), insert_after, insert_before)
        report = check_golden(model, Path(directory), plugins=plugins, **options)
        if not report.ok:
            pytest.fail(report.table(), pytrace=False)
        return report

    return check
