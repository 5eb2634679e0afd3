import os

import pytest


@pytest.fixture(scope="session")
def runtime():
    """One single-process gloo group for every in-process trainer test: DeepSpeed caches its
    groups on the world group, so it must not be torn down and created again in one process."""
    from qvl_train.parallel.runtime import init_runtime, shutdown

    env = dict(os.environ)
    rt = init_runtime("gloo")
    yield rt
    shutdown()
    os.environ.clear()
    os.environ.update(env)

