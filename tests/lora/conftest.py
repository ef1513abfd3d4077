import pytest


@pytest.fixture(autouse=True)
def _threads(torch_threads):
    """Every test here runs single-threaded (see tests/conftest.py::torch_threads)."""
