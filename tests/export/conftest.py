"""The export tests use the shared tiny run (`trained_run`, `loaded` in tests/conftest.py)."""

import pytest


@pytest.fixture(scope="session")
def export_run(trained_run):
    return trained_run
