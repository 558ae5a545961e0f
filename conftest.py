"""Shared pytest set-up: tests never reach a model hub."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tools():
    """TPU-MLIR, as the README's install command sets it up; the tests that take it fail without it."""
    from graphopt.errors import GraphoptError
    from graphopt.targets.bm1684x import toolchain

    try:
        return toolchain.require()
    except GraphoptError as error:
        pytest.fail(f"this test needs TPU-MLIR: {error}")
