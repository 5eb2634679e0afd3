import pytest

from .launch import run_torchrun


@pytest.fixture(scope="session")
def zero3_runs(tmp_path_factory):
    """zero3_worker.py's cases in one 2-process launch (CI time): {"mode:ep": rank 0's results}."""
    return run_torchrun("zero3_worker.py", ["--cases", "autoep:1,autoep:2,a2a:2"], tmp_path_factory.mktemp("zero3"),
                        timeout=400)
